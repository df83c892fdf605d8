"""Domain guard of a bundle: the in-domain rate on the Kermany test split, and which
images the classifier was not made for it catches.

    .venv/bin/python benchmarks/bench_domain_guard.py [--bundle bundles/demo-pneumonia] \
        [--shared ../shared/data]

Kinds (all real pixels, read through the product's DICOM reader where they are DICOM):
adult chest CRs (the two shared files and the shared DICOM cases derived from them,
TBX11K sample PNGs), a photograph (shared case sc_empty_modality_lut_item.dcm), a
nuclear-medicine whole-body bone scan, a non-chest projection image (pydicom's test file
JPGExtended.dcm), an MG-labelled chest with padding (shared case), Kermany test images
inverted, and pure noise. No real mammogram or non-chest radiograph is available
offline here. Prints one row per image kind: caught / total, and the score range.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_io.errors import DicomInputError  # noqa: E402
from dicom_io.preprocess import Preprocessor  # noqa: E402
from dicom_io.reader import read_radiograph  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from explainers.domain import DomainGuard  # noqa: E402
from pipeline.training.datasets import read_images, read_manifest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    from pydicom.data import get_testdata_file

    bundle = Bundle.load(args.bundle)
    classifier = bundle.load_classifier()
    guard = DomainGuard.from_bundle(bundle, classifier)
    if guard is None:
        print(f"{args.bundle} has no domain guard: run `medxplain train domain-guard`", file=sys.stderr)
        return 2
    pre = Preprocessor(bundle.spec.input.size, bundle.spec.input.aspect)

    def dicom(path) -> torch.Tensor:
        return pre(read_radiograph(path).display).as_tensor()[None]

    def stored(path) -> torch.Tensor:  # the stored values as grey, min-max scaled (no header LUTs)
        pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
        if pixels.ndim == 3:
            pixels = pixels.mean(axis=-1)
        return pre((pixels - pixels.min()) / max(1e-6, float(pixels.max() - pixels.min()))).as_tensor()[None]

    def picture(path) -> torch.Tensor:
        return pre(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0).as_tensor()[None]

    kermany = args.shared / "kermany-cxr224"
    rows = [r for r in read_manifest(kermany) if r["split"] == "test"]
    test = torch.from_numpy(read_images(kermany, rows, pre)[0]).float() / 255.0
    cases = args.shared / "dicom-cases"
    kinds: dict[str, list[torch.Tensor]] = {
        "adult chest CR (shared dicom/)": [dicom(p) for p in sorted((args.shared / "dicom").glob("*.dcm"))],
        "adult chest CR, 512 px derivations (dicom-cases cr_*/dx_*)": [],
        "adult chest, TBX11K sample PNG": [picture(p) for p in sorted((args.shared / "tbx11k-sample").rglob("*.png"))],
        "MG-labelled chest with 2/3 padding (dicom-cases mg_*)": [],
        "photograph RGB->gray (dicom-cases sc_empty_modality_lut_item)": [
            stored(cases / "sc_empty_modality_lut_item.dcm")],
        "NM whole-body bone scan (pydicom JPGExtended.dcm)": [dicom(get_testdata_file("JPGExtended.dcm"))],
        "test patterns / CT slice (dicom-cases ot_*, sc_deflated, sc_jpegls)": [],
        "Kermany test, inverted": [1.0 - test],
        "uniform noise": [torch.rand(16, 1, *test.shape[-2:], generator=torch.Generator().manual_seed(0))],
        "Gaussian noise": [(0.5 + 0.2 * torch.randn(16, 1, *test.shape[-2:],
                                                    generator=torch.Generator().manual_seed(1))).clamp(0, 1)],
    }
    for path in sorted(cases.glob("*.dcm")):
        try:
            image = dicom(path)
        except DicomInputError as exc:
            print(f"(not read: {path.name}: {exc.reason})")
            continue
        if path.name.startswith(("cr_", "dx_")):
            kinds["adult chest CR, 512 px derivations (dicom-cases cr_*/dx_*)"].append(image)
        elif path.name.startswith("mg_"):
            kinds["MG-labelled chest with 2/3 padding (dicom-cases mg_*)"].append(image)
        elif path.name != "sc_empty_modality_lut_item.dcm":
            kinds["test patterns / CT slice (dicom-cases ot_*, sc_deflated, sc_jpegls)"].append(image)

    result = guard(test)
    print(f"threshold {guard.threshold:.2f} (layers {', '.join(guard.extract.layers)})")
    print(f"Kermany test: {int(result.in_domain.sum())} of {len(test)} in domain "
          f"({float(result.in_domain.float().mean()):.3f}); scores {float(result.score.min()):.1f}-"
          f"{float(result.score.max()):.1f}")
    print("| image kind | caught (out of domain) | scores |")
    print("|---|---|---|")
    for kind, images in kinds.items():
        if not images:
            continue
        scores = torch.cat([guard(x).score for x in images])
        caught = int((scores > guard.threshold).sum())
        print(f"| {kind} | {caught} of {len(scores)} | {float(scores.min()):.1f}-{float(scores.max()):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
