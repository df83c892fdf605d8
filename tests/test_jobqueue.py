"""The durable SQLite queue: states, leases, retries, dead letters, concurrency."""
from __future__ import annotations

import multiprocessing
import time

import pytest

from pipeline.jobqueue import JobQueue


def test_enqueue_lease_complete(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    job_id, created = q.enqueue("orthanc:study-1", {"study": "study-1"})
    assert created
    job = q.lease("w1", lease_s=60)
    assert job.id == job_id and job.state == "leased" and job.attempts == 1 and job.payload == {"study": "study-1"}
    assert q.lease("w2") is None  # nothing else ready
    assert q.complete(job_id, "w1", {"written": 4})
    assert q.get(job_id).state == "done" and q.get(job_id).result == {"written": 4}
    assert q.counts() == {"pending": 0, "leased": 0, "done": 1, "dead": 0}


def test_same_key_merges_while_open_and_refire_requeues_after_completion(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    a, _ = q.enqueue("orthanc:s")
    b, created = q.enqueue("orthanc:s")
    assert (a, False) == (b, created)  # pending: merged
    job = q.lease("w")
    c, created = q.enqueue("orthanc:s")  # re-fired while running: remembered
    assert c == job.id and not created
    q.complete(job.id, "w")
    again = q.lease("w")
    assert again is not None and again.id != job.id and again.key == "orthanc:s"
    assert "refired" not in again.payload


def test_failure_backs_off_then_dead_letters(tmp_path):
    q = JobQueue(tmp_path / "q.db", max_attempts=3, backoff_s=0.2)
    job_id, _ = q.enqueue("k")
    assert q.fail(q.lease("w").id, "w", "boom 1") == "pending"
    assert q.lease("w") is None  # backing off
    time.sleep(0.25)
    assert q.fail(q.lease("w").id, "w", "boom 2") == "pending"
    time.sleep(0.45)  # second back-off is twice the first
    assert q.fail(q.lease("w").id, "w", "boom 3") == "dead"
    job = q.get(job_id)
    assert job.state == "dead" and job.last_error == "boom 3" and job.attempts == 3
    assert q.retry(job_id) and q.get(job_id).state == "pending" and q.get(job_id).attempts == 0


def test_non_retryable_failure_goes_straight_to_dead(tmp_path):
    q = JobQueue(tmp_path / "q.db", max_attempts=5)
    job_id, _ = q.enqueue("k")
    assert q.fail(q.lease("w").id, "w", "bad input", retry=False) == "dead"


def test_expired_lease_is_taken_again_and_stale_owner_cannot_complete(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    job_id, _ = q.enqueue("k")
    q.lease("crashed-worker", lease_s=0.1)
    time.sleep(0.15)
    job = q.lease("w2", lease_s=60)
    assert job.id == job_id and job.attempts == 2 and job.lease_owner == "w2"
    assert not q.complete(job_id, "crashed-worker")
    assert q.complete(job_id, "w2")


def test_survives_reopen(tmp_path):
    job_id, _ = JobQueue(tmp_path / "q.db").enqueue("k", {"x": 1})
    assert JobQueue(tmp_path / "q.db").lease("w").id == job_id


def test_purge_never_touches_open_jobs(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    q.enqueue("a")
    done_id, _ = q.enqueue("b")
    q.complete(q.lease("w").id, "w")
    with pytest.raises(ValueError, match="open jobs"):
        q.purge(states=("pending",))
    with pytest.raises(ValueError, match="unknown"):
        q.purge(states=("nope",))
    assert q.purge(states=("done",)) == 1
    assert q.counts()["pending"] == 1


def _worker(path: str, owner: str, out) -> None:
    q = JobQueue(path)
    taken = []
    while True:
        job = q.lease(owner, lease_s=60)
        if job is None:
            break
        taken.append(job.key)
        q.complete(job.id, owner)
    out.put(taken)


def test_concurrent_workers_take_each_job_exactly_once(tmp_path):
    path = str(tmp_path / "q.db")
    q = JobQueue(path)
    for i in range(60):
        q.enqueue(f"k{i}")
    out = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_worker, args=(path, f"w{i}", out))
             for i in range(3)]
    for p in procs:
        p.start()
    taken = [key for _ in procs for key in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
    assert sorted(taken) == sorted(f"k{i}" for i in range(60))
    assert q.counts()["done"] == 60


def test_release_gives_the_job_back_without_counting_an_attempt(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    job_id, _ = q.enqueue("k")
    q.lease("w")
    assert not q.release(job_id, "someone-else")
    assert q.release(job_id, "w")
    job = q.lease("w2")
    assert job.id == job_id and job.attempts == 1
