"""medXGAN inversion: the official route (z = 0 start, Adam, a fixed number of steps)
against the fast route (encoder E(x), then a short early-stopped refinement), on
the same images, generator, classifier, loss and learning rate, in one run.

    .venv/bin/python benchmarks/bench_medxgan_inversion.py [--n 16] [--official-steps 2000]
        [--device auto|cpu|cuda] [--bundle bundles/demo-pneumonia]

Prints, per route, the reconstruction error (mean L1 at the generator's size),
steps and wall time; then how many official steps (and how much time) it takes
to reach the encoder route's error, and the ratios (target: >= 10x fewer steps
and less wall time at equal or better error). The paper's code runs 5,000 steps;
the default here stops at 2,000 to keep the run short on a CPU and says so when
the official route has not caught up by then.
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
from explainers.bundle import Bundle  # noqa: E402
from explainers.medxgan import MedxganExplainer, frozen, invert, to_working  # noqa: E402
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {len(images)} images, "
          f"learning rate {explainer.budget.learning_rate}, probability weight {explainer.probability_weight}")

    fast_error, fast_steps, fast_s, _ = timed_inversion(explainer, classifier, images, encoder=explainer.encoder,
                                                        budget=explainer.budget, device=device)
    official_budget = SearchBudget(steps=args.official_steps, learning_rate=explainer.budget.learning_rate,
                                   tolerance=0.0, patience=args.official_steps + 1)
    slow_error, slow_steps, slow_s, trace = timed_inversion(explainer, classifier, images, encoder=None,
                                                            budget=official_budget, device=device)
    curve = torch.stack(trace).mean(dim=1)  # mean L1 after each step (index = steps taken)
    target = float(fast_error.mean())
    reached = (curve <= target).nonzero()
    per_step_s = slow_s / max(args.official_steps, 1)

    print("| route | steps (mean) | wall s | ms/image | reconstruction L1 |")
    print("|---|---|---|---|---|")
    print(f"| encoder + refinement | {float(fast_steps.float().mean()):.1f} | {fast_s:.2f} | "
          f"{1000 * fast_s / len(images):.0f} | {target:.4f} |")
    print(f"| official (z = 0, Adam, fixed) | {args.official_steps} | {slow_s:.2f} | "
          f"{1000 * slow_s / len(images):.0f} | {float(slow_error.mean()):.4f} |")
    if len(reached):
        steps_needed = int(reached[0])
        print(f"official route reaches the encoder route's L1 {target:.4f} after {steps_needed} steps "
              f"(~{steps_needed * per_step_s:.2f} s): {steps_needed / max(float(fast_steps.float().mean()), 1):.1f}x "
              f"the steps, {steps_needed * per_step_s / fast_s:.1f}x the wall time")
    else:
        print(f"official route does not reach the encoder route's L1 {target:.4f} within {args.official_steps} "
              f"steps (best {float(curve.min()):.4f}): more than {args.official_steps / max(float(fast_steps.float().mean()), 1):.0f}x "
              f"the steps and {slow_s / fast_s:.0f}x the wall time")
    print(f"full official budget (5,000 steps) at this step cost: ~{5000 * per_step_s:.0f} s for the batch, "
          f"{5000 * per_step_s / len(images):.1f} s per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
