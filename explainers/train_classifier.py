"""Training of a bundle's binary classifier, declared for ``explainers.training.fit``
(the same framework as the explainers: epochs, resume, checkpoints and log are fit's).

Class-balanced BCE on the one positive logit (positives weighted n_neg / n_pos, so the
decision threshold lands near 0.5 despite the 74% pneumonia prevalence in Kermany's
train split), AdamW with a one-cycle schedule, geometric and intensity jitter and, with
``augmentation: shortcut_robust`` (the default), synthetic shortcut cues on both classes
alike (``explainers.shortcuts``: burned-in text, L/R markers, border bands, collimation
edges) plus brightness, contrast and gamma jitter, so that none of them tells the label. The
epoch with the highest validation AUROC is kept; the decision threshold is then
Youden's J on the validation split (``decision_threshold``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)
from torch import nn

from explainers._helpers import as_float, plain_tensor
from explainers.metrics import classification_metrics, youden_threshold
from explainers.networks import BinaryClassifier
from explainers.shortcuts import RandBorderBands, RandBurnedInText, RandCollimation, RandSideMarker
from explainers.training import Trainer, TrainingSettings, option


@dataclass
class ClassifierTrainingConfig(TrainingSettings):
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = option(1e-3, "peak learning rate of the one-cycle schedule (AdamW)")
    weight_decay: float = 1e-4
    # Augmentation: RandAffine with probability 0.8, contrast (gamma) and noise.
    rotate: float = 0.12
    scale: float = 0.1
    translate: float = 8.0
    # Class balance: positives are weighted n_neg/n_pos.
    balance_classes: bool = True
    augmentation: str = option("shortcut_robust", "shortcut_robust: also synthetic text, L/R markers, border "
                               "bands, collimation and brightness jitter | basic: geometric, gamma and noise only")


AUGMENTATIONS = ("shortcut_robust", "basic")


def augmentation(settings: ClassifierTrainingConfig) -> Compose:
    """``basic``: small geometric and intensity jitter (what a different detector or
    positioning gives). ``shortcut_robust``: the same geometry, then the synthetic cues
    of ``explainers.shortcuts`` (text p=0.5, marker p=0.5, border bands p=0.3,
    collimation p=0.3) and brightness (scale +-20 %, shift +-0.08), gamma 0.6-1.6 and
    noise jitter, each drawn from the transform's own seeded state."""
    if settings.augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {settings.augmentation!r}")
    geometry = RandAffine(prob=0.8, rotate_range=settings.rotate, scale_range=settings.scale,
                          translate_range=(settings.translate, settings.translate), padding_mode="border")
    if settings.augmentation == "basic":
        return Compose([geometry, RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
                        RandGaussianNoise(prob=0.3, std=0.02)])
    return Compose([
        geometry,
        RandCollimation(prob=0.3),
        RandBorderBands(prob=0.3),
        RandBurnedInText(prob=0.5),
        RandSideMarker(prob=0.5),
        RandScaleIntensity(factors=0.2, prob=0.5),
        RandShiftIntensity(offsets=0.08, prob=0.5),
        RandAdjustContrast(prob=0.5, gamma=(0.6, 1.6)),
        RandGaussianNoise(prob=0.3, std=0.02),
    ])


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, device: str = "cpu",
                          batch_size: int = 128) -> torch.Tensor:
    """(N,) P(positive) on CPU for images (N, C, H, W), uint8 or float in [0, 1]."""
    model.eval()
    return torch.cat([torch.sigmoid(model(as_float(images[i:i + batch_size]).to(device))).cpu()
                      for i in range(0, len(images), batch_size)])


class ClassifierTrainer(Trainer):
    """A ``BinaryClassifier`` on labelled images (labels (N,) 0 / 1)."""

    name = "classifier"
    settings_class = ClassifierTrainingConfig
    best_parts = ("model",)
    selection = "highest validation AUROC; threshold: Youden's J on the validation split"
    needs_classifier = False
    progress_keys = ("train_loss",)
    resumable_changes = ("device",)  # the one-cycle schedule spans all epochs: they may not change

    def __init__(self, settings: ClassifierTrainingConfig, model: BinaryClassifier, train_images: torch.Tensor,
                 train_labels: torch.Tensor, val_images: torch.Tensor, val_labels: torch.Tensor):
        super().__init__(settings, train_images, val_images)
        s = settings
        self.model, self.train_labels, self.val_labels = model.to(self.device), train_labels, val_labels
        self.augment = augmentation(s)
        self.optimiser = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimiser, max_lr=s.learning_rate,
                                                             total_steps=max(s.epochs, 1) * self.steps_per_epoch())
        n_pos = float(train_labels.sum())
        n_neg = float(len(train_labels) - n_pos)
        pos_weight = torch.tensor(n_neg / max(n_pos, 1.0) if s.balance_classes else 1.0, device=self.device)
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def networks(self) -> dict[str, nn.Module]:
        return {}  # the architecture is in bundle.yaml; the fingerprint holds the settings and set size

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimiser, "scheduler": self.scheduler}

    def train_mode(self) -> None:
        self.model.train()

    def eval_mode(self) -> None:
        self.model.eval()

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Reseeded from (seed, epoch) like every trainer's: resuming is bit-identical.
        epoch_seed = (self.settings.seed * 100_003 + epoch) % (2**31)
        torch.manual_seed(epoch_seed)
        order = torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(epoch_seed))
        self.augment.set_random_state(seed=epoch_seed)
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            index = order[start:start + size]
            images = torch.stack([plain_tensor(self.augment(as_float(self.train_images[i]))) for i in index])
            yield images.clamp(0, 1).to(self.device), self.train_labels[index].float().to(self.device)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, float], int]:
        images, labels = batch
        self.optimiser.zero_grad(set_to_none=True)
        loss = self.loss(self.model(images), labels)
        loss.backward()
        self.optimiser.step()
        self.scheduler.step()
        return {"train_loss": loss.item()}, len(images)

    def validate(self) -> dict[str, float]:
        metrics = classification_metrics(predict_probabilities(self.model, self.val_images, self.device),
                                          self.val_labels, 0.5)
        return {"auroc": metrics["auroc"], "accuracy": metrics["accuracy"]}

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return (metrics["auroc"],)

    def decision_threshold(self) -> float:
        """Youden's J of the current weights on the validation split."""
        return youden_threshold(predict_probabilities(self.model, self.val_images, self.device), self.val_labels)
