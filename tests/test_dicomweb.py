"""DICOMweb against a real server: Debian's Orthanc with its DICOMweb plugin
(orthanc-dicomweb), HTTP basic authentication on.

A ``dicomweb:<StudyInstanceUID>`` job pulls the study by QIDO-RS/WADO-RS and stores
the results by STOW-RS; a re-run is idempotent (same SOP Instance UIDs, no
duplicates, also when the objects are sent again); wrong credentials defer the job
(no attempt spent) and the password appears in no error, log or queue row.
"""
from __future__ import annotations

import json
import logging

import pytest

from config import load_config
from pipeline.pacs import orthanc_launcher as launcher
from pipeline.pacs.dicomweb import DicomwebConfigError, DicomwebServer, DicomwebUnavailable
from pipeline.pacs.jobqueue import JobQueue
from pipeline.pacs.worker import Worker
from tests.orthanc_server import TEST_BUNDLE, OrthancServer, require_orthanc
from tests.test_orthanc import cr_study, kermany_test, require_bundle, to_bytes  # noqa: F401 (fixtures)

PASSWORD_ENV = "MEDXPLAIN_TEST_DICOMWEB_PASSWORD"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An Orthanc with DICOMweb and authentication (no medxplain worker: the test runs one)."""
    require_orthanc()
    if not launcher.DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    server = OrthancServer(tmp_path_factory.mktemp("dicomweb-pacs"))
    server.start()
    yield server
    server.stop()


def config(tmp_path, url: str, **dicomweb):
    return load_config(None, {
        "bundle": str(TEST_BUNDLE), "explainers": ["gradcam"], "trust": {"out_of_domain": "warn"},
        "queue": {"path": str(tmp_path / "queue.db"), "backoff_s": 1, "backoff_max_s": 2},
        "worker": {"audit_log": str(tmp_path / "audit.jsonl")},
        "delivery": {"orthanc": False, "dicomweb": False},
        "dicomweb": {"url": url, "auth": "basic", "username": launcher.ADMIN_USER, "password_env": PASSWORD_ENV,
                     **dicomweb}})


def study_uids(pacs: OrthancServer, study_uid: str) -> list[tuple[str, str]]:
    """(Modality, SOPInstanceUID) of every instance of the study, via Orthanc's REST API."""
    status, body = pacs.http("POST", "/tools/lookup", study_uid.encode(), content_type="text/plain")
    assert status == 200
    (sid,) = [r["ID"] for r in json.loads(body) if r["Type"] == "Study"]
    return sorted((i["Modality"], i["SOPInstanceUID"]) for i in pacs.study_instances(sid))


@pytest.mark.slow
def test_dicomweb_job_pulls_pushes_and_a_rerun_is_idempotent(pacs, tmp_path, kermany_test, monkeypatch, caplog):
    require_bundle()
    password = pacs.password(launcher.ADMIN_USER)
    monkeypatch.setenv(PASSWORD_ENV, password)
    sources = cr_study(kermany_test[:2], "dicomweb-pull")
    for ds in sources:
        pacs.upload(to_bytes(ds))
    study_uid = str(sources[0].StudyInstanceUID)
    cfg = config(tmp_path, pacs.url + "/dicom-web")
    queue = JobQueue(tmp_path / "queue.db", backoff_s=1)
    worker = Worker(cfg, queue, "w1")
    caplog.set_level(logging.INFO)

    queue.enqueue(f"dicomweb:{study_uid}", {"kind": "dicomweb", "study_uid": study_uid})
    assert worker.run_once() == ["done"]
    first = study_uids(pacs, study_uid)
    modalities = [m for m, _ in first]
    # 2 sources + per source: overlay SC, SEG, SR (gradcam has no counterfactual)
    assert len(first) == 8 and modalities.count("SR") == 2 and modalities.count("SEG") == 2, first
    (job,) = queue.list("done")
    assert job.result["instances"]["explained"] == 2 and job.result["outputs_stored"] == {"dicomweb": 6}

    # Re-run: QIDO-RS finds each SR, nothing is sent again.
    queue.retry(job.id)
    assert worker.run_once() == ["done"]
    assert queue.get(job.id).result["instances"]["already_done"] == 2
    assert study_uids(pacs, study_uid) == first

    # Re-run after the SRs were removed: everything is sent again by STOW-RS with the same
    # UIDs; the server keeps one copy of each (no duplicates).
    server = DicomwebServer(cfg.dicomweb)
    for modality, uid in first:
        if modality == "SR":
            status, body = pacs.http("POST", "/tools/lookup", uid.encode(), content_type="text/plain")
            (iid,) = [r["ID"] for r in json.loads(body) if r["Type"] == "Instance"]
            assert pacs.http("DELETE", f"/instances/{iid}")[0] == 200
            assert not server.has_instance(uid)
    queue.retry(job.id)
    assert worker.run_once() == ["done"]
    assert queue.get(job.id).result["instances"]["explained"] == 2
    assert study_uids(pacs, study_uid) == first
    assert password not in caplog.text


@pytest.mark.slow
def test_wrong_credentials_defer_the_job_and_never_show_the_secret(pacs, tmp_path, monkeypatch, caplog):
    secret = "not-the-password-7f3a9"
    monkeypatch.setenv(PASSWORD_ENV, secret)
    cfg = config(tmp_path, pacs.url + "/dicom-web")
    queue = JobQueue(tmp_path / "queue.db", backoff_s=1)
    caplog.set_level(logging.INFO)
    queue.enqueue("dicomweb:1.2.3.4", {"kind": "dicomweb", "study_uid": "1.2.3.4"})
    assert Worker(cfg, queue, "w1").run_once() == ["pending"]
    (job,) = queue.list("pending")
    assert job.attempts == 0 and "HTTP 401" in job.last_error  # deferred: no attempt spent
    assert secret not in caplog.text and secret not in job.last_error
    with pytest.raises(DicomwebUnavailable) as raised:
        DicomwebServer(cfg.dicomweb).study_series("1.2.3.4")
    assert raised.value.status == 401 and secret not in str(raised.value)


def test_missing_secret_or_server_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv("MEDXPLAIN_DICOMWEB_TOKEN", raising=False)
    with pytest.raises(DicomwebConfigError, match=PASSWORD_ENV):
        DicomwebServer(config(tmp_path, "http://127.0.0.1:9/dicom-web").dicomweb)
    with pytest.raises(DicomwebConfigError, match="MEDXPLAIN_DICOMWEB_TOKEN"):
        DicomwebServer(config(tmp_path, "http://127.0.0.1:9/dicom-web", auth="bearer").dicomweb)
    with pytest.raises(DicomwebConfigError, match="no DICOMweb server"):
        DicomwebServer(None)
    bearer = DicomwebServer(config(tmp_path, "http://127.0.0.1:9/dicom-web", auth="bearer").dicomweb,
                            environ={"MEDXPLAIN_DICOMWEB_TOKEN": "tok"})
    assert bearer.session.headers["Authorization"] == "Bearer tok" and bearer.session.trust_env is False
    # Nothing listens on port 9: unreachable, the job would wait (not dead-letter).
    with pytest.raises(DicomwebUnavailable, match="unreachable"):
        bearer.has_instance("1.2.3")
