"""Training loop for a bundle's binary classifier (tensors in, weights + log out).

Knows nothing of files or DICOM: the pipeline loads the data and writes the bundle.
Resumable from the last epoch checkpoint; deterministic for a seed on one device.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandGaussianNoise
from monai.utils import set_determinism
from torch import nn

from explainers.metrics import classification_metrics, youden_threshold
from explainers.networks import BinaryClassifier


@dataclass
class ClassifierTrainingConfig:
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    # Class balance: positives are weighted n_neg/n_pos so that the decision
    # threshold lands near 0.5 despite the 74% pneumonia prevalence in train.
    balance_classes: bool = True


@dataclass
class ClassifierTrainingResult:
    best_epoch: int
    threshold: float
    validation: dict[str, float]
    log: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


def augmentation() -> Compose:
    """Small geometric and intensity jitter (what a different detector/positioning gives)."""
    return Compose([
        RandAffine(prob=0.8, rotate_range=0.12, scale_range=0.1, translate_range=(8, 8), padding_mode="border"),
        RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
        RandGaussianNoise(prob=0.3, std=0.02),
    ])


def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device).float()
            out.append(torch.sigmoid(model(batch)).cpu())
    return torch.cat(out)


def train_classifier(
    model: BinaryClassifier,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: ClassifierTrainingConfig,
    checkpoint_dir: Path,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> ClassifierTrainingResult:
    """Train in place; leaves the best-validation-AUROC weights in ``model``."""
    started = time.perf_counter()
    set_determinism(seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = config.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = (len(train_images) + config.batch_size - 1) // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    n_pos = float(train_labels.sum())
    n_neg = float(len(train_labels) - n_pos)
    pos_weight = torch.tensor(n_neg / max(n_pos, 1.0) if config.balance_classes else 1.0, device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    augment = augmentation()
    augment.set_random_state(seed=config.seed)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / "last.ckpt"
    best = checkpoint_dir / "best.ckpt"
    start_epoch, best_auroc, best_epoch, log = 0, -1.0, -1, []
    if last.exists():
        # Our own training checkpoint; weights_only=True refuses arbitrary objects.
        state = torch.load(last, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start_epoch = int(state["epoch"]) + 1
        best_auroc, best_epoch = float(state["best_auroc"]), int(state["best_epoch"])
        log = [dict(zip(state["log_keys"], row.tolist())) for row in state["log"]]
        augment.set_random_state(seed=config.seed + start_epoch)

    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        total, seen = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            batch = torch.stack([augment(train_images[i].float()) for i in index]).clamp(0, 1).to(device)
            labels = train_labels[index].float().to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
            seen += len(index)
            if on_step:
                on_step(epoch, step + 1, total / seen)
        val_prob = _predict(model, val_images, 128, device)
        val = classification_metrics(val_prob, val_labels, 0.5)
        row = {"epoch": float(epoch), "train_loss": total / seen, "val_auroc": val["auroc"],
               "val_accuracy": val["accuracy"], "seconds": time.perf_counter() - started}
        log.append(row)
        if val["auroc"] > best_auroc:
            best_auroc, best_epoch = val["auroc"], epoch
            torch.save({"model": model.state_dict()}, best)
        keys = list(log[0].keys())
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "epoch": epoch, "best_auroc": best_auroc, "best_epoch": best_epoch,
            "log_keys": keys, "log": torch.tensor([[r[k] for k in keys] for r in log]),
        }, last)
        write_log(log, checkpoint_dir.parent / "classifier_training_log.csv")
        if on_epoch:
            on_epoch(row)

    model.load_state_dict(torch.load(best, weights_only=True)["model"])
    val_prob = _predict(model, val_images, 128, device)
    threshold = youden_threshold(val_prob, val_labels)
    return ClassifierTrainingResult(
        best_epoch=best_epoch,
        threshold=threshold,
        validation=classification_metrics(val_prob, val_labels, threshold),
        log=log,
        wall_time_s=log[-1]["seconds"] if log else 0.0,
    )


def write_log(rows: list[dict[str, float]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def predict_probabilities(model: nn.Module, images: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    return _predict(model, images, 128, device)
