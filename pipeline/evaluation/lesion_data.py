"""`medxplain make-lesions`: the NORMAL images of a Kermany-layout folder -> a lesion
data set in the same layout (PNG images, manifest.csv) plus exact lesion masks.

Two designs (``paired``):

- split (default): per split, each NORMAL image appears once, with an inserted lesion
  (label 1) or untouched (label 0), ``positive_fraction`` of them with one, by a
  seeded permutation;
- paired: each NORMAL image appears twice, untouched (label 0) and with a lesion
  (label 1). The two differ only by the lesion, so anatomy, exposure and burned-in
  labels carry no information about the class: a classifier can only learn the
  lesion, from twice as many images.

The folder also gets ``recipe.json`` (``RECIPE``): the design, seed and command that
made it and the sha256 of the lesion generator's source (``explainers/lesions.py``),
so a classifier trained on it can say in its model card exactly which lesions it
learnt, and a changed generator is visible.

Patient tokens are kept (both images of a pair share one), so
pipeline.training.datasets.load_splits carves validation by patient as for Kermany
and a pair never straddles two splits.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

import explainers.lesions
from explainers.lesions import random_lesion
from pipeline.training.datasets import RECIPE, DatasetError, read_manifest

FIELDS = ["path", "split", "label", "class_name", "source_patient_token", "mask", "lesion_kind",
          "lesion_area", "source_path", "sha1"]
POSITIVE, NEGATIVE = "LESION", "NORMAL"


@dataclass
class LesionDataset:
    root: Path
    counts: dict[str, dict[str, int]]  # split -> class_name -> images


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def make_lesion_dataset(source: Path, out: Path, *, seed: int = 0, positive_fraction: float = 0.5,
                        limit: int | None = None, paired: bool = False,
                        on_image: Callable[[], None] | None = None) -> LesionDataset:
    """Write the data set (module docstring: the two designs; ``positive_fraction`` is
    ignored when ``paired``); ``limit`` keeps the first N NORMAL images per split (tests).
    Raises DatasetError without NORMAL rows, ValueError for a fraction outside (0, 1),
    explainers.lesions.LesionError for an image that cannot take a lesion."""
    if not 0 < positive_fraction < 1:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
    rows = [r for r in read_manifest(source) if r.get("class_name", "") == NEGATIVE or
            (not r.get("class_name") and r["label"] == "0")]
    if not rows:
        raise DatasetError(f"{source}: manifest has no NORMAL (label 0) rows to insert lesions into")
    out.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, str]] = []
    for split in sorted({r["split"] for r in rows}):
        split_rows = [r for r in rows if r["split"] == split][:limit]
        # Split design: which images get a lesion, a seeded permutation per split, exactly the fraction.
        order = np.random.default_rng([seed, int(hashlib.sha256(split.encode()).hexdigest()[:8], 16)]) \
            .permutation(len(split_rows))
        positive = set() if paired else set(order[: int(round(len(split_rows) * positive_fraction))].tolist())
        for i, row in enumerate(split_rows):
            with Image.open(source / row["path"]) as img:
                image = np.asarray(img.convert("L"), dtype=np.uint8)
            versions = (False, True) if paired else (i in positive,)
            for with_lesion in versions:
                written.append(_write_image(out, split, row, image, with_lesion, seed))
            if on_image:
                on_image()
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(written)
    design = ["--paired"] if paired else ["--positive-fraction", str(positive_fraction)]
    recipe = {"design": "paired" if paired else "split", "seed": seed, "source": source.name,
              "positive_fraction": None if paired else positive_fraction, "limit": limit,
              "command": " ".join(["medxplain make-lesions", "--data", str(source), "--out", str(out), "--seed",
                                   str(seed), *design, *(["--limit", str(limit)] if limit else [])]),
              "generator_sha256": hashlib.sha256(Path(explainers.lesions.__file__).read_bytes()).hexdigest()}
    (out / RECIPE).write_text(json.dumps(recipe, indent=1) + "\n")
    counts: dict[str, dict[str, int]] = {}
    for (split, name), n in Counter((r["split"], r["class_name"]) for r in written).items():
        counts.setdefault(split, {})[name] = n
    return LesionDataset(out, counts)


def _write_image(out: Path, split: str, row: dict[str, str], image: np.ndarray, with_lesion: bool,
                 seed: int) -> dict[str, str]:
    """Write one image of the data set (with a lesion and its mask, or untouched); its manifest row."""
    stem = Path(row["path"]).stem
    record = {"split": split, "source_patient_token": row.get("source_patient_token", ""),
              "source_path": row["path"], "mask": "", "lesion_kind": "", "lesion_area": "0"}
    if with_lesion:
        lesion = random_lesion(image, seed=seed, key=row["path"])
        image = lesion.image
        mask_rel = f"masks/{split}/{stem}.png"
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lesion.mask.astype(np.uint8) * 255).save(out / mask_rel)
        record.update(label="1", class_name=POSITIVE, mask=mask_rel, lesion_kind=lesion.spec.kind,
                      lesion_area=str(int(lesion.mask.sum())))
    else:
        record.update(label="0", class_name=NEGATIVE)
    rel = f"{split}/{record['class_name']}/{stem}.png"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out / rel)
    record.update(path=rel, sha1=_sha1(out / rel))
    return record


def count_normal(source: Path) -> int:
    return sum(1 for r in read_manifest(source) if r.get("class_name", "") == NEGATIVE or
               (not r.get("class_name") and r["label"] == "0"))
