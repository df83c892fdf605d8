"""Time every stage of the CLI path on the shared DICOM files, on this machine.

Prints the median of repeated runs per stage, and each explainer's cost as a ratio
to one classifier forward+backward pass measured in the same run. Then the peak
RSS of a whole `medxplain explain` process on one file.

    .venv/bin/python benchmarks/bench_pipeline.py [--repeats 5] [--bundle bundles/demo-pneumonia]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from dicom_io.reader import read_radiograph  # noqa: E402
from dicom_io.sc import counterfactual_sc, overlay_sc  # noqa: E402
from dicom_io.seg import saliency_seg  # noqa: E402
from dicom_io.sr import ExplainerRecord, audit_sr  # noqa: E402
from pipeline.engine import Engine, most_salient_region  # noqa: E402

SHARED = Path(os.environ.get("MEDXPLAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
FILES = [SHARED / "dicom" / "RG1_UNCR.dcm", SHARED / "dicom" / "siim_cr_chest_jpeg_baseline.dcm"]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy imports, kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo-pneumonia")
    parser.add_argument("--explainers", default="gradcam,ig,occlusion")
    args = parser.parse_args()
    missing = [f for f in FILES if not f.exists()]
    if missing:
        print(f"shared DICOM files not found: {missing}", file=sys.stderr)
        return 2
    config = load_config(overrides={"bundle": args.bundle, "device": "cpu", "explainers": args.explainers.split(",")})
    engine = Engine(config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {engine.device}, "
          f"bundle {engine.bundle.spec.name} ({engine.bundle.spec.input.size[0]} px), repeats {args.repeats}")
    classifier = engine.classifier

    for path in FILES:
        rows: list[tuple[str, float, str]] = []
        source = read_radiograph(path)
        rows.append(("decode (read + LUTs)", median_ms(lambda: read_radiograph(path), args.repeats), ""))
        rows.append(("preprocess (MONAI)", median_ms(lambda: engine.preprocessor(source.display), args.repeats), ""))
        model_input = engine.preprocessor(source.display)
        batch = model_input.as_tensor()[None]

        def forward():
            with torch.no_grad():
                classifier(batch)

        def forward_backward():
            x = batch.clone().requires_grad_(True)
            classifier(x).sum().backward()

        fwd = median_ms(forward, args.repeats)
        fwdbwd = median_ms(forward_backward, args.repeats)
        rows.append(("classify (forward)", fwd, "1.0x forward"))
        rows.append(("forward+backward", fwdbwd, f"{fwdbwd / fwd:.1f}x forward"))
        explanations = {}
        for explainer in engine.explainers:
            ms = median_ms(lambda e=explainer: explanations.__setitem__(e.name, e.explain(batch, classifier)),
                           args.repeats)
            rows.append((f"explain: {explainer.name}", ms, f"{ms / fwdbwd:.1f}x fwd+bwd"))
        saliency_model = explanations[engine.explainers[0].name].saliency[0]
        rows.append(("inverse map to source grid",
                     median_ms(lambda: engine.preprocessor.to_source(model_input, saliency_model), args.repeats), ""))
        saliency = np.clip(engine.preprocessor.to_source(model_input, saliency_model), 0, 1)
        mask = most_salient_region(saliency, 0.05)
        context = engine.context("benchmark")
        prob = float(engine.classify(batch)[0])
        overlay = overlay_sc(source=source, saliency=saliency, method="gradcam", probability=prob,
                             decision=engine.decision(prob), context=context, series_number=9001,
                             positive_label=engine.bundle.spec.task.positive_label)
        rows.append(("write: overlay SC", median_ms(lambda: overlay_sc(
            source=source, saliency=saliency, method="gradcam", probability=prob, decision=engine.decision(prob),
            context=context, series_number=9001, positive_label=engine.bundle.spec.task.positive_label),
            args.repeats), ""))
        rows.append(("write: counterfactual SC (1 step)", median_ms(lambda: counterfactual_sc(
            source=source, images=[source.display], method="gradcam", context=context, series_number=9002,
            positive_label=engine.bundle.spec.task.positive_label),
            args.repeats), ""))
        seg = saliency_seg(source=source, mask=mask, method="gradcam", context=context, series_number=9003)
        rows.append(("write: BINARY SEG", median_ms(lambda: saliency_seg(
            source=source, mask=mask, method="gradcam", context=context, series_number=9003), args.repeats), ""))
        record = ExplainerRecord(method="gradcam", method_version="1", parameters={}, probability=prob,
                                 threshold=0.5, decision=engine.decision(prob), counterfactual_probability=None,
                                 flipped=None, checks={}, processing_ms=1.0, derived=[overlay, seg])
        rows.append(("write: SR", median_ms(lambda: audit_sr(source=source, records=[record], context=context,
                                                             series_number=9000, total_processing_ms=1.0,
                                                             finding_name=engine.bundle.spec.task.finding),
                                            args.repeats), ""))
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(("save overlay to disk", median_ms(
                lambda: overlay.save_as(Path(tmp) / "o.dcm", enforce_file_format=True), args.repeats), ""))
        by_name = {name: ms for name, ms, _ in rows}
        io_total = (by_name["decode (read + LUTs)"] + by_name["preprocess (MONAI)"]
                    + by_name["inverse map to source grid"] + by_name["write: overlay SC"]
                    + by_name["write: BINARY SEG"] + by_name["write: SR"])
        print(f"\n## {path.name}: {source.rows}x{source.columns}")
        print("| stage | median ms | ratio |\n|---|---|---|")
        for name, ms, ratio in rows:
            print(f"| {name} | {ms:.1f} | {ratio} |")
        print(f"| decode+preprocess+inverse+write (overlay, SEG, SR) | {io_total:.1f} | target <= 1000 |")

    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / ".venv" / "bin" / "medxplain"), "explain", str(FILES[0]), "--out", tmp,
                        "--bundle", str(args.bundle), "--explainers", args.explainers, "--device", "cpu"],
                       check=True, capture_output=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"\n`medxplain explain {FILES[0].name}` ({args.explainers}): wall {wall:.1f} s, "
          f"peak RSS {peak / 1024:.0f} MiB" + ("" if peak > before else " (a previous child was larger)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
