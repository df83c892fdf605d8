"""The parts of the Orthanc plugin that do not need Orthanc: standard library only.

``plugin.py`` (the script Orthanc loads) is glue around these: it passes
Orthanc's log functions in, so everything here can be tested without Orthanc.

- :class:`StudyMarks`: the loop guard's table ``orthanc_marks`` in the queue's
  SQLite file: a study is marked when a *non*-medxplain instance is stored, and
  a mark is taken (job enqueued, mark cleared) on STABLE_STUDY.
- :func:`orthanc_study_id`: Orthanc's study identifier computed from the tags,
  exactly as Orthanc does (checked against Orthanc in the tests).
- :func:`worker_may`: what the worker's Orthanc account may do (least privilege).
- :class:`Timings`: callback durations (the plugin measures itself).
- :class:`WorkerSupervisor`: start the worker, restart it with back-off, stop it.
- :func:`jobs_answer`: the JSON of ``GET /medxplain/jobs``.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from typing import Any, Callable

MARKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS orthanc_marks (
    study   TEXT PRIMARY KEY,   -- Orthanc study id that received a new non-medxplain instance
    version INTEGER NOT NULL,   -- bumped on each such instance
    updated REAL NOT NULL
)"""


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's study id: SHA-1 of "PatientID|StudyInstanceUID", as 5 dash-separated
    groups of 8 hex digits (Orthanc's DicomInstanceHasher).

    The values must be the ones Orthanc itself extracted (``GetInstanceSimplifiedJson``
    of the instance): DCMTK has already dropped the trailing padding there, and
    leading spaces are kept, so nothing is stripped here (a leading space in a
    Patient ID is part of Orthanc's id).
    """
    digest = hashlib.sha1(f"{patient_id}|{study_uid}".encode("utf-8")).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


# The worker's Orthanc account (least privilege): what it needs and nothing more.
# Orthanc ids are 5 groups of 8 hex digits.
_OID = r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}"
WORKER_ALLOWED = (
    ("GET", re.compile(r"/system")),
    ("GET", re.compile(rf"/studies/{_OID}/(?:series|instances)")),
    ("GET", re.compile(rf"/instances/{_OID}/file")),
    ("POST", re.compile(r"/instances")),        # store results
    ("POST", re.compile(r"/tools/lookup")),     # "already explained?" (finds by UID)
)


def worker_may(method: str, uri: str) -> bool:
    """May the worker's account make this request? Everything not listed in
    :data:`WORKER_ALLOWED` is refused: no DELETE, no PUT (e.g. a new DICOM modality
    to send patient data to), no /tools/execute-script, no other studies' listing."""
    return any(method == m and pattern.fullmatch(uri) for m, pattern in WORKER_ALLOWED)


def basic_auth_user(headers: dict[str, str]) -> str | None:
    """The user name of an HTTP basic Authorization header (Orthanc checked the password)."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    if not value.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(value[6:].strip()).decode("utf-8").split(":", 1)[0]
    except (ValueError, UnicodeDecodeError):
        return None


class StudyMarks:
    """The loop guard's marks, in a table of the queue's SQLite file.

    One long-lived connection (opening one per callback costs a WAL checkpoint and
    an fsync whenever it is the last to close), shared by Orthanc's threads under
    a lock; synchronous=FULL like the queue itself, so a mark survives a crash.
    """

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.db: sqlite3.Connection | None = None
        with self._conn() as db:
            db.execute(MARKS_SCHEMA)

    def _conn(self):
        marks = self

        class _Ctx:
            def __enter__(self) -> sqlite3.Connection:
                marks.lock.acquire()
                try:
                    if marks.db is None:
                        marks.db = sqlite3.connect(marks.path, timeout=10.0, isolation_level=None,
                                                   check_same_thread=False)
                        marks.db.execute("PRAGMA synchronous=FULL")
                except BaseException:
                    marks.lock.release()
                    raise
                return marks.db

            def __exit__(self, exc_type, exc, tb) -> None:
                if exc_type is not None and issubclass(exc_type, sqlite3.Error) and marks.db is not None:
                    marks.db.close()  # reopen on next use
                    marks.db = None
                marks.lock.release()

        return _Ctx()

    def mark(self, study: str) -> None:
        with self._conn() as db:
            db.execute("INSERT INTO orthanc_marks (study, version, updated) VALUES (?, 1, ?) ON CONFLICT(study) "
                       "DO UPDATE SET version = version + 1, updated = excluded.updated", (study, time.time()))

    def version(self, study: str) -> int | None:
        with self._conn() as db:
            row = db.execute("SELECT version FROM orthanc_marks WHERE study = ?", (study,)).fetchone()
        return row[0] if row else None

    def clear(self, study: str, version: int | None = None) -> None:
        """Remove a mark; with ``version``, only if no instance arrived since it was read.

        Without an fsync of its own (synchronous=NORMAL for this statement; the next
        FULL commit syncs it): a clear lost to a power cut only costs a redundant,
        idempotent job at the next start, while it saves one fsync per STABLE_STUDY."""
        with self._conn() as db:
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                if version is None:
                    db.execute("DELETE FROM orthanc_marks WHERE study = ?", (study,))
                else:
                    db.execute("DELETE FROM orthanc_marks WHERE study = ? AND version = ?", (study, version))
            finally:
                db.execute("PRAGMA synchronous=FULL")

    def studies(self) -> list[str]:
        with self._conn() as db:
            return [r[0] for r in db.execute("SELECT study FROM orthanc_marks ORDER BY updated")]

    def studies_with_time(self) -> list[tuple[str, float]]:
        """(study, time of its newest instance) of every mark, oldest first."""
        with self._conn() as db:
            return [(r[0], r[1]) for r in db.execute("SELECT study, updated FROM orthanc_marks ORDER BY updated")]

    def probe(self) -> None:
        """A durable write that records nothing: raises while the queue file cannot be written."""
        with self._conn() as db:
            db.execute("CREATE TABLE IF NOT EXISTS orthanc_probe (id INTEGER PRIMARY KEY, time REAL NOT NULL)")
            db.execute("INSERT OR REPLACE INTO orthanc_probe (id, time) VALUES (1, ?)", (time.time(),))

    def take(self, study: str, enqueue: Callable[[str], Any]) -> Any:
        """STABLE_STUDY: if ``study`` is marked, make its job durable (``enqueue``), then
        clear the mark unless a new instance re-marked it meanwhile. None if unmarked."""
        version = self.version(study)
        if version is None:
            return None
        result = enqueue(study)
        self.clear(study, version)
        return result


class Timings:
    """Durations (ms) of the last ``keep`` calls per callback kind, and counters."""

    def __init__(self, keep: int = 2000):
        self.values: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=keep))
        self.counters: collections.Counter = collections.Counter()

    def add(self, kind: str, ms: float) -> None:
        self.values[kind].append(ms)

    def stats(self, kind: str) -> dict[str, Any]:
        data = sorted(self.values[kind])
        if not data:
            return {"count": 0}

        def pick(q: float) -> float:
            return round(data[min(len(data) - 1, int(q * len(data)))], 3)

        return {"count": len(data), "mean_ms": round(sum(data) / len(data), 3), "p50_ms": pick(0.5),
                "p95_ms": pick(0.95), "max_ms": round(data[-1], 3)}


class WorkerSupervisor:
    """Run ``command`` as a child; when it exits, start it again after a back-off
    (1 s, doubling to 60 s; back to 1 s after a run of more than a minute)."""

    def __init__(self, command: list[str], *, cwd: str, env: dict[str, str] | None = None,
                 log_path: str | None = None, pid_path: str | None = None, stop_timeout_s: float = 15.0,
                 check_interval_s: float = 2.0, log_warning: Callable[[str], None] = print,
                 log_error: Callable[[str], None] = print, on_exit: Callable[[int], None] | None = None):
        self.command = [str(c) for c in command]
        self.cwd = cwd
        self.env = env or {}
        self.log_path = log_path
        self.pid_path = pid_path
        self.stop_timeout_s = stop_timeout_s
        self.check_interval_s = check_interval_s
        self.log_warning = log_warning
        self.log_error = log_error
        self.on_exit = on_exit  # told the pid of a worker that exited (its leases are released at once)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def _spawn(self) -> float:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        env.update({str(k): str(v) for k, v in self.env.items()})
        path = self.log_path or os.devnull
        if path != os.devnull and os.path.exists(path) and os.path.getsize(path) > 50 * 1024 * 1024:
            os.replace(path, path + ".1")  # keep one previous log of at most 50 MiB
        with open(path, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         close_fds=True)
        if self.pid_path:
            with open(self.pid_path, "w") as f:
                f.write(str(self.proc.pid))
        self.log_warning(f"medxplain: worker started (pid {self.proc.pid})")
        return time.time()

    def _run(self) -> None:
        delay, started = 1.0, time.time()
        while not self.stopping.is_set():
            try:
                if self.proc is None or self.proc.poll() is not None:
                    if self.proc is not None:
                        self.last_exit = self.proc.returncode
                        ran = time.time() - started
                        delay = 1.0 if ran > 60 else min(60.0, delay * 2)
                        self.log_error(f"medxplain: worker exited (code {self.proc.returncode} after {ran:.0f} s); "
                                       f"restarting in {delay:.0f} s")
                        pid = self.proc.pid
                        self.proc = None
                        self.restarts += 1
                        if self.on_exit is not None:
                            try:
                                self.on_exit(pid)
                            except Exception as exc:  # the next worker's first lease releases them too
                                self.log_error(f"medxplain: releasing the leases of worker {pid} failed: "
                                               f"{type(exc).__name__}: {exc}")
                        if self.stopping.wait(delay):
                            break
                    started = self._spawn()
            except Exception as exc:  # e.g. the command does not exist: keep trying, less and less often
                self.log_error(f"medxplain: cannot start the worker: {type(exc).__name__}: {exc}")
                delay = min(60.0, delay * 2)
                self.stopping.wait(delay)
            self.stopping.wait(self.check_interval_s)

    def start(self) -> None:
        self.kill_stale()
        self.thread = threading.Thread(target=self._run, name="medxplain-worker-supervisor", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the worker finishes its batch and releases the job
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            self.log_warning("medxplain: worker stopped")
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.pid_path and os.path.exists(self.pid_path):
            os.unlink(self.pid_path)

    def kill_stale(self) -> None:
        """Stop a worker left running by an Orthanc that was killed (pid file + our command line)."""
        if not self.pid_path:
            return
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except (OSError, ValueError):
            return
        if self.command[-1].encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            self.log_warning(f"medxplain: stopped a stale worker (pid {pid})")

    def status(self) -> dict[str, Any]:
        proc = self.proc
        return {"supervised": True, "pid": proc.pid if proc else None,
                "running": bool(proc and proc.poll() is None), "restarts": self.restarts,
                "last_exit_code": self.last_exit}


JOB_FIELDS = ("id", "key", "state", "attempts", "max_attempts", "last_error", "result", "created", "updated")


def jobs_answer(queue: Any, marks: StudyMarks, timings: Timings, worker: dict[str, Any], *,
                state: str | None = None, limit: int = 50, health: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of GET /medxplain/jobs: counts, the newest jobs (dead ones with their
    last error), the queue's health and incidents (emptied, damaged, recovered...),
    the plugin's callback times and counters, the worker's status."""
    jobs = queue.list(state=state, limit=limit)
    return {
        "health": health or {"ok": True},
        "incidents": queue.incidents(),
        "counts": queue.counts(),
        "jobs": [{**{k: getattr(j, k) for k in JOB_FIELDS}, "study": j.payload.get("study")} for j in jobs],
        "stats": {"stored_instance_callback": timings.stats("stored"), "change_callback": timings.stats("change"),
                  "stable_study": timings.stats("stable"),
                  "counters": dict(timings.counters), "studies_marked": len(marks.studies())},
        "worker": worker,
    }
