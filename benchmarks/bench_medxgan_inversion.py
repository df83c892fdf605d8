"""medXGAN inversion: the official route (z = 0 start, Adam, a fixed number of steps)
against the fast route (encoder E(x), then a short early-stopped refinement), on
the same images, generator, classifier, loss and learning rate, in one run.

    .venv/bin/python benchmarks/bench_medxgan_inversion.py [--n 16] [--official-steps 2000] \
        [--refine-steps shipped,100,200]
        [--device auto|cpu|cuda] [--bundle bundles/demo-pneumonia]

Prints, per route, the reconstruction error (mean L1 at the generator's size),
steps and wall time; for each encoder-route budget, how many official steps (and
how much time) it takes to reach the same error, and the ratios (target: >= 10x
fewer steps and less wall time at equal or better error). The paper's code runs
5,000 steps; the default here stops at 2,000 to keep the run short on a CPU and
says so when the official route has not caught up by then.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_explainers import SHARED, load_images  # noqa: E402
from explainers._helpers import frozen  # noqa: E402
from explainers.bundle import Bundle  # noqa: E402
from explainers.medxgan import MedxganExplainer, invert, to_working  # noqa: E402
from explainers.optimise import SearchBudget  # noqa: E402


def timed_inversion(explainer: MedxganExplainer, classifier, images, *, encoder, budget, device):
    trace: list[torch.Tensor] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with frozen(classifier):
        z, search = invert(explainer.generator, classifier, images, encoder=encoder, budget=budget,
                           probability_weight=explainer.probability_weight, trace=trace)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = (explainer.generator(z) - to_working(images, explainer.generator.size)).abs().flatten(1).mean(1)
    return error, search.steps_used, seconds, trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    parser.add_argument("--n", type=int, default=16, help="test images, inverted as one batch")
    parser.add_argument("--official-steps", type=int, default=2000)
    parser.add_argument("--refine-steps", default="shipped,100,200",
                        help="encoder-route budgets to compare ('shipped': the bundle's setting, with early "
                             "stopping; a number: that many steps, no early stopping)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not (SHARED / "kermany-cxr224" / "manifest.csv").exists():
        print(f"shared Kermany data not found under {SHARED}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    bundle = Bundle.load(args.bundle)
    classifier = bundle.load_classifier(device=str(device)).eval()
    explainer = MedxganExplainer.from_bundle(bundle)
    explainer.generator.to(device)
    explainer.encoder.to(device)
    images = load_images(bundle, args.n).to(device)
    lr = explainer.budget.learning_rate
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {len(images)} images, "
          f"learning rate {lr}, probability weight {explainer.probability_weight}")

    official_budget = SearchBudget(steps=args.official_steps, learning_rate=lr, tolerance=0.0,
                                   patience=args.official_steps + 1)
    slow_error, _, slow_s, trace = timed_inversion(explainer, classifier, images, encoder=None,
                                                   budget=official_budget, device=device)
    curve = torch.stack(trace).mean(dim=1)  # mean L1 of the images at each step (index = steps taken)
    per_step_s = slow_s / max(args.official_steps, 1)

    print("| route | steps (mean) | wall s | ms/image | reconstruction L1 | official steps to the same L1 | "
          "x steps | x wall time |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| official (z = 0, Adam, fixed) | {args.official_steps} | {slow_s:.1f} | "
          f"{1000 * slow_s / len(images):.0f} | {float(slow_error.mean()):.4f} | | | |")
    for budget_name in args.refine_steps.split(","):
        budget = explainer.budget if budget_name == "shipped" else SearchBudget(
            steps=int(budget_name), learning_rate=lr, tolerance=0.0, patience=int(budget_name) + 1)
        error, steps, seconds, _ = timed_inversion(explainer, classifier, images, encoder=explainer.encoder,
                                                   budget=budget, device=device)
        target, mean_steps = float(error.mean()), float(steps.float().mean())
        reached = (curve <= target).nonzero()
        if len(reached):
            needed = int(reached[0])
            tail = f"{needed} | {needed / max(mean_steps, 1.0):.1f} | {needed * per_step_s / seconds:.1f} |"
        else:
            tail = (f"> {args.official_steps} (best {float(curve.min()):.4f}) | "
                    f"> {args.official_steps / max(mean_steps, 1.0):.0f} | > {slow_s / seconds:.0f} |")
        budget = (f"shipped: {explainer.budget.steps} max, early stop" if budget_name == "shipped"
                  else f"{budget_name} steps")
        label = f"encoder + refinement ({budget})"
        print(f"| {label} | {mean_steps:.1f} | {seconds:.1f} | {1000 * seconds / len(images):.0f} | {target:.4f} "
              f"| {tail}")
    print(f"the paper's 5,000 official steps at this step cost: ~{5000 * per_step_s / len(images):.1f} s per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
