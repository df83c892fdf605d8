"""Render what a viewer shows, for the README: the overlay SCs that `medxplain
explain` writes for real files (baselines; and the generative explainers the bundle
has weights for), and the counterfactual SC path of progressive exaggeration.
Pixels are read back from the written DICOM objects, so the PNGs are exactly what a
PACS viewer displays.

    .venv/bin/python scripts/render_docs_images.py [--bundle bundles/demo-pneumonia-v2]
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
from explainers.base import explainer_class  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from pipeline.engine import Engine  # noqa: E402
from pipeline.runner import explain_paths  # noqa: E402

SHARED = Path(os.environ.get("MEDXPLAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "docs" / "img"
# Figures of the generative methods (rendered when the bundle has their weights): file -> methods.
GENERATIVE = {"generative_kermany_pneumonia.png": ("sagen", "sagen_ig", "exaggeration"),
              "generative2_kermany_pneumonia.png": ("medxgan", "medxgan_ig", "gvr", "cia")}
# medxgan_ig's and sagen_ig's counterfactuals are medxgan's and sagen's: their overlays are the only new pictures.
OVERLAY_ONLY = {"medxgan_ig", "sagen_ig"}


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
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia-v2")
    args = parser.parse_args()
    source_path = SHARED / "dicom" / "siim_cr_chest_jpeg_baseline.dcm"
    OUT.mkdir(parents=True, exist_ok=True)
    # As `medxplain explain` does: an image the domain guard rejects (the adult SIIM
    # radiograph for the paediatric demo model) is explained with a visible warning.
    engine = Engine(load_config(overrides={"bundle": args.bundle, "device": "cpu",
                                           "explainers": ["gradcam", "ig", "occlusion"],
                                           "trust": {"out_of_domain": "warn"}}))
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

        trained = Bundle.load(args.bundle).spec.explainers
        for figure, methods in GENERATIVE.items():
            ready = [m for m in methods if explainer_class(m).bundle_section in trained]
            if ready:
                render_generative(args.bundle, ready, wrapped, Path(tmp) / figure, figure)
    return 0


def render_generative(bundle: Path, methods: list[str], source: Path, out: Path, figure: str) -> None:
    """Overlay + counterfactual SCs of each generative method, and the exaggeration path."""
    engine = Engine(load_config(overrides={"bundle": bundle, "device": "cpu", "explainers": methods}))
    (outcome,) = explain_paths(engine, [source], out)
    if not outcome.ok:
        raise SystemExit(f"explain failed: {outcome.error}")
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for written in outcome.written:
        ds = pydicom.dcmread(written)
        by_series.setdefault(str(ds.SeriesDescription), []).append(ds)
    tiles = []
    for method in methods:
        tiles.append(by_series[f"MEDXPLAIN OVERLAY {method}"][0].pixel_array)
        if method in OVERLAY_ONLY:
            continue
        path = sorted(by_series[f"MEDXPLAIN COUNTERFACTUAL {method}"], key=lambda d: int(d.InstanceNumber))
        tiles.append(np.repeat(to_display(path[-1])[..., None], 3, axis=2))
        if method == "exaggeration":
            picks = [path[i] for i in sorted({0, len(path) // 4, len(path) // 2, 3 * len(path) // 4, len(path) - 1})]
            save_png(np.concatenate([to_display(d) for d in picks], axis=1),
                     OUT / "counterfactual_path_exaggeration.png", width=1500)
    height = min(t.shape[0] for t in tiles)
    resized = [np.asarray(Image.fromarray(t).resize((round(t.shape[1] * height / t.shape[0]), height)))
               for t in tiles]
    save_png(np.concatenate(resized, axis=1), OUT / figure, width=1800)


if __name__ == "__main__":
    sys.exit(main())
