"""Image folders with a manifest (the shared Kermany layout) -> model-space tensors.

Images go through the same invertible Preprocessor as DICOM input, so training
and inference see identical resampling.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dicom_io.preprocess import Preprocessor

CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "datasets"


class DatasetError(Exception):
    """The training data folder is missing, or its manifest is malformed."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, H, W) uint8, model space * 255 (compact in memory)
    labels: torch.Tensor  # (N,) int64
    paths: list[str]

    def float_images(self) -> torch.Tensor:
        return self.images.float() / 255.0


def read_manifest(root: Path) -> list[dict[str, str]]:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DatasetError(f"{root}: no manifest.csv (expected columns path, split, label, source_patient_token)")
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"path", "split", "label"} - set(rows[0].keys() if rows else [])
    if missing:
        raise DatasetError(f"{manifest}: missing columns {sorted(missing)}")
    return rows


def read_images(root: Path, rows: list[dict[str, str]], preprocessor: Preprocessor
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The manifest rows' images (and masks, where every row has a ``mask`` column) on
    the model grid. The one image loader of training and evaluation.

    Returns uint8 images (N, 1, H, W), model space * 255 (the quantisation training
    sees), and boolean masks (N, H, W) resampled by the same chain (kept where >= 0.5),
    or None. Raises DatasetError for an image that is missing or cannot be decoded.
    """
    images = np.empty((len(rows), 1, *preprocessor.size), dtype=np.uint8)
    masks = []
    for i, row in enumerate(rows):
        images[i] = np.round(preprocessor(_grey(root / row["path"])).numpy() * 255.0).astype(np.uint8)
        if row.get("mask"):
            masks.append(preprocessor((_grey(root / row["mask"]) > 0).astype(np.float32)).numpy()[0] >= 0.5)
    return images, (np.stack(masks) if masks and len(masks) == len(rows) else None)


def _grey(path: Path) -> np.ndarray:
    """(rows, cols) float32 in [0, 1]."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc})") from exc


def _load_rows(root: Path, rows: list[dict[str, str]], preprocessor: Preprocessor) -> Split:
    key = hashlib.sha256(
        (f"InputSpec(size={preprocessor.size}, aspect={preprocessor.aspect!r})"
         + "".join(r["path"] + r.get("sha1", "") for r in rows)).encode()
    ).hexdigest()[:16]
    cache = CACHE_DIR / f"{key}.npz"
    if cache.exists():
        data = np.load(cache)
        return Split(torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]), [r["path"] for r in rows])
    images, _ = read_images(root, rows, preprocessor)
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, labels=labels)
    return Split(torch.from_numpy(images), torch.from_numpy(labels), [r["path"] for r in rows])


RECIPE = "recipe.json"  # how a generated data set was made (pipeline.evaluation.lesion_data writes it)


def read_recipe(folder: Path) -> dict[str, Any] | None:
    """The ``recipe.json`` of a data set ``medxplain make-lesions`` wrote; None for any
    other folder (Kermany's, or a lesion set made before recipes were written)."""
    path = folder / RECIPE
    return json.loads(path.read_text()) if path.is_file() else None


def load_splits(root: Path, preprocessor: Preprocessor, *, val_fraction: float = 0.1,
                seed: int = 0) -> dict[str, Split]:
    """train / val / test. Validation is carved from train by *patient* so that no
    patient appears in both (the manifest's source_patient_token)."""
    rows = read_manifest(root)
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    if not train_rows or not test_rows:
        raise DatasetError(f"{root}: manifest needs rows with split 'train' and 'test'")
    patients = sorted({r.get("source_patient_token") or r["path"] for r in train_rows})
    random.Random(seed).shuffle(patients)
    val_patients = set(patients[: max(1, int(len(patients) * val_fraction))])
    val_rows = [r for r in train_rows if (r.get("source_patient_token") or r["path"]) in val_patients]
    fit_rows = [r for r in train_rows if (r.get("source_patient_token") or r["path"]) not in val_patients]
    return {
        "train": _load_rows(root, fit_rows, preprocessor),
        "val": _load_rows(root, val_rows, preprocessor),
        "test": _load_rows(root, test_rows, preprocessor),
    }
