"""Start a ready Orthanc (Debian package) with the medxplain plugin and worker.

Everything lives in one data folder::

    DIR/orthanc.json       Orthanc's configuration (0600: it holds the user passwords)
    DIR/credentials.json   the generated users and passwords (0600), reused on restart
    DIR/medxplain.yaml     the worker's configuration (queue, Orthanc URL and user)
    DIR/storage/           Orthanc's storage and index (SQLite)
    DIR/queue.db           the durable job queue (plugin and worker share it)
    DIR/audit.jsonl        the worker's audit log
    DIR/orthanc.log, DIR/worker.log
    DIR/orthanc.pid, DIR/worker.pid

Network: HTTP answers only loopback clients ("RemoteAccessAllowed": false) and
requires a user ("AuthenticationEnabled": true). Orthanc 1.10 has no option to
bind its HTTP or DICOM listeners to one address (it listens on every
interface), so DICOM is restricted the other way round: C-STORE/C-ECHO only
from the AE titles in ``allowed_aets``, and only from 127.0.0.1
("DicomCheckModalityHost").
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.schema import PROJECT_ROOT

ORTHANC_BINARY = Path(os.environ.get("MEDXPLAIN_ORTHANC_BINARY", "/usr/sbin/Orthanc"))
PYTHON_PLUGIN = Path(os.environ.get("MEDXPLAIN_ORTHANC_PYTHON_PLUGIN",
                                    "/usr/share/orthanc/plugins/libOrthancPython.so"))
PLUGIN_SCRIPT = PROJECT_ROOT / "orthanc_plugin" / "plugin.py"
# Optional Debian plugins, loaded when installed: DICOMweb (orthanc-dicomweb; OHIF reads
# through it) and the Orthanc Web Viewer (orthanc-webviewer).
DICOMWEB_PLUGIN = Path(os.environ.get("MEDXPLAIN_ORTHANC_DICOMWEB_PLUGIN",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
WEBVIEWER_PLUGIN = Path(os.environ.get("MEDXPLAIN_ORTHANC_WEBVIEWER_PLUGIN",
                                       "/usr/share/orthanc/plugins/libOrthancWebViewer.so"))
WORKER_USER = "medxplain"
ADMIN_USER = "admin"
PASSWORD_ENV = "MEDXPLAIN_ORTHANC_PASSWORD"
DEFAULT_HTTP_PORT = 8043   # next to Orthanc's usual 8042/4242, which a system service may hold
DEFAULT_DICOM_PORT = 4243
DEFAULT_ALLOWED_AETS = ("STORESCU", "PYNETDICOM", "MEDXPLAIN")


class OrthancError(RuntimeError):
    """Orthanc could not be configured, started or stopped; the message says why."""


@dataclass
class OrthancSettings:
    data: Path
    http_port: int = DEFAULT_HTTP_PORT
    dicom_port: int = DEFAULT_DICOM_PORT
    aet: str = "ORTHANC"
    stable_age: int = 5
    start_worker: bool = True
    allowed_aets: tuple[str, ...] = DEFAULT_ALLOWED_AETS
    base_config: Path | None = None          # medxplain YAML the worker config derives from
    worker_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"explainers": ["gradcam"]}
    worker_command: list[str] | None = None  # default: the venv's `medxplain worker --config DIR/medxplain.yaml`
    # Orthanc's in-memory cache of DICOM files (its default, 128 MB, dominates its RSS; the
    # worker reads each file once and the OS page cache already keeps recent files).
    max_storage_cache_mb: int = 0
    plugin_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the "Medxplain" section
    reconcile_s: float = 30.0  # the plugin's reconciliation period (marks, stable studies, queue probe)
    queue_file: Path | None = None  # default DIR/queue.db (e.g. a separate file system)
    # Serve OHIF under /ohif/ (needs the DICOMweb plugin and the app prepared by scripts/install.sh);
    # `medxplain orthanc` turns it on unless --no-viewer.
    viewer: bool = False

    def __post_init__(self) -> None:
        self.data = Path(self.data).resolve()

    # Paths in the data folder.
    @property
    def config_path(self) -> Path:
        return self.data / "orthanc.json"

    @property
    def queue_path(self) -> Path:
        return Path(self.queue_file).resolve() if self.queue_file else self.data / "queue.db"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def paths(data: Path) -> dict[str, Path]:
    data = Path(data).resolve()
    return {name: data / file for name, file in (
        ("pid", "orthanc.pid"), ("worker_pid", "worker.pid"), ("log", "orthanc.log"), ("worker_log", "worker.log"),
        ("credentials", "credentials.json"), ("config", "orthanc.json"), ("queue", "queue.db"),
        ("worker_config", "medxplain.yaml"), ("audit", "audit.jsonl"))}


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600, never world-readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def credentials(data: Path) -> dict[str, Any]:
    """The saved users/passwords of a data folder, generating them on first use."""
    path = paths(data)["credentials"]
    if path.exists():
        return json.loads(path.read_text())
    creds = {"users": {ADMIN_USER: secrets.token_urlsafe(18), WORKER_USER: secrets.token_urlsafe(18)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, json.dumps(creds, indent=2) + "\n")
    return creds


def write_configs(settings: OrthancSettings) -> dict[str, Any]:
    """Write DIR/orthanc.json and DIR/medxplain.yaml; return Orthanc's configuration."""
    import yaml

    from config import load_config

    data = settings.data
    (data / "storage").mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    creds = credentials(data)
    p = paths(data)
    base = load_config(settings.base_config, {k: v for k, v in settings.worker_overrides.items()})
    worker_cfg = base.model_dump(mode="json")
    worker_cfg["bundle"] = str(base.bundle_path())
    worker_cfg["queue"]["path"] = str(settings.queue_path)
    worker_cfg["worker"]["audit_log"] = str(p["audit"])
    worker_cfg["orthanc"].update(url=settings.url, username=WORKER_USER, password_env=PASSWORD_ENV)
    for rule in worker_cfg.get("rules", []):
        if rule.get("bundle"):
            rule["bundle"] = str((PROJECT_ROOT / rule["bundle"]).resolve())
    p["worker_config"].write_text("# Generated by `medxplain orthanc`; edit the base config instead.\n"
                                  + yaml.safe_dump(worker_cfg, sort_keys=False))
    # queue.backend celery: the supervised process is the dispatcher (outbox -> Celery);
    # the workers run wherever the broker is reachable.
    verb = "dispatcher" if base.queue.backend == "celery" else "worker"
    command = settings.worker_command or [str(PROJECT_ROOT / ".venv" / "bin" / "medxplain"), verb,
                                          "--config", str(p["worker_config"])]
    orthanc_cfg = {
        "Name": "medxplain",
        "StorageDirectory": str(data / "storage"),
        "IndexDirectory": str(data / "storage"),
        "MaximumStorageCacheSize": settings.max_storage_cache_mb,
        "Plugins": [str(PYTHON_PLUGIN)],
        "PythonScript": str(PLUGIN_SCRIPT),
        "PythonVerbose": False,
        "HttpServerEnabled": True,
        "HttpPort": settings.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": dict(creds["users"]),
        # No internal details (paths, SQL) in HTTP error answers.
        "HttpDescribeErrors": False,
        "DicomServerEnabled": True,
        "DicomAet": settings.aet,
        "DicomPort": settings.dicom_port,
        "DicomCheckCalledAet": True,
        "StrictAetComparison": True,  # calling AE titles compared exactly (case included)
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {aet.lower(): {"AET": aet, "Host": "127.0.0.1", "Port": 104, "AllowEcho": True,
                                          "AllowStore": True, "AllowFind": False, "AllowMove": False,
                                          "AllowGet": False} for aet in settings.allowed_aets},
        "StableAge": settings.stable_age,
        "ConcurrentJobs": 1,
        "Medxplain": {
            "ProjectRoot": str(PROJECT_ROOT),
            "QueuePath": str(settings.queue_path),
            "MaxAttempts": base.queue.max_attempts,
            "BackoffSeconds": base.queue.backoff_s,
            "BackoffMaxSeconds": base.queue.backoff_max_s,
            "UnavailableDeadAfterSeconds": base.queue.unavailable_dead_after_s,
            "ReconcileSeconds": settings.reconcile_s,
            "WorkerUser": WORKER_USER,
            "StartWorker": settings.start_worker,
            "WorkerCommand": command,
            "WorkerEnv": {PASSWORD_ENV: creds["users"][WORKER_USER], "PYTHONUNBUFFERED": "1"},
            "WorkerLog": str(p["worker_log"]),
            "WorkerPidFile": str(p["worker_pid"]),
        },
    }
    orthanc_cfg["Medxplain"].update(settings.plugin_overrides)
    _add_viewers(orthanc_cfg, settings)
    _write_private(p["config"], json.dumps(orthanc_cfg, indent=2) + "\n")
    return orthanc_cfg


def _add_viewers(orthanc_cfg: dict[str, Any], settings: OrthancSettings) -> None:
    """DICOMweb and the Orthanc Web Viewer when their Debian plugins are installed; OHIF
    (served by the medxplain plugin under /ohif/, same origin and authentication) when
    ``settings.viewer`` and the app is prepared."""
    from pipeline.pacs.viewer import OHIF_PREFIX, installed, ohif_folder

    if DICOMWEB_PLUGIN.exists():
        orthanc_cfg["Plugins"].append(str(DICOMWEB_PLUGIN))
        orthanc_cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                   "WadoRoot": "/wado", "Ssl": False,
                                   # OHIF reads SR content and SEG geometry from the metadata
                                   "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
    if WEBVIEWER_PLUGIN.exists():
        orthanc_cfg["Plugins"].append(str(WEBVIEWER_PLUGIN))
        orthanc_cfg["WebViewer"] = {"CachePath": str(settings.data / "webviewer-cache")}
    if settings.viewer:
        if not DICOMWEB_PLUGIN.exists():
            raise OrthancError(f"OHIF needs Orthanc's DICOMweb plugin, not found at {DICOMWEB_PLUGIN} "
                               "(Debian package 'orthanc-dicomweb'; or start without the viewer)")
        if not installed():
            raise OrthancError(f"OHIF is not installed in {ohif_folder()} (run scripts/install.sh; "
                               "or start without the viewer)")
        orthanc_cfg["Medxplain"].update(ViewerFolder=str(ohif_folder()), ViewerPrefix=OHIF_PREFIX.rstrip("/"))


def _alive(pid: int, needle: bytes) -> bool:
    """Is ``pid`` running and its command line contains ``needle`` (not a recycled pid)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except OSError:
        return False
    return needle in cmdline


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(data: Path) -> int | None:
    """The pid of the Orthanc running on this data folder, if any."""
    p = paths(data)
    pid = _read_pid(p["pid"])
    if pid and _alive(pid, str(p["config"]).encode()):
        return pid
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))  # Orthanc binds every interface
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port (for tests): bound on every interface, as Orthanc will."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# Loopback only: never through an http_proxy that happens to be set in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, *, user: str, password: str, method: str = "GET", body: bytes | None = None,
            content_type: str = "application/json", timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request with basic auth; returns (status, body) and never raises on HTTP errors."""
    req = urllib.request.Request(url, data=body, method=method)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(settings: OrthancSettings, *, timeout_s: float = 60.0, detach: bool = True) -> subprocess.Popen:
    """Write the configuration, start Orthanc, wait until its REST API answers.

    ``detach``: Orthanc gets its own session, so it outlives the calling command
    (stop it with :func:`stop`) and a terminal's Ctrl-C does not reach it; otherwise
    it shares the caller's session. Orthanc stops cleanly on one SIGINT/SIGTERM but
    dies at once on a second one, so exactly one signal should reach it."""
    if not ORTHANC_BINARY.exists():
        raise OrthancError(f"Orthanc not found at {ORTHANC_BINARY} (Debian package 'orthanc')")
    if not PYTHON_PLUGIN.exists():
        raise OrthancError(f"Orthanc's Python plugin not found at {PYTHON_PLUGIN} (Debian package 'orthanc-python')")
    pid = running_pid(settings.data)
    if pid:
        raise OrthancError(f"Orthanc already runs on {settings.data} (pid {pid}); "
                           f"stop it with `medxplain orthanc --stop --data {settings.data}`")
    for name, port in (("HTTP", settings.http_port), ("DICOM", settings.dicom_port)):
        if not _port_free(port):
            raise OrthancError(f"{name} port {port} is already in use; choose another one")
    write_configs(settings)
    p = paths(settings.data)
    with open(p["log"], "ab") as log:
        proc = subprocess.Popen([str(ORTHANC_BINARY), str(p["config"])], cwd=settings.data,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=detach, close_fds=True)
    p["pid"].write_text(str(proc.pid))
    admin = credentials(settings.data)["users"][ADMIN_USER]
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            p["pid"].unlink(missing_ok=True)
            raise OrthancError(f"Orthanc exited with code {proc.returncode} at start-up; last log lines "
                               f"({p['log']}):\n{_tail(p['log'])}")
        try:
            status, _ = request(settings.url + "/system", user=ADMIN_USER, password=admin, timeout=2.0)
            if status == 200:
                return proc
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            _stop_pid(proc.pid, b"Orthanc", 5.0)
            raise OrthancError(f"Orthanc did not answer on {settings.url} within {timeout_s:.0f} s; "
                               f"last log lines:\n{_tail(p['log'])}")
        time.sleep(0.2)


def plugin_problems(settings: OrthancSettings, since: float) -> list[str]:
    """What keeps the plugin from recording studies, as seen through its REST route
    right after start-up: disabled (C-STOREs refused), or a queue found emptied or
    damaged at this start (recovered from Orthanc, but a person must know). Empty
    when all is well."""
    admin = credentials(settings.data)["users"][ADMIN_USER]
    try:
        status, body = request(settings.url + "/medxplain/jobs?limit=1", user=ADMIN_USER, password=admin)
    except (OSError, urllib.error.URLError) as exc:
        return [f"cannot ask the plugin ({exc})"]
    try:
        answer = json.loads(body or b"{}")
    except ValueError:
        answer = {}
    if status != 200:
        return [f"plugin not working (HTTP {status}): {answer.get('reason') or answer.get('error') or body[:200]!r}"]
    return [f"job queue {i['kind']}: {i['detail']}" for i in answer.get("incidents", [])
            if i.get("kind") in ("emptied", "damaged") and float(i.get("time", 0)) >= since - 1.0]


def _stop_pid(pid: int, needle: bytes, timeout_s: float) -> str:
    """SIGTERM, wait, then SIGKILL. Returns how it ended: 'terminated', 'killed' or 'not running'."""
    if not _alive(pid, needle):
        return "not running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid, needle):
            _reap(pid)
            return "terminated"
        _reap(pid)
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "terminated"
    for _ in range(50):
        _reap(pid)
        if not _alive(pid, needle):
            break
        time.sleep(0.1)
    return "killed"


def _reap(pid: int) -> None:
    """Collect a child's exit status so it does not linger as a zombie (no-op for non-children)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(data: Path, *, timeout_s: float = 20.0) -> dict[str, str]:
    """Stop the Orthanc of a data folder by pid (SIGTERM, SIGKILL after ``timeout_s``),
    then any worker it left behind (the plugin stops the worker on a clean stop)."""
    p = paths(data)
    result = {"orthanc": "not running", "worker": "not running"}
    pid = _read_pid(p["pid"])
    if pid:
        result["orthanc"] = _stop_pid(pid, str(p["config"]).encode(), timeout_s)
    p["pid"].unlink(missing_ok=True)
    wpid = _read_pid(p["worker_pid"])
    if wpid:
        result["worker"] = _stop_pid(wpid, _worker_needle(data), 15.0)
    p["worker_pid"].unlink(missing_ok=True)
    return result


def status(data: Path) -> dict[str, Any]:
    p = paths(data)
    pid = running_pid(data)
    wpid = _read_pid(p["worker_pid"])
    return {"orthanc_pid": pid, "worker_pid": wpid if wpid and _alive(wpid, _worker_needle(data)) else None}


def _worker_needle(data: Path) -> bytes:
    """What the supervised worker's command line contains: the last word of WorkerCommand
    (the worker's config path by default), to tell it from a recycled pid."""
    p = paths(data)
    try:
        return json.loads(p["config"].read_text())["Medxplain"]["WorkerCommand"][-1].encode()
    except (OSError, ValueError, KeyError, IndexError):
        return str(p["worker_config"]).encode()
