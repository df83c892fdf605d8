"""Training of medXGAN (Dravid et al. 2022), declared for ``explainers.training.fit``.

Against a frozen classifier f (its logit, shifted by logit(threshold) so that
"negative" means below the bundle's decision threshold). Each step draws a class
c ~ Bernoulli(1/2) per sample, z1 ~ N(0, I), and z2 = 0 for c = 0, z2 ~ N(0, I) for c = 1:

    D step   hinge:  relu(1 - D(x)) + relu(1 + D(G(z)))
    G step   w_cls * BCE(f(up(G(z))) - t -+ m, c)      one sigmoid on the one logit
           - w_gan * D(G(z))
           + w_walk * BCE(f(x'), 1 - yhat) + w_prox * L1_lung(x', x)  the walk on real images
    E step   w_lat * MSE(E(G(z)), z)                    codes of generated images
           + w_rec * [L1 + MSE](G(E(x)), x)             real images (G frozen here)

The last two terms are not in the paper, nor is L1_lung: change outside the lung
fields costs 1 + w_out times more (explainers.lesions.lung_weighted_l1). x' = x + up(G(z1, z2') - G(z1, z2)) is the
counterfactual the explainer shows for a real image x, with (z1, z2) = E(x) and
z2' = 0 where the classifier calls x positive (yhat = 1), z2' = z2 + N(0, I) where it
calls it negative. Without them the generator learned to make its *own* images
cross the threshold, but the same latent walk added to a real radiograph barely
moved the classifier: after two epochs on the full training split not one positive
call of the validation sample flipped (negative calls did). These terms train the
property the method relies on, "moving z2 changes what the classifier cares
about", where it is used.

D and E see the generator's working size (real images are area-resampled to it); the
classifier sees G's image bilinearly resampled to its input size. The encoder is
the fast inversion route: trained alongside G, it replaces the official code's
5,000 Adam steps from z = 0 with E(x) plus a short refinement.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainers._helpers import to_working
from explainers.base import threshold_logit
from explainers.lesions import lung_weighted_l1
from explainers.medxgan import ANATOMY_DIM, PATHOLOGY_DIM, MedxganEncoder, MedxganExplainer, MedxganGenerator, to_input
from explainers.networks import PatchCritic
from explainers.training import AdversarialTrainer, TrainingSettings, adam, explainer_parameter, from_bundle, option
from explainers.validity import evaluate_explainer


@dataclass
class MedxganLossWeights:
    classification: float = 1.0
    adversarial: float = 1.0
    walk: float = 1.0  # the latent walk, added to real images, crosses the threshold (not in the paper)
    proximity: float = 1.0  # ... with an L1 cost on the change it makes
    outside_lungs: float = option(4.0, "walk proximity outside the lung fields costs 1 + this times more "
                                       "(explainers.lesions.lung_weighted_l1; 0: plain L1, as in v1)")
    latent: float = 1.0  # encoder: codes of generated images
    reconstruction: float = 1.0  # encoder: real images through the frozen generator


@dataclass
class MedxganTrainingConfig(TrainingSettings):
    batch_size: int = 32
    learning_rate: float = option(2e-4, "Adam learning rate of the generator and the encoder")
    discriminator_learning_rate: float = 2e-4
    size: int = option(64, "side of the generated images (multiple of 16); their change is upsampled to the "
                           "bundle's input size")
    width: int = option(16, "generator widths (8w, 4w, 2w, w); the encoder mirrors them")
    anatomy_dim: int = option(ANATOMY_DIM, "size of the anatomy code z1")
    pathology_dim: int = option(PATHOLOGY_DIM, "size of the pathology code z2")
    threshold: float = from_bundle(0.5)  # the bundle's decision threshold on P(positive)
    margin: float = option(1.0, "logits by which generated images must sit on their class's side")
    weights: MedxganLossWeights = field(default_factory=MedxganLossWeights)
    validation_images: int = 32  # per-epoch selection runs the explainer on this many validation images
    # The explainer's parameters, stored in bundle.yaml (config may override them).
    inversion: str = explainer_parameter("encoder", "inversion route: encoder (fast) | optimise (official)")
    inversion_steps: int = explainer_parameter(30, "encoder route: refinement Adam steps at most")
    official_steps: int = explainer_parameter(5000, "optimise route: Adam steps from z = 0")
    inversion_learning_rate: float = explainer_parameter(0.02, "Adam learning rate of the inversion",
                                                         name="learning_rate")
    tolerance: float = explainer_parameter(1e-3, "inversion: relative improvement that counts")
    patience: int = explainer_parameter(10, "inversion: steps without improvement before stopping")
    probability_weight: float = explainer_parameter(0.1, "inversion: weight of matching the classifier's "
                                                         "probability")
    negative_scale: float = explainer_parameter(1.0, "length of the walk for cases called negative, in "
                                                     "sqrt(dim z2)")
    walk: str = explainer_parameter("zero", "end of the latent walk: zero (the paper's z2 -> 0) | search "
                                            "(per image, the smallest lung-weighted change that flips)")
    search_steps: int = explainer_parameter(200, "walk search: Adam steps at most before the crossing")
    search_learning_rate: float = explainer_parameter(0.05, "walk search: Adam learning rate")
    search_patience: int = explainer_parameter(1000, "walk search: steps without improvement before stopping")
    refine_steps: int = explainer_parameter(100, "walk search: Adam steps after the crossing")
    walk_margin: float = explainer_parameter(1.0, "walk search: logits by which the end must cross the "
                                                  "threshold", name="margin")
    walk_similarity: float = explainer_parameter(8.0, "walk search: weight of the lung-weighted mean "
                                                      "|G(z*) - G(z)|", name="similarity_weight")
    walk_outside_lungs: float = explainer_parameter(8.0, "walk search: change outside the lung fields costs "
                                                         "1 + this times more", name="outside_lungs")
    steps: int = explainer_parameter(8, "images on the latent walk")
    ig_steps: int = explainer_parameter(32, "medxgan_ig: trapezoid steps of the integrated gradients")
    smoothing_sigma: float = explainer_parameter(2.0, "Gaussian smoothing of the saliency map, pixels")


class MedxganTrainer(AdversarialTrainer):
    """Generator, encoder and patch critic against a frozen ``classifier``."""

    name = "medxgan"
    settings_class = MedxganTrainingConfig
    best_parts = ("generator", "encoder")
    progress_keys = ("loss_g", "loss_d", "loss_e", "train_class_rate")

    def __init__(self, settings: MedxganTrainingConfig, generator: MedxganGenerator, encoder: MedxganEncoder,
                 classifier: nn.Module, train_images: torch.Tensor, val_images: torch.Tensor, *,
                 discriminator: nn.Module | None = None):
        super().__init__(settings, generator, classifier, train_images, val_images, discriminator=discriminator)
        s = settings
        self.encoder = encoder.to(self.device)
        self.opt_e = adam(encoder, s.learning_rate, s.betas)
        self.offset = threshold_logit(s.threshold)
        self.input_shape = tuple(train_images.shape[-2:])
        # A seeded random sample: the validation split is sorted by class, its first images are one class.
        pick = torch.randperm(len(val_images), generator=torch.Generator().manual_seed(s.seed))
        self.selection_images = val_images[pick[:s.validation_images].sort().values]

    @property
    def selection(self) -> str:  # type: ignore[override]
        return (f"highest flip rate of the explainer on a seeded sample of {self.settings.validation_images} "
                "validation images; ties: lowest inversion L1")

    def default_discriminator(self, generator: nn.Module) -> nn.Module:
        return PatchCritic(in_channels=generator.in_channels)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "encoder": self.encoder}

    def parts(self) -> dict[str, Any]:
        return {**super().parts(), "encoder": self.encoder, "opt_e": self.opt_e}

    def _real_walk(self, x: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE towards the other class, L1 change) of the walk the explainer shows for real x."""
        g, margin = self.generator, self.settings.margin
        with torch.no_grad():
            z1, z2 = g.split(self.encoder(real))
            called = (self.classifier(x).reshape(-1).float() - self.offset >= 0).float()
            end = torch.where(called[:, None] > 0, torch.zeros_like(z2), z2 + torch.randn_like(z2))
        start = torch.cat([z1, z2], dim=1)
        change = g(torch.cat([z1, end], dim=1)) - g(start)
        shown = (x + to_input(change, self.input_shape)).clamp(0.0, 1.0)
        wanted = 1.0 - called
        logits = self.classifier(shown).reshape(-1).float() - self.offset
        return (F.binary_cross_entropy_with_logits(logits - margin * (2.0 * wanted - 1.0), wanted),
                lung_weighted_l1(shown, x, self.settings.weights.outside_lungs))

    def step(self, x: torch.Tensor) -> tuple[dict[str, float], int]:
        s, w, g, n = self.settings, self.settings.weights, self.generator, len(x)
        real = to_working(x, g.size)
        wanted = torch.randint(0, 2, (n,), device=self.device).float()
        z1 = torch.randn(n, g.anatomy_dim, device=self.device)
        z2 = torch.randn(n, g.pathology_dim, device=self.device) * wanted[:, None]
        z = torch.cat([z1, z2], dim=1)
        fake = g(z)

        self.discriminator.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = F.relu(1.0 - self.discriminator(real)).mean() + F.relu(1.0 + self.discriminator(fake.detach())).mean()
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        logits = self.classifier(to_input(fake, self.input_shape)).reshape(-1).float() - self.offset
        cls = F.binary_cross_entropy_with_logits(logits - s.margin * (2.0 * wanted - 1.0), wanted)
        gan = -self.discriminator(fake).mean()
        walk, prox = self._real_walk(x, real)
        loss_g = w.classification * cls + w.adversarial * gan + w.walk * walk + w.proximity * prox
        loss_g.backward()
        self.opt_g.step()

        g.requires_grad_(False)
        self.opt_e.zero_grad(set_to_none=True)
        latent = F.mse_loss(self.encoder(fake.detach()), z)
        rebuilt = g(self.encoder(real))
        rec = F.l1_loss(rebuilt, real) + F.mse_loss(rebuilt, real)
        loss_e = w.latent * latent + w.reconstruction * rec
        loss_e.backward()
        self.opt_e.step()
        g.requires_grad_(True)
        with torch.no_grad():
            class_rate = float(((logits >= 0).float() == wanted).float().mean())
        return {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "loss_e": loss_e.item(),
                "classification": cls.item(), "gan": gan.item(), "walk": walk.item(),
                "walk_proximity": prox.item(), "latent": latent.item(), "reconstruction": rec.item(),
                "train_class_rate": class_rate}, n

    def explainer(self) -> MedxganExplainer:
        # Validated with the difference map; the medxgan_ig-only settings (ig_steps) are not its own.
        parameters = {k: v for k, v in self.settings.explainer_parameters().items()
                      if k in MedxganExplainer.parameter_names()}
        return MedxganExplainer(generator=self.generator, encoder=self.encoder, threshold=self.settings.threshold,
                                **parameters)

    def validate(self) -> dict[str, float]:
        metrics = evaluate_explainer(self.explainer(), self.classifier, self.selection_images, device=self.device)
        self.generator.requires_grad_(True)  # the explainer froze them for its searches
        self.encoder.requires_grad_(True)
        return metrics

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return (round(metrics["flip_rate"], 3), -metrics["inversion_l1"])

    # -- the bundle ------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, settings, bundle, classifier, splits) -> "MedxganTrainer":
        spec, w, channels = bundle.spec, settings.width, bundle.spec.input.channels
        settings = dataclasses.replace(settings, threshold=spec.task.threshold)
        torch.manual_seed(settings.seed)
        widths = (8 * w, 4 * w, 2 * w, w)
        generator = MedxganGenerator(anatomy_dim=settings.anatomy_dim, pathology_dim=settings.pathology_dim,
                                     widths=widths, size=settings.size, in_channels=channels)
        encoder = MedxganEncoder(latent_dim=generator.latent_dim, widths=tuple(reversed(widths)), size=settings.size,
                                 in_channels=channels)
        return cls(settings, generator, encoder, classifier, splits["train"].images, splits["val"].images,
                   discriminator=PatchCritic(in_channels=channels))

    def test(self, classifier, images, on_batch=None) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), classifier, images, device=self.device, on_batch=on_batch)

    def bundle_parameters(self) -> dict[str, Any]:
        return {"architecture": "medxplain.MedxganGenerator (MONAI Generator, instance norm, sigmoid) + "
                                "MedxganEncoder (MONAI Regressor)",
                "network": self.generator.config(), "encoder_network": self.encoder.config(),
                **self.settings.explainer_parameters(), "loss_weights": dataclasses.asdict(self.settings.weights),
                "margin_logits": self.settings.margin}

    def bundle_training(self) -> dict[str, Any]:
        return {"discriminator": "MONAI PatchDiscriminator, 32 channels, 3 layers, instance norm, hinge loss",
                "targets": "class drawn 50/50 per generated sample: z2 = 0 -> below the threshold by the margin, "
                           "z2 ~ N(0, I) -> above it (the classifier's decision, not the labels)"}
