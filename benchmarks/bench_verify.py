"""Re-verification of written counterfactuals on a seeded sample of Kermany test images.

    .venv/bin/python benchmarks/bench_verify.py [--n 60] [--methods sagen,exaggeration,gvr,cia,medxgan] \
        [--bundle bundles/demo-pneumonia] [--shared ../shared/data] [--keep DIR]

Wraps the images as CR DICOM, explains them with the engine (out-of-domain images too,
with the caution), then runs the `medxplain verify` logic on what was written: per
method, how many counterfactual SCs re-classify to the SR's probability (within 0.02)
and flip.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config.schema import MedxplainConfig  # noqa: E402
from dicom_io.convert import cr_from_pixels  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from pipeline.engine import Engine  # noqa: E402
from pipeline.runner import explain_paths  # noqa: E402
from pipeline.verify import verify_outputs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--methods", default="sagen,exaggeration,gvr,cia,medxgan")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--keep", type=Path, default=None, help="write inputs and outputs here (else a temp dir)")
    args = parser.parse_args()
    kermany = args.shared / "kermany-cxr224"
    rows = [r for r in csv.DictReader(open(kermany / "manifest.csv")) if r["split"] == "test"]
    picked = [rows[i] for i in sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:args.n])]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        inputs = root / "in"
        inputs.mkdir(parents=True, exist_ok=True)
        for number, row in enumerate(picked, start=1):
            pixels = np.asarray(Image.open(kermany / row["path"]).convert("L"), dtype=np.uint8)
            cr_from_pixels(pixels, patient_id="MXVERIFY", patient_name="Verify^Kermany", study_key="bench-verify",
                           instance_key=row["path"], instance_number=number).save_as(
                inputs / f"{number:03d}.dcm", enforce_file_format=True)
        config = MedxplainConfig(bundle=args.bundle, explainers=args.methods.split(","), device="cpu",
                                 outputs={"overlay": False, "segmentation": False},
                                 trust={"out_of_domain": "warn"})
        outcomes = explain_paths(Engine(config), sorted(inputs.glob("*.dcm")), root / "out")
        failed = [o.error for o in outcomes if not o.ok]
        checks = verify_outputs([root / "out"], Bundle.load(args.bundle))
    print(f"{len(picked)} Kermany test images (seeded sample), {len(failed)} failed to explain")
    print("| method | SR says flipped | SC re-classified agrees (|dP| <= 0.02 and same flip) | max |dP| |")
    print("|---|---|---|---|")
    for method in args.methods.split(","):
        mine = [c for c in checks if c.method == method]
        if not mine:
            continue
        agree = sum(c.agrees(0.02) for c in mine)
        worst = max(abs(c.reclassified - c.sr_counterfactual_probability) for c in mine if c.reclassified is not None)
        print(f"| {method} | {sum(bool(c.sr_flipped) for c in mine)} of {len(mine)} | {agree} of {len(mine)} | "
              f"{worst:.4f} |")
    return 0 if all(c.agrees(0.02) for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
