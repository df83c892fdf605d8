"""Where the generative methods' change lies, for several bundles in one run (same
test images): flips per called class, L1, SSIM, and the share of |counterfactual -
input| inside the lung fields and inside the outer 10 % band, with ratios of each
later bundle against the first (the baseline).

    .venv/bin/python benchmarks/bench_change_location.py \
        --bundle bundles/demo-pneumonia --bundle bundles/demo-pneumonia-v2 \
        --methods sagen,exaggeration [--data ../shared/data/kermany-cxr224] [--n 624] \
        [--setting "" --setting outside_lungs=8,refine_steps=100]

The figures are ``explainers.validity.evaluate_explainer``'s, the scoring every
training's test record uses: ``lung_share`` over all cases and for cases called
positive (the positive -> negative direction), ``border_share``, next to
``lung_area`` / ``border_area`` (what a uniform change scores). ``--n`` takes the
first N of a seeded permutation of the test split. A method a bundle lacks is skipped.
Each ``--setting`` (comma-separated explainer parameters, "" for the bundle's own)
adds one row per bundle, on top of the bundle's parameters; the first row of each
method is the baseline of its ratios.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explainers.base import explainer_class, parameter_overrides  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from explainers.validity import evaluate_explainer  # noqa: E402
from pipeline.training.explainers import training_splits  # noqa: E402

COLUMNS = ("flip_rate_called_positive", "flip_rate_called_negative", "proximity_l1", "proximity_ssim", "lung_share",
           "lung_share_called_positive", "border_share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="first: the baseline")
    parser.add_argument("--methods", default="sagen,exaggeration,medxgan,gvr,cia")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kermany-cxr224")
    parser.add_argument("--n", type=int, default=624)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", action="append", default=None,
                        help="explainer parameters k=v[,k=v...] over the bundle's ('' = as bundled); repeatable")
    args = parser.parse_args()
    settings = [parameter_overrides([i for i in text.split(",") if i.strip()]) for text in args.setting or [""]]
    print("command:", " ".join(shlex.quote(a) for a in sys.argv))
    bundles = [Bundle.load(b) for b in args.bundle]
    test = training_splits(bundles[0], args.data, max_images=None, seed=args.seed)["test"].images
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.n].sort().values
    images = test[pick]
    print(f"{len(images)} test images; columns: {', '.join(COLUMNS)}, ms_per_image")
    for method in args.methods.split(","):
        baseline: dict[str, float] | None = None
        for bundle, setting in ((b, s) for b in bundles for s in settings):
            if method not in bundle.spec.explainers:
                print(f"{method:13s} {bundle.spec.name:20s} not trained")
                continue
            if setting:
                print(f"{method:13s} {bundle.spec.name:20s} with {setting}")
            metrics = evaluate_explainer(explainer_class(method).from_bundle(bundle, **setting),
                                         bundle.load_classifier(), images, batch_size=args.batch_size)
            row = " ".join(f"{metrics.get(k, float('nan')):.3f}" for k in COLUMNS)
            ratio = ""
            if baseline is None:
                baseline = metrics
            else:
                ratio = "  vs baseline: " + " ".join(f"{k} x{metrics[k] / baseline[k]:.2f}" for k in
                                                   ("lung_share", "border_share", "flip_rate_called_negative")
                                                   if baseline.get(k))
            print(f"{method:13s} {bundle.spec.name:20s} {row} {metrics['ms_per_image']:.0f}{ratio}", flush=True)
    print(f"areas: lung fields {metrics['lung_area']:.3f}, outer 10 % band {metrics['border_area']:.3f}")


if __name__ == "__main__":
    main()
