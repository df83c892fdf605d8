"""The standalone DICOM node and C-STORE delivery, against real DICOM peers.

Peers: pynetdicom (SCU and a Storage SCP standing in as the hospital PACS) and
dcmtk's `storescu`. Everything listens on free loopback ports; spool and queue
live in tmp_path.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_io.network import DeliveryError, cstore
from pipeline.pacs.dicom_node import DicomNode
from pipeline.pacs.jobqueue import JobQueue
from tests.clock import FakeClock

OUR_AE = "MEDXPLAIN"
PEER_AE = "ALLOWED"
QUIET_S = 0.6


def _h(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_node(tmp_path):
    """Nodes on a fake clock: a study is quiet only when the test says so (:func:`_quiet`)."""
    nodes: list[DicomNode] = []

    def make(allowed=(PEER_AE,), quiet_s=QUIET_S, start=True) -> DicomNode:
        node = DicomNode(ae_title=OUR_AE, host="127.0.0.1", port=0, allowed_calling_ae_titles=list(allowed),
                         quiet_s=quiet_s, spool=tmp_path / "spool", queue=JobQueue(tmp_path / "queue.db"),
                         clock=FakeClock())
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in nodes:
        node.stop(flush=False)


def _send(port: int, datasets, calling=PEER_AE):
    """Send with a plain pynetdicom SCU proposing each dataset's own transfer syntax."""
    ae = AE(ae_title=calling)
    for sop, ts in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE)
    if not assoc.is_established:
        return assoc, None
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return assoc, statuses


def _storescu(port: int, *files: Path, calling=PEER_AE) -> subprocess.CompletedProcess:
    # -xy also proposes JPEG baseline (storescu proposes only uncompressed syntaxes by default)
    return subprocess.run(["storescu", "-xy", "-aet", calling, "-aec", OUR_AE, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)


def _assert_same_instance(spooled: Path, original: pydicom.Dataset) -> None:
    got = pydicom.dcmread(spooled)
    assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert got.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    # Every data element, value for value; dcmtk drops Data Set Trailing Padding
    # (FFFC,FFFC), which PS3.10 7.2 allows any application to remove.
    padding = 0xFFFCFFFC
    assert [got[t] for t in got.keys() if t != padding] == [original[t] for t in original.keys() if t != padding]
    assert got.PixelData == original.PixelData


def _variant(ds: pydicom.Dataset, **changes) -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(out, keyword, value)
    return out


def _quiet(node: DicomNode) -> None:
    """Let the quiet period pass on the node's fake clock and run one grouping pass."""
    node.clock.advance(node.quiet_s * 1.01)  # past it (1e6 + 0.6 - 1e6 < 0.6 in floating point)
    node.tick()


def _node_jobs(node: DicomNode):
    return [j for j in node.queue.list(limit=-1) if j.key.startswith("node:")]


def _spool_files(node: DicomNode) -> list[Path]:
    return sorted(node.spool.rglob("*.dcm"))


# --------------------------------------------------------------------------- receiving


def test_pynetdicom_sends_are_spooled_exactly_and_grouped_into_one_job_per_study(make_node, cr_16bit, cr_jpeg):
    node = make_node()
    cr, jpeg = pydicom.dcmread(cr_16bit), pydicom.dcmread(cr_jpeg)
    jpeg_2 = _variant(jpeg)  # a second instance of the JPEG study
    ours = _variant(jpeg, StudyInstanceUID=generate_uid(), Manufacturer="medxplain")  # our own output

    _, statuses = _send(node.port, [cr, jpeg, jpeg_2, ours])
    assert statuses == [0x0000] * 4
    node.tick()
    assert _node_jobs(node) == []  # still inside the quiet period

    _quiet(node)
    jobs = _node_jobs(node)
    assert len(jobs) == 2
    by_key = {j.key: j for j in jobs}
    for ds, count in ((cr, 1), (jpeg, 2)):
        study = _h(ds.StudyInstanceUID)
        folder = node.spool / study
        assert by_key[f"node:{study}"].payload == {"kind": "folder", "folder": str(folder),
                                                   "deliver": "cstore"}
        assert by_key[f"node:{study}"].state == "pending"
        assert len(list(folder.glob("*.dcm"))) == count
    _assert_same_instance(node.spool / _h(cr.StudyInstanceUID) / f"{_h(cr.SOPInstanceUID)}.dcm", cr)
    _assert_same_instance(node.spool / _h(jpeg.StudyInstanceUID) / f"{_h(jpeg.SOPInstanceUID)}.dcm", jpeg)
    _assert_same_instance(node.spool / _h(jpeg.StudyInstanceUID) / f"{_h(jpeg_2.SOPInstanceUID)}.dcm", jpeg_2)
    # Our own output was accepted but neither spooled nor queued.
    assert not (node.spool / _h(ours.StudyInstanceUID)).exists()
    assert node.ignored_own_output == 1
    assert not list(node.spool.rglob(".*"))  # no temp files left behind

    # A late instance joins the open job of its study (the queue merges the key).
    late = _variant(jpeg)
    assert _send(node.port, [late])[1] == [0x0000]
    folder = node.spool / _h(jpeg.StudyInstanceUID)
    _quiet(node)
    assert not node._pending
    assert len(list(folder.glob("*.dcm"))) == 3
    assert sorted(j.id for j in _node_jobs(node)) == sorted(j.id for j in jobs)


def test_storescu_sends_are_spooled_and_queued(make_node, cr_16bit, cr_jpeg):
    node = make_node()
    result = _storescu(node.port, cr_16bit, cr_jpeg)
    assert result.returncode == 0, result.stderr
    _quiet(node)
    jobs = _node_jobs(node)
    assert len(jobs) == 2
    for path in (cr_16bit, cr_jpeg):
        original = pydicom.dcmread(path)
        study = _h(original.StudyInstanceUID)
        _assert_same_instance(node.spool / study / f"{_h(original.SOPInstanceUID)}.dcm", original)
        assert f"node:{study}" in {j.key for j in jobs}


def test_unknown_calling_ae_is_rejected_and_nothing_is_spooled(make_node, cr_jpeg):
    node = make_node()
    assoc, _ = _send(node.port, [pydicom.dcmread(cr_jpeg)], calling="STRANGER")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
    result = _storescu(node.port, cr_jpeg, calling="STRANGER")
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr
    _quiet(node)
    assert _spool_files(node) == [] and _node_jobs(node) == []


def test_empty_allowed_list_refuses_everyone(make_node, cr_jpeg):
    node = make_node(allowed=())
    ds = pydicom.dcmread(cr_jpeg)
    for calling in (PEER_AE, "ANYONE", OUR_AE):
        assoc, _ = _send(node.port, [ds], calling=calling)
        assert assoc.is_rejected, calling
    # The placeholder pynetdicom needs for "nobody" is no back door: C-STOREs are refused too.
    assoc, statuses = _send(node.port, [ds], calling=node.scp._NOBODY)
    assert assoc.is_established is False and statuses == [0x0124]
    assert _spool_files(node) == []


def test_instance_that_cannot_be_written_gets_a_failure_status(make_node, cr_jpeg):
    node = make_node()
    shutil.rmtree(node.spool)
    node.spool.write_text("not a folder")  # every write now fails, even as root
    _, statuses = _send(node.port, [pydicom.dcmread(cr_jpeg)])
    assert statuses == [0xA700]
    _quiet(node)
    assert _node_jobs(node) == [] and node.failed_writes == 1


def test_startup_requeues_unfinished_spool_folders_and_cleans_done_ones(make_node, cr_jpeg):
    node = make_node(start=False)
    queue, data = node.queue, cr_jpeg.read_bytes()
    now = time.time()

    def spool(study: str, mtime: float) -> Path:
        path = node.spool / study / f"{study[::-1]}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))
        return path

    def job(study: str, outcome: str) -> str:
        job_id, _ = queue.enqueue("node:" + study, {"kind": "folder"})
        if outcome != "pending":
            leased = queue.lease("w")
            assert leased.id == job_id
            queue.complete(job_id, "w") if outcome == "done" else queue.fail(job_id, "w", "bad input", retry=False)
        return job_id

    crashed = spool("a" * 16, now - 50)          # received, node died before the quiet timeout
    done = spool("c" * 16, now - 50)             # explained and delivered
    done_id = job("c" * 16, "done")
    late = spool("d" * 16, now + 50)             # arrived after its job was done
    job("d" * 16, "done")
    dead = spool("e" * 16, now - 50)             # failed for good: kept for `jobs retry`
    job("e" * 16, "dead")
    open_job = spool("b" * 16, now - 50)         # already queued
    open_id = job("b" * 16, "pending")
    stale_tmp = crashed.parent / ".partial.0123.tmp"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (now - 600, now - 600))

    node.start()
    node.stop(flush=False)

    open_jobs = {j.key: j for j in queue.list(limit=-1) if j.state == "pending"}
    assert set(open_jobs) == {"node:" + "a" * 16, "node:" + "b" * 16, "node:" + "d" * 16}
    assert open_jobs["node:" + "a" * 16].payload == {"kind": "folder", "folder": str(crashed.parent),
                                                     "deliver": "cstore"}
    assert open_jobs["node:" + "b" * 16].id == open_id
    assert open_job.exists() and late.exists() and dead.exists()
    assert not done.exists() and not done.parent.exists()
    assert queue.get(done_id).state == "done"
    assert not stale_tmp.exists()


# --------------------------------------------------------------------------- delivery


class _Pacs:
    """A pynetdicom Storage SCP standing in as the hospital PACS."""

    def __init__(self, *, calling=OUR_AE, status=0x0000, transfer_syntaxes=None):
        self.received: list[pydicom.Dataset] = []
        self.status = status
        self.ae = AE(ae_title="PACS")
        self.ae.require_calling_aet = [calling]
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, transfer_syntaxes or
                                          [*cx.transfer_syntax, pydicom.uid.JPEGBaseline8Bit])
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.destination = SimpleNamespace(ae_title="PACS", host="127.0.0.1",
                                           port=self.server.server_address[1], calling_ae_title=OUR_AE)

    def _store(self, event):
        if self.status == 0:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
        return self.status

    def close(self):
        self.server.shutdown()


@pytest.fixture
def pacs():
    made = []

    def make(**kwargs) -> _Pacs:
        made.append(_Pacs(**kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_cstore_delivers_intact_to_the_pacs(pacs, cr_16bit, cr_jpeg):
    pacs_ = pacs()
    cr, jpeg = pydicom.dcmread(cr_16bit), pydicom.dcmread(cr_jpeg)
    in_memory = _variant(cr)
    del in_memory.file_meta  # a dataset built in memory, no file meta: sent as Explicit VR Little Endian
    cstore([cr, jpeg, in_memory], pacs_.destination, timeout_s=10)
    got = {ds.SOPInstanceUID: ds for ds in pacs_.received}
    assert list(got) == [cr.SOPInstanceUID, jpeg.SOPInstanceUID, in_memory.SOPInstanceUID]
    for ds in (cr, jpeg, in_memory):
        assert got[ds.SOPInstanceUID].PixelData == ds.PixelData
    assert got[jpeg.SOPInstanceUID].file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit  # not re-encoded


def test_cstore_decompresses_when_the_pacs_refuses_the_compressed_syntax(pacs, cr_jpeg):
    pacs_ = pacs(transfer_syntaxes=[pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    jpeg = pydicom.dcmread(cr_jpeg)
    cstore([jpeg], pacs_.destination, timeout_s=10)
    (got,) = pacs_.received
    assert got.SOPInstanceUID == jpeg.SOPInstanceUID and not got.file_meta.TransferSyntaxUID.is_compressed
    assert (got.pixel_array == jpeg.pixel_array).all()


def test_cstore_failures_raise_delivery_error_naming_the_ae(pacs, cr_jpeg):
    ds = pydicom.dcmread(cr_jpeg)
    down = SimpleNamespace(ae_title="PACS", host="127.0.0.1", port=_free_port(), calling_ae_title=OUR_AE)
    with pytest.raises(DeliveryError, match="PACS at 127.0.0.1.*could not connect") as info:
        cstore([ds], down, timeout_s=5)
    assert info.value.transient

    strict = pacs(calling="SOMEONE_ELSE")
    with pytest.raises(DeliveryError, match="PACS.*Calling AE title not recognised") as info:
        cstore([ds], strict.destination, timeout_s=5)
    assert not info.value.transient and strict.received == []

    full = pacs(status=0xA700)
    with pytest.raises(DeliveryError, match=r"PACS.*Secondary Capture Image Storage.*0xA700") as info:
        cstore([ds], full.destination, timeout_s=5)
    assert info.value.status == 0xA700 and info.value.sop_class_uid == ds.SOPClassUID
    assert ds.PatientName and str(ds.PatientName) not in str(info.value)


# --------------------------------------------------------------------------- CLI


def test_serve_dicom_command_runs_until_interrupted(tmp_path, cr_jpeg):
    port = _free_port()
    config = tmp_path / "medxplain.yaml"
    config.write_text(
        f"queue: {{path: {tmp_path / 'queue.db'}}}\n"
        f"dicom_node: {{port: 11112, allowed_calling_ae_titles: [{PEER_AE}], quiet_s: 0.3, "
        f"spool: {tmp_path / 'spool'}}}\n")
    medxplain = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[1] / ".venv")) / "bin" / "medxplain"
    command = [str(medxplain)] if medxplain.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.Popen([*command, "serve-dicom", "--config", str(config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: any("Ctrl-C" in line for line in lines), timeout_s=30)
        assert _storescu(port, cr_jpeg).returncode == 0
        study = _h(pydicom.dcmread(cr_jpeg, stop_before_pixels=True).StudyInstanceUID)
        _wait_for(lambda: any(f"study {study}" in line and "queued" in line for line in lines))
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            proc.wait(timeout=60)  # generous: a loaded CI machine is slow to stop the threads
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave a server behind; the test still fails
            raise
    reader.join(timeout=5)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert f"AE {OUR_AE} on 127.0.0.1:{port}" in output and f"allowed calling AE titles: {PEER_AE}" in output
    assert "stopped" in output
    patient = str(pydicom.dcmread(cr_jpeg, stop_before_pixels=True).PatientName)
    assert patient not in output


def test_spool_is_private(make_node, cr_jpeg):
    node = make_node()
    assert _send(node.port, [pydicom.dcmread(cr_jpeg)])[1] == [0x0000]
    (spooled,) = _spool_files(node)
    assert spooled.stat().st_mode & 0o777 == 0o600
    assert spooled.parent.stat().st_mode & 0o777 == 0o700 and node.spool.stat().st_mode & 0o777 == 0o700
