"""Shared pieces for the generative explainers' tests (sagen, exaggeration).

A hand-made classifier whose logit is K * (mean intensity of a fixed box - C): the
only way to change its decision is to brighten or darken that box, so what a
trained generator must learn is known exactly.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dicom_io.preprocess import Preprocessor
from tests.conftest import PROJECT_ROOT, kermany_subset

DEMO_BUNDLE = PROJECT_ROOT / "bundles" / "demo-pneumonia"
SIZE = 32
BOX = (8, 20, 8, 20)  # rows [8, 20), cols [8, 20)
K, C = 12.0, 0.5
TINY = (8, 8, 16, 16, 32, 8)  # sagen U-Net widths for tests


class BoxClassifier(nn.Module):
    """logit = K * (mean of BOX - C): positive when the box is bright."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return K * (images[:, 0, BOX[0]:BOX[1], BOX[2]:BOX[3]].mean(dim=(1, 2)) - C)


def box_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy backgrounds with soft structure; half of them with a bright blob in BOX."""
    g = torch.Generator().manual_seed(seed)
    images = 0.25 + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    labels = torch.arange(n) % 2
    for i in range(n):
        if labels[i]:
            top, left = (b + int(torch.randint(0, 3, (1,), generator=g)) for b in (BOX[0], BOX[2]))
            images[i, :, top:top + 10, left:left + 10] = 0.9
    return images.clamp(0, 1), labels


def sampled_test_images(kermany_dir: Path, n: int, seed: int = 0, size: int = 128) -> torch.Tensor:
    """A seeded random sample of n shared Kermany test images (the test split's own class mix).

    Not the first n by name: the manifest is sorted by file name, and its first
    NORMAL images are a harder-than-average group for the NORMAL -> PNEUMONIA direction.
    """
    rows = [r for r in csv.DictReader(open(kermany_dir / "manifest.csv")) if r["split"] == "test"]
    picked = [rows[i] for i in sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n])]
    return _preprocessed(kermany_dir, picked, size)


def _preprocessed(kermany_dir: Path, rows: list[dict[str, str]], size: int) -> torch.Tensor:
    preprocess = Preprocessor((size, size), "squash")
    out = []
    for r in rows:
        with Image.open(kermany_dir / r["path"]) as img:
            display = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        out.append(preprocess(display).as_tensor())
    return torch.stack(out)


def real_images(kermany_dir: Path, n: int, size: int = 128) -> torch.Tensor:
    """n shared Kermany test images (both classes), through the same Preprocessor as DICOM input."""
    rows = list(csv.DictReader(open(kermany_dir / "manifest.csv")))
    picked = []
    for label in ("0", "1"):
        picked += [r for r in rows if r["split"] == "test" and r["label"] == label][: (n + 1) // 2]
    return _preprocessed(kermany_dir, picked[:n], size)


def bundle_copy(tmp_path: Path) -> Path:
    """A copy of the demo bundle (never its checkpoints): the repository's bundle is never modified."""
    copy = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, copy, ignore=shutil.ignore_patterns(".checkpoints"))
    return copy


def small_data(tmp_path: Path, kermany_dir: Path) -> Path:
    """A small real subset, read in place through symlinks."""
    return kermany_subset(kermany_dir, tmp_path / "data", {"train": 96, "test": 16})
