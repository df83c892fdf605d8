"""Shared fixtures: where the shared real data lives, and skipping when it is absent."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDXPLAIN_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
DICOM_DIR = SHARED_DATA / "dicom"
KERMANY_DIR = SHARED_DATA / "kermany-cxr224"
CR_16BIT = DICOM_DIR / "RG1_UNCR.dcm"
CR_JPEG = DICOM_DIR / "siim_cr_chest_jpeg_baseline.dcm"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set MEDXPLAIN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_dicom_files() -> list[Path]:
    return [_require(CR_16BIT), _require(CR_JPEG)]


@pytest.fixture(scope="session")
def cr_16bit() -> Path:
    return _require(CR_16BIT)


@pytest.fixture(scope="session")
def cr_jpeg() -> Path:
    return _require(CR_JPEG)


@pytest.fixture(scope="session")
def kermany_dir() -> Path:
    return _require(KERMANY_DIR)


def kermany_subset(kermany_dir: Path, out: Path, counts: dict[str, int]) -> Path:
    """A small class-balanced Kermany folder with its own manifest.csv, the images
    symlinked from the shared data (read in place, never copied)."""
    rows = list(csv.DictReader(open(kermany_dir / "manifest.csv")))
    picked = []
    for split, n in counts.items():
        for label in ("0", "1"):
            picked += [r for r in rows if r["split"] == split and r["label"] == label][: n // 2]
    out.mkdir(parents=True, exist_ok=True)
    for r in picked:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        (out / r["path"]).symlink_to(kermany_dir / r["path"])
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(picked)
    return out
