"""Real faults against a real Orthanc: no acknowledged study is lost or stuck.

Each test starts Orthanc (Debian package) with the medxplain plugin on free
loopback ports, sends studies with dcmtk's storescu (or REST), causes a real
fault, and checks that every study Orthanc acknowledged is queued and, where a
worker runs, explained exactly once. Waits are on events (queue states, audit
lines, Orthanc answers), never on wall-clock windows; the time to recover is
printed as a figure (``pytest -s -k ...`` shows it), not asserted.

- a peer (Orthanc) down for longer than the whole retry budget, then back;
- the queue file emptied, and damaged, while Orthanc is stopped;
- the queue on a full file system (a small tmpfs, mounted and unmounted here: root);
- Patient IDs with leading and trailing spaces;
- the worker's account trying DELETE and PUT; calling AE compared exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.pacs import orthanc_launcher as launcher
from tests.orthanc_server import OrthancServer, wait_for
from tests.test_orthanc import (  # noqa: F401 (fixtures)
    cr_study,
    expected_outputs_once,
    kermany_test,
    require_bundle,
    servers,
    study_id,
    to_bytes,
    wait_done,
    write,
)

pytestmark = pytest.mark.slow


def audit_lines(orthanc: OrthancServer) -> list[dict]:
    try:
        return [json.loads(line) for line in orthanc.paths["audit"].read_text().splitlines() if line.strip()]
    except OSError:
        return []


def figure(name: str, **values) -> None:
    print(f"\nFIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ------------------------------------------------------------------ peer down, longer than the retry budget


def test_orthanc_down_longer_than_the_retry_budget_then_back_resumes_everything(servers, tmp_path, kermany_test):
    require_bundle()
    # Retry budget for real failures: 2 attempts, 1 s then 2 s back-off (3 s). The outage
    # lasts until the worker has tried more times than every job's attempts put together.
    queue = {"max_attempts": 2, "backoff_s": 1, "backoff_max_s": 2, "outage_retry_max_s": 2}
    orthanc = servers(queue=queue).start()
    studies = [cr_study(kermany_test[100 + i:101 + i], f"fault-outage-{i}", patient_id=f"MXO{i}") for i in range(3)]
    for i, study in enumerate(studies):
        orthanc.storescu(write(study, tmp_path / f"in{i}"))
    orthanc.wait_jobs(lambda c: c["pending"] == 3, 30, "three pending jobs")
    ids = [study_id(orthanc, s[0]) for s in studies]
    orthanc.stop()
    worker = orthanc.start_worker()  # our own worker: it keeps running while Orthanc is down
    try:
        budget = 3 * queue["max_attempts"]
        wait_for(lambda: sum(1 for a in audit_lines(orthanc) if a["outcome"] == "pending") > budget, 120,
                 what=f"more than {budget} tries while Orthanc is down")
        jobs = orthanc.queue().list(limit=-1)
        assert [j.state for j in jobs] == ["pending"] * 3, [(j.state, j.last_error) for j in jobs]
        assert all(j.attempts == 0 for j in jobs) and any(j.unavailable_since for j in jobs)  # no attempt spent
        tries = sum(1 for a in audit_lines(orthanc) if a["outcome"] == "pending")
        back = time.monotonic()
        orthanc.start()
        wait_done(orthanc, ids, 240)
        recovered_s = time.monotonic() - back
        for sid in ids:
            expected_outputs_once(orthanc, sid, 1)
        assert all(j.attempts == 1 for j in orthanc.queue().list(limit=-1))
        figure("orthanc_down", studies_sent=3, acknowledged=3, explained_once=3, lost=0,
               tries_during_outage=tries, attempts_budget=budget, seconds_from_orthanc_back_to_all_done=round(recovered_s, 1))
    finally:
        stop_process(worker)


# ------------------------------------------------------------------ queue emptied or damaged while stopped


def _damage(path: Path, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    if how == "emptied":
        path.write_bytes(b"")
    else:
        data = path.read_bytes()
        path.write_bytes(b"garbage-garbage!" + data[16: len(data) // 2])


@pytest.mark.parametrize("how", ["emptied", "damaged"])
def test_queue_emptied_or_damaged_is_reported_and_rebuilt_from_orthanc(servers, tmp_path, kermany_test, how):
    require_bundle()
    orthanc = servers(start_worker=False).start()
    explained = cr_study(kermany_test[110:111], f"fault-{how}-done", patient_id="MXD1")
    waiting = cr_study(kermany_test[111:112], f"fault-{how}-pending", patient_id="MXD2")
    orthanc.storescu(write(explained, tmp_path / "a"))
    orthanc.storescu(write(waiting, tmp_path / "b"))
    orthanc.wait_jobs(lambda c: c["pending"] == 2, 30, "two pending jobs")
    ids = [study_id(orthanc, explained[0]), study_id(orthanc, waiting[0])]
    orthanc.restart(start_worker=True)
    wait_done(orthanc, ids, 240)  # both explained once; now the queue is lost
    orthanc.stop()
    _damage(orthanc.settings.queue_path, how)

    # `medxplain orthanc` says so and exits non-zero (instead of "worker started").
    cli = subprocess.run([str(Path(launcher.PROJECT_ROOT) / ".venv" / "bin" / "medxplain"), "orthanc",
                          "--data", str(orthanc.data), "--http-port", str(orthanc.settings.http_port),
                          "--dicom-port", str(orthanc.settings.dicom_port), "--no-worker", "--stable-age", "1"],
                         capture_output=True, text=True, timeout=120)
    try:
        assert cli.returncode == 3, cli.stdout + cli.stderr
        assert f"job queue {how}" in cli.stderr and "NOT healthy" in cli.stderr
        answer = orthanc.jobs()
        assert answer["incidents"][-1]["kind"] == how
        moved = list(orthanc.settings.queue_path.parent.glob("queue.db.damaged-*"))
        assert moved, "the damaged file is kept for inspection"
        assert "QUEUE WAS " + how.upper() in orthanc.paths["log"].read_text()
        # Rebuilt from Orthanc's own state: both studies queued again.
        wait_for(lambda: any(i["kind"] == "recovered" for i in orthanc.jobs()["incidents"]), 30,
                 what="recovery recorded")
        assert {j["study"] for j in orthanc.jobs()["jobs"]} == set(ids)
    finally:
        launcher.stop(orthanc.data)
    # The worker re-runs them: everything already explained is skipped, nothing is duplicated.
    orthanc.start(start_worker=True)
    wait_for(lambda: orthanc.jobs()["counts"]["done"] == 2, 240, what="the recovered jobs done")
    for sid in ids:
        expected_outputs_once(orthanc, sid, 1)
    summaries = [j.result for j in orthanc.queue().list(limit=-1)]
    assert sum(r["instances"]["already_done"] for r in summaries) == 2
    figure(f"queue_{how}", studies_sent=2, acknowledged=2, explained_once=2, lost=0, requeued_from_orthanc=2)


# ------------------------------------------------------------------ the queue's file system full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs, mounted here and unmounted at the end (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system to the last byte (unbuffered writes until ENOSPC)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_queue_on_a_full_file_system_refuses_instead_of_losing(servers, tmp_path, kermany_test, small_tmpfs):
    orthanc = servers(queue_file=small_tmpfs / "queue.db", reconcile_s=1.0)
    try:
        orthanc.start()
        first = cr_study(kermany_test[120:121], "fault-full-a", patient_id="MXF1")
        orthanc.storescu(write(first, tmp_path / "a"))
        orthanc.wait_jobs(lambda c: c["pending"] == 1, 30, "the first job")
        filler = _fill(small_tmpfs)

        by_cstore = cr_study(kermany_test[121:122], "fault-full-b", patient_id="MXF2")
        by_rest = cr_study(kermany_test[122:123], "fault-full-c", patient_id="MXF3")
        refused = orthanc.storescu(write(by_cstore, tmp_path / "b"), check=False)
        assert refused.returncode != 0  # 0xA700: the sender keeps the study
        status, _ = orthanc.http("POST", "/instances", to_bytes(by_rest[0]), content_type="application/dicom")
        assert status == 403  # the queue cannot record it: refused, not acknowledged
        assert len(orthanc.studies()) == 1
        health = orthanc.jobs()["health"]
        assert health["ok"] is False and "full" in health["reason"]

        filler.unlink()  # space again: the reconciliation's probe finds the queue usable
        wait_for(lambda: orthanc.jobs()["health"]["ok"], 30, what="the queue usable again")
        orthanc.storescu(write(by_cstore, tmp_path / "b"))  # the sender's retry
        orthanc.upload(to_bytes(by_rest[0]))
        wait = orthanc.wait_jobs(lambda c: c["pending"] == 3, 30, "three jobs")
        ids = {study_id(orthanc, s[0]) for s in (first, by_cstore, by_rest)}
        assert {j["study"] for j in wait["jobs"]} == ids
        figure("queue_disk_full", studies_sent=3, acknowledged_while_full=0, refused_while_full=2,
               acknowledged_after=3, queued=3, lost=0)
    finally:
        orthanc.stop()


# ------------------------------------------------------------------ identity and privileges


def test_spaces_in_identifiers_queue_orthancs_own_study_id(servers, tmp_path, kermany_test):
    orthanc = servers().start()
    lead = cr_study(kermany_test[130:131], "fault-space-lead", patient_id=" MXLEAD")
    both = cr_study(kermany_test[131:132], "fault-space-both", patient_id="  MX BOTH  ")
    orthanc.storescu(write(lead, tmp_path / "a"))
    orthanc.upload(to_bytes(both[0]))  # REST: the stored-instance path
    answer = orthanc.wait_jobs(lambda c: c["pending"] == 2, 30, "two jobs")
    assert {j["study"] for j in answer["jobs"]} == {study_id(orthanc, lead[0]), study_id(orthanc, both[0])}
    assert answer["stats"]["counters"].get("study_id_mismatch", 0) == 0


def test_worker_account_cannot_delete_or_add_a_destination_and_aets_are_exact(servers, tmp_path, kermany_test):
    orthanc = servers().start()
    source = cr_study(kermany_test[140:141], "fault-privileges")
    orthanc.storescu(write(source, tmp_path / "a"))
    sid = study_id(orthanc, source[0])
    worker = launcher.WORKER_USER
    assert orthanc.http("GET", f"/studies/{sid}/series", user=worker)[0] == 200
    assert orthanc.http("DELETE", f"/studies/{sid}", user=worker)[0] == 403
    body = json.dumps({"AET": "EVIL", "Host": "10.0.0.66", "Port": 104}).encode()
    assert orthanc.http("PUT", "/modalities/evil", body, user=worker)[0] == 403
    assert orthanc.http("GET", "/modalities", user=worker)[0] == 403
    assert orthanc.http("GET", "/studies", user=worker)[0] == 403
    assert sid in orthanc.studies()  # still there
    assert orthanc.get("/modalities") == [a.lower() for a in launcher.DEFAULT_ALLOWED_AETS] or \
        "evil" not in orthanc.get("/modalities")
    # Calling AE compared exactly (case included); the called AE must be Orthanc's.
    files = write(cr_study(kermany_test[141:142], "fault-aet"), tmp_path / "b")
    assert orthanc.storescu(files, aet="storescu", check=False).returncode != 0
    wrong_called = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "NOT-ORTHANC", "127.0.0.1",
                                   str(orthanc.settings.dicom_port), *map(str, files)],
                                  capture_output=True, text=True, timeout=60)
    assert wrong_called.returncode != 0
    assert len(orthanc.studies()) == 1


def test_a_mark_whose_stable_study_enqueue_failed_is_queued_without_a_restart(servers, tmp_path, kermany_test):
    """E.g. the whole data folder was full when STABLE_STUDY fired: the mark stayed, no job
    was made. The plugin's reconciliation queues it once Orthanc says the study is stable."""
    import sqlite3

    orthanc = servers(reconcile_s=1.0).start()
    source = cr_study(kermany_test[150:151], "fault-stuck-mark")
    orthanc.storescu(write(source, tmp_path / "a"))
    orthanc.wait_jobs(lambda c: c["pending"] == 1, 30, "the first job")
    sid = study_id(orthanc, source[0])
    q = orthanc.queue()
    job = q.lease("test-worker")
    assert q.complete(job.id, "test-worker")
    # The state a failed enqueue leaves: a mark (of a study already stable), no open job.
    db = sqlite3.connect(orthanc.settings.queue_path, isolation_level=None)
    db.execute("INSERT INTO orthanc_marks (study, version, updated) VALUES (?, 1, 0)", (sid,))
    db.close()
    answer = orthanc.wait_jobs(lambda c: c["pending"] == 1, 30, "the job queued by the reconciliation")
    assert answer["jobs"][0]["study"] == sid and answer["stats"]["studies_marked"] == 0
