"""The durable SQLite queue: states, leases, retries, dead letters, concurrency,
outages, dead owners and a damaged file. Time is a fake clock (no sleeps)."""
from __future__ import annotations

import multiprocessing
import signal
import stat
import subprocess
import sys

import pytest

from pipeline.pacs.jobqueue import JobQueue, QueueDamaged, inspect_queue, make_owner, owner_alive
from tests.clock import FakeClock


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
    clock = FakeClock()
    q = JobQueue(tmp_path / "q.db", max_attempts=3, backoff_s=10, clock=clock)
    job_id, _ = q.enqueue("k")
    assert q.fail(q.lease("w").id, "w", "boom 1") == "pending"
    clock.advance(9.9)
    assert q.lease("w") is None  # backing off
    clock.advance(0.1)
    assert q.fail(q.lease("w").id, "w", "boom 2") == "pending"
    clock.advance(19.9)  # second back-off is twice the first
    assert q.lease("w") is None
    clock.advance(0.1)
    assert q.fail(q.lease("w").id, "w", "boom 3") == "dead"
    job = q.get(job_id)
    assert job.state == "dead" and job.last_error == "boom 3" and job.attempts == 3
    assert q.retry(job_id) and q.get(job_id).state == "pending" and q.get(job_id).attempts == 0


def test_non_retryable_failure_goes_straight_to_dead(tmp_path):
    q = JobQueue(tmp_path / "q.db", max_attempts=5)
    job_id, _ = q.enqueue("k")
    assert q.fail(q.lease("w").id, "w", "bad input", retry=False) == "dead"


def test_expired_lease_is_taken_again_and_stale_owner_cannot_complete(tmp_path):
    clock = FakeClock()
    q = JobQueue(tmp_path / "q.db", clock=clock)
    job_id, _ = q.enqueue("k")
    q.lease("crashed-worker", lease_s=300)
    clock.advance(299)
    assert q.lease("w2", lease_s=60) is None  # the lease still holds
    clock.advance(2)
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


# ------------------------------------------------------------------ peer outages


def test_an_outage_defers_without_spending_attempts_then_dead_letters_after_the_long_limit(tmp_path):
    clock = FakeClock()
    q = JobQueue(tmp_path / "q.db", max_attempts=2, unavailable_dead_after_s=3600, clock=clock)
    job_id, _ = q.enqueue("k")
    for _ in range(10):  # far more outages than max_attempts
        job = q.lease("w")
        assert job.attempts == 1
        assert q.defer(job.id, "w", "Orthanc unreachable", delay_s=60) == "pending"
        assert q.lease("w") is None  # paused
        clock.advance(60)
    job = q.get(job_id)
    assert job.attempts == 0 and job.unavailable_since == 1_000_000.0 and job.last_error == "Orthanc unreachable"
    clock.advance(3000)
    assert q.defer(q.lease("w").id, "w", "still unreachable", delay_s=60) == "dead"
    assert q.get(job_id).last_error.startswith("peer unavailable for 3600 s")


def test_a_success_ends_the_outage_and_wakes_every_deferred_job(tmp_path):
    clock = FakeClock()
    q = JobQueue(tmp_path / "q.db", unavailable_dead_after_s=100, clock=clock)
    ids = [q.enqueue(f"k{i}")[0] for i in range(3)]
    for _ in ids:
        q.defer(q.lease("w").id, "w", "down", delay_s=600)
    assert q.lease("w") is None
    assert q.wake_deferred() == 3
    first = q.lease("w")
    assert q.complete(first.id, "w") and q.get(first.id).unavailable_since is None
    clock.advance(200)  # a later outage starts its own count
    second = q.lease("w")
    assert q.defer(second.id, "w", "down again", delay_s=1) == "dead"  # it was unavailable since t0
    third = q.lease("w")
    assert q.fail(third.id, "w", "a real error") == "pending" and q.get(third.id).unavailable_since is None


# ------------------------------------------------------------------ dead owners


def test_a_dead_owners_lease_is_released_at_once(tmp_path):
    clock = FakeClock()
    q = JobQueue(tmp_path / "q.db", clock=clock)
    job_id, _ = q.enqueue("k")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        owner = make_owner(child.pid)
        assert owner_alive(owner) is True and owner_alive(make_owner()) is True
        assert q.lease(owner, lease_s=300).id == job_id
        assert q.lease("w2") is None  # its owner runs: the lease holds
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert owner_alive(owner) is False
    assert owner_alive("otherhost:1:abc:x:1") is None and owner_alive("w2") is None  # cannot tell: lease expiry
    job = q.lease("w2", lease_s=300)  # no clock advance: the owner is known to be gone
    assert job.id == job_id and job.attempts == 2 and job.lease_owner == "w2"


def test_reclaim_orphans_for_the_supervisor(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    job_id, _ = q.enqueue("k")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = make_owner(child.pid)
    q.lease(owner)
    child.wait()
    assert q.reclaim_orphans() == [job_id]
    assert q.reclaim_orphans() == []


# ------------------------------------------------------------------ integrity


def _filled(path) -> str:
    q = JobQueue(path)
    return q.enqueue("orthanc:s1")[0]


@pytest.mark.parametrize("damage", ["emptied", "garbage_header", "half_file"])
def test_a_damaged_queue_is_refused_or_moved_aside_with_an_incident(tmp_path, damage):
    path = tmp_path / "q.db"
    _filled(path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"q.db{suffix}").unlink(missing_ok=True)
    data = path.read_bytes()
    if damage == "emptied":
        path.write_bytes(b"")
    elif damage == "garbage_header":
        path.write_bytes(b"\x00garbage-garbage" + data[17:])
    else:
        path.write_bytes(data[: len(data) // 2])
    state, detail = inspect_queue(path)
    assert state == ("emptied" if damage == "emptied" else "damaged"), detail
    with pytest.raises(QueueDamaged) as info:
        JobQueue(path)  # a worker: refuses, never re-creates an empty schema over it
    assert info.value.kind == state
    q = JobQueue(path, recover=True)  # the queue's owner: moves it aside, starts anew, says so
    assert q.incident["kind"] == state and q.incident["moved_to"]
    (incident,) = q.incidents()
    assert incident["kind"] == state and "moved to" in incident["detail"]
    assert q.counts()["pending"] == 0 and inspect_queue(path)[0] == "ok"
    assert JobQueue(path).incident is None  # healthy now


def test_queue_files_are_private(tmp_path):
    path = tmp_path / "new" / "q.db"
    JobQueue(path).enqueue("k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for suffix in ("-wal", "-shm"):
        side = path.with_name("q.db" + suffix)
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0
