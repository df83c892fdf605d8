"""Sanity checks per method (Adebayo et al. 2018) on a few Kermany test images, without
the rest of the benchmark: cascading model randomisation (Spearman of each map with the
original after the top block, half the blocks and all blocks are re-initialised) and
the map's Spearman with its input's Sobel edges.

    .venv/bin/python benchmarks/bench_sanity.py [--n 6] [--methods gradcam,ig,...] [--bundle B]

The full benchmark (`medxplain benchmark --sanity-n N`) reports the same columns.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from explainers import evaluation as ev  # noqa: E402
from explainers.base import explainer_class  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from pipeline.evaluation.benchmark import SANITY_STAGES, depends_on_classifier  # noqa: E402
from tests.generator_helpers import sampled_test_images  # noqa: E402

METHODS = "gradcam,ig,occlusion,sagen,exaggeration,medxgan,gvr,cia"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle)
    classifier = bundle.load_classifier()
    images = sampled_test_images(args.shared / "kermany-cxr224", args.n)
    print(f"{args.n} Kermany test images (seeded sample); Spearman rank correlation, mean over images")
    print("| method | top block randomised | half the blocks | all blocks | map vs input edges | "
          "map depends on the classifier |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        explainer = explainer_class(method).from_bundle(bundle)
        result = ev.cascading_randomisation(classifier, lambda x, c: explainer.explain(x, c).saliency, images,
                                            stages=SANITY_STAGES)
        edges = ev.edge_similarity(images, explainer.explain(images, classifier).saliency)
        values = [float(result[f"randomised_{f:g}"].mean()) for f in SANITY_STAGES]
        print(f"| {method} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {float(edges.mean()):.2f} | "
              f"{depends_on_classifier(values[-1])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
