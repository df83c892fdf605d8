"""Training of the gvr autoencoder (Seah et al. 2018), declared for ``explainers.training.fit``.

The autoencoder learns from images alone, no labels and no classifier:

    loss = L1(D(E(x)), x) + w_mse * MSE(D(E(x)), x)      at the working size

on area-downsampled, randomly augmented images. Validation: reconstruction error on
the unaugmented validation images; the epoch with the lowest validation L1 is kept.
The explainer (a per-image latent search against the classifier) is scored after
training, on a seeded subset of the validation split and on the test split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainers._helpers import as_float, working_size
from explainers.gvr import DEFAULT_LATENT_CHANNELS, GvrAutoEncoder, GvrExplainer
from explainers.training import Trainer, TrainingSettings, adam, explainer_parameter, from_bundle, option
from explainers.validity import evaluate_explainer

EXPLAINED_VALIDATION_IMAGES = 128  # validation images the explainer is scored on (per-image search: a subset)
EVALUATION_BATCH = 32


@dataclass
class GvrTrainingConfig(TrainingSettings):
    epochs: int = option(30, "total epochs; a checkpoint in <bundle>/.checkpoints/gvr is resumed")
    learning_rate: float = option(1e-3, "Adam learning rate of the autoencoder")
    betas: tuple[float, float] = (0.9, 0.999)
    mse_weight: float = 1.0  # L1 + w * MSE: L1 keeps edges, MSE punishes the rare large errors
    size: int = option(64, "side the autoencoder works at (multiple of 8); its change is upsampled to the "
                           "bundle's input size")
    width: int = option(32, "encoder base width: widths (w, 2w, 4w)")
    latent_channels: int = option(DEFAULT_LATENT_CHANNELS, "channels of the (size/8 x size/8) latent")
    threshold: float = from_bundle(0.5)  # the bundle's decision threshold (the explainer's)
    # The explainer's parameters, stored in bundle.yaml (editable there without retraining).
    mode: str = explainer_parameter("optimise", "latent search: optimise | gradient_shift")
    steps: int = explainer_parameter(5, "images on the counterfactual path")
    search_steps: int = explainer_parameter(60, "per-image Adam steps at most when explaining")
    search_learning_rate: float = explainer_parameter(0.1, "Adam learning rate of the latent search",
                                                      name="learning_rate")
    tolerance: float = explainer_parameter(1e-3, "latent search: relative improvement that counts")
    patience: int = explainer_parameter(10, "latent search: steps without improvement before stopping")
    margin: float = explainer_parameter(1.0, "logits by which the counterfactual must cross the threshold")
    similarity: float = explainer_parameter(2.0, "weight of mean |D(z) - D(z0)|: higher keeps the rationale "
                                                 "smaller, lower flips more decisions", name="similarity_weight")
    outside_lungs: float = explainer_parameter(0.0, "similarity: change outside the lung fields costs 1 + this "
                                                    "times more (0: uniform)")
    refine_steps: int = explainer_parameter(0, "latent search: Adam steps after the decision has crossed "
                                               "(0: stop at the first crossing)")
    max_shift: float = explainer_parameter(3.0, "gradient_shift: largest latent shift (RMS per element)")
    smoothing_sigma: float = explainer_parameter(4.0, "Gaussian smoothing of the saliency map, pixels")


@torch.no_grad()
def evaluate_reconstruction(autoencoder: GvrAutoEncoder, images: torch.Tensor, *, batch_size: int = 64,
                            device: str = "cpu") -> dict[str, float]:
    """Mean |D(E(x)) - x| and (D(E(x)) - x)^2 at the working size (uint8 or [0, 1] images)."""
    autoencoder.eval()
    l1 = l2 = 0.0
    for start in range(0, len(images), batch_size):
        x = autoencoder.working(as_float(images[start:start + batch_size]).to(device))
        out = autoencoder(x)
        l1 += float((out - x).abs().flatten(1).mean(1).sum())
        l2 += float((out - x).pow(2).flatten(1).mean(1).sum())
    n = max(len(images), 1)
    return {"reconstruction_l1": l1 / n, "reconstruction_mse": l2 / n}


class GvrTrainer(Trainer):
    """The autoencoder alone (no classifier while training)."""

    name = "gvr"
    settings_class = GvrTrainingConfig
    best_parts = ("autoencoder",)
    selection = "lowest validation reconstruction L1"
    needs_classifier = False
    progress_keys = ("l1", "mse")

    def __init__(self, settings: GvrTrainingConfig, autoencoder: GvrAutoEncoder, train_images: torch.Tensor,
                 val_images: torch.Tensor):
        super().__init__(settings, train_images, val_images)
        self.autoencoder = autoencoder.to(self.device)
        self.optimiser = adam(autoencoder, settings.learning_rate, settings.betas)
        # Refuse bad explainer settings before training, not after it.
        self.explainer()

    def networks(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder}

    def parts(self) -> dict[str, Any]:
        return {"autoencoder": self.autoencoder, "optimiser": self.optimiser}

    def step(self, x: torch.Tensor) -> tuple[dict[str, float], int]:
        x = self.autoencoder.working(x)
        out = self.autoencoder(x)
        l1, mse = F.l1_loss(out, x), F.mse_loss(out, x)
        loss = l1 + self.settings.mse_weight * mse
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return {"loss": loss.item(), "l1": l1.item(), "mse": mse.item()}, len(x)

    def validate(self) -> dict[str, float]:
        return evaluate_reconstruction(self.autoencoder, self.val_images, batch_size=max(self.settings.batch_size, 64),
                                       device=self.device)

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return (-metrics["reconstruction_l1"],)

    def explainer(self) -> GvrExplainer:
        return GvrExplainer(autoencoder=self.autoencoder, threshold=self.settings.threshold,
                            **self.settings.explainer_parameters())

    # -- the bundle ------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, settings, bundle, classifier, splits) -> "GvrTrainer":
        spec, w = bundle.spec, settings.width
        settings = dataclasses.replace(settings, threshold=spec.task.threshold)
        torch.manual_seed(settings.seed)
        autoencoder = GvrAutoEncoder(widths=(w, 2 * w, 4 * w), latent_channels=settings.latent_channels,
                                     size=working_size(settings.size, max(spec.input.size), 1),
                                     in_channels=spec.input.channels)
        return cls(settings, autoencoder, splits["train"].images, splits["val"].images)

    def validate_explainer(self, classifier: nn.Module) -> dict[str, float]:
        """The explainer on a seeded subset of the validation split (merged into the validation record)."""
        pick = torch.randperm(len(self.val_images), generator=torch.Generator().manual_seed(self.settings.seed))
        images = self.val_images[pick[:EXPLAINED_VALIDATION_IMAGES].sort().values]
        return evaluate_explainer(self.explainer(), classifier, images, batch_size=EVALUATION_BATCH,
                                  device=self.device)

    def test(self, classifier, images, on_batch=None) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), classifier, images, batch_size=EVALUATION_BATCH,
                                  device=self.device, on_batch=on_batch)

    def bundle_parameters(self) -> dict[str, Any]:
        return {"architecture": "medxplain.GvrAutoEncoder (MONAI residual units, spatial latent, sigmoid output)",
                "network": self.autoencoder.config(), **self.settings.explainer_parameters()}

    def bundle_training(self) -> dict[str, Any]:
        return {"loss": f"L1 + {self.settings.mse_weight} * MSE reconstruction at the working size (no labels, "
                        "no classifier)",
                "evaluation": f"explainer with the parameters above, batches of {EVALUATION_BATCH}; validation on "
                              f"a seeded subset of {min(EXPLAINED_VALIDATION_IMAGES, len(self.val_images))} images"}
