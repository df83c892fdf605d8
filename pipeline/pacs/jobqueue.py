"""The durable job queue: one SQLite file in WAL mode, no server to run.

Standard library only: Orthanc's embedded interpreter imports this module to make
a job durable before its callback returns, and must never import torch.

A job is one study to explain. States:

    pending --lease--> leased --complete--> done
       ^                  |
       +---- fail --------+  (attempts < max_attempts: back to pending after a back-off)
       +---- defer -------+  (peer unavailable: pending again, the attempt is not counted)
                          +--> dead   (permanent failure, attempts exhausted, or a peer
                                       unavailable for longer than unavailable_dead_after_s)

Leases: a worker that dies mid-job leaves a leased row. Its owner id
(:func:`make_owner`) names host, boot, pid namespace, pid and the process start
time, so the next ``lease()`` on the same machine sees at once that the owner is
gone and takes the job again (the attempt it used still counts: a job that keeps
killing its worker is dead-lettered by the worker). An owner on another machine
is only known dead when its ``lease_expires`` passes. Idempotent outputs
(deterministic UIDs) make the re-run safe.

Integrity (:func:`inspect_queue`): at open, a file emptied to 0 bytes, without the
SQLite header, failing ``PRAGMA quick_check`` or missing the ``jobs`` table is
*damaged*. With ``recover=True`` (the owner of the queue: the Orthanc plugin, the
DICOM node) it is moved aside (``queue.db.damaged-<time>``), a new queue is made
and an incident is recorded in it (``incidents()``): the caller must then
rebuild what it can (the plugin re-queues from Orthanc's own state). With
``recover=False`` (a worker) :class:`QueueDamaged` is raised.

Time comes from ``clock`` (default ``time.time``): tests pass a fake clock.
Files are created 0600 (a folder made for the queue 0700): job payloads name
studies.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no cross-process lock during the check
    fcntl = None  # type: ignore[assignment]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    key           TEXT NOT NULL,          -- what the job is about, e.g. 'orthanc:<study id>'
    payload       TEXT NOT NULL,          -- JSON
    state         TEXT NOT NULL CHECK (state IN ('pending', 'leased', 'done', 'dead')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    not_before    REAL NOT NULL,          -- earliest time to lease (back-off)
    lease_owner   TEXT,
    lease_expires REAL,
    last_error    TEXT,
    result        TEXT,                   -- JSON summary when done
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    unavailable_since REAL                -- first deferral of the current peer outage (NULL: none)
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before);
-- At most one open (pending or leased) job per key: a re-fired trigger joins it.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_open_key ON jobs (key) WHERE state IN ('pending', 'leased');
CREATE TABLE IF NOT EXISTS incidents (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    time     REAL NOT NULL,
    kind     TEXT NOT NULL,               -- emptied | damaged | recovered | ...
    detail   TEXT NOT NULL
);
"""

STATES = ("pending", "leased", "done", "dead")
SQLITE_HEADER = b"SQLite format 3\x00"


class QueueDamaged(RuntimeError):
    """The queue file is emptied or damaged (``kind``: 'emptied' or 'damaged'; ``detail``)."""

    def __init__(self, path: Path, kind: str, detail: str):
        self.path, self.kind, self.detail = Path(path), kind, detail
        super().__init__(f"job queue {path} is {kind}: {detail}")


def inspect_queue(path: str | Path) -> tuple[str, str]:
    """What state a queue file is in, without changing it: ``("missing" | "ok" |
    "emptied" | "damaged", detail)``. Emptied: 0 bytes (SQLite would silently make a
    new empty database of it). Damaged: no SQLite header, ``PRAGMA quick_check``
    not ok, or no ``jobs`` table."""
    path = Path(path)
    if not path.exists():
        return "missing", "no queue file"
    size = path.stat().st_size
    if size == 0:
        return "emptied", "the file has 0 bytes (truncated?): every job and study mark it held is gone"
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        return "damaged", f"not an SQLite database (header {header[:16]!r}, {size} bytes)"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return "damaged", f"SQLite cannot read it ({exc})"
    if rows != ["ok"]:
        return "damaged", "PRAGMA quick_check: " + "; ".join(str(r) for r in rows[:5])
    if "jobs" not in tables:
        return "damaged", "no 'jobs' table (a database that is not this queue, or one emptied by hand)"
    return "ok", f"{size} bytes"


_BOOT: str | None = None


def _boot() -> str:
    """This boot and pid namespace: pids are only comparable within them."""
    global _BOOT
    if _BOOT is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        except OSError:
            boot = "noboot"
        try:
            ns = os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
        except OSError:
            ns = "nons"
        _BOOT = f"{boot}.{ns}"
    return _BOOT


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def make_owner(pid: int | None = None) -> str:
    """A lease owner id: ``host:pid:random:boot.pidns:start`` (see :func:`owner_alive`)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:6]}:{_boot()}:{_start_time(pid) or '?'}"


def owner_alive(owner: str | None) -> bool | None:
    """Is the process that holds a lease still running? None when this machine cannot
    tell (another host or boot, or an owner id not made by :func:`make_owner`)."""
    parts = (owner or "").split(":")
    if len(parts) != 5 or parts[0] != socket.gethostname() or parts[3] != _boot() or not parts[1].isdigit():
        return None
    start = _start_time(int(parts[1]))
    return start is not None and start == parts[4]


@dataclass(frozen=True)
class Job:
    id: str
    key: str
    payload: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    not_before: float
    lease_owner: str | None
    lease_expires: float | None
    last_error: str | None
    result: dict[str, Any] | None
    created: float
    updated: float
    unavailable_since: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["payload"] = json.loads(data["payload"])
    data["result"] = json.loads(data["result"]) if data["result"] else None
    return Job(**data)


def _create_private(path: Path) -> None:
    """Create the queue file 0600 (and its folder 0700) before SQLite does (umask 022 gives 0644)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.chmod(str(path) + suffix, 0o600)


class JobQueue:
    """``JobQueue(path)``: open (or create) the queue file; see the module docstring.

    ``unavailable_dead_after_s``: a job deferred because a peer was unreachable is
    dead-lettered once the outage has lasted this long (default one week).
    ``recover``: what to do with an emptied or damaged file (move aside and start
    anew, recording an incident; or raise :class:`QueueDamaged`). ``incident``
    holds the recovery made by this open, if any.
    """

    def __init__(self, path: str | Path, *, max_attempts: int = 5, backoff_s: float = 5.0,
                 backoff_max_s: float = 600.0, unavailable_dead_after_s: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time, recover: bool = False):
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.unavailable_dead_after_s = unavailable_dead_after_s
        self.clock = clock
        self.incident: dict[str, Any] | None = None
        with self._exclusive():
            state, detail = inspect_queue(self.path)
            if state in ("emptied", "damaged"):
                if not recover:
                    raise QueueDamaged(self.path, state, detail)
                moved = self._move_aside()
                self.incident = {"kind": state, "detail": detail, "moved_to": str(moved) if moved else None}
            _create_private(self.path)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
                columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
                if "unavailable_since" not in columns:  # a queue made by an older release
                    db.execute("ALTER TABLE jobs ADD COLUMN unavailable_since REAL")
            _create_private(self.path)  # the -wal and -shm files SQLite just made
            if self.incident is not None:
                moved = self.incident["moved_to"]
                where = f"; the damaged file was moved to {moved}" if moved else ""
                self.incident["id"] = self.record_incident(self.incident["kind"], detail + where)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold a lock file while checking/recovering, so two processes never both move the file."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        if fcntl is None:
            yield
            return
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _move_aside(self) -> Path | None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        target = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{uuid.uuid4().hex[:4]}")
        try:
            os.replace(self.path, target)
        except OSError:
            self.path.unlink(missing_ok=True)
            target = None
        for suffix in ("-wal", "-shm"):  # belong to the old file; SQLite would apply them to the new one
            side = Path(str(self.path) + suffix)
            if side.exists():
                if target is not None:
                    with contextlib.suppress(OSError):
                        os.replace(side, str(target) + suffix)
                side.unlink(missing_ok=True)
        return target

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: safe across threads (Orthanc's callbacks) and processes.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            # FULL: a job acknowledged to Orthanc survives even a power loss.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    # -- incidents ---------------------------------------------------------------
    def record_incident(self, kind: str, detail: str) -> int:
        with self._connect() as db:
            cur = db.execute("INSERT INTO incidents (time, kind, detail) VALUES (?, ?, ?)",
                             (self.clock(), kind, detail[:2000]))
            return int(cur.lastrowid)

    def incidents(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest incidents first: ``{id, time, kind, detail}``."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM incidents ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    # -- jobs --------------------------------------------------------------------
    def enqueue(self, key: str, payload: dict[str, Any] | None = None, *, delay_s: float = 0.0) -> tuple[str, bool]:
        """Make a job durable; returns (job id, created). If an open job with the same
        key exists, it is returned instead (created False): re-fired triggers merge."""
        now = self.clock()
        job_id = uuid.uuid4().hex
        with self._connect() as db:
            try:
                db.execute(
                    "INSERT INTO jobs (id, key, payload, state, max_attempts, not_before, created, updated) "
                    "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)",
                    (job_id, key, json.dumps(payload or {}), self.max_attempts, now + delay_s, now, now),
                )
                return job_id, True
            except sqlite3.IntegrityError:
                row = db.execute("SELECT id FROM jobs WHERE key = ? AND state IN ('pending', 'leased')",
                                 (key,)).fetchone()
                if row is None:  # the open job closed between the two statements: try once more
                    return self.enqueue(key, payload, delay_s=delay_s)
                # A job that is already running must look again after it finishes:
                # mark it so that completion re-queues (new instances may have arrived).
                db.execute("UPDATE jobs SET payload = json_set(payload, '$.refired', 1), updated = ? "
                           "WHERE id = ? AND state = 'leased'", (now, row["id"]))
                return row["id"], False

    def _reclaim_orphans(self, db: sqlite3.Connection, now: float) -> list[str]:
        """Inside a write transaction: expire the leases whose owner process is gone."""
        reclaimed = []
        for row in db.execute("SELECT id, lease_owner FROM jobs WHERE state = 'leased' AND lease_expires >= ?",
                              (now,)).fetchall():
            if owner_alive(row["lease_owner"]) is False:
                db.execute("UPDATE jobs SET lease_expires = ?, updated = ? WHERE id = ?", (now - 1e-6, now, row["id"]))
                reclaimed.append(row["id"])
        return reclaimed

    def reclaim_orphans(self) -> list[str]:
        """Release now the leases held by processes of this machine that have exited
        (the supervisor calls it when its worker exits). Returns the job ids."""
        now = self.clock()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                reclaimed = self._reclaim_orphans(db, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return reclaimed

    def lease(self, owner: str, lease_s: float = 300.0) -> Job | None:
        """Take the oldest ready job (pending, or leased with an expired lease or a
        dead owner on this machine)."""
        now = self.clock()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._reclaim_orphans(db, now)
                row = db.execute(
                    "SELECT id FROM jobs WHERE (state = 'pending' AND not_before <= ?) "
                    "OR (state = 'leased' AND lease_expires < ?) ORDER BY created LIMIT 1",
                    (now, now),
                ).fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return None
                db.execute(
                    "UPDATE jobs SET state = 'leased', lease_owner = ?, lease_expires = ?, attempts = attempts + 1, "
                    "payload = json_remove(payload, '$.refired'), updated = ? WHERE id = ?",
                    (owner, now + lease_s, now, row["id"]),
                )
                job = _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())
                db.execute("COMMIT")
                return job
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def extend(self, job_id: str, owner: str, lease_s: float = 300.0) -> bool:
        """Keep a long job's lease alive; False if the lease was lost to another worker."""
        now = self.clock()
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET lease_expires = ?, updated = ? "
                             "WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                             (now + lease_s, now, job_id, owner))
            return cur.rowcount == 1

    @staticmethod
    def _begin_owned(db: sqlite3.Connection, job_id: str, owner: str) -> sqlite3.Row | None:
        """Open a write transaction and return the job if ``owner`` holds its lease;
        otherwise end the transaction and return None (the lease was lost)."""
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT * FROM jobs WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                         (job_id, owner)).fetchone()
        if row is None:
            db.execute("COMMIT")
        return row

    def complete(self, job_id: str, owner: str, result: dict[str, Any] | None = None) -> bool:
        now = self.clock()
        with self._connect() as db:
            row = self._begin_owned(db, job_id, owner)
            if row is None:
                return False
            db.execute("UPDATE jobs SET state = 'done', result = ?, lease_owner = NULL, lease_expires = NULL, "
                       "last_error = NULL, unavailable_since = NULL, updated = ? WHERE id = ?",
                       (json.dumps(result or {}), now, job_id))
            refired = json.loads(row["payload"]).get("refired")
            db.execute("COMMIT")
        if refired:
            payload = json.loads(row["payload"])
            payload.pop("refired", None)
            self.enqueue(row["key"], payload)
        return True

    def fail(self, job_id: str, owner: str, error: str, *, retry: bool = True) -> str | None:
        """Record a failure: back to pending after an exponential back-off, or dead
        when attempts are exhausted (or ``retry`` is False). Returns the new state."""
        now = self.clock()
        with self._connect() as db:
            row = self._begin_owned(db, job_id, owner)
            if row is None:
                return None
            dead = not retry or row["attempts"] >= row["max_attempts"]
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (row["attempts"] - 1))
            state = "dead" if dead else "pending"
            db.execute("UPDATE jobs SET state = ?, last_error = ?, not_before = ?, lease_owner = NULL, "
                       "lease_expires = NULL, unavailable_since = NULL, updated = ? WHERE id = ?",
                       (state, error[:2000], now + (0 if dead else delay), now, job_id))
            db.execute("COMMIT")
            return state

    def defer(self, job_id: str, owner: str, error: str, *, delay_s: float) -> str | None:
        """A peer (Orthanc, the C-STORE destination) is unavailable: pending again
        after ``delay_s`` without counting the attempt; dead once the outage that
        began at the job's first deferral has lasted ``unavailable_dead_after_s``.
        Returns the new state (None if the lease was lost)."""
        now = self.clock()
        with self._connect() as db:
            row = self._begin_owned(db, job_id, owner)
            if row is None:
                return None
            since = row["unavailable_since"] if row["unavailable_since"] is not None else now
            if now - since >= self.unavailable_dead_after_s:
                state = "dead"
                error = (f"peer unavailable for {now - since:.0f} s (queue.unavailable_dead_after_s "
                         f"{self.unavailable_dead_after_s:.0f}): {error}")
                db.execute("UPDATE jobs SET state = 'dead', last_error = ?, lease_owner = NULL, lease_expires = NULL, "
                           "updated = ? WHERE id = ?", (error[:2000], now, job_id))
            else:
                state = "pending"
                db.execute("UPDATE jobs SET state = 'pending', attempts = MAX(attempts - 1, 0), not_before = ?, "
                           "last_error = ?, unavailable_since = ?, lease_owner = NULL, lease_expires = NULL, "
                           "updated = ? WHERE id = ?", (now + delay_s, error[:2000], since, now, job_id))
            db.execute("COMMIT")
            return state

    def wake_deferred(self) -> int:
        """A peer answered again: every job deferred for an outage is ready now."""
        now = self.clock()
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET not_before = ?, updated = ? WHERE state = 'pending' "
                             "AND unavailable_since IS NOT NULL AND not_before > ?", (now, now, now))
            return cur.rowcount

    def release(self, job_id: str, owner: str) -> bool:
        """Give a leased job back untouched (worker shutting down): pending again at
        once, and the attempt it used is not counted."""
        now = self.clock()
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET state = 'pending', attempts = MAX(attempts - 1, 0), not_before = ?, "
                             "lease_owner = NULL, lease_expires = NULL, updated = ? "
                             "WHERE id = ? AND state = 'leased' AND lease_owner = ?", (now, now, job_id, owner))
            return cur.rowcount == 1

    def retry(self, job_id: str) -> bool:
        """Put a dead (or done) job back to pending with fresh attempts."""
        now = self.clock()
        with self._connect() as db:
            try:
                cur = db.execute("UPDATE jobs SET state = 'pending', attempts = 0, not_before = ?, "
                                 "unavailable_since = NULL, updated = ? "
                                 "WHERE id = ? AND state IN ('dead', 'done')", (now, now, job_id))
            except sqlite3.IntegrityError:
                return False  # an open job for the same key already exists
            return cur.rowcount == 1

    def purge(self, *, states: tuple[str, ...] = ("done",), older_than_s: float = 0.0) -> int:
        unknown = set(states) - set(STATES)
        if unknown:
            raise ValueError(f"unknown job states {sorted(unknown)}; known: {STATES}")
        if set(states) & {"pending", "leased"}:
            raise ValueError("refusing to purge open jobs (pending/leased): that would lose studies")
        with self._connect() as db:
            marks = ",".join("?" for _ in states)
            cur = db.execute(f"DELETE FROM jobs WHERE state IN ({marks}) AND updated <= ?",
                             (*states, self.clock() - older_than_s))
            return cur.rowcount

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._connect() as db:
            if state:
                rows = db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created DESC LIMIT ?", (state, limit))
            else:
                rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
            return [_job(r) for r in rows]

    def keys(self) -> set[str]:
        """Every key that has a job (any state)."""
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT key FROM jobs")}

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def __iter__(self) -> Iterator[Job]:
        return iter(self.list(limit=-1))
