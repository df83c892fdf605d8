"""PACS figures: Orthanc + medxplain plugin + plugin-supervised worker, real C-STORE.

- latency from the end of C-STORE (storescu returns) to the study's SR being
  stored in Orthanc, p50/p95 over N studies sent one after another (StableAge 1,
  Grad-CAM by default);
- throughput for a burst of M single-image studies sent back to back
  (studies per minute, from the first C-STORE to the last SR);
- Orthanc's resident memory with the plugin loaded (VmRSS and its peak VmHWM);
- the plugin's own callback times (it measures them; /medxplain/jobs "stats").

Usage: .venv/bin/python benchmarks/bench_pacs.py [--studies 20] [--burst 50]
       [--explainers gradcam] [--stable-age 1] [--out out/bench/pacs.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_io.convert import cr_from_pixels  # noqa: E402
from pipeline.pacs import orthanc_launcher as launcher  # noqa: E402


def kermany_images(shared: Path, n: int) -> list[Path]:
    root = shared / "kermany-cxr224"
    rows = [r for r in csv.DictReader(open(root / "manifest.csv")) if r["split"] == "test"]
    return [root / r["path"] for r in rows[:n]]


def make_study(image: Path, key: str, folder: Path) -> tuple[Path, str, str]:
    """One single-image CR study; returns (file, PatientID, StudyInstanceUID)."""
    pixels = np.asarray(Image.open(image).convert("L"), dtype=np.uint8)
    ds = cr_from_pixels(pixels, patient_id=f"BENCH-{key}", patient_name="Bench^PACS", study_key=f"bench-{key}",
                        instance_key=f"bench-{key}/{image.name}")
    path = folder / f"{key}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds.PatientID, str(ds.StudyInstanceUID)


def study_id(patient_id: str, study_uid: str) -> str:
    import hashlib

    digest = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class Pacs:
    def __init__(self, settings: launcher.OrthancSettings):
        self.settings = settings
        self.password = launcher.credentials(settings.data)["users"][launcher.ADMIN_USER]

    def get(self, path: str):
        status, body = launcher.request(self.settings.url + path, user=launcher.ADMIN_USER, password=self.password)
        return json.loads(body) if status == 200 else None

    def has_sr(self, sid: str) -> bool:
        series = self.get(f"/studies/{sid}/series") or []
        return any(s["MainDicomTags"].get("Modality") == "SR" for s in series)

    def storescu(self, files: list[Path]) -> None:
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", self.settings.aet, "--required", "127.0.0.1",
                        str(self.settings.dicom_port), *map(str, files)], check=True, capture_output=True)


def wait(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError("timed out")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20, help="studies for the latency figures")
    parser.add_argument("--burst", type=int, default=50, help="studies in the burst")
    parser.add_argument("--explainers", default="gradcam")
    parser.add_argument("--stable-age", type=int, default=1)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "pacs.json")
    parser.add_argument("--storage-cache-mb", type=int, default=None,
                        help="Orthanc's MaximumStorageCacheSize (default: the launcher's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medxplain-bench-pacs-"))
    images = kermany_images(args.shared, 1 + args.studies + args.burst)
    settings = launcher.OrthancSettings(
        data=work / "orthanc", http_port=launcher.free_port(), dicom_port=launcher.free_port(),
        stable_age=args.stable_age, start_worker=True,
        worker_overrides={"explainers": args.explainers.split(",")})
    if args.storage_cache_mb is not None:
        settings.max_storage_cache_mb = args.storage_cache_mb
    proc = launcher.start(settings)
    pacs = Pacs(settings)
    results: dict = {"explainers": args.explainers, "stable_age_s": args.stable_age}
    memory = {"idle": rss_kib(proc.pid)}
    try:
        inputs = work / "inputs"
        inputs.mkdir()
        # Warm-up: the worker loads torch and the models once; not counted.
        path, pid, uid = make_study(images[0], "warmup", inputs)
        t0 = time.monotonic()
        pacs.storescu([path])
        wait(lambda: pacs.has_sr(study_id(pid, uid)), 600, 0.2)
        results["warm_up_s"] = round(time.monotonic() - t0, 2)
        print(f"warm-up study (worker start, model load): {results['warm_up_s']:.1f} s")

        latencies = []
        for i in range(args.studies):
            path, pid, uid = make_study(images[1 + i], f"lat{i:03d}", inputs)
            pacs.storescu([path])
            sent = time.monotonic()
            done = wait(lambda: pacs.has_sr(study_id(pid, uid)), 300)
            latencies.append(done - sent)
            print(f"  study {i + 1:2d}/{args.studies}: C-STORE end -> SR stored {latencies[-1]:.2f} s")
        memory["after_latency_run"] = rss_kib(proc.pid)
        q = statistics.quantiles(latencies, n=20, method="inclusive")
        results["latency_s"] = {"n": len(latencies), "p50": round(statistics.median(latencies), 2),
                                "p95": round(q[18], 2), "min": round(min(latencies), 2),
                                "max": round(max(latencies), 2)}

        burst = [make_study(images[1 + args.studies + i], f"burst{i:03d}", inputs) for i in range(args.burst)]
        ids = [study_id(pid, uid) for _, pid, uid in burst]
        start = time.monotonic()
        pacs.storescu([p for p, _, _ in burst])
        sent = time.monotonic()
        remaining = set(ids)

        def all_done():
            for sid in list(remaining):
                if pacs.has_sr(sid):
                    remaining.discard(sid)
            return not remaining

        end = wait(all_done, 1800, 0.5)
        srs = sum(1 for sid in ids for s in pacs.get(f"/studies/{sid}/series")
                  if s["MainDicomTags"].get("Modality") == "SR")
        results["burst"] = {"studies": args.burst, "send_s": round(sent - start, 2),
                            "total_s": round(end - start, 2),
                            "studies_per_min": round(args.burst / (end - start) * 60.0, 1),
                            "sr_series": srs}

        stats = pacs.get("/medxplain/jobs?limit=1")
        memory["after_burst"] = rss_kib(proc.pid)
        results["orthanc_memory_kib"] = memory
        results["plugin"] = {"stored_instance_callback": stats["stats"]["stored_instance_callback"],
                             "change_callback": stats["stats"]["change_callback"],
                             "stable_study": stats["stats"]["stable_study"],
                             "jobs": stats["counts"], "worker_restarts": stats["worker"]["restarts"]}
    finally:
        launcher.stop(settings.data)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    lat, b, mem, cb = results["latency_s"], results["burst"], results["orthanc_memory_kib"], results["plugin"]
    print()
    print(f"explainers {args.explainers}, StableAge {args.stable_age} s, CPU")
    print(f"latency C-STORE end -> SR stored: p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s "
          f"(min {lat['min']:.2f}, max {lat['max']:.2f}, n {lat['n']}); target p50 <= {args.stable_age + 3} s")
    print(f"burst of {b['studies']}: {b['total_s']:.1f} s -> {b['studies_per_min']:.1f} studies/min "
          f"({b['sr_series']} SR series)")
    print("Orthanc RSS with the plugin: " + ", ".join(f"{when.replace('_', ' ')} {m['VmRSS'] / 1024:.1f} MiB"
                                                       for when, m in mem.items())
          + f" (peak {mem['after_burst']['VmHWM'] / 1024:.1f} MiB); target < 150 MB")
    s, c, st = cb["stored_instance_callback"], cb["change_callback"], cb["stable_study"]
    print(f"plugin callbacks (target < 10 ms): stored-instance p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms, "
          f"max {s['max_ms']:.2f} ms (n {s['count']}); STABLE_STUDY (enqueue) p50 {st['p50_ms']:.2f} ms, "
          f"p95 {st['p95_ms']:.2f} ms, max {st['max_ms']:.2f} ms (n {st['count']}); any change event "
          f"p95 {c['p95_ms']:.2f} ms, max {c['max_ms']:.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
