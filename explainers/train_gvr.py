"""Training loop for the gvr autoencoder (tensors in, weights + log out), and the
evaluation of the gvr explainer.

The autoencoder learns from images alone, no labels and no classifier:

    loss = L1(D(E(x)), x) + w_mse * MSE(D(E(x)), x)      at the working size

on area-downsampled, randomly augmented images (small rotation, scale, shift; the
same seeded augmented_batches as sagen's loop). Validation: reconstruction error on
the unaugmented validation images; the epoch with the lowest validation L1 is kept.

Knows nothing of files or DICOM beyond its own checkpoints and CSV log. Resumable
from the last epoch checkpoint; every epoch reseeds its data order and augmentation
from (seed, epoch), so a resumed run is bit-identical to an uninterrupted one on
the same device.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from torch import nn

from explainers.checkpoints import EpochCheckpoints, TrainingState
from explainers.evaluation import proximity_ssim
from explainers.gvr import GvrAutoEncoder, GvrExplainer
from explainers.training import SettingsDict, TrainingResult, as_float, augmentation, augmented_batches, finish_epoch


@dataclass
class GvrTrainingConfig(SettingsDict):
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    mse_weight: float = 1.0  # L1 + w * MSE: L1 keeps edges, MSE punishes the rare large errors
    # Augmentation: rotation (radians), relative scale, shift (pixels at the input size).
    rotate: float = 0.1
    scale: float = 0.05
    translate: float = 6.0
    seed: int = 0
    device: str = "cpu"


def gvr_checkpoints(directory: Path, *, autoencoder: GvrAutoEncoder, optimiser: torch.optim.Optimizer,
                    n_train: int, settings: dict) -> EpochCheckpoints:
    """best.ckpt keeps the autoencoder; a checkpoint resumes only for the same network,
    training set size and settings (epochs and device may differ)."""
    setup = {k: v for k, v in settings.items() if k not in ("epochs", "device")}
    fingerprint = json.dumps({"autoencoder": autoencoder.config(), "n_train": n_train, **setup}, sort_keys=True)
    return EpochCheckpoints(directory, fingerprint, {"autoencoder": autoencoder, "optimiser": optimiser},
                            best_parts=("autoencoder",))


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


def evaluate_gvr(explainer: GvrExplainer, classifier: nn.Module, images: torch.Tensor, *, batch_size: int = 32,
                 device: str = "cpu") -> dict[str, float]:
    """Validity, proximity, cost and reconstruction of the explainer on a set of images."""
    classifier.to(device).eval()
    flipped = proximity = ssim = steps = reconstruction = shift = prob_change = 0.0
    n_pos = flipped_pos = 0.0
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        e = explainer.explain(x, classifier)
        called = e.probability >= explainer.threshold
        flips = torch.tensor([c["flipped"] for c in e.checks], device=called.device)
        flipped += float(flips.sum())
        n_pos += float(called.sum())
        flipped_pos += float((flips & called).sum())
        cf = e.counterfactuals[:, -1]
        proximity += sum(c["proximity_l1"] for c in e.checks)
        ssim += float(proximity_ssim(x, cf).sum())
        steps += sum(c["steps_used"] for c in e.checks)
        reconstruction += sum(c["reconstruction_l1"] for c in e.checks)
        shift += sum(c["latent_shift"] for c in e.checks)
        prob_change += float((e.path_probability[:, -1] - e.probability).abs().sum())
    wall = time.perf_counter() - started
    n = max(len(images), 1)
    n_neg = len(images) - n_pos
    return {"flip_rate": flipped / n,
            # per class the classifier called (NaN where it called none of that class)
            "flip_rate_called_positive": flipped_pos / n_pos if n_pos else float("nan"),
            "flip_rate_called_negative": (flipped - flipped_pos) / n_neg if n_neg else float("nan"),
            "proximity_l1": proximity / n, "proximity_ssim": ssim / n, "steps_used": steps / n,
            "reconstruction_l1": reconstruction / n, "latent_shift": shift / n,
            "probability_change": prob_change / n, "ms_per_image": 1000.0 * wall / n, "n": float(len(images))}


def train_gvr(
    autoencoder: GvrAutoEncoder,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    config: GvrTrainingConfig,
    checkpoint_dir: Path,
    *,
    log_path: Path | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train in place; leaves the best-validation weights in ``autoencoder``.

    ``train_images`` / ``val_images``: (N, C, H, W), uint8 (x 255) or float in [0, 1],
    at the classifier's input size; the autoencoder area-downsamples them itself.
    """
    started = time.perf_counter()
    device = config.device
    set_determinism(seed=config.seed)
    autoencoder.to(device)
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=config.learning_rate, betas=config.betas)
    augment = augmentation(config)
    checkpoints = gvr_checkpoints(checkpoint_dir, autoencoder=autoencoder, optimiser=optimiser,
                                  n_train=len(train_images), settings=config.as_dict())
    state: TrainingState = checkpoints.resume()
    log_path = log_path or checkpoint_dir / "gvr_training_log.csv"
    elapsed_before = state.elapsed_s

    for epoch in range(state.start_epoch, config.epochs):
        autoencoder.train()
        sums: dict[str, float] = {}
        seen = 0
        batches = augmented_batches(train_images, epoch=epoch, seed=config.seed, batch_size=config.batch_size,
                                    augment=augment, device=device)
        for step, x in enumerate(batches):
            n = len(x)
            x = autoencoder.working(x)
            out = autoencoder(x)
            l1 = F.l1_loss(out, x)
            mse = F.mse_loss(out, x)
            loss = l1 + config.mse_weight * mse
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            values = {"loss": loss.item(), "l1": l1.item(), "mse": mse.item()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
            seen += n
            if on_step:
                on_step(epoch, step + 1, {k: v / seen for k, v in sums.items()})

        val = evaluate_reconstruction(autoencoder, val_images, batch_size=max(config.batch_size, 64), device=device)
        losses = {k: v / max(seen, 1) for k, v in sums.items()}
        finish_epoch(checkpoints, state, epoch=epoch, losses=losses, validation=val, key=(-val["reconstruction_l1"],),
                     seconds=elapsed_before + time.perf_counter() - started, log_path=log_path, on_epoch=on_epoch)

    checkpoints.load_best()
    autoencoder.eval()
    validation = evaluate_reconstruction(autoencoder, val_images, batch_size=max(config.batch_size, 64),
                                         device=device)
    return TrainingResult(best_epoch=state.best_epoch, validation=validation, log=state.log,
                             wall_time_s=state.elapsed_s)
