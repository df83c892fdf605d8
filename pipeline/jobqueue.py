"""The durable job queue: one SQLite file in WAL mode, no server to run.

Standard library only: Orthanc's embedded interpreter imports this module to make
a job durable before its callback returns, and must never import torch.

A job is one study to explain. States:

    pending --lease--> leased --complete--> done
       ^                  |
       +---- fail --------+  (attempts < max_attempts: back to pending after a back-off)
                          +--> dead   (attempts exhausted: kept with its last error)

A lease expires: a worker that crashes mid-job leaves a leased row whose
``lease_expires`` passes, and the next ``lease()`` takes it again. Idempotent
outputs (deterministic UIDs) make that re-run safe.
"""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    updated       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before);
-- At most one open (pending or leased) job per key: a re-fired trigger joins it.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_open_key ON jobs (key) WHERE state IN ('pending', 'leased');
"""

STATES = ("pending", "leased", "done", "dead")


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["payload"] = json.loads(data["payload"])
    data["result"] = json.loads(data["result"]) if data["result"] else None
    return Job(**data)


class JobQueue:
    def __init__(self, path: str | Path, *, max_attempts: int = 5, backoff_s: float = 5.0,
                 backoff_max_s: float = 600.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

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

    def enqueue(self, key: str, payload: dict[str, Any] | None = None, *, delay_s: float = 0.0) -> tuple[str, bool]:
        """Make a job durable; returns (job id, created). If an open job with the same
        key exists, it is returned instead (created False): re-fired triggers merge."""
        now = time.time()
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

    def lease(self, owner: str, lease_s: float = 300.0) -> Job | None:
        """Take the oldest ready job (pending, or leased with an expired lease)."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
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
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET lease_expires = ?, updated = ? "
                             "WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                             (time.time() + lease_s, time.time(), job_id, owner))
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
        now = time.time()
        with self._connect() as db:
            row = self._begin_owned(db, job_id, owner)
            if row is None:
                return False
            db.execute("UPDATE jobs SET state = 'done', result = ?, lease_owner = NULL, lease_expires = NULL, "
                       "last_error = NULL, updated = ? WHERE id = ?", (json.dumps(result or {}), now, job_id))
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
        now = time.time()
        with self._connect() as db:
            row = self._begin_owned(db, job_id, owner)
            if row is None:
                return None
            dead = not retry or row["attempts"] >= row["max_attempts"]
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (row["attempts"] - 1))
            state = "dead" if dead else "pending"
            db.execute("UPDATE jobs SET state = ?, last_error = ?, not_before = ?, lease_owner = NULL, "
                       "lease_expires = NULL, updated = ? WHERE id = ?",
                       (state, error[:2000], now + (0 if dead else delay), now, job_id))
            db.execute("COMMIT")
            return state

    def release(self, job_id: str, owner: str) -> bool:
        """Give a leased job back untouched (worker shutting down): pending again at
        once, and the attempt it used is not counted."""
        now = time.time()
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET state = 'pending', attempts = MAX(attempts - 1, 0), not_before = ?, "
                             "lease_owner = NULL, lease_expires = NULL, updated = ? "
                             "WHERE id = ? AND state = 'leased' AND lease_owner = ?", (now, now, job_id, owner))
            return cur.rowcount == 1

    def retry(self, job_id: str) -> bool:
        """Put a dead (or done) job back to pending with fresh attempts."""
        now = time.time()
        with self._connect() as db:
            try:
                cur = db.execute("UPDATE jobs SET state = 'pending', attempts = 0, not_before = ?, updated = ? "
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
                             (*states, time.time() - older_than_s))
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

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def __iter__(self) -> Iterator[Job]:
        return iter(self.list(limit=-1))
