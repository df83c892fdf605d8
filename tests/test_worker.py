"""The PACS worker end to end on real parts: the shared DICOM files (and edited
copies of them), a real bundle written to disk and loaded by a real Engine, a real
SQLite queue, real folders; the CLI through subprocesses; the Orthanc client and
the Orthanc job path against a real Orthanc (slow).

The bundle is a small DenseNet at 32 px with untrained weights, written exactly as
`medxplain train` writes one: what is under test here is the plumbing (queue,
rules, batching, delivery, idempotence, audit), not the classifier.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, generate_uid

from config.schema import MedxplainConfig
from dicom_io.uids import hash_text
from explainers.bundle import Bundle, BundleSpec, ClassifierSpec, InputSpec, TaskSpec, save_weights
from explainers.networks import build_network
from pipeline.pacs.audit import AuditLog, Redactor, ScrubUIDsFilter
from pipeline.pacs.jobqueue import JobQueue
from pipeline.pacs.orthanc_client import OrthancClient, OrthancConfigError, OrthancRequestError, OrthancUnavailable
from pipeline.pacs.worker import Worker, open_queue
from tests.clock import FakeClock
from tests.conftest import PROJECT_ROOT

MEDXPLAIN = [sys.executable, "-m", "pipeline.cli"]
TINY = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "init_features": 8, "growth_rate": 8,
        "block_config": [2, 2]}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle") / "tiny-cxr"
    root.mkdir()
    torch.manual_seed(0)
    ref = save_weights(build_network("monai.DenseNet", dict(TINY)).eval(), root / "classifier.safetensors")
    spec = BundleSpec(
        name="tiny-cxr", version="0.1", description="written by tests/test_worker.py",
        task=TaskSpec(finding="Pneumonia", positive_label="PNEUMONIA", negative_label="NORMAL", threshold=0.5),
        input=InputSpec(size=(32, 32), aspect="squash"),
        classifier=ClassifierSpec(architecture="monai.DenseNet", parameters=dict(TINY), weights=ref),
    )
    Bundle(root, spec, sha256="").save_spec()
    return root


def make_config(tmp_path: Path, bundle_dir: Path, **over) -> MedxplainConfig:
    raw = {
        "bundle": str(bundle_dir), "explainers": ["gradcam"], "device": "cpu",
        "queue": {"path": str(tmp_path / "queue.db"), "max_attempts": 3, "backoff_s": 0.05,
                  "backoff_max_s": 0.2, "lease_s": 60},
        "worker": {"audit_log": str(tmp_path / "audit.jsonl"), "poll_interval_s": 0.05},
        "dicom_node": {"spool": str(tmp_path / "spool")},
        "delivery": {"orthanc": False},
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return MedxplainConfig.model_validate(raw)


def _edit(src: Path, dst: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory, cr_16bit, cr_jpeg) -> Path:
    """Two good chest radiographs and six bad instances, as a PACS would forward a study."""
    root = tmp_path_factory.mktemp("study") / "in"
    root.mkdir()
    shutil.copy(cr_16bit, root / "a.dcm")
    shutil.copy(cr_jpeg, root / "b.dcm")
    (root / "notes.txt").write_text("not a DICOM file")
    _edit(cr_jpeg, root / "colour.dcm", SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    _edit(cr_jpeg, root / "report.dcm", SOPClassUID=ComprehensiveSRStorage, Modality="SR")
    _edit(cr_jpeg, root / "ct.dcm", SOPClassUID=CTImageStorage, Modality="CT")
    _edit(cr_jpeg, root / "ours.dcm", Manufacturer="medxplain")
    data = _edit(cr_jpeg, root / "cut.dcm").read_bytes()  # its own UID: not a copy of b.dcm
    (root / "cut.dcm").write_bytes(data[: len(data) * 2 // 3])
    return root


EXPECTED_SKIPS = {"colour_image": 1, "medxplain_output": 1, "not_an_image": 1, "not_dicom": 1,
                  "not_projection_radiograph": 1, "truncated_pixel_data": 1}


def _identifying(paths: list[Path]) -> set[str]:
    """Patient names/IDs and every UID of these files: none may appear in clear."""
    values = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "AccessionNumber"):
            if ds.get(keyword):
                values.add(str(ds.get(keyword)))
    return values


# --------------------------------------------------------------------------- folder jobs


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # cut.dcm, on purpose
def test_folder_job_explains_the_good_images_skips_the_bad_and_reruns_idempotently(
        tmp_path, bundle_dir, study_folder, cr_16bit, cr_jpeg):
    cfg = make_config(tmp_path, bundle_dir)
    queue = open_queue(cfg, clock=FakeClock())
    out = tmp_path / "out"
    payload = {"kind": "folder", "folder": str(study_folder), "deliver": "folder", "out": str(out)}
    job_id, _ = queue.enqueue("folder:test", payload)
    worker = Worker(cfg, queue, "w1")
    assert worker.run_once() == ["done"]

    job = queue.get(job_id)
    assert job.state == "done" and job.last_error is None
    assert job.result["instances"] == {"seen": 8, "explained": 2, "skipped": 6, "already_done": 0, "failed": 0}
    assert job.result["skipped"] == EXPECTED_SKIPS

    # One folder per source image; per image an overlay SC, a SEG and the SR of the engine's UID.
    engine = next(iter(worker._engines.values()))
    folders = sorted(p for p in out.iterdir())
    assert len(folders) == 2
    written = sorted(out.rglob("*.dcm"))
    assert job.result["outputs_stored"] == {"folder": len(written)} and len(written) == 6
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (cr_16bit, cr_jpeg)}
    reports = set()
    for folder in folders:
        datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        assert sorted(ds.Modality for ds in datasets) == ["OT", "SEG", "SR"]
        assert all(ds.Manufacturer == "medxplain" for ds in datasets)
        reports |= {str(ds.SOPInstanceUID) for ds in datasets if ds.Modality == "SR"}
    assert reports == {engine.report_uid(uid) for uid in sources}
    assert study_folder.is_dir() and len(list(study_folder.iterdir())) == 8  # a user's folder is kept

    # Re-run: everything is already done; nothing is written again.
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    job2, created = queue.enqueue("folder:test", payload)
    assert created
    assert worker.run_once() == ["done"]
    result = queue.get(job2).result
    assert result["instances"] == {"seen": 8, "explained": 0, "skipped": 6, "already_done": 2, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == mtimes

    # The audit trail: one line per job, counts and reasons, no patient data or UIDs in clear.
    lines = AuditLog(cfg.worker.audit_log).read()
    assert [line["outcome"] for line in lines] == ["done", "done"]
    first = lines[0]
    assert first["job"] == job_id and first["key"] == hash_text("folder:test") and first["kind"] == "folder"
    assert first["instances"]["explained"] == 2 and first["skipped"] == EXPECTED_SKIPS
    assert first["outputs_stored"] == {"folder": 6} and first["ms"] > 0 and first["error"] is None
    text = cfg.worker.audit_log.read_text()
    leaks = {v for v in _identifying([*study_folder.glob("*.dcm"), *written]) if v in text}
    assert not leaks and "folder:test" not in text


@pytest.mark.slow
def test_failing_delivery_backs_off_goes_dead_keeps_the_spool_then_retry_completes(tmp_path, bundle_dir, cr_jpeg):
    cfg = make_config(tmp_path, bundle_dir, queue={"max_attempts": 2})
    clock = FakeClock()
    queue = open_queue(cfg, clock=clock)
    spool = tmp_path / "spool" / "study-1"
    spool.mkdir(parents=True)
    shutil.copy(cr_jpeg, spool / "1.dcm")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")  # a real write failure, even as root
    out = blocker / "out"
    job_id, _ = queue.enqueue("dicom:study-1", {"kind": "folder", "folder": str(spool), "deliver": "folder",
                                                "out": str(out)})
    worker = Worker(cfg, queue, "w1")

    assert worker.run_once() == ["pending"]
    job = queue.get(job_id)
    assert job.attempts == 1 and job.not_before == clock.now + cfg.queue.backoff_s
    assert job.last_error.startswith("DeliveryFailed: cannot write results under the output folder")
    assert worker.run_once() == []  # backing off
    clock.advance(cfg.queue.backoff_s)
    assert worker.run_once() == ["dead"]
    job = queue.get(job_id)
    assert job.state == "dead" and job.attempts == 2 and "DeliveryFailed" in job.last_error
    assert (spool / "1.dcm").exists()  # nothing is lost while the job is not done

    blocker.unlink()
    assert queue.retry(job_id)
    assert worker.run_once() == ["done"]
    assert len(list(out.rglob("*.dcm"))) == 3
    assert not spool.exists() and (tmp_path / "spool").is_dir()  # the spool folder went, the spool stays
    outcomes = [(line["outcome"], bool(line["error"])) for line in AuditLog(cfg.worker.audit_log).read()]
    assert outcomes == [("pending", True), ("dead", True), ("done", False)]


@pytest.mark.slow
def test_stop_request_releases_the_job_and_a_rerun_finishes_it(tmp_path, bundle_dir, cr_jpeg, cr_16bit):
    cfg = make_config(tmp_path, bundle_dir, batch_size=1)
    queue = open_queue(cfg, clock=FakeClock())
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cr_jpeg, folder / "1.dcm")
    shutil.copy(cr_16bit, folder / "2.dcm")
    out = tmp_path / "out"
    job_id, _ = queue.enqueue("k", {"kind": "folder", "folder": str(folder), "deliver": "folder", "out": str(out)})
    worker = Worker(cfg, queue, "w1")

    # The stop request arrives while the first image is being explained: its batch is
    # finished and delivered completely (SR included), then the job is released.
    real_flush = worker._flush

    def flush_then_stop(state, key, engine):
        worker.stop_event.set()
        real_flush(state, key, engine)

    worker._flush = flush_then_stop
    assert worker.run_once() == ["released"]  # the stop request ends run_once too
    job = queue.get(job_id)
    assert job.state == "pending" and job.lease_owner is None
    assert sorted(p.name.split("-")[0] for p in out.rglob("*.dcm")) == ["OT", "SEG", "SR"]

    assert job.attempts == 0  # a release does not count as an attempt
    worker2 = Worker(cfg, queue, "w2")
    assert worker2.run_once() == ["done"]
    assert queue.get(job_id).result["instances"]["already_done"] == 1
    assert queue.get(job_id).result["instances"]["explained"] == 1
    assert len(list(out.rglob("SR-*.dcm"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("error, outcome", [(ValueError, "done"), (RuntimeError, "pending")],
                         ids=["deterministic", "transient"])
def test_an_image_the_engine_fails_on_does_not_hold_back_the_others(tmp_path, bundle_dir, cr_jpeg, cr_16bit,
                                                                    error, outcome):
    """A writer-style error (ValueError) is recorded for that image and not retried; an
    environment-style error (RuntimeError: device, memory) fails the job for a retry.
    Either way the study's other image is explained and delivered."""
    cfg = make_config(tmp_path, bundle_dir, queue={"backoff_s": 3600, "backoff_max_s": 3600})  # no re-lease here
    queue = open_queue(cfg, clock=FakeClock())
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cr_jpeg, folder / "1.dcm")
    shutil.copy(cr_16bit, folder / "2.dcm")
    poison = str(pydicom.dcmread(cr_16bit, stop_before_pixels=True).SOPInstanceUID)
    out = tmp_path / "out"
    job_id, _ = queue.enqueue("k", {"kind": "folder", "folder": str(folder), "deliver": "folder", "out": str(out)})
    worker = Worker(cfg, queue, "w1")
    engine = worker.engine_for(cfg.rules[0])
    real_run = engine.run

    def run(sources):  # the engine raising on one image (whose UID its message quotes)
        if any(s.sop_instance_uid == poison for s in sources):
            raise error(f"{poison}: cannot explain this one")
        return real_run(sources)

    engine.run = run
    assert worker.run_once() == [outcome]
    job = queue.get(job_id)
    assert len(list(out.rglob("SR-*.dcm"))) == 1  # the other image was explained and delivered
    line = AuditLog(cfg.worker.audit_log).read()[-1]
    assert line["instances"]["failed"] == 1 and line["instances"]["explained"] == 1 and poison not in str(line)
    if outcome == "done":
        assert job.attempts == 1 and job.result["failures"] == [
            {"instance": hash_text(poison), "reason": "explain_failed:ValueError"}]
        assert line["failures"] == job.result["failures"]
    else:
        assert job.last_error.startswith("ImagesFailed: 1 image(s) could not be explained; first: explain_failed")
        assert poison not in job.last_error and f"uid:{hash_text(poison)}" in job.last_error


@pytest.mark.slow
def test_a_rule_picks_its_own_model_profile(tmp_path, bundle_dir, cr_jpeg):
    sc_class = str(pydicom.dcmread(cr_jpeg, stop_before_pixels=True).SOPClassUID)
    cfg = make_config(tmp_path, bundle_dir, rules=[
        {"name": "secondary capture", "modalities": [], "sop_class_uids": [sc_class], "explainers": ["occlusion"]},
        {"name": "chest radiographs"}])
    queue = open_queue(cfg, clock=FakeClock())
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cr_jpeg, folder / "1.dcm")
    out = tmp_path / "out"
    job_id, _ = queue.enqueue("k", {"kind": "folder", "folder": str(folder), "deliver": "folder", "out": str(out)})
    worker = Worker(cfg, queue, "w1")
    assert worker.run_once() == ["done"]
    assert queue.get(job_id).result["profiles"] == {"tiny-cxr:occlusion": 1}
    assert [key[1] for key in worker._engines] == [("occlusion",)]
    descriptions = {pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription for p in out.rglob("*.dcm")}
    assert any("occlusion" in d for d in descriptions) and not any("gradcam" in d for d in descriptions)


@pytest.mark.slow
def test_cstore_delivery_from_the_dicom_node_spool(tmp_path, bundle_dir, cr_jpeg):
    network = pytest.importorskip("dicom_io.network")
    received: list[tuple[str, str]] = []

    def on_store(instance) -> int:
        received.append((instance.calling_ae_title, instance.dataset.Modality))
        return 0x0000

    scp = network.StorageSCP(ae_title="PACS", host="127.0.0.1", port=0, allowed_calling_ae_titles=["MEDXPLAIN"],
                             on_store=on_store)
    port = scp.start()
    try:
        cfg = make_config(tmp_path, bundle_dir,
                          delivery={"cstore": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}})
        queue = open_queue(cfg, clock=FakeClock())
        spool = tmp_path / "spool" / "0123abcd"
        spool.mkdir(parents=True)
        shutil.copy(cr_jpeg, spool / "1.dcm")
        payload = {"kind": "folder", "folder": str(spool), "deliver": "cstore"}  # as the DICOM node queues it
        job_id, _ = queue.enqueue("node:0123abcd", payload)
        worker = Worker(cfg, queue, "w1")
        assert worker.run_once() == ["done"]
        assert received == [("MEDXPLAIN", "OT"), ("MEDXPLAIN", "SEG"), ("MEDXPLAIN", "SR")]  # the SR last
        assert queue.get(job_id).result["outputs_stored"] == {"cstore": 3}
        assert not spool.exists()

        # A peer that refuses our calling AE title: not transient, dead at once; the spool is kept.
        spool.mkdir()
        shutil.copy(cr_jpeg, spool / "1.dcm")
        refused, _ = queue.enqueue("node:0123abcd", {**payload, "destination": {
            "ae_title": "PACS", "host": "127.0.0.1", "port": port, "calling_ae_title": "STRANGER"}})
        assert worker.run_once() == ["dead"]
        assert queue.get(refused).last_error.startswith("DeliveryError") and (spool / "1.dcm").exists()
    finally:
        scp.stop()
    # The PACS is down: the job is deferred without spending an attempt, and the worker pauses.
    again, _ = queue.enqueue("node:0123abcd", payload)
    assert worker.run_once() == ["pending"]
    job = queue.get(again)
    assert job.last_error.startswith("DeliveryError") and job.attempts == 0 and job.unavailable_since is not None
    assert worker.outage_pause_s == cfg.queue.backoff_s
    # Down for longer than the whole retry budget (3 attempts): still waiting, nothing spent.
    for _ in range(2 * cfg.queue.max_attempts):
        queue.clock.advance(worker.outage_pause_s)
        assert worker.run_once() == ["pending"]
    assert queue.get(again).attempts == 0 and queue.get(again).state == "pending"
    # The PACS is back on the same port: the job goes through and the outage ends.
    received.clear()
    scp = network.StorageSCP(ae_title="PACS", host="127.0.0.1", port=port, allowed_calling_ae_titles=["MEDXPLAIN"],
                             on_store=on_store)
    scp.start()
    try:
        queue.clock.advance(worker.outage_pause_s)
        assert worker.run_once() == ["done"]
    finally:
        scp.stop()
    assert len(received) == 3 and queue.get(again).attempts == 1 and worker.outage_pause_s == 0


def test_permanent_failures_go_dead_at_once_with_the_reason(tmp_path, bundle_dir):
    cfg = make_config(tmp_path, bundle_dir)
    queue = open_queue(cfg, clock=FakeClock())
    worker = Worker(cfg, queue, "w1")
    cases = {
        "missing": ({"kind": "folder", "folder": str(tmp_path / "nope"), "deliver": "folder", "out": "/tmp/x"},
                    "folder_not_found"),
        "kind": ({"kind": "mystery"}, "unknown job kind 'mystery'"),
        "deliver": ({"kind": "folder", "folder": str(tmp_path), "deliver": "fax"}, "unknown deliver 'fax'"),
        "cstore": ({"kind": "folder", "folder": str(tmp_path), "deliver": "cstore"}, "no destination"),
        "study": ({"kind": "orthanc"}, "without a 'study'"),
    }
    ids = {name: queue.enqueue(name, payload)[0] for name, (payload, _) in cases.items()}
    assert worker.run_once() == ["dead"] * len(cases)
    for name, (_, reason) in cases.items():
        job = queue.get(ids[name])
        assert job.state == "dead" and job.attempts == 1 and reason in job.last_error, (name, job.last_error)
    assert not worker._engines  # nothing loaded models for jobs that could not run


def test_a_job_whose_worker_keeps_dying_is_dead_lettered(tmp_path, bundle_dir):
    cfg = make_config(tmp_path, bundle_dir, queue={"max_attempts": 2})
    clock = FakeClock()
    queue = open_queue(cfg, clock=clock)
    job_id, _ = queue.enqueue("k", {"kind": "folder", "folder": str(tmp_path), "deliver": "folder",
                                    "out": str(tmp_path / "out")})
    for _ in range(2):  # two workers "die" mid-job: their leases expire
        assert queue.lease("crashed", lease_s=60).id == job_id
        clock.advance(61)
    assert Worker(cfg, queue, "w").run_once() == ["dead"]
    assert queue.get(job_id).last_error.startswith("gave up: leased 3 times without finishing")


def test_a_spool_folder_already_cleaned_up_is_a_no_op(tmp_path, bundle_dir):
    cfg = make_config(tmp_path, bundle_dir)
    queue = open_queue(cfg, clock=FakeClock())
    job_id, _ = queue.enqueue("k", {"kind": "folder", "folder": str(tmp_path / "spool" / "gone"),
                                    "deliver": "folder", "out": str(tmp_path / "out")})
    assert Worker(cfg, queue, "w").run_once() == ["done"]
    assert queue.get(job_id).result["skipped"] == {"folder_gone": 0}


def test_orthanc_job_without_password_fails_with_a_clear_message(tmp_path, bundle_dir, monkeypatch):
    monkeypatch.delenv("MEDXPLAIN_TEST_NO_SUCH_PASSWORD", raising=False)
    cfg = make_config(tmp_path, bundle_dir, delivery={"orthanc": True},
                      orthanc={"password_env": "MEDXPLAIN_TEST_NO_SUCH_PASSWORD"})
    queue = open_queue(cfg, clock=FakeClock())
    job_id, _ = queue.enqueue("orthanc:abc", {"kind": "orthanc", "study": "abc"})
    assert Worker(cfg, queue, "w").run_once() == ["pending"]
    job = queue.get(job_id)
    assert "MEDXPLAIN_TEST_NO_SUCH_PASSWORD is not set" in job.last_error
    assert job.attempts == 0  # a configuration to fix: the job waits, spending no attempt
    with pytest.raises(OrthancConfigError, match="MEDXPLAIN_TEST_NO_SUCH_PASSWORD"):
        OrthancClient.from_config(cfg.orthanc)


def test_redactor_scrubs_uids_and_patient_values(cr_jpeg):
    ds = pydicom.dcmread(cr_jpeg, stop_before_pixels=True)
    redactor = Redactor()
    redactor.add_dataset(ds)
    text = f"ValueError: {ds.SOPInstanceUID}: bad value for {ds.PatientName} at 127.0.0.1:8042"
    scrubbed = redactor.scrub(text)
    assert str(ds.SOPInstanceUID) not in scrubbed and str(ds.PatientName) not in scrubbed
    assert f"uid:{hash_text(str(ds.SOPInstanceUID))}" in scrubbed and "127.0.0.1:8042" in scrubbed

    record = logging.LogRecord("highdicom.base", logging.INFO, __file__, 1, 'copy attributes from "%s"',
                               (str(ds.StudyInstanceUID),), None)
    assert ScrubUIDsFilter().filter(record)
    assert record.getMessage() == f'copy attributes from "uid:{hash_text(str(ds.StudyInstanceUID))}"'


def test_uuid_derived_uids_are_scrubbed_but_versions_and_addresses_stay():
    # 2.25.<UUID as a decimal> has three components only (PS3.5 B.2); Celery and
    # pydicom's generate_uid() make them.
    uuid_uid = "2.25.329800735698586629295641978511506172918"
    text = f"stored {uuid_uid} and 1.2.826.0.1.3680043.8.498.1 via 127.0.0.1:8042 (Orthanc 1.10.1, celery 5.7.0)"
    scrubbed = Redactor().scrub(text)
    assert uuid_uid not in scrubbed and f"uid:{hash_text(uuid_uid)}" in scrubbed
    assert "uid:" + hash_text("1.2.826.0.1.3680043.8.498.1") in scrubbed
    assert "127.0.0.1:8042" in scrubbed and "1.10.1" in scrubbed and "5.7.0" in scrubbed


# --------------------------------------------------------------------------- CLI


def medxplain(*args: str, rc: int | None = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([*MEDXPLAIN, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    if rc is not None:
        assert done.returncode == rc, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_jobs_list_retry_purge_on_a_real_queue_file(tmp_path):
    path = tmp_path / "q.db"
    queue = JobQueue(path, max_attempts=3)
    done_id, _ = queue.enqueue("orthanc:aaa", {"kind": "orthanc", "study": "aaa"})
    dead_id, _ = queue.enqueue("orthanc:bbb", {"kind": "orthanc", "study": "bbb"})
    pending_id, _ = queue.enqueue("orthanc:ccc", {"kind": "orthanc", "study": "ccc"})
    queue.complete(queue.lease("w").id, "w", {"instances": {}})
    queue.fail(queue.lease("w").id, "w", "study_not_found: Orthanc has no study bbb", retry=False)

    table = medxplain("jobs", "list", "--queue", str(path)).stdout
    for job_id, state in ((done_id, "done"), (dead_id, "dead"), (pending_id, "pending")):
        line = next(line for line in table.splitlines() if job_id[:12] in line)
        assert state in line
    assert "study_not_found" in table and "pending 1" in table and "dead 1" in table

    dead = [json.loads(line) for line in medxplain("jobs", "list", "--state", "dead", "--json",
                                                    "--queue", str(path)).stdout.splitlines()]
    assert [job["id"] for job in dead] == [dead_id] and dead[0]["attempts"] == 1
    medxplain("jobs", "list", "--state", "zombie", "--queue", str(path), rc=2)

    assert "1 job(s) back to pending" in medxplain("jobs", "retry", dead_id[:12], "--queue", str(path)).stdout
    assert queue.get(dead_id).state == "pending" and queue.get(dead_id).attempts == 0
    medxplain("jobs", "retry", "ffffffff", "--queue", str(path), rc=1)
    medxplain("jobs", "retry", "--queue", str(path), rc=2)

    queue.fail(queue.lease("w").id, "w", "boom", retry=False)
    queue.fail(queue.lease("w").id, "w", "boom", retry=False)
    assert queue.counts()["dead"] == 2
    assert "2 job(s) back to pending" in medxplain("jobs", "retry", "--all-dead", "--queue", str(path)).stdout

    assert "purged 0" in medxplain("jobs", "purge", "--older-than-hours", "1", "--queue", str(path)).stdout
    assert "purged 1" in medxplain("jobs", "purge", "--queue", str(path)).stdout
    assert queue.get(done_id) is None
    assert "refusing" in medxplain("jobs", "purge", "--state", "pending", "--queue", str(path), rc=2).stdout
    assert queue.counts() == {"pending": 2, "leased": 0, "done": 0, "dead": 0}


def _write_config(tmp_path: Path, bundle_dir: Path) -> Path:
    cfg = make_config(tmp_path, bundle_dir)
    path = tmp_path / "medxplain.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


@pytest.mark.slow
def test_jobs_add_and_worker_once_through_the_cli(tmp_path, bundle_dir, cr_jpeg):
    config = _write_config(tmp_path, bundle_dir)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cr_jpeg, folder / "x.dcm")
    out = tmp_path / "out"
    assert "queued: job" in medxplain("jobs", "add", str(folder), "--out", str(out), "--config", str(config)).stdout
    assert "already queued" in medxplain("jobs", "add", str(folder), "--out", str(out),
                                         "--config", str(config)).stdout
    done = medxplain("worker", "--once", "--config", str(config))
    assert "processed 1 job(s): 1 done" in done.stdout
    assert len(list(out.rglob("*.dcm"))) == 3 and (folder / "x.dcm").exists()
    assert "done: 1 seen, 1 explained, 0 already done, 0 skipped" in done.stderr
    assert not {v for v in _identifying([cr_jpeg]) if v in done.stderr}  # the log has no patient data
    assert "processed 0 job(s): nothing to do" in medxplain("worker", "--once", "--config", str(config)).stdout


def test_worker_stops_cleanly_on_sigterm(tmp_path, bundle_dir):
    config = _write_config(tmp_path, bundle_dir)
    proc = subprocess.Popen([*MEDXPLAIN, "worker", "--no-warm", "--config", str(config)], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "polling" in line or not line:
                break
        assert any("polling" in line for line in lines), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- Orthanc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """A real Orthanc (Debian package) on free loopback ports with its own storage."""

    def __init__(self, root: Path):
        self.root = root
        self.http_port = _free_port()
        self.dicom_port = _free_port()
        self.password = "pw-" + os.urandom(4).hex()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        config = {
            "Name": "medxplain-test", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {"medxplain": self.password}, "Plugins": [], "DicomServerEnabled": False,
            "HttpTimeout": 10, "StableAge": 60,
        }
        (self.root / "orthanc.json").write_text(json.dumps(config))
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(self.root / "orthanc.json")], stdout=log,
                                     stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.time() + 30
        while True:
            try:
                client.get_json("/system")
                return
            except OrthancUnavailable:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {self.root / 'orthanc.log'}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def client(self, password: str | None = None) -> OrthancClient:
        return OrthancClient(self.url, "medxplain", password or self.password, timeout_s=10)


@pytest.fixture()
def orthanc(tmp_path):
    if not Path("/usr/sbin/Orthanc").exists():
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    server = OrthancServer(tmp_path / "orthanc")
    server.root.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_orthanc_client_and_orthanc_job_end_to_end(tmp_path, bundle_dir, cr_jpeg, orthanc, monkeypatch):
    client = orthanc.client()
    # Authentication is on: a wrong password is a 4xx, not something to retry.
    with pytest.raises(OrthancRequestError) as refused:
        orthanc.client("wrong").get_json("/system")
    assert refused.value.status == 401

    # One good radiograph and bad instances of the same study.
    bad = tmp_path / "bad"
    bad.mkdir()
    files = [cr_jpeg,
             _edit(cr_jpeg, bad / "sr.dcm", SOPClassUID=ComprehensiveSRStorage, Modality="SR",
                   SeriesInstanceUID=generate_uid()),
             _edit(cr_jpeg, bad / "ct.dcm", SOPClassUID=CTImageStorage, Modality="CT",
                   SeriesInstanceUID=generate_uid()),
             _edit(cr_jpeg, bad / "rgb.dcm", SamplesPerPixel=3, PhotometricInterpretation="RGB",
                   PlanarConfiguration=0)]
    answers = [client.post_instance(f.read_bytes()) for f in files]
    assert {a["Status"] for a in answers} == {"Success"}
    assert client.post_instance(cr_jpeg.read_bytes())["Status"] == "AlreadyStored"
    study = answers[0]["ParentStudy"]
    assert {a["ParentStudy"] for a in answers} == {study}
    assert len(client.get_json(f"/studies/{study}/instances")) == 4
    source_uid = str(pydicom.dcmread(cr_jpeg, stop_before_pixels=True).SOPInstanceUID)
    assert [r["Type"] for r in client.lookup(source_uid)] == ["Instance"]
    assert client.lookup("1.2.3.4.5.6.7.8.9") == []
    with pytest.raises(OrthancRequestError) as missing:
        client.get_json("/studies/0000-1111")
    assert missing.value.status == 404 and "/studies/0000-1111" in str(missing.value)

    monkeypatch.setenv("MEDXPLAIN_TEST_ORTHANC_PASSWORD", orthanc.password)
    cfg = make_config(tmp_path, bundle_dir, delivery={"orthanc": True},
                      orthanc={"url": orthanc.url, "password_env": "MEDXPLAIN_TEST_ORTHANC_PASSWORD"})
    queue = open_queue(cfg, clock=FakeClock())
    worker = Worker(cfg, queue, "w1")
    job_id, _ = queue.enqueue(f"orthanc:{study}", {"kind": "orthanc", "study": study})
    assert worker.run_once() == ["done"]
    result = queue.get(job_id).result
    assert result["instances"] == {"seen": 4, "explained": 1, "skipped": 3, "already_done": 0, "failed": 0}
    assert result["skipped"] == {"colour_image": 1, "not_an_image": 1, "not_projection_radiograph": 1}
    assert result["outputs_stored"] == {"orthanc": 3}
    report_uid = next(iter(worker._engines.values())).report_uid(source_uid)
    assert [r["Type"] for r in client.lookup(report_uid)] == ["Instance"]
    assert len(client.get_json(f"/studies/{study}/instances")) == 7  # overlay SC, SEG and SR joined the study

    # A re-fire: the source is already explained; our own series are not even downloaded.
    job2, _ = queue.enqueue(f"orthanc:{study}", {"kind": "orthanc", "study": study})
    assert worker.run_once() == ["done"]
    result = queue.get(job2).result
    assert result["instances"]["already_done"] == 1 and result["instances"]["explained"] == 0
    assert result["skipped"]["medxplain_output"] == 3 and result["outputs_stored"] == {}
    assert len(client.get_json(f"/studies/{study}/instances")) == 7

    # A deleted study: dead at once with the reason.
    gone, _ = queue.enqueue("orthanc:deadbeef", {"kind": "orthanc", "study": "deadbeef"})
    assert worker.run_once() == ["dead"]
    assert queue.get(gone).last_error.startswith("study_not_found")

    # Orthanc down: transient, back to pending with back-off.
    orthanc.stop()
    with pytest.raises(OrthancUnavailable):
        client.get_json("/system")
    job3, _ = queue.enqueue(f"orthanc:{study}", {"kind": "orthanc", "study": study})
    assert worker.run_once() == ["pending"]
    assert queue.get(job3).last_error.startswith("OrthancUnavailable")
    text = cfg.worker.audit_log.read_text()
    assert source_uid not in text


def test_failures_are_classified_by_what_retrying_can_do():
    from dicom_io.network import DeliveryError
    from pipeline.pacs.orthanc_client import OrthancConfigError
    from pipeline.pacs.worker import _classify

    down = dict(ae_title="PACS", host="127.0.0.1", port=104)
    assert _classify(OrthancUnavailable("refused")) == "unavailable"
    assert _classify(OrthancUnavailable("x", status=503)) == "unavailable"
    assert _classify(OrthancUnavailable("x", status=507)) == "unavailable"  # Orthanc's disk is full
    assert _classify(OrthancUnavailable("x", status=500)) == "retry"
    assert _classify(OrthancRequestError("x", status=401)) == "unavailable"  # credentials: a config to fix
    assert _classify(OrthancRequestError("x", status=400)) == "permanent"
    assert _classify(OrthancRequestError("not stored")) == "permanent"
    assert _classify(OrthancConfigError("no password")) == "unavailable"
    assert _classify(DeliveryError("refused", **down)) == "unavailable"
    assert _classify(DeliveryError("out of resources", status=0xA700, **down)) == "unavailable"
    assert _classify(DeliveryError("cannot understand", status=0xC000, **down)) == "retry"
    assert _classify(DeliveryError("AE refused", transient=False, **down)) == "permanent"
    assert _classify(RuntimeError("cuda")) == "retry"


def test_jobs_and_worker_commands_refuse_a_damaged_queue_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    queue = tmp_path / "queue.db"
    JobQueue(queue).enqueue("k")
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"queue.db{suffix}").unlink(missing_ok=True)
    queue.write_bytes(b"")
    for args in (["jobs", "list", "--queue", str(queue)], ["worker", "--once", "--no-warm", "--queue", str(queue)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "is emptied" in result.output, (args, result.output)
    assert queue.stat().st_size == 0  # left for its owner to recover, never re-created empty by a reader
