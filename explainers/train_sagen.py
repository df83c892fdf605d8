"""Training of the similar/adversarial generator (Charachon et al. 2020), declared for
``explainers.training.fit``.

Against a frozen classifier and its own thresholded decisions (never the labels):

    D step   hinge:  relu(1 - D(x)) + relu(1 + D(S(x))) + relu(1 + D(A(x)))
    G step   w_cls  * [BCE(f(S(x)) - t, yhat) + BCE(f(A(x)) - t -+ m, 1 - yhat)]
           + w_rec  * [L1(S(x), x) + L2(S(x), x)]
           + w_prox * L1_lung(A(x), x)       change outside the lung fields costs 1 + w_out more
           + w_cyc  * L1(A(A(x, yhat), 1 - yhat), x)      conditional generators only
           - w_gan  * [D(S(x)) + D(A(x))] / 2

with yhat = [f(x) >= threshold] on the *augmented* x and t = logit(threshold), so
"classified like x" means on the same side of the bundle's decision threshold; the
adversarial head must cross it by a margin of m logits. With ``conditional`` the
generator also gets yhat as an input channel: S(x) = G_s(x, yhat), A(x) = G_a(x, yhat);
the cycle term (Charachon et al. 2021, the cyclic approximation) asks that the opposite call
undoes the change, which a change the classifier merely reacts to, unrelated to what makes
the image positive, cannot satisfy in both directions at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainers._helpers import as_float, frozen, to_working, working_size
from explainers.base import threshold_logit
from explainers.lesions import lung_weighted_l1
from explainers.networks import PatchCritic
from explainers.sagen import SagenExplainer, SagenGenerator
from explainers.training import AdversarialTrainer, TrainingSettings, explainer_parameter, from_bundle, option
from explainers.validity import evaluate_explainer


@dataclass
class SagenLossWeights:
    classification: float = 1.0  # each head, BCE on logits shifted by logit(threshold)
    reconstruction: float = 10.0  # similar head: L1 + L2 to the input
    proximity: float = option(2.0, "weight of L1(A(x), x): higher keeps the counterfactual closer to the input, "
                                   "lower flips more decisions")  # 5 left test NORMAL->PNEUMONIA at 70% flips
    adversarial: float = 0.1  # realism: hinge generator loss, both heads
    outside_lungs: float = option(4.0, "proximity outside the lung fields costs 1 + this times more "
                                       "(explainers.lesions.lung_weighted_l1; 0: plain L1, as in v1)")
    cycle: float = option(0.0, "weight of L1(A(A(x)), x) with the opposite call (conditional generators "
                               "only; Charachon et al. 2021): the change must be undone by the reverse one")


@dataclass
class SagenTrainingConfig(TrainingSettings):
    size: int = option(64, "side the generator works at (multiple of 16); its change is upsampled to the "
                           "bundle's input size")
    width: int = option(16, "U-Net base width: features (w, 2w, 4w, 8w, 16w, w)")
    conditional: bool = option(False, "give the generator the classifier's call as an input channel (Charachon "
                                      "et al. 2021); for findings too small to infer the call from the image")
    discriminator_learning_rate: float = 2e-4
    threshold: float = from_bundle(0.5)  # the bundle's decision threshold on P(positive)
    weights: SagenLossWeights = field(default_factory=SagenLossWeights)
    # Weight each case's classification losses by the inverse frequency of the class the
    # classifier called (74% of Kermany train is pneumonia): without it the adversarial
    # head first learns one universal "make it normal" change and neglects the minority.
    balance_classes: bool = True
    # The adversarial head must cross the threshold by this many logits, not just reach
    # it: counterfactuals that stop right at the threshold flip on validation but not
    # on a shifted test set (Kermany's test split is).
    margin: float = option(1.0, "logits by which the adversarial image must cross the threshold")
    steps: int = explainer_parameter(1, "images on the path S(x) -> A(x) the explainer shows")
    smoothing_sigma: float = explainer_parameter(2.0, "Gaussian smoothing of the saliency map, pixels")
    ig_steps: int = explainer_parameter(32, "sagen_ig: Gauss-Legendre steps of the integrated gradients "
                                            "from A(x) to x")


@torch.no_grad()
def called_positive_fraction(classifier: nn.Module, images: torch.Tensor, threshold: float, *,
                             batch_size: int = 64, device: str = "cpu") -> float:
    """Fraction of images (N, C, H, W) the classifier calls positive at ``threshold``."""
    positive = 0.0
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        positive += float((torch.sigmoid(classifier(x).reshape(-1).float()) >= threshold).sum())
    return positive / max(len(images), 1)


class SagenTrainer(AdversarialTrainer):
    """Both heads of ``generator`` against a frozen ``classifier`` (logit of the positive class)."""

    name = "sagen"
    settings_class = SagenTrainingConfig
    best_parts = ("generator",)
    selection = "highest validation flip rate; ties: lowest |S-x| + |A-x|"
    progress_keys = ("loss_g", "loss_d", "train_flip_rate")

    def __init__(self, settings: SagenTrainingConfig, generator: SagenGenerator, classifier: nn.Module,
                 train_images: torch.Tensor, val_images: torch.Tensor, *, discriminator: nn.Module | None = None):
        """Raises ValueError for a cycle weight with an unconditional generator."""
        if settings.weights.cycle and not generator.conditional:
            raise ValueError("the sagen cycle term needs a conditional generator (--conditional): an "
                             "unconditional one cannot be asked for the opposite change")
        super().__init__(settings, generator, classifier, train_images, val_images, discriminator=discriminator)
        s = settings
        self.offset = threshold_logit(s.threshold)
        with frozen(self.classifier):
            self.positive_fraction = called_positive_fraction(classifier, train_images, s.threshold,
                                                              device=self.device)
        floor = 1.0 / max(len(train_images), 1)
        self.class_weight = ((0.5 / max(1.0 - self.positive_fraction, floor), 0.5 / max(self.positive_fraction, floor))
                             if s.balance_classes else (1.0, 1.0))

    def default_discriminator(self, generator: nn.Module) -> nn.Module:
        return PatchCritic(in_channels=generator.in_channels)

    def critic(self, images: torch.Tensor) -> torch.Tensor:
        # The discriminator looks at the generator's working resolution.
        return self.discriminator(to_working(images, self.generator.size))

    def step(self, x: torch.Tensor) -> tuple[dict[str, float], int]:
        s, w, n = self.settings, self.settings.weights, len(x)
        with torch.no_grad():
            called = (self.classifier(x).reshape(-1) - self.offset >= 0).float()
        similar, adversarial = self.generator(x, called)
        fakes = torch.cat([similar, adversarial])

        self.discriminator.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = F.relu(1.0 - self.critic(x)).mean() + F.relu(1.0 + self.critic(fakes.detach())).mean()
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        logits = self.classifier(fakes).reshape(-1) - self.offset
        weight = torch.where(called > 0, self.class_weight[1], self.class_weight[0])
        cls_s = F.binary_cross_entropy_with_logits(logits[:n], called, weight=weight)
        wanted = 1.0 - called
        cls_a = F.binary_cross_entropy_with_logits(logits[n:] - s.margin * (2.0 * wanted - 1.0), wanted,
                                                   weight=weight)
        rec = F.l1_loss(similar, x) + F.mse_loss(similar, x)
        prox = lung_weighted_l1(adversarial, x, w.outside_lungs)
        gan = -self.critic(fakes).mean()
        cycle = F.l1_loss(self.generator(adversarial, 1.0 - called)[1], x) if w.cycle else torch.zeros(())
        loss_g = (w.classification * (cls_s + cls_a) + w.reconstruction * rec + w.proximity * prox
                  + w.cycle * cycle + w.adversarial * gan)
        loss_g.backward()
        self.opt_g.step()
        with torch.no_grad():
            flips = float(((logits[n:] >= 0).float() != called).float().mean())
        return {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "cls_similar": cls_s.item(),
                "cls_adversarial": cls_a.item(), "reconstruction": rec.item(), "proximity": prox.item(),
                "gan": gan.item(), "cycle": cycle.item(), "train_flip_rate": flips}, n

    def explainer(self) -> SagenExplainer:
        # Validated with |S - A|; the sagen_ig-only settings (ig_steps) are not its own.
        parameters = {k: v for k, v in self.settings.explainer_parameters().items()
                      if k in SagenExplainer.parameter_names()}
        return SagenExplainer(generator=self.generator, threshold=self.settings.threshold, **parameters)

    def validate(self) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), self.classifier, self.val_images,
                                  batch_size=max(self.settings.batch_size, 64), device=self.device, ssim=False)

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return (metrics["flip_rate"], -(metrics["similar_l1"] + metrics["proximity_l1"]))

    # -- the bundle ------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, settings, bundle, classifier, splits) -> "SagenTrainer":
        spec, w = bundle.spec, settings.width
        settings = dataclasses.replace(settings, threshold=spec.task.threshold)
        torch.manual_seed(settings.seed)
        generator = SagenGenerator(features=(w, 2 * w, 4 * w, 8 * w, 16 * w, w), in_channels=spec.input.channels,
                                   size=working_size(settings.size, max(spec.input.size), 16),
                                   conditional=settings.conditional)
        return cls(settings, generator, classifier, splits["train"].images, splits["val"].images,
                   discriminator=PatchCritic(in_channels=spec.input.channels))

    def test(self, classifier, images, on_batch=None) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), classifier, images, batch_size=64, device=self.device,
                                  on_batch=on_batch)

    def bundle_parameters(self) -> dict[str, Any]:
        return {"architecture": "medxplain.SagenGenerator (MONAI BasicUNet, two residual heads)",
                "network": self.generator.config(), **self.settings.explainer_parameters(),
                "loss_weights": dataclasses.asdict(self.settings.weights), "margin_logits": self.settings.margin}

    def bundle_training(self) -> dict[str, Any]:
        return {"discriminator": "MONAI PatchDiscriminator, 32 channels, 3 layers, instance norm, hinge loss",
                "targets": "classifier's own thresholded predictions on the augmented input (not the labels)",
                "balance_classes": self.settings.balance_classes,
                "called_positive_fraction": round(self.positive_fraction, 4)}
