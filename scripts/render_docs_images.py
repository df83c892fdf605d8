"""Render what a viewer shows, for the README: the overlay SC that `medxplain
explain` writes for a real file, and a counterfactual SC path (built from a
synthetic path until a generative explainer is trained). Pixels are read back from
the written DICOM objects, so the PNGs are exactly what a PACS viewer displays.

    .venv/bin/python scripts/render_docs_images.py [--bundle bundles/demo-pneumonia]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402
from dicom_io.convert import cr_from_pixels  # noqa: E402
from dicom_io.reader import read_radiograph  # noqa: E402
from dicom_io.sc import counterfactual_sc  # noqa: E402
from pipeline.engine import Engine  # noqa: E402
from pipeline.runner import explain_paths  # noqa: E402

SHARED = Path(os.environ.get("MEDXPLAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "docs" / "img"


def save_png(array: np.ndarray, path: Path, width: int = 900) -> None:
    image = Image.fromarray(array)
    image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    image.save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)}")


def to_display(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(pixels.astype(np.float32) / 65535.0 * 255.0).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    args = parser.parse_args()
    source_path = SHARED / "dicom" / "siim_cr_chest_jpeg_baseline.dcm"
    OUT.mkdir(parents=True, exist_ok=True)
    engine = Engine(load_config(overrides={"bundle": args.bundle, "device": "cpu",
                                           "explainers": ["gradcam", "ig", "occlusion"]}))
    with tempfile.TemporaryDirectory() as tmp:
        # A Kermany test radiograph (pneumonia), wrapped as CR the way `make demo` does it.
        kermany = SHARED / "kermany-cxr224" / "test" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
        pixels = np.asarray(Image.open(kermany).convert("L"), dtype=np.uint8)
        wrapped = Path(tmp) / "kermany.dcm"
        cr_from_pixels(pixels, patient_id="MXDEMO", patient_name="Demo^Kermany", study_key="docs",
                       instance_key="docs-kermany").save_as(wrapped, enforce_file_format=True)
        for name, path in (("overlays_siim.png", source_path), ("overlays_kermany_pneumonia.png", wrapped)):
            (outcome,) = explain_paths(engine, [path], Path(tmp) / name)
            if not outcome.ok:
                print(f"explain failed: {outcome.error}", file=sys.stderr)
                return 1
            overlays = {}
            for written in outcome.written:
                ds = pydicom.dcmread(written)
                if ds.Modality != "SR" and ds.get("SamplesPerPixel") == 3:
                    overlays[ds.SeriesNumber] = ds.pixel_array
            tiles = [overlays[k] for k in sorted(overlays)]
            height = min(t.shape[0] for t in tiles)
            save_png(np.concatenate([t[:height] for t in tiles], axis=1), OUT / name, width=1500)

    # A synthetic counterfactual path (a dense patch fading out), written by the real writer.
    source = read_radiograph(source_path)
    yy, xx = np.mgrid[: source.rows, : source.columns]
    blob = np.exp(-(((yy - 0.55 * source.rows) ** 2 + (xx - 0.3 * source.columns) ** 2) / (2 * 60.0 ** 2)))
    path = [np.clip(source.display + 0.35 * blob * (1 - t), 0, 1) for t in (0.0, 0.5, 1.0)]
    datasets = counterfactual_sc(source=source, images=path, path_probability=[0.91, 0.62, 0.18],
                                 method="demo", context=engine.context("docs"), series_number=9002)
    tiles = [to_display(pydicom.dcmread(_roundtrip(ds))) for ds in datasets]
    save_png(np.concatenate(tiles, axis=1), OUT / "counterfactual_path_synthetic.png", width=1500)
    return 0


def _roundtrip(ds: pydicom.Dataset):
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


if __name__ == "__main__":
    sys.exit(main())
