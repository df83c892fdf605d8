"""Shortcut sensitivity of bundle classifiers: how much P(positive) moves when only a
burned-in text strip or a side marker is added to untouched test images.

    .venv/bin/python benchmarks/bench_shortcut.py \
        --bundle bundles/demo-pneumonia --bundle bundles/demo-pneumonia-v2 \
        [--data ../shared/data/kermany-cxr224] [--n 624] [--seed 0] [--record]

``--record`` writes the last bundle's figures into its bundle.yaml
(``metrics.shortcut_sensitivity``) and the earlier bundles' figures into its
``metrics.history``, then re-renders its MODEL_CARD.md.

For each bundle (same images, same overlays, one run): the test AUROC on clean
images, then per overlay the median and 90th percentile of |P(overlaid) - P(clean)|,
the share of decisions (at the bundle's threshold) that change, and the AUROC on
overlaid images, and the median |dP| over the images whose clean P lies in
[0.05, 0.95] (where a saturated classifier can still move; n in brackets). Overlays are
drawn at the classifier's input size by the functions ``explainers.shortcuts`` also
uses for training, with fixed, per-image seeded text:

- ``text_bottom_3pct``: bright text strip in the bottom 3 % of the image (the kind the
  ``shortcut_robust`` augmentation draws);
- ``marker_corner``: a bright "R" (8 % of H) in the top-left corner (a trained kind);
- ``text_vertical_grey`` (held out: never drawn in training): mid-grey (0.6) text
  running vertically along the right edge, 4 % wide;
- ``marker_AP_large_grey`` (held out): a boxed mid-grey "AP" 15 % of H high in the
  bottom-right corner (training markers are 4-12 %, single letters, near-white or black).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_io.preprocess import InputSpec  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from explainers.metrics import classification_metrics  # noqa: E402
from explainers.shortcuts import TEXT_CHARACTERS, burn_in_text, side_marker  # noqa: E402
from explainers.train_classifier import predict_probabilities  # noqa: E402
from pipeline.training.classifier import write_model_card  # noqa: E402
from pipeline.training.datasets import load_splits  # noqa: E402


def _text(seed: int, index: int, length: int = 14) -> str:
    rng = np.random.default_rng([seed, index])
    return "".join(rng.choice(list(TEXT_CHARACTERS.strip()), size=length))


def _vertical_text(image: torch.Tensor, text: str) -> torch.Tensor:
    turned = torch.rot90(image, 1, dims=(1, 2))  # the right edge becomes the bottom edge
    turned = burn_in_text(turned, text, top_fraction=0.95, height_fraction=0.04, left_fraction=0.2, value=0.6)
    return torch.rot90(turned, -1, dims=(1, 2))


OVERLAYS: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
    "text_bottom_3pct": lambda x, t: burn_in_text(x, t, top_fraction=0.97, height_fraction=0.03, value=1.0),
    "marker_corner": lambda x, t: side_marker(x, "R", "top_left", size_fraction=0.08, value=1.0),
    "text_vertical_grey": _vertical_text,
    "marker_AP_large_grey": lambda x, t: side_marker(x, "AP", "bottom_right", size_fraction=0.15, value=0.6,
                                                     boxed=True),
}
HELD_OUT = ("text_vertical_grey", "marker_AP_large_grey")


def overlaid(images: torch.Tensor, overlay: str, seed: int) -> torch.Tensor:
    """(N, 1, H, W) float in [0, 1] with ``overlay`` drawn on each image (text seeded by (seed, index))."""
    draw = OVERLAYS[overlay]
    return torch.stack([draw(image, _text(seed, i)) for i, image in enumerate(images)]).clamp(0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", help="bundle folder (repeat to compare)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kermany-cxr224")
    parser.add_argument("--n", type=int, default=0, help="first N test images (0: all 624)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="record into the last bundle's bundle.yaml and card")
    args = parser.parse_args()
    bundles = [Bundle.load(b) for b in (args.bundle or [ROOT / "bundles" / "demo-pneumonia"])]
    sizes = {tuple(b.spec.input.size) for b in bundles} | {(b.spec.input.aspect,) for b in bundles}
    if len(sizes) != 2:
        print("the bundles must share the input size and aspect", file=sys.stderr)
        return 2
    first = bundles[0].spec.input
    test = load_splits(args.data, InputSpec(tuple(first.size), first.aspect), seed=args.seed)["test"]
    images, labels = test.float_images(), test.labels
    if args.n:
        images, labels = images[:args.n], labels[:args.n]
    variants = {name: overlaid(images, name, args.seed) for name in OVERLAYS}
    print(f"{len(images)} test images ({int(labels.sum())} positive) of {args.data.name}; "
          f"held-out overlays (not drawn in training): {', '.join(HELD_OUT)}\n")
    print("| bundle | clean AUROC | overlay | median abs dP | p90 abs dP | median abs dP, 0.05<P<0.95 (n) | "
          "decisions changed | AUROC overlaid |")
    print("|---|---|---|---|---|---|---|---|")
    figures: list[dict] = []
    for bundle in bundles:
        overlays: dict[str, dict] = {}
        model = bundle.load_classifier()
        threshold = bundle.spec.task.threshold
        clean = predict_probabilities(model, images)
        auroc = classification_metrics(clean, labels, threshold)["auroc"]
        uncertain = (clean >= 0.05) & (clean <= 0.95)
        for name, shifted in variants.items():
            moved = predict_probabilities(model, shifted)
            delta = (moved - clean).abs()
            changed = ((moved >= threshold) != (clean >= threshold)).float().mean()
            overlays[name] = {
                "median": round(float(delta.median()), 4), "p90": round(float(torch.quantile(delta, 0.9)), 4),
                "median_uncertain": round(float(delta[uncertain].median()), 4) if uncertain.any() else None,
                "n_uncertain": int(uncertain.sum()), "decisions_changed": round(float(changed), 4),
                "auroc": round(classification_metrics(moved, labels, threshold)["auroc"], 4),
                "held_out": name in HELD_OUT}
            print(f"| {bundle.spec.name} | {auroc:.4f} | {name}{' (held out)' if name in HELD_OUT else ''} | "
                  f"{delta.median():.4f} | {torch.quantile(delta, 0.9):.4f} | "
                  f"{delta[uncertain].median() if uncertain.any() else float('nan'):.4f} ({int(uncertain.sum())}) | "
                  f"{changed:.3f} | "
                  f"{classification_metrics(moved, labels, threshold)['auroc']:.4f} |")
        figures.append({"name": bundle.spec.name, "version": bundle.spec.version, "test_auroc": round(auroc, 4),
                        "classifier_sha256": bundle.spec.classifier.weights.sha256,
                        "note": bundle.spec.training.get("augmentation", "basic") + " augmentation",
                        "shortcut_sensitivity": {"n": len(images), "overlays": overlays}})
    if args.record:
        last = bundles[-1]
        command = "python benchmarks/bench_shortcut.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        last.spec.metrics["shortcut_sensitivity"] = {**figures[-1]["shortcut_sensitivity"], "command": command}
        last.spec.metrics["history"] = figures[:-1]
        last.save_spec()
        write_model_card(last)
        print(f"\nrecorded in {last.root / 'bundle.yaml'} and MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
