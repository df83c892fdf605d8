"""Cost of each explainer at prediction time, batch 1 and batch N, against one
classifier forward pass at the same batch size measured in the same run.

    .venv/bin/python benchmarks/bench_explainers.py [--methods sagen,exaggeration,gradcam]
        [--batch 16] [--repeats 5] [--device auto|cpu|cuda] [--bundle bundles/demo-pneumonia]

Inputs are real Kermany test radiographs, preprocessed as DICOM input is. Prints
median ms per image and the ratio to the classifier's forward; on CUDA also the
peak memory and images per second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_io.preprocess import Preprocessor  # noqa: E402
from explainers.base import explainer_class  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from pipeline.training.datasets import read_images, read_manifest  # noqa: E402

SHARED = Path(os.environ.get("MEDXPLAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_images(bundle: Bundle, n: int) -> torch.Tensor:
    """Every 7th test image (n at most) as the classifier sees it at training."""
    kermany = SHARED / "kermany-cxr224"
    rows = [r for r in read_manifest(kermany) if r["split"] == "test"][::7][:n]
    images, _ = read_images(kermany, rows, Preprocessor(bundle.spec.input.size, bundle.spec.input.aspect))
    return torch.from_numpy(images).float() / 255.0


def median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, cuDNN autotuning)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    parser.add_argument("--methods", default="gradcam,sagen,exaggeration")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not (SHARED / "kermany-cxr224" / "manifest.csv").exists():
        print(f"shared Kermany data not found under {SHARED}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    bundle = Bundle.load(args.bundle)
    classifier = bundle.load_classifier(device=str(device)).eval()
    images = load_images(bundle, args.batch).to(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, bundle "
          f"{bundle.spec.name} ({bundle.spec.input.size[0]} px), batch {len(images)}, repeats {args.repeats}")
    print("| method | ms/image batch 1 | x forward | ms/image batch N | x forward | speed-up N vs 1 |"
          + (" peak MiB |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))

    def forward(x: torch.Tensor):
        with torch.no_grad():
            return classifier(x)

    fwd1 = median_ms(lambda: forward(images[:1]), args.repeats, device)
    fwdn = median_ms(lambda: forward(images), args.repeats, device) / len(images)
    print(f"| classifier forward | {fwd1:.2f} | 1.0 | {fwdn:.2f} | 1.0 | {fwd1 / fwdn:.1f} |"
          + (" |" if device.type == "cuda" else ""))
    for name in args.methods.split(","):
        explainer = explainer_class(name).from_bundle(bundle)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        one = median_ms(lambda: explainer.explain(images[:1], classifier), args.repeats, device)
        many = median_ms(lambda: explainer.explain(images, classifier), args.repeats, device) / len(images)
        peak = f" {torch.cuda.max_memory_allocated() / 2**20:.0f} |" if device.type == "cuda" else ""
        print(f"| {name} | {one:.1f} | {one / fwd1:.1f} | {many:.1f} | {many / fwdn:.1f} | {one / many:.1f} |{peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
