"""Scale-out figures: the Celery backend against the embedded SQLite queue, real servers.

- end-to-end latency, upload (REST, a one-image CR study) -> the study's SR in
  Orthanc, p50/p95 over --latency studies sent one after another, through the SQLite
  queue (plugin-supervised worker) and through Celery (outbox -> dispatcher -> Redis
  -> one `medxplain worker`);
- throughput of a burst of --burst studies through Celery with 1 and with 2 worker
  processes (studies per minute from the first upload to the last SR; ratio);
- broker outage recovery: Redis stopped with a burst queued, down for --outage s,
  started again; time from its restart to the next study done, and whether every
  study of the burst was still explained exactly once.

Grad-CAM, StableAge 1, every process on this machine. Usage:
    .venv/bin/python benchmarks/bench_scaleout.py [--latency 8] [--burst 16] [--outage 10] \
        [--out out/bench/scaleout.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.orthanc_server import OrthancServer, wait_for  # noqa: E402
from tests.test_celery import Cluster  # noqa: E402
from tests.test_orthanc import cr_study, study_id, to_bytes  # noqa: E402


def kermany(n: int) -> list[Path]:
    import csv

    root = ROOT.parent / "shared" / "data" / "kermany-cxr224"
    rows = [r for r in csv.DictReader(open(root / "manifest.csv")) if r["split"] == "test"]
    return [root / r["path"] for r in rows[:n]]


def has_sr(o: OrthancServer, sid: str) -> bool:
    return any(i["Modality"] == "SR" for i in o.study_instances(sid))


def upload(o: OrthancServer, image: Path, key: str) -> str:
    (ds,) = cr_study([image], key, patient_id=f"BENCH-{key}"[:16])
    o.upload(to_bytes(ds))
    return study_id(o, ds)


def latencies(o: OrthancServer, images: list[Path], tag: str) -> dict:
    values = []
    for n, image in enumerate(images):
        start = time.monotonic()
        sid = upload(o, image, f"{tag}-lat-{n}")
        wait_for(lambda: has_sr(o, sid), 600, interval=0.05, what="SR stored")
        values.append(time.monotonic() - start)
    values.sort()
    return {"n": len(values), "p50_s": round(statistics.median(values), 2),
            "p95_s": round(values[min(len(values) - 1, int(0.95 * len(values)))], 2)}


def burst(o: OrthancServer, images: list[Path], tag: str) -> dict:
    start = time.monotonic()
    sids = [upload(o, image, f"{tag}-{n}") for n, image in enumerate(images)]
    wait_for(lambda: all(has_sr(o, s) for s in sids), 1800, interval=0.5, what="burst explained")
    elapsed = time.monotonic() - start
    once = all(sum(i["Modality"] == "SR" for i in o.study_instances(s)) == 1 for s in sids)
    return {"n": len(sids), "seconds": round(elapsed, 1), "studies_per_min": round(60 * len(sids) / elapsed, 1),
            "exactly_one_sr_each": once}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=int, default=8)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the broker stays down")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "scaleout.json")
    args = parser.parse_args()
    images = kermany(max(args.latency, args.burst))
    results: dict = {"explainer": "gradcam", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        root = Path(tmp)
        # SQLite queue: one Orthanc, its plugin-supervised worker.
        sqlite = OrthancServer(root / "sqlite", start_worker=True)
        try:
            sqlite.start()
            upload(sqlite, images[0], "sqlite-warm")  # the worker loads its models
            wait_for(lambda: sqlite.jobs()["counts"]["done"] >= 1, 600, what="warm-up")
            results["sqlite_latency"] = latencies(sqlite, images[:args.latency], "sqlite")
        finally:
            sqlite.stop()
        # Celery: one Orthanc (dispatcher), Redis, 1 then 2 workers.
        cluster = Cluster(root / "celery", origins=("a",))
        try:
            cluster.start(n_workers=1)
            o = cluster.orthancs["a"]
            sid = upload(o, images[0], "celery-warm")
            wait_for(lambda: has_sr(o, sid), 600, what="warm-up")
            results["celery_latency"] = latencies(o, images[:args.latency], "celery")
            results["celery_burst_1_worker"] = burst(o, images[:args.burst], "b1")
            cluster.start_worker(1)
            wait_for(lambda: "loaded model profile" in cluster.log_text(1), 600, what="second worker ready")
            results["celery_burst_2_workers"] = burst(o, images[:args.burst], "b2")
            results["throughput_ratio_2_to_1"] = round(results["celery_burst_2_workers"]["studies_per_min"]
                                                       / results["celery_burst_1_worker"]["studies_per_min"], 2)
            # Broker outage with a burst queued.
            done_before = o.queue().counts()["done"]
            sids = [upload(o, image, f"outage-{n}") for n, image in enumerate(images[:args.burst])]
            wait_for(lambda: o.queue().counts()["done"] > done_before, 600, interval=0.05, what="burst started")
            cluster.redis.stop()
            time.sleep(args.outage)  # the outage itself: its length is the benchmark's parameter
            cluster.redis.start()
            restarted = time.monotonic()
            done_at_restart = o.queue().counts()["done"]
            wait_for(lambda: o.queue().counts()["done"] > done_at_restart, 600, interval=0.05,
                     what="a study done after the restart")
            recovery = time.monotonic() - restarted
            wait_for(lambda: all(has_sr(o, s) for s in sids), 1800, interval=0.5, what="outage burst explained")
            once = all(sum(i["Modality"] == "SR" for i in o.study_instances(s)) == 1 for s in sids)
            results["broker_outage"] = {"down_s": args.outage, "first_done_after_restart_s": round(recovery, 1),
                                        "studies": len(sids), "exactly_one_sr_each": once}
        finally:
            cluster.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
