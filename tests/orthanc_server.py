"""A real Orthanc (Debian package) with the medxplain plugin, for tests and benchmarks.

``OrthancServer`` starts Orthanc through ``pipeline.pacs.orthanc_launcher`` on free
loopback ports with its own data folder (storage, index, queue, logs) and stops
it by process id (SIGTERM, then SIGKILL). Helpers send DICOM with dcmtk's
``storescu`` and with pynetdicom, call the REST API with the generated
credentials, read the job queue, and wait for conditions.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from pipeline.pacs import orthanc_launcher as launcher
from pipeline.pacs.jobqueue import JobQueue

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MEDXPLAIN = PROJECT_ROOT / ".venv" / "bin" / "medxplain"
# The bundle the worker uses in these tests (another one can be given for a quick run).
TEST_BUNDLE = Path(os.environ.get("MEDXPLAIN_TEST_BUNDLE", PROJECT_ROOT / "bundles" / "demo-pneumonia-v2"))


def require_orthanc() -> None:
    if not launcher.ORTHANC_BINARY.exists() or not launcher.PYTHON_PLUGIN.exists():
        pytest.skip("Orthanc or its Python plugin is not installed (Debian packages orthanc, orthanc-python)")
    if shutil.which("storescu") is None:
        pytest.skip("storescu is not installed (Debian package dcmtk)")


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class OrthancServer:
    def __init__(self, data: Path, *, stable_age: int = 1, start_worker: bool = False,
                 worker_command: list[str] | None = None, explainers: Iterable[str] = ("gradcam",),
                 queue: dict[str, Any] | None = None, plugin_overrides: dict[str, Any] | None = None,
                 worker_overrides: dict[str, Any] | None = None, **settings: Any):
        # The PACS tests send Kermany test images in a fixed order; about 3 % of them lie
        # outside the demo bundle's domain and the PACS default would skip them (no SR):
        # these tests are about the PACS machinery, so out-of-domain images are explained
        # with the caution (the skip itself: tests/test_trust.py).
        overrides: dict[str, Any] = {"bundle": str(TEST_BUNDLE), "explainers": list(explainers),
                                     "queue": {"lease_s": 30, "backoff_s": 1, "backoff_max_s": 4, **(queue or {})},
                                     "trust": {"out_of_domain": "warn"}}
        overrides.update(worker_overrides or {})
        self.settings = launcher.OrthancSettings(
            data=data, http_port=launcher.free_port(), dicom_port=launcher.free_port(), stable_age=stable_age,
            start_worker=start_worker, worker_command=worker_command, worker_overrides=overrides,
            plugin_overrides=plugin_overrides or {}, **settings)
        self.proc: subprocess.Popen | None = None

    # -------------------------------------------------------------- life cycle
    @property
    def data(self) -> Path:
        return self.settings.data

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def paths(self) -> dict[str, Path]:
        return launcher.paths(self.data)

    def start(self, **changes: Any) -> "OrthancServer":
        for key, value in changes.items():
            setattr(self.settings, key, value)
        self.proc = launcher.start(self.settings, timeout_s=60)
        return self

    def stop(self, timeout_s: float = 20.0) -> dict[str, str]:
        result = launcher.stop(self.data, timeout_s=timeout_s)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        return result

    def kill(self) -> None:
        """SIGKILL Orthanc (a crash): the plugin gets no ORTHANC_STOPPED."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self, **changes: Any) -> "OrthancServer":
        self.stop()
        return self.start(**changes)

    # -------------------------------------------------------------- REST
    def password(self, user: str = launcher.ADMIN_USER) -> str:
        return launcher.credentials(self.data)["users"][user]

    def http(self, method: str, path: str, body: bytes | None = None, *, user: str = launcher.ADMIN_USER,
             password: str | None = None, content_type: str = "application/json") -> tuple[int, bytes]:
        return launcher.request(self.url + path, user=user, password=self.password(user) if password is None
                                else password, method=method, body=body, content_type=content_type, timeout=30)

    def get(self, path: str) -> Any:
        status, body = self.http("GET", path)
        assert status == 200, f"GET {path}: HTTP {status} {body[:300]!r}"
        return json.loads(body)

    def get_bytes(self, path: str) -> bytes:
        status, body = self.http("GET", path)
        assert status == 200, f"GET {path}: HTTP {status}"
        return body

    def upload(self, path_or_bytes: Path | bytes) -> dict[str, Any]:
        data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        status, body = self.http("POST", "/instances", data, content_type="application/dicom")
        assert status == 200, f"upload: HTTP {status} {body[:300]!r}"
        return json.loads(body)

    def jobs(self, **query: Any) -> dict[str, Any]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return self.get("/medxplain/jobs" + (f"?{qs}" if qs else ""))

    def queue(self) -> JobQueue:
        return JobQueue(self.settings.queue_path)

    def studies(self) -> list[str]:
        return self.get("/studies")

    def study_instances(self, study: str) -> list[dict[str, Any]]:
        """Every instance of a study with its series' description, modality and SOP class."""
        out = []
        for series in self.get(f"/studies/{study}/series"):
            tags = series["MainDicomTags"]
            for instance in self.get(f"/series/{series['ID']}/instances"):
                out.append({"id": instance["ID"], "series": series["ID"],
                            "SeriesDescription": tags.get("SeriesDescription", ""),
                            "Modality": tags.get("Modality", ""),
                            "SOPInstanceUID": instance["MainDicomTags"].get("SOPInstanceUID")})
        return out

    def stats(self) -> dict[str, Any]:
        return self.jobs(limit=1)["stats"]

    def wait_stable(self, study: str, timeout: float = 30.0) -> None:
        wait_for(lambda: self.get(f"/studies/{study}")["IsStable"], timeout, what=f"study {study} stable")

    def wait_jobs(self, predicate: Callable[[dict[str, int]], bool], timeout: float, what: str) -> dict[str, Any]:
        return wait_for(lambda: (lambda j: j if predicate(j["counts"]) else None)(self.jobs(limit=200)),
                        timeout, interval=0.5, what=what)

    # -------------------------------------------------------------- DICOM peers
    def storescu(self, files: Iterable[Path], *, aet: str = "STORESCU", check: bool = True
                 ) -> subprocess.CompletedProcess:
        """Send files with dcmtk's storescu (each file proposed in its own transfer syntax)."""
        done = subprocess.run(["storescu", "-aet", aet, "-aec", self.settings.aet, "--required",
                               "127.0.0.1", str(self.settings.dicom_port), *map(str, files)],
                              capture_output=True, text=True, timeout=300)
        if check:
            assert done.returncode == 0, f"storescu failed: {done.stderr[-2000:]}"
        return done

    def pynetdicom_store(self, datasets: Iterable[Any], *, aet: str = "PYNETDICOM") -> list[int]:
        """Send pydicom datasets with pynetdicom; returns the C-STORE statuses."""
        from pynetdicom import AE

        datasets = list(datasets)
        ae = AE(ae_title=aet)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", self.settings.dicom_port, ae_title=self.settings.aet)
        assert assoc.is_established, "pynetdicom could not associate with Orthanc"
        try:
            return [int(assoc.send_c_store(ds).Status) for ds in datasets]
        finally:
            assoc.release()

    # -------------------------------------------------------------- worker
    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[launcher.PASSWORD_ENV] = self.password(launcher.WORKER_USER)
        return env

    def worker_command(self, *extra: str) -> list[str]:
        return [str(MEDXPLAIN), "worker", "--config", str(self.paths["worker_config"]), *extra]

    def start_worker(self, *extra: str, log: Path | None = None) -> subprocess.Popen:
        """Run `medxplain worker` ourselves (not supervised by the plugin)."""
        out = open(log or self.data / "test-worker.log", "ab")
        try:
            return subprocess.Popen(self.worker_command(*extra), cwd=PROJECT_ROOT, env=self.worker_env(),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()

    def worker_pid(self) -> int | None:
        try:
            return int(self.paths["worker_pid"].read_text())
        except (OSError, ValueError):
            return None

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for name in ("log", "worker_log"):
            try:
                text.append(f"--- {self.paths[name]}\n" + "\n".join(
                    self.paths[name].read_text(errors="replace").splitlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(text)


def python_command(code: str) -> list[str]:
    """A trivial stand-in worker command (for supervision tests)."""
    return [sys.executable, "-c", code]
