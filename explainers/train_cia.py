"""Training loop for the two inpainters of cia (tensors in, weights + log out), and the
evaluation of the whole explainer.

Each inpainter learns to fill random smooth masks (blobs and rectangles of varied
size, some at partial opacity; ``explainers.cia.random_masks``) of images of its own
class (by label: fill_normal on NORMAL, fill_pneumonia on PNEUMONIA):

    loss = L1(fill, x) over the whole image + hole_weight * L1(fill, x) inside the mask

No classifier is involved, so training is cheap. Both networks train in the same
loop, one after the other within each epoch; the smaller class is repeated so that
both take the same number of steps per epoch. Random geometric augmentation (small
rotation, scale, shift) on every batch, at the input size, then area-downsampled
to the inpainter's working size.

Resumable from the last epoch checkpoint; every epoch reseeds its data order,
augmentation and masks from (seed, epoch, network), so a resumed run is
bit-identical to an uninterrupted one on the same device.
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

from explainers.checkpoints import EpochCheckpoints, TrainingState
from explainers.cia import CiaExplainer, Inpainter, hole_l1, random_masks
from explainers.evaluation import proximity_ssim
from explainers.training import SettingsDict, TrainingResult, as_float, augmentation, augmented_batches, finish_epoch

PARTS = ("fill_normal", "fill_pneumonia")  # trained on label 0 (NORMAL) and label 1 (PNEUMONIA)
_VAL_MASK_SEED = 4242  # fixed validation masks: the same for every epoch


@dataclass
class CiaTrainingConfig(SettingsDict):
    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    hole_weight: float = 5.0  # L1 inside the mask, on top of the whole-image L1
    # Augmentation: rotation (radians), relative scale, shift (pixels at the input size).
    rotate: float = 0.1
    scale: float = 0.05
    translate: float = 6.0
    seed: int = 0
    device: str = "cpu"


def _working(images: torch.Tensor, size: int | None) -> torch.Tensor:
    return images if size is None or images.shape[-1] == size else F.interpolate(images, size=(size, size),
                                                                                 mode="area")


@torch.no_grad()
def evaluate_inpainter(network: Inpainter, images: torch.Tensor, *, batch_size: int = 64,
                       device: str = "cpu") -> dict[str, float]:
    """Reconstruction error on fixed random masks (seeded, the same every call):
    mean |fill - x| inside the mask (hole_l1) and over the whole image (image_l1)."""
    network.eval()
    hole = whole = 0.0
    generator = torch.Generator().manual_seed(_VAL_MASK_SEED)
    for start in range(0, len(images), batch_size):
        x = _working(as_float(images[start:start + batch_size]).to(device), network.size)
        masks = random_masks(len(x), x.shape[-1], generator, device=device)
        prediction = network.fill(x, masks)
        hole += float(hole_l1(prediction, x, masks).sum())
        whole += float((prediction - x).abs().flatten(1).mean(1).sum())
    n = max(len(images), 1)
    return {"hole_l1": hole / n, "image_l1": whole / n, "n": float(len(images))}


def evaluate_inpainters(networks: dict[str, Inpainter], images: torch.Tensor, labels: torch.Tensor, *,
                        device: str = "cpu") -> dict[str, float]:
    """Each inpainter on the images of its own class; ``hole_l1`` is their mean."""
    out: dict[str, float] = {}
    for label, part in enumerate(PARTS):
        metrics = evaluate_inpainter(networks[part], images[labels == label], device=device)
        out[f"{part}_hole_l1"], out[f"{part}_image_l1"] = metrics["hole_l1"], metrics["image_l1"]
    out["hole_l1"] = (out["fill_normal_hole_l1"] + out["fill_pneumonia_hole_l1"]) / 2
    return out


def evaluate_cia(explainer: CiaExplainer, classifier: torch.nn.Module, images: torch.Tensor, *,
                 batch_size: int = 32, device: str = "cpu",
                 on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """The explainer on a set of images (uint8 or [0, 1] floats), in batches: validity
    (overall and per class the classifier called), proximity (L1, SSIM), search
    steps, mask area, the inpainters' own error and the wall time per image."""
    started = time.perf_counter()
    rows: dict[str, list[float]] = {k: [] for k in ("flipped", "positive", "l1", "ssim", "steps", "area",
                                                     "inpainting", "change")}
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        e = explainer.explain(x, classifier)
        rows["flipped"] += [float(c["flipped"]) for c in e.checks]
        rows["positive"] += [float(c["fill"] == "normal") for c in e.checks]
        rows["l1"] += [c["proximity_l1"] for c in e.checks]
        rows["ssim"] += proximity_ssim(x, e.counterfactuals[:, -1]).tolist()
        rows["steps"] += [float(c["steps_used"]) for c in e.checks]
        rows["area"] += [c["mask_area"] for c in e.checks]
        rows["inpainting"] += [c["inpainting_l1"] for c in e.checks]
        rows["change"] += (e.path_probability[:, -1] - e.probability).abs().tolist()
        if on_batch:
            on_batch(min(start + batch_size, len(images)), len(images))
    seconds = time.perf_counter() - started
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}
    n = len(images)
    positive = t["positive"] > 0

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if len(values) else float("nan")

    return {"flip_rate": mean(t["flipped"]),
            # per class the classifier called (NaN where it called none of that class)
            "flip_rate_called_positive": mean(t["flipped"][positive]),
            "flip_rate_called_negative": mean(t["flipped"][~positive]),
            "proximity_l1": mean(t["l1"]), "proximity_ssim": mean(t["ssim"]),
            "steps_used": mean(t["steps"]), "mask_area": mean(t["area"]),
            "inpainting_l1": mean(t["inpainting"]), "probability_change": mean(t["change"]),
            "ms_per_image": 1000.0 * seconds / max(n, 1), "n": float(n)}


def cia_checkpoints(directory: Path, *, networks: dict[str, Inpainter], optimisers: dict[str, torch.optim.Optimizer],
                    n_train: dict[str, int], settings: dict) -> EpochCheckpoints:
    """The fingerprint: the networks, the training set sizes and every setting except epochs and device."""
    setup = {k: v for k, v in settings.items() if k not in ("epochs", "device")}
    fingerprint = json.dumps({"inpainters": {k: v.config() for k, v in networks.items()}, "n_train": n_train,
                              **setup}, sort_keys=True)
    parts = {**networks, **{f"opt_{k}": v for k, v in optimisers.items()}}
    return EpochCheckpoints(directory, fingerprint, parts, best_parts=PARTS)


def _selection_key(metrics: dict[str, float]) -> tuple[float]:
    # The lowest validation hole error, both inpainters together.
    return (-metrics["hole_l1"],)


def train_cia(
    networks: dict[str, Inpainter],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: CiaTrainingConfig,
    checkpoint_dir: Path,
    *,
    log_path: Path | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train both inpainters in place; leaves the best-validation weights in ``networks``.

    ``networks``: {"fill_normal": ..., "fill_pneumonia": ...}. Images (N, C, H, W), uint8
    (x 255) or float in [0, 1]; labels (N,) 0 = NORMAL, 1 = PNEUMONIA.
    """
    if set(networks) != set(PARTS):
        raise ValueError(f"networks must be {PARTS}, got {sorted(networks)}")
    started = time.perf_counter()
    device = config.device
    set_determinism(seed=config.seed)
    by_class = {part: train_images[train_labels == label] for label, part in enumerate(PARTS)}
    for part, images in by_class.items():
        if len(images) == 0:
            raise ValueError(f"no training images of the class {part} fills (labels {PARTS.index(part)})")
    for network in networks.values():
        network.to(device)
    optimisers = {part: torch.optim.Adam(networks[part].parameters(), lr=config.learning_rate, betas=config.betas)
                  for part in PARTS}
    augment = augmentation(config)  # type: ignore[arg-type]
    # The smaller class is repeated (whole passes) so both networks take the same number of steps.
    largest = max(len(v) for v in by_class.values())
    repeats = {part: max(1, round(largest / len(v))) for part, v in by_class.items()}

    checkpoints = cia_checkpoints(checkpoint_dir, networks=networks, optimisers=optimisers,
                                  n_train={k: len(v) for k, v in by_class.items()}, settings=config.as_dict())
    state: TrainingState = checkpoints.resume()
    log_path = log_path or checkpoint_dir / "cia_training_log.csv"
    elapsed_before = state.elapsed_s

    for epoch in range(state.start_epoch, config.epochs):
        sums: dict[str, float] = {}
        done = 0
        for index, part in enumerate(PARTS):
            network, optimiser = networks[part], optimisers[part]
            network.train()
            images = by_class[part].repeat(repeats[part], 1, 1, 1) if repeats[part] > 1 else by_class[part]
            part_seed = config.seed * 2 + index
            masks_rng = torch.Generator().manual_seed((part_seed * 100_003 + epoch + 7) % (2**31))
            seen, hole_sum, whole_sum = 0, 0.0, 0.0
            for x in augmented_batches(images, epoch=epoch, seed=part_seed, batch_size=config.batch_size,
                                       augment=augment, device=device):
                x = _working(x, network.size)
                masks = random_masks(len(x), x.shape[-1], masks_rng, device=device)
                prediction = network.fill(x, masks)
                hole = hole_l1(prediction, x, masks).mean()
                whole = F.l1_loss(prediction, x)
                loss = whole + config.hole_weight * hole
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                seen += len(x)
                hole_sum += hole.item() * len(x)
                whole_sum += whole.item() * len(x)
                done += 1
                if on_step:
                    on_step(epoch, done, {"part": float(index), "hole_l1": hole_sum / seen,
                                          "image_l1": whole_sum / seen})
            sums[f"{part}_hole_l1"] = hole_sum / max(seen, 1)
            sums[f"{part}_image_l1"] = whole_sum / max(seen, 1)
        val = evaluate_inpainters(networks, val_images, val_labels, device=device)
        finish_epoch(checkpoints, state, epoch=epoch, losses=sums, validation=val, key=_selection_key(val),
                     seconds=elapsed_before + time.perf_counter() - started, log_path=log_path, on_epoch=on_epoch)

    checkpoints.load_best()
    for network in networks.values():
        network.eval()
    validation = evaluate_inpainters(networks, val_images, val_labels, device=device)
    return TrainingResult(best_epoch=state.best_epoch, validation=validation, log=state.log,
                             wall_time_s=state.elapsed_s)


def steps_per_epoch(train_labels: torch.Tensor, batch_size: int) -> int:
    """Optimiser steps per epoch, both networks together (for progress bars)."""
    counts = [int((train_labels == label).sum()) for label in range(len(PARTS))]
    largest = max(counts)
    return sum(-(-c * max(1, round(largest / c)) // batch_size) for c in counts if c)
