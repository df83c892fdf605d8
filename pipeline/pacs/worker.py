"""The worker: a long-lived process that takes jobs from the durable queue and
explains the eligible images of each study.

One job is one study (or one folder of received instances):

    list instances -> rules (eligibility, model profile) -> already explained? ->
    decode -> engine (batched per profile) -> deliver (SR of each image last) -> audit

Job payloads (``JobQueue.enqueue(key, payload)``):

- ``{"kind": "orthanc", "study": "<Orthanc study id>"}`` (key ``orthanc:<id>``,
  enqueued by the Orthanc plugin): instances are fetched through Orthanc's REST
  API and results stored into the same study (``delivery.orthanc``), and also
  C-STOREd when ``delivery.cstore`` is set.
- ``{"kind": "dicomweb", "study_uid": "<StudyInstanceUID>"}`` (key ``dicomweb:<uid>``,
  ``medxplain jobs add-dicomweb``): a study on the ``dicomweb`` server, listed by
  QIDO-RS, fetched by WADO-RS, results stored back by STOW-RS
  (``pipeline/pacs/dicomweb.py``). ``delivery.dicomweb`` also STOWs the results of
  Orthanc jobs there.
- ``{"kind": "folder", "folder": "<abs path>", "deliver": "cstore" | "folder" | "orthanc",
  ["out": "<dir>"], ["destination": {ae_title, host, port, calling_ae_title}],
  ["delete_folder": bool]}``: DICOM files of one study on disk (the DICOM node's
  spool, or any folder). ``deliver: cstore`` sends to ``destination`` or
  ``delivery.cstore``; ``folder`` writes one sub-folder per source image under
  ``out`` (as ``medxplain explain`` does); ``orthanc`` stores into Orthanc. After
  the job is done, the files it processed are deleted (and the folder, once
  empty) when ``delete_folder`` is true, or, when the payload does not say, when
  the folder lies inside ``dicom_node.spool``. A user's folder is never deleted
  unless asked.

Failures, by what retrying can do about them (:func:`_classify`):

- *peer unavailable*: Orthanc or the C-STORE destination cannot be reached, is
  overloaded or full (HTTP 502/503/504/507, connection refused or reset, an
  association that fails, a 0xA7xx status), or refuses our credentials (401/403:
  a configuration to fix). The job is deferred (``JobQueue.defer``): pending
  again, no attempt spent; the worker pauses (``queue.backoff_s`` doubling to
  ``queue.outage_retry_max_s``) and then tries one job; the first job that
  succeeds wakes every deferred job. Dead only after
  ``queue.unavailable_dead_after_s`` (default a week) of outage.
- *permanent*: a study Orthanc no longer has (404), any other 4xx, a missing
  input folder, an unknown payload, a C-STORE peer that rejects us for good
  (``DeliveryError.transient`` False) -> dead at once with the reason.
- anything else (5xx, a delivery folder that cannot be written, an unexpected
  exception): back to pending with back-off, dead after ``queue.max_attempts``,
  its error recorded as ``Type: message``.

A job leased more than ``max_attempts`` times (its workers kept dying) is
dead-lettered instead of crashing workers forever.

The lease is renewed by a heartbeat thread while a job runs. A stop request
(SIGTERM/SIGINT, ``stop_event``) is honoured between instances and after each
batch is delivered: the job is released (pending again) and a re-run picks up
where it stopped. A bad instance (colour, SR, corrupt, CT slice...) is skipped with
its reason and the rest of the study still runs. Outputs have deterministic UIDs,
so a re-run after any failure or interruption is idempotent; the SR of an image
is delivered after every object it references, and the destination that can tell
"already explained" (Orthanc, the output folder) is written last, so an SR found
there means everything for that image was delivered everywhere.

Logs and audit lines carry no patient data: Orthanc ids, job ids and hashed UIDs.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from config.schema import CStoreDestination, MatchRule, MedxplainConfig, resolve
from dicom_io.errors import DicomInputError, UnreadableFileError
from dicom_io.reader import read_radiograph
from dicom_io.uids import hash_text
from pipeline.pacs.audit import AuditLog, JobAudit, Redactor
from pipeline.pacs.jobqueue import Job, JobQueue, make_owner
from pipeline.pacs.orthanc_client import OrthancClient, OrthancRequestError, OrthancUnavailable
from pipeline.pacs.rules import eligibility, match_rule, series_exclusion

if TYPE_CHECKING:  # torch is imported when the first engine is built, not before
    from dicom_io.source import SourceImage
    from pipeline.engine import Engine, ImageResult

__all__ = [
    "DeliveryFailed",
    "ImagesFailed",
    "JobFailed",
    "Worker",
    "install_signal_handlers",
    "open_queue",
]

logger = logging.getLogger("medxplain.worker")


class JobFailed(Exception):
    """A permanent failure: retrying cannot help (the job goes dead with this reason)."""


class DeliveryFailed(Exception):
    """Results could not be delivered (folder not writable...): transient, retried."""


class ImagesFailed(Exception):
    """Some eligible images raised in the engine (the others were delivered): retried."""


class _Interrupted(Exception):
    """The worker was asked to stop: release the job between batches."""


class _LeaseLost(Exception):
    """Another worker took the job over (our lease expired): stop touching it."""


def open_queue(config: MedxplainConfig, path: str | Path | None = None, *,
               clock: Callable[[], float] = time.time, recover: bool = False) -> JobQueue:
    """The job queue of ``config`` (``queue.path``, relative to the project root), or ``path``.
    Raises ``pipeline.pacs.jobqueue.QueueDamaged`` for an emptied or damaged file unless ``recover``."""
    q = config.queue
    return JobQueue(Path(path) if path else resolve(q.path), max_attempts=q.max_attempts,
                    backoff_s=q.backoff_s, backoff_max_s=q.backoff_max_s,
                    unavailable_dead_after_s=q.unavailable_dead_after_s, clock=clock, recover=recover)


def default_owner() -> str:
    """host:pid:random:boot:start: the queue can tell when this process is gone."""
    return make_owner()


# --------------------------------------------------------------------------- delivery


class _Delivery:
    """A destination for results. ``is_done`` is None when it cannot tell."""

    name = "?"

    def is_done(self, report_uid: str, source_uid: str) -> bool | None:
        return None

    def deliver(self, results: list["ImageResult"]) -> int:
        raise NotImplementedError


def _to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class _OrthancDelivery(_Delivery):
    name = "orthanc"

    def __init__(self, client: OrthancClient):
        self.client = client

    def is_done(self, report_uid: str, source_uid: str) -> bool | None:
        return self.client.has_instance(report_uid)

    def deliver(self, results: list["ImageResult"]) -> int:
        stored = 0
        for result in results:
            for ds in result.datasets():  # the SR last
                self.client.post_instance(_to_bytes(ds))
                stored += 1
        return stored


class _FolderDelivery(_Delivery):
    """One sub-folder per source image (named by a hash of its UID) under ``out``."""

    name = "folder"

    def __init__(self, out: Path):
        self.out = out

    def is_done(self, report_uid: str, source_uid: str) -> bool | None:
        from pipeline.runner import output_folder

        folder = output_folder(self.out, SimpleNamespace(sop_instance_uid=source_uid))
        for path in sorted(folder.glob("SR-*.dcm")) if folder.is_dir() else ():
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:  # a half-written file: not done
                continue
            if ds.get("SOPInstanceUID") == report_uid:
                return True
        return False

    def deliver(self, results: list["ImageResult"]) -> int:
        from pipeline.runner import output_folder, write_result

        stored = 0
        for result in results:
            try:
                stored += len(write_result(result, output_folder(self.out, result.source)))
            except OSError as exc:
                raise DeliveryFailed(f"cannot write results under the output folder "
                                     f"({type(exc).__name__}: {exc.strerror or exc})") from exc
        return stored


class _CStoreDelivery(_Delivery):
    name = "cstore"

    def __init__(self, destination: CStoreDestination):
        self.destination = destination
        try:
            from dicom_io import network
        except ImportError as exc:
            raise JobFailed(f"C-STORE delivery is not available in this installation "
                            f"(dicom_io.network: {exc})") from exc
        self._cstore = network.cstore

    def deliver(self, results: list["ImageResult"]) -> int:
        datasets = [ds for result in results for ds in result.datasets()]  # each SR after its objects
        if datasets:
            self._cstore(datasets, self.destination)
        return len(datasets)


# --------------------------------------------------------------------------- inputs


@dataclass
class _Item:
    """One instance to consider: a label for logs (no patient data) and how to read it."""

    label: str
    header: Callable[[], Dataset]  # may raise DicomInputError
    image: Callable[[Dataset], "SourceImage"]  # decode, may raise DicomInputError


def _parse_bytes(data: bytes, label: str) -> Dataset:
    try:
        return dcmread(BytesIO(data))
    except InvalidDicomError as exc:
        raise UnreadableFileError("not a DICOM Part 10 file", source=label, reason="not_dicom") from exc
    except Exception as exc:  # untrusted bytes: any parser error is this instance's problem
        raise UnreadableFileError(f"cannot parse DICOM ({type(exc).__name__})", source=label,
                                  reason="unparseable") from exc


def _file_header(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except Exception:
        # The reader knows how to say what is wrong with a file: let it raise its typed error.
        return read_radiograph(path).dataset


# --------------------------------------------------------------------------- the worker


@dataclass
class _JobState:
    job: Job
    audit: JobAudit
    redactor: Redactor
    deliveries: list[_Delivery]
    pending: dict[tuple, list["SourceImage"]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lease_lost: threading.Event = field(default_factory=threading.Event)


class Worker:
    """``Worker(config, queue, owner_id).run_forever(stop_event)``.

    Engines (bundle, classifier, explainers) are built on first use, one per model
    profile (bundle, explainers) that the rules name, and kept warm.
    """

    def __init__(self, config: MedxplainConfig, queue: JobQueue, owner_id: str | None = None, *,
                 orthanc: OrthancClient | None = None):
        self.config = config
        self.queue = queue
        self.owner = owner_id or default_owner()
        self.audit_log = AuditLog(resolve(config.worker.audit_log))
        self.stop_event = threading.Event()
        self._engines: dict[tuple[str, tuple[str, ...]], "Engine"] = {}
        self._orthanc = orthanc
        self.outage_pause_s = 0.0  # > 0 while a peer is unavailable: how long to pause before the next job

    # -- models ----------------------------------------------------------------
    def profile(self, rule: MatchRule | None) -> tuple[MedxplainConfig, tuple[str, tuple[str, ...]]]:
        """The config of a rule's model profile and its key (bundle path, explainers)."""
        update: dict[str, Any] = {}
        if rule is not None and rule.bundle is not None:
            update["bundle"] = rule.bundle
        if rule is not None and rule.explainers is not None:
            update["explainers"] = list(rule.explainers)
        cfg = self.config.model_copy(update=update) if update else self.config
        return cfg, (str(cfg.bundle_path().resolve()), tuple(cfg.explainers))

    def engine_for(self, rule: MatchRule | None) -> "Engine":
        cfg, key = self.profile(rule)
        engine = self._engines.get(key)
        if engine is None:
            started = time.perf_counter()
            from pipeline.engine import Engine  # torch: imported by the first engine, not before

            engine = Engine(cfg)
            self._engines[key] = engine
            logger.info("loaded model profile %s (%s) on %s in %.1f s", engine.bundle.spec.name,
                        ",".join(key[1]), engine.device, time.perf_counter() - started)
        return engine

    def warm_up(self) -> int:
        """Build the engine of every rule's profile now (start-up errors show at once)."""
        for rule in self.config.rules or [None]:
            self.engine_for(rule)
        return len(self._engines)

    @property
    def orthanc(self) -> OrthancClient:
        if self._orthanc is None:
            self._orthanc = OrthancClient.from_config(self.config.orthanc)
        return self._orthanc

    # -- the loop ----------------------------------------------------------------
    def run_forever(self, stop_event: threading.Event | None = None) -> None:
        """Lease and process jobs until ``stop_event`` is set."""
        if stop_event is not None:
            self.stop_event = stop_event
        poll = self.config.worker.poll_interval_s
        logger.info("worker %s polling %s every %.2f s", self.owner, self.queue.path.name, poll)
        while not self.stop_event.is_set():
            try:
                if self.outage_pause_s:
                    # A peer is unavailable: wait, then try one job (its failure spends no attempt).
                    if self.stop_event.wait(self.outage_pause_s):
                        break
                job = self.queue.lease(self.owner, self.config.queue.lease_s)
                if job is None:
                    self.stop_event.wait(poll)
                    continue
                self.process(job)
            except Exception:  # the queue itself failed (disk, lock): log, wait, go on
                logger.exception("worker loop error; retrying in 1 s (a leased job is retried after its lease)")
                self.stop_event.wait(1.0)
        logger.info("worker %s stopped", self.owner)

    def run_once(self) -> list[str]:
        """Process every job that is ready now, then return their outcomes (for --once and cron)."""
        outcomes = []
        while not self.stop_event.is_set():
            job = self.queue.lease(self.owner, self.config.queue.lease_s)
            if job is None:
                break
            outcomes.append(self.process(job))
        return outcomes

    # -- one job -------------------------------------------------------------------
    def process(self, job: Job) -> str:
        """Do one leased job; returns what became of it: done, pending, dead, released or lease_lost."""
        kind = str(job.payload.get("kind", "?"))[:16]
        state = _JobState(job=job, audit=JobAudit(job.id, job.key, kind, attempt=job.attempts),
                          redactor=Redactor(), deliveries=[])
        tag = f"job {job.id[:8]} ({kind} {hash_text(job.key)}, attempt {job.attempts})"
        logger.info("%s: started", tag)
        heartbeat_stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(state, heartbeat_stop), daemon=True)
        heartbeat.start()
        error: str | None = None
        cleanup: Callable[[], None] | None = None
        try:
            if job.attempts > job.max_attempts:
                # Only a lease that expired gets here (fail() dead-letters at max_attempts):
                # a job that keeps killing its worker (OOM, segfault) must not loop forever.
                raise JobFailed(f"gave up: leased {job.attempts} times without finishing "
                                f"(a worker died or was killed during this job; max_attempts {job.max_attempts})")
            if kind == "orthanc":
                self._orthanc_job(state)
            elif kind == "folder":
                cleanup = self._folder_job(state)
            elif kind == "dicomweb":
                self._dicomweb_job(state)
            else:
                raise JobFailed(f"unknown job kind {kind!r} (known: orthanc, folder, dicomweb)")
            if state.errors:
                raise ImagesFailed(f"{len(state.errors)} image(s) could not be explained; "
                                   f"first: {state.errors[0]}")
        except _LeaseLost:
            outcome = "lease_lost"
            error = "lease lost to another worker (job took longer than queue.lease_s without renewal)"
            logger.warning("%s: %s; leaving it to that worker", tag, error)
        except _Interrupted:
            outcome = self._release(job, "released: the worker stopped before the job finished")
            error = "interrupted"
            logger.info("%s: worker stopping; job released (%s)", tag, outcome)
        except JobFailed as exc:
            error = state.redactor.scrub(str(exc))
            outcome = self.queue.fail(job.id, self.owner, error, retry=False) or "lease_lost"
            logger.error("%s: failed permanently: %s", tag, error)
        except Exception as exc:  # noqa: BLE001  recorded on the job and retried, never swallowed
            error = state.redactor.scrub(f"{type(exc).__name__}: {exc}")
            kind_of_failure = _classify(exc)
            if kind_of_failure == "unavailable":
                q = self.config.queue
                self.outage_pause_s = min(q.outage_retry_max_s, max(q.backoff_s, self.outage_pause_s * 2))
                outcome = self.queue.defer(job.id, self.owner, error, delay_s=self.outage_pause_s) or "lease_lost"
                if outcome == "pending":
                    error = f"deferred (peer unavailable, no attempt spent; pausing {self.outage_pause_s:g} s): {error}"
            else:
                outcome = self.queue.fail(job.id, self.owner, error,
                                          retry=kind_of_failure == "retry") or "lease_lost"
            # The traceback's frames, not its message: that may quote a UID (the message is scrubbed).
            where = "" if _expected(exc) else "\n" + "".join(traceback.format_tb(exc.__traceback__)).rstrip()
            log = logger.warning if outcome == "pending" else logger.error
            log("%s: %s -> %s%s", tag, error, outcome, where)
        except BaseException:  # KeyboardInterrupt / SystemExit: give the job back, then go
            self._release(job, "released: the worker was interrupted")
            self._write_audit(state, "released", "interrupted")
            raise
        else:
            outcome = "done" if self.queue.complete(job.id, self.owner, state.audit.summary()) else "lease_lost"
            if outcome == "done" and self.outage_pause_s:
                self.outage_pause_s = 0.0
                woken = self.queue.wake_deferred()
                logger.info("%s: peers answer again; %d deferred job(s) resume now", tag, woken)
            if outcome == "done" and cleanup is not None:
                cleanup()
            a = state.audit
            logger.info("%s: %s: %d seen, %d explained, %d already done, %d skipped %s, %s stored",
                        tag, outcome, a.seen, a.explained, a.already_done, sum(a.skipped.values()),
                        dict(a.skipped), dict(a.stored))
        finally:
            heartbeat_stop.set()
            heartbeat.join()
        self._write_audit(state, outcome, error)
        return outcome

    def _write_audit(self, state: _JobState, outcome: str, error: str | None) -> None:
        try:
            self.audit_log.write(state.audit.record(outcome, error))
        except OSError as exc:
            logger.error("cannot write the audit log %s: %s", self.audit_log.path, exc)

    def _release(self, job: Job, reason: str) -> str:
        """Give a leased job back to the queue as pending, without counting an attempt."""
        logger.info("job %s released: %s", job.id[:8], reason)
        return "released" if self.queue.release(job.id, self.owner) else "lease_lost"

    def _heartbeat(self, state: _JobState, stop: threading.Event) -> None:
        """Renew the lease while the job runs (a third of lease_s between renewals)."""
        lease_s = self.config.queue.lease_s
        while not stop.wait(lease_s / 3.0):
            try:
                if not self.queue.extend(state.job.id, self.owner, lease_s):
                    state.lease_lost.set()
                    return
            except Exception:  # the next renewal may succeed; the lease has head-room
                logger.warning("job %s: lease renewal failed", state.job.id[:8], exc_info=True)

    def _checkpoint(self, state: _JobState) -> None:
        """Between instances and batches: stop if asked to, or if the lease is gone."""
        if state.lease_lost.is_set():
            raise _LeaseLost()
        if self.stop_event.is_set():
            raise _Interrupted()

    # -- the two job kinds -------------------------------------------------------------
    def _orthanc_job(self, state: _JobState) -> None:
        study = state.job.payload.get("study")
        if not isinstance(study, str) or not study:
            raise JobFailed("orthanc job without a 'study' (Orthanc study id)")
        deliveries: list[_Delivery] = []
        if self.config.delivery.cstore is not None:
            deliveries.append(_CStoreDelivery(self.config.delivery.cstore))
        if self.config.delivery.dicomweb:
            deliveries.append(self._stow())
        if self.config.delivery.orthanc:
            deliveries.append(_OrthancDelivery(self.orthanc))  # last: it tells "already done"
        if not deliveries:
            raise JobFailed("no delivery configured (delivery.orthanc is false and delivery.cstore unset)")
        state.deliveries = deliveries
        client = self.orthanc
        try:
            series_list = client.study_series(study)
        except OrthancRequestError as exc:
            if exc.status == 404:
                raise JobFailed(f"study_not_found: Orthanc has no study {study} (deleted?)") from exc
            raise
        rules = self.config.rules
        items: list[_Item] = []
        for series in sorted(series_list, key=lambda s: s.get("ID", "")):
            instances = sorted(series.get("Instances") or [])
            excluded = series_exclusion(series.get("MainDicomTags") or {}, rules)
            if excluded is not None:
                state.audit.skip(excluded, len(instances))
                logger.info("job %s: series %s (%d instances) skipped: %s", state.job.id[:8],
                            series.get("ID"), len(instances), excluded)
                continue
            items += [self._orthanc_item(client, instance_id) for instance_id in instances]
        self._run_items(state, items)

    def _orthanc_item(self, client: OrthancClient, instance_id: str) -> _Item:
        def header() -> Dataset:
            try:
                data = client.instance_file(instance_id)
            except OrthancRequestError as exc:
                if exc.status == 404:  # deleted since the listing
                    raise UnreadableFileError("instance deleted from Orthanc during the job",
                                              source=instance_id, reason="file_not_found") from exc
                raise
            return _parse_bytes(data, instance_id)

        return _Item(label=instance_id, header=header, image=lambda ds: read_radiograph(ds))

    def _stow(self) -> _Delivery:
        from pipeline.pacs.dicomweb import DicomwebServer, StowDelivery

        return StowDelivery(DicomwebServer(self.config.dicomweb))  # type: ignore[return-value]

    def _dicomweb_job(self, state: _JobState) -> None:
        """A study on a DICOMweb server (pipeline/pacs/dicomweb.py): QIDO-RS lists, WADO-RS
        fetches, results go back by STOW-RS (last: it tells "already done")."""
        from pipeline.pacs.dicomweb import DicomwebServer, StowDelivery

        study_uid = state.job.payload.get("study_uid")
        if not isinstance(study_uid, str) or not study_uid:
            raise JobFailed("dicomweb job without a 'study_uid' (Study Instance UID)")
        server = DicomwebServer(self.config.dicomweb)
        state.deliveries = ([_CStoreDelivery(self.config.delivery.cstore)] if self.config.delivery.cstore else []) \
            + [StowDelivery(server)]  # type: ignore[list-item]
        series_list = server.study_series(study_uid)
        if not series_list:
            raise JobFailed(f"study_not_found: the DICOMweb server has no study {hash_text(study_uid)}")
        items: list[_Item] = []
        for series in sorted(series_list, key=lambda s: str(s.get("SeriesInstanceUID", ""))):
            series_uid = str(series.get("SeriesInstanceUID", ""))
            instances = server.series_instances(study_uid, series_uid)
            excluded = series_exclusion(series, self.config.rules)
            if excluded is not None:
                state.audit.skip(excluded, len(instances))
                continue
            items += [_Item(label=hash_text(sop_uid), header=lambda so=sop_uid, se=series_uid: server.instance(
                study_uid, se, so), image=lambda ds: read_radiograph(ds)) for sop_uid in instances]
        self._run_items(state, items)

    def _folder_job(self, state: _JobState) -> Callable[[], None] | None:
        payload = state.job.payload
        folder_text = payload.get("folder")
        if not isinstance(folder_text, str) or not folder_text:
            raise JobFailed("folder job without a 'folder'")
        folder = Path(folder_text)
        deletable = self._deletable(folder, payload)
        state.deliveries = [self._folder_delivery(payload)]
        if not folder.is_dir():
            if deletable and not folder.exists():
                # A spool folder already processed and cleaned up (e.g. a re-fired job): nothing to do.
                state.audit.skip("folder_gone", 0)
                return None
            raise JobFailed(f"folder_not_found: input folder {hash_text(str(folder))} does not exist "
                            f"or is not a folder")
        from pipeline.runner import expand_inputs

        files = expand_inputs([folder])
        items = [_Item(label=hash_text(path.name), header=lambda p=path: _file_header(p),
                       image=lambda ds, p=path: read_radiograph(p)) for path in files]
        self._run_items(state, items)
        if not deletable:
            return None

        def cleanup() -> None:
            for path in files:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    logger.warning("job %s: cannot delete a spool file: %s", state.job.id[:8], exc.strerror)
            for directory in sorted({p.parent for p in files} | {folder}, key=lambda p: len(p.parts),
                                    reverse=True):
                try:
                    directory.rmdir()  # only when empty: files that arrived meanwhile stay for the next job
                except OSError:
                    pass

        return cleanup

    def _deletable(self, folder: Path, payload: dict[str, Any]) -> bool:
        if "delete_folder" in payload:
            return bool(payload["delete_folder"])
        spool = resolve(self.config.dicom_node.spool).resolve()
        try:
            inside = folder.resolve().relative_to(spool)
        except ValueError:
            return False
        return inside != Path(".")

    def _folder_delivery(self, payload: dict[str, Any]) -> _Delivery:
        deliver = payload.get("deliver")
        if deliver == "folder":
            out = payload.get("out")
            if not isinstance(out, str) or not out:
                raise JobFailed("deliver 'folder' needs 'out' (the output folder)")
            return _FolderDelivery(Path(out))
        if deliver == "cstore":
            raw = payload.get("destination")
            if raw is not None:
                try:
                    destination = CStoreDestination.model_validate(raw)
                except Exception as exc:
                    raise JobFailed(f"invalid C-STORE destination in the job: {exc}") from exc
            elif self.config.delivery.cstore is not None:
                destination = self.config.delivery.cstore
            else:
                raise JobFailed("deliver 'cstore' but no destination: set delivery.cstore in the config")
            return _CStoreDelivery(destination)
        if deliver == "orthanc":
            return _OrthancDelivery(self.orthanc)
        raise JobFailed(f"unknown deliver {deliver!r} (known: cstore, folder, orthanc)")

    # -- shared: rules, already done, batches, delivery --------------------------------
    def _run_items(self, state: _JobState, items: list[_Item]) -> None:
        audit = state.audit
        for item in items:
            self._checkpoint(state)
            try:
                header = item.header()
                state.redactor.add_dataset(header)
                eligible, reason = eligibility(header, self.config.rules)
                if not eligible:
                    self._skip(state, item, reason)
                    continue
                rule = match_rule(header, self.config.rules)
                engine = self.engine_for(rule)
                if int(header.Rows) * int(header.Columns) > engine.config.max_pixels:
                    self._skip(state, item, "too_large")
                    continue
                sop_uid = str(header.SOPInstanceUID)
                if state.deliveries[-1].is_done(engine.report_uid(sop_uid), sop_uid):
                    audit.seen += 1
                    audit.already_done += 1
                    continue
                source = item.image(header)
            except DicomInputError as exc:
                self._skip(state, item, exc.reason)
                continue
            state.redactor.add_dataset(source.dataset)
            audit.seen += 1
            for note in source.warnings:  # the reader's decisions on doubtful headers, by code
                audit.warnings[note.split(":", 1)[0]] += 1
            audit.profiles[f"{engine.bundle.spec.name}:{'+'.join(engine.config.explainers)}"] += 1
            _, key = self.profile(rule)
            batch = state.pending.setdefault(key, [])
            batch.append(source)
            if len(batch) >= engine.config.batch_size:
                self._flush(state, key, engine)
        for key in list(state.pending):
            if state.pending[key]:
                self._flush(state, key, self._engines[key])

    def _skip(self, state: _JobState, item: _Item, reason: str) -> None:
        state.audit.skip(reason)
        logger.info("job %s: instance %s skipped: %s", state.job.id[:8], item.label, reason)

    def _flush(self, state: _JobState, key: tuple, engine: "Engine") -> None:
        sources = state.pending.pop(key)
        results = self._explain(state, engine, sources)
        for result in results:
            if result.skipped:  # e.g. out_of_domain: the typed reason goes to the audit, nothing is written
                state.audit.skipped[result.skipped.split(":", 1)[0]] += 1
                logger.info("job %s: an image was not explained: %s", state.job.id[:8], result.skipped)
        results = [r for r in results if not r.skipped]
        for delivery in state.deliveries:  # the one that tells "already done" comes last
            state.audit.stored[delivery.name] += delivery.deliver(results)
        state.audit.explained += len(results)
        self._checkpoint(state)

    def _explain(self, state: _JobState, engine: "Engine", sources: list["SourceImage"]) -> list["ImageResult"]:
        """Run a batch; if it fails, run its images one by one so that one bad image
        does not hold back the others. An image that fails deterministically (a typed
        refusal, a writer error: the same input fails the same way) is recorded for
        that image and the job goes on; any other error fails the job afterwards
        (retried with back-off)."""
        try:
            return engine.run(sources)
        except Exception as exc:
            if len(sources) == 1:
                label = hash_text(sources[0].sop_instance_uid)
                reason = deterministic_failure(exc)
                message = state.redactor.scrub(f"explain_failed ({label}): {type(exc).__name__}: {exc}")
                if reason is None:
                    state.errors.append(message)
                    state.audit.failed += 1
                else:
                    state.audit.fail(label, reason)
                logger.error("job %s: %s%s", state.job.id[:8], message,
                             "" if reason is None else f" (deterministic, {reason}: not retried)")
                return []
            logger.warning("job %s: a batch of %d failed (%s); running its images one by one",
                           state.job.id[:8], len(sources), type(exc).__name__)
        results = []
        for source in sources:
            results += self._explain(state, engine, [source])
        return results


# HTTP statuses that say "not now" rather than "not this": the job waits for the peer.
_UNAVAILABLE_HTTP = {401, 403, 408, 429, 502, 503, 504, 507}


def _classify(exc: BaseException) -> str:
    """What a job failure calls for: ``"unavailable"`` (defer, spend no attempt),
    ``"permanent"`` (dead at once) or ``"retry"`` (back-off, counted attempts).
    See the module docstring."""
    from pipeline.pacs.orthanc_client import OrthancConfigError

    kind = getattr(exc, "failure_kind", None)  # errors that say it themselves (pipeline/pacs/dicomweb.py)
    if kind in ("unavailable", "permanent", "retry"):
        return kind
    if isinstance(exc, OrthancConfigError):
        return "unavailable"  # e.g. the password variable unset: nothing is wrong with the job
    if isinstance(exc, (OrthancUnavailable, OrthancRequestError)):
        if exc.status is None:
            return "unavailable" if isinstance(exc, OrthancUnavailable) else "permanent"
        if exc.status in _UNAVAILABLE_HTTP:
            return "unavailable"
        return "permanent" if 400 <= exc.status < 500 else "retry"
    if type(exc).__name__ == "DeliveryError":
        if getattr(exc, "transient", True) is False:
            return "permanent"
        status = getattr(exc, "status", None)
        return "unavailable" if status is None or 0xA700 <= status <= 0xA7FF else "retry"
    return "retry"


def deterministic_failure(exc: BaseException) -> str | None:
    """The stable reason code of a per-image failure that a retry would repeat, else None.

    Typed refusals (``DicomInputError``) give their own code; errors of the data
    (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError),
    which the writers raise for values they cannot write, give
    ``explain_failed:<type>``. Environment errors (memory, device, I/O) may pass:
    None, the job is retried.
    """
    if isinstance(exc, DicomInputError):
        return exc.reason
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError)) \
            and not isinstance(exc, (OSError, MemoryError)):
        return f"explain_failed:{type(exc).__name__}"
    return None


def _expected(exc: BaseException) -> bool:
    """Failures whose message says it all (no traceback in the log)."""
    from pipeline.pacs.orthanc_client import OrthancError

    if isinstance(exc, (OrthancError, DeliveryFailed, ImagesFailed)) or hasattr(exc, "failure_kind"):
        return True
    return type(exc).__name__ == "DeliveryError"


def install_signal_handlers(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT: the first sets ``stop_event`` (the current batch finishes, its
    results are delivered, the job is released); a second interrupts at once (the
    job is released as well). Call from the main thread."""

    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        received.append(signum)
        logger.info("%s received: finishing the current batch, then stopping "
                    "(signal again to stop at once)", signal.Signals(signum).name)
        # Not stop_event.set() here: the handler runs in the main thread, which may be
        # inside stop_event.wait() holding the event's non-reentrant lock at this very
        # moment; set() would then wait for that lock forever (a CI run hung on it).
        # Another thread takes the lock once the main thread lets go of it.
        threading.Thread(target=stop_event.set, name="medxplain-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

