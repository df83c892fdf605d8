"""What the explainers' training loops share: seeded augmented batches, the CSV log,
the result record, settings as a dict (for checkpoint fingerprints) and freezing
the classifier they train against."""
from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from monai.transforms import RandAffine
from torch import nn


class SettingsDict:
    """Mixin for the training config dataclasses: their settings as plain JSON values."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)  # type: ignore[call-overload]
        if "betas" in out:
            out["betas"] = list(out["betas"])
        return out


@dataclass
class TrainingResult:
    best_epoch: int
    validation: dict[str, float]
    log: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


def freeze(module: nn.Module) -> Callable[[], None]:
    """Eval mode and no parameter gradients (a frozen classifier, or a network searched
    through); returns the function that restores both."""
    training, flags = module.training, [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)

    def restore() -> None:
        module.train(training)
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
    return restore


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    restore = freeze(module)
    try:
        yield module
    finally:
        restore()


def augmentation(config: Any) -> RandAffine:
    """Random rotation (radians), relative scale and shift (pixels) from a config's
    ``rotate``, ``scale`` and ``translate``."""
    return RandAffine(prob=1.0, rotate_range=config.rotate, scale_range=config.scale,
                      translate_range=(config.translate, config.translate), padding_mode="border")


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _plain(image: torch.Tensor) -> torch.Tensor:
    # MONAI transforms return MetaTensors; the loop only needs the pixels.
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def augmented_batches(images: torch.Tensor, *, epoch: int, seed: int, batch_size: int, augment: RandAffine,
                      device: str) -> Iterator[torch.Tensor]:
    """One epoch of augmented batches in [0, 1]. Everything random derives from
    (seed, epoch), so a resumed run is bit-identical to an uninterrupted one."""
    epoch_seed = (seed * 100_003 + epoch) % (2**31)
    torch.manual_seed(epoch_seed)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch_seed))
    augment.set_random_state(seed=epoch_seed)
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        yield torch.stack([_plain(augment(as_float(images[i]))) for i in index]).clamp(0, 1).to(device)


def write_log(rows: list[dict[str, float]], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: int(v) if k == "epoch" else ("" if math.isnan(v) else round(v, 6))
                             for k, v in row.items()})


def finish_epoch(checkpoints: Any, state: Any, *, epoch: int, losses: dict[str, float],
                 validation: dict[str, float], seconds: float, key: tuple[float, ...], log_path: Path,
                 on_epoch: Callable[[dict[str, float]], None] | None) -> None:
    """Record one finished epoch: its log row (mean training losses, validation metrics
    as ``val_*``, cumulative seconds), the checkpoints (``key`` picks the best epoch),
    the CSV log and the caller's callback."""
    state.log.append({"epoch": float(epoch), **losses, **{f"val_{k}": v for k, v in validation.items() if k != "n"},
                      "seconds": seconds})
    checkpoints.end_epoch(epoch, key, state)
    write_log(state.log, log_path)
    if on_epoch:
        on_epoch(state.log[-1])
