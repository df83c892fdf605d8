"""Training of the progressive-exaggeration generator (Singla et al. 2021/2023), declared
for ``explainers.training.fit``.

Against a frozen classifier f (its logit; k_x = bin of f(x), k a requested bin,
c_k its centre):

    D step   hinge:  relu(1 - D(x, k_x)) + relu(1 + D(G(x, k), k))
    G step   w_cls  * BCE(f(G(x, k)), c_k)                 classifier consistency
           + w_rec  * L1(G(x, k_x), x)                      reconstruction
           + w_cyc  * L1(G(G(x, k), k_x), x)                cycle
           + w_prox * L1_lung(G(x, k), x)                   keep anatomy and devices: change outside
                                                            the lung fields costs 1 + w_out more
           - w_gan  * D(G(x, k), k)

Requested bins are drawn uniformly, so every posterior is trained even though the
classifier's own posteriors pile up near 0 and 1. The proximity term is not in the
paper (whose generator re-synthesises the image); with a residual generator it is
what keeps the change to what the classifier needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainers._helpers import to_working, working_size
from explainers.exaggeration import ConditionalGenerator, ExaggerationExplainer, ProjectionCritic, bin_centre, bin_of
from explainers.lesions import lung_weighted_l1
from explainers.training import AdversarialTrainer, TrainingSettings, explainer_parameter, from_bundle, option
from explainers.validity import evaluate_explainer


@dataclass
class ExaggerationLossWeights:
    classification: float = 1.0
    reconstruction: float = 10.0
    cycle: float = 5.0
    proximity: float = 1.0
    adversarial: float = 0.1
    outside_lungs: float = option(4.0, "proximity outside the lung fields costs 1 + this times more "
                                       "(explainers.lesions.lung_weighted_l1; 0: plain L1, as in v1)")


@dataclass
class ExaggerationTrainingConfig(TrainingSettings):
    epochs: int = option(8, "total epochs; a checkpoint in <bundle>/.checkpoints/exaggeration is resumed")
    size: int = option(64, "side the generator works at (multiple of 8); its change is upsampled to the "
                           "bundle's input size")
    width: int = option(16, "U-Net base width: widths (w, 2w, 4w, 8w)")
    bins: int = option(10, "posterior bins K the generator is conditioned on")
    discriminator_learning_rate: float = 2e-4
    threshold: float = from_bundle(0.5)  # the bundle's decision threshold on P(positive)
    weights: ExaggerationLossWeights = field(default_factory=ExaggerationLossWeights)
    steps: int = explainer_parameter(10, "images on the counterfactual path (the paper's K = 10 bins)")
    smoothing_sigma: float = explainer_parameter(2.0, "Gaussian smoothing of the saliency map, pixels")


class ExaggerationTrainer(AdversarialTrainer):
    """The conditional generator G(x, k) against a frozen ``classifier``."""

    name = "exaggeration"
    settings_class = ExaggerationTrainingConfig
    best_parts = ("generator",)
    selection = "highest validation flip rate of the sweep's end; ties: lowest posterior tracking error"
    progress_keys = ("loss_g", "loss_d", "train_tracking_mae")

    def __init__(self, settings: ExaggerationTrainingConfig, generator: ConditionalGenerator, classifier: nn.Module,
                 train_images: torch.Tensor, val_images: torch.Tensor, *,
                 discriminator: ProjectionCritic | None = None):
        super().__init__(settings, generator, classifier, train_images, val_images, discriminator=discriminator)

    def default_discriminator(self, generator: nn.Module) -> nn.Module:
        return ProjectionCritic(bins=generator.bins, in_channels=generator.in_channels)

    def critic(self, images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # The discriminator looks at the generator's working resolution.
        return self.discriminator(to_working(images, self.generator.size), k)

    def step(self, x: torch.Tensor) -> tuple[dict[str, float], int]:
        w, n, bins = self.settings.weights, len(x), self.generator.bins
        with torch.no_grad():
            own = bin_of(torch.sigmoid(self.classifier(x).reshape(-1).float()), bins)
        wanted = torch.randint(0, bins, (n,), device=self.device)
        # One generator call for the requested posterior and the reconstruction.
        fake, rebuilt = self.generator(torch.cat([x, x]), torch.cat([wanted, own])).split(n)
        cycled = self.generator(fake, own)

        self.discriminator.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = F.relu(1.0 - self.critic(x, own)).mean() + F.relu(1.0 + self.critic(fake.detach(), wanted)).mean()
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        logits = self.classifier(fake).reshape(-1).float()
        cls = F.binary_cross_entropy_with_logits(logits, bin_centre(wanted, bins))
        rec = F.l1_loss(rebuilt, x)
        cyc = F.l1_loss(cycled, x)
        prox = lung_weighted_l1(fake, x, w.outside_lungs)
        gan = -self.critic(fake, wanted).mean()
        loss_g = (w.classification * cls + w.reconstruction * rec + w.cycle * cyc + w.proximity * prox
                  + w.adversarial * gan)
        loss_g.backward()
        self.opt_g.step()
        with torch.no_grad():
            tracking = float((torch.sigmoid(logits) - bin_centre(wanted, bins)).abs().mean())
        return {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "classification": cls.item(),
                "reconstruction": rec.item(), "cycle": cyc.item(), "proximity": prox.item(),
                "gan": gan.item(), "train_tracking_mae": tracking}, n

    def explainer(self) -> ExaggerationExplainer:
        return ExaggerationExplainer(generator=self.generator, threshold=self.settings.threshold,
                                     **self.settings.explainer_parameters())

    def validate(self) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), self.classifier, self.val_images, device=self.device, ssim=False)

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return (round(metrics["flip_rate"], 3), -metrics["posterior_tracking_mae"])

    # -- the bundle ------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, settings, bundle, classifier, splits) -> "ExaggerationTrainer":
        spec, w = bundle.spec, settings.width
        settings = dataclasses.replace(settings, threshold=spec.task.threshold)
        torch.manual_seed(settings.seed)
        generator = ConditionalGenerator(widths=(w, 2 * w, 4 * w, 8 * w), bins=settings.bins,
                                         size=working_size(settings.size, max(spec.input.size), 1),
                                         in_channels=spec.input.channels)
        return cls(settings, generator, classifier, splits["train"].images, splits["val"].images,
                   discriminator=ProjectionCritic(bins=settings.bins, in_channels=spec.input.channels))

    def test(self, classifier, images, on_batch=None) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), classifier, images, device=self.device, on_batch=on_batch)

    def bundle_parameters(self) -> dict[str, Any]:
        return {"architecture": "medxplain.ConditionalGenerator (U-Net, conditional instance norm on the posterior "
                                "bin, residual output)",
                "network": self.generator.config(), **self.settings.explainer_parameters(),
                "loss_weights": dataclasses.asdict(self.settings.weights)}

    def bundle_training(self) -> dict[str, Any]:
        return {"discriminator": "projection discriminator with ordinal bin embedding, spectral norm, hinge loss",
                "targets": "requested posterior bins drawn uniformly; reconstruction at the bin of the classifier's "
                           "own posterior (not the labels)"}
