"""The standalone DICOM node (`medxplain serve-dicom`): a Storage SCP for PACS other than Orthanc.

A PACS forwards studies to it by C-STORE. For each instance:

1. the calling AE title must be configured (``dicom_node.allowed_calling_ae_titles``;
   empty refuses everyone), else the association is rejected;
2. our own output (:func:`dicom_io.output.is_medxplain_output`) is answered with
   success and dropped: it is never queued for work (loop guard);
3. the instance is written *durably* into the spool, as the bytes the peer sent:
   ``<spool>/<sha256(StudyInstanceUID)[:16]>/<sha256(SOPInstanceUID)[:16]>.dcm``,
   through a hidden temp file, fsync, rename and fsync of the folder, *before*
   success (0x0000) is answered; if it cannot be written the peer gets a failure
   status (0xA700 out of resources) and keeps the instance, so nothing is lost
   silently.

Instances are grouped by study: when a study has had no new instance for
``dicom_node.quiet_s``, one job is queued::

    key     "node:<sha256(StudyInstanceUID)[:16]>"
    payload {"kind": "folder", "folder": "<absolute spool study folder>", "deliver": "cstore"}

The worker explains the folder's ``*.dcm`` files (hidden files are temp files) and
C-STOREs the results to ``delivery.cstore`` with :func:`dicom_io.network.cstore`.
An instance arriving after the job was queued queues the same key again: the
queue merges it into the open job (or re-runs a running one afterwards).

The worker deletes the files a job processed once the job is done (and the
folder once empty; a file that arrived meanwhile stays for the next job). A
reconcile pass (at start-up and every ``sweep_interval_s``) backs that up and
recovers from crashes: it looks at every study folder that is not waiting for its
quiet timeout and compares the files' modification times with the study's
newest job (each file's mtime is set *after* its rename, so a file older than a
job's creation was in the folder before the job existed):

- an open (pending/leased) job: nothing to do;
- no job, or files newer than the newest job: queue it (crash recovery: the node
  died between the write and the quiet timeout, or a file arrived while the last
  attempt of a job was dying);
- a done job and no newer file: the files were explained and delivered (the
  worker died before its clean-up), so they are deleted (and the folder once empty);
- a dead job and no newer file: kept, so that ``medxplain jobs retry`` can re-run it.

Logs and callbacks carry hashed UIDs and AE titles only, never patient data.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_io.network import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    ReceivedInstance,
    StorageSCP,
)
from dicom_io.output import is_medxplain_output
from dicom_io.uids import hash_text
from pipeline.pacs.jobqueue import JobQueue

if TYPE_CHECKING:  # pragma: no cover
    from config.schema import MedxplainConfig

__all__ = ["DicomNode", "StudyQueued", "uid_hash", "job_key", "SPOOL_SUFFIX", "KEY_PREFIX"]

LOGGER = logging.getLogger("medxplain.dicom_node")

KEY_PREFIX = "node:"
SPOOL_SUFFIX = ".dcm"
_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 3600.0  # a temp file this old belongs to no write in progress


def uid_hash(uid: str) -> str:
    """The name used for a UID in paths, job keys and logs (no patient data)."""
    return hash_text(str(uid).strip())


def job_key(study_hash: str) -> str:
    return KEY_PREFIX + study_hash


@dataclass(frozen=True)
class StudyQueued:
    """Told to ``on_study`` each time a study is handed to the queue."""

    study: str            # hashed StudyInstanceUID
    folder: Path
    instances: int        # .dcm files in the spool folder
    job_id: str
    created: bool         # False: merged into an open job for the same study
    reason: str           # "quiet" (quiet timeout), "recovered" (reconcile), "shutdown"
    calling_ae_titles: tuple[str, ...] = ()


@dataclass
class _Pending:
    last: float
    inflight: int = 0
    stores: int = 0       # writes started (a change marker)
    received: int = 0     # writes that succeeded
    calling: set[str] = field(default_factory=set)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new sub-folder) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without directory fsync
            raise
    finally:
        os.close(fd)


class DicomNode:
    """The medxplain Storage SCP with a durable spool and study grouping.

    ``start()`` runs a reconcile pass (crash recovery) and starts listening and
    the grouping thread; ``stop()`` stops listening and, with ``flush``, queues
    the studies still waiting for their quiet timeout (their files are durable
    either way: the next start would queue them).
    """

    def __init__(self, *, ae_title: str, host: str, port: int, allowed_calling_ae_titles: Iterable[str],
                 quiet_s: float, spool: str | Path, queue: JobQueue,
                 on_study: Callable[[StudyQueued], None] | None = None,
                 on_rejected: Callable[[str, str, str], None] | None = None,
                 sweep_interval_s: float = 60.0, clean_done: bool = True,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        if quiet_s <= 0:
            raise ValueError('Argument "quiet_s" must be positive.')
        self.spool = Path(spool).absolute()
        self.queue = queue
        self.quiet_s = float(quiet_s)
        self.on_study = on_study
        self.sweep_interval_s = float(sweep_interval_s)
        self.clean_done = clean_done
        # Injected clocks (tests pass fake ones and call tick()): ``clock`` for the quiet
        # timeout and the sweep period, ``wall_clock`` for file ages.
        self.clock = clock
        self.wall_clock = wall_clock
        self.scp = StorageSCP(ae_title=ae_title, host=host, port=port,
                              allowed_calling_ae_titles=allowed_calling_ae_titles,
                              on_store=self._store, on_rejected=on_rejected or self._log_rejected)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_sweep: float | None = None
        self.ignored_own_output = 0
        self.failed_writes = 0

    @classmethod
    def from_config(cls, config: "MedxplainConfig", *, port: int | None = None, ae_title: str | None = None,
                    **kwargs: Any) -> "DicomNode":
        from config.schema import resolve

        node = config.dicom_node
        q = config.queue
        # The node owns its queue: an emptied or damaged file is moved aside and the spool
        # (the node's own state) is queued again by the start-up reconcile pass.
        queue = JobQueue(resolve(q.path), max_attempts=q.max_attempts, backoff_s=q.backoff_s,
                         backoff_max_s=q.backoff_max_s, unavailable_dead_after_s=q.unavailable_dead_after_s,
                         recover=True)
        if queue.incident is not None:
            LOGGER.error("THE JOB QUEUE WAS %s: %s; every study still in the spool is queued again",
                         queue.incident["kind"].upper(), queue.incident["detail"])
        return cls(ae_title=ae_title or node.ae_title, host=node.host, port=node.port if port is None else port,
                   allowed_calling_ae_titles=node.allowed_calling_ae_titles, quiet_s=node.quiet_s,
                   spool=resolve(node.spool), queue=queue, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def ae_title(self) -> str:
        return self.scp.ae_title

    @property
    def host(self) -> str:
        return self.scp.host

    @property
    def port(self) -> int:
        """The listening port (the bound one after ``start()`` with port 0)."""
        return self.scp.port

    @property
    def allowed_calling_ae_titles(self) -> list[str]:
        return sorted(self.scp.allowed)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> int:
        """Reconcile the spool, then listen; returns the bound port."""
        self.spool.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(self.spool, 0o700)  # full DICOM files: only this account reads them
        self.reconcile(startup=True)
        if self.scp.refuses_everyone:
            LOGGER.warning("dicom_node.allowed_calling_ae_titles is empty: every association will be rejected")
        port = self.scp.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="medxplain-dicom-node-grouper", daemon=True)
        self._thread.start()
        LOGGER.info("DICOM node %s listening on %s:%d", self.ae_title, self.host, port)
        return port

    def stop(self, *, flush: bool = True) -> None:
        self.scp.stop()  # no new associations; running ones get up to 10 s to finish
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if flush:
            self.flush(reason="shutdown")

    def __enter__(self) -> "DicomNode":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ receiving

    def study_folder(self, study_hash: str) -> Path:
        return self.spool / study_hash

    def _store(self, instance: ReceivedInstance) -> int:
        try:
            ds = instance.dataset
            study_uid = ds.get("StudyInstanceUID")
            sop_uid = ds.get("SOPInstanceUID") or instance.sop_instance_uid
        except Exception as exc:  # noqa: BLE001 - undecodable data set
            LOGGER.warning("C-STORE from %s: cannot decode the data set (%s)", instance.calling_ae_title,
                           type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        if not study_uid or not sop_uid:
            LOGGER.warning("C-STORE from %s: data set without StudyInstanceUID/SOPInstanceUID refused",
                           instance.calling_ae_title)
            return STATUS_CANNOT_UNDERSTAND
        if is_medxplain_output(ds):
            with self._lock:
                self.ignored_own_output += 1
            LOGGER.info("C-STORE from %s: medxplain output of study %s accepted, not queued",
                        instance.calling_ae_title, uid_hash(study_uid))
            return STATUS_SUCCESS
        study = uid_hash(study_uid)
        with self._lock:  # registered before the write: reconcile leaves the folder alone
            entry = self._pending.setdefault(study, _Pending(last=self.clock()))
            entry.inflight += 1
            entry.stores += 1
            entry.last = self.clock()
        ok = False
        try:
            self._write(study, uid_hash(sop_uid), instance.encoded())
            ok = True
        except Exception as exc:  # noqa: BLE001 - answer a failure, the peer keeps the instance
            LOGGER.error("C-STORE from %s: cannot spool an instance of study %s: %s: %s",
                         instance.calling_ae_title, study, type(exc).__name__, getattr(exc, "strerror", "") or "")
        finally:
            with self._lock:
                entry.inflight -= 1
                entry.last = self.clock()
                if ok:
                    entry.received += 1
                    entry.calling.add(instance.calling_ae_title)
                else:
                    self.failed_writes += 1
        return STATUS_SUCCESS if ok else STATUS_OUT_OF_RESOURCES

    def _write(self, study: str, instance: str, data: bytes) -> Path:
        folder = self.study_folder(study)
        if not folder.is_dir():
            folder.mkdir(parents=True, mode=0o700, exist_ok=True)
            _fsync_dir(folder.parent)  # the new folder's entry is durable too
        final = folder / f"{instance}{SPOOL_SUFFIX}"
        tmp = folder / f".{instance}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.utime(final)  # mtime after the rename: see the module docstring
        _fsync_dir(folder)
        return final

    def _log_rejected(self, calling_ae_title: str, address: str, reason: str) -> None:
        LOGGER.warning("rejected association from calling AE %r at %s: %s", calling_ae_title, address, reason)

    # ------------------------------------------------------------------ grouping

    def _run(self) -> None:
        period = min(0.25, self.quiet_s / 4)
        while not self._stop.wait(period):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep grouping; the files are durable
                LOGGER.exception("DICOM node grouping pass failed; retrying")

    def tick(self) -> None:
        """One grouping pass: queue the studies quiet for ``quiet_s`` (by ``clock``) and,
        every ``sweep_interval_s``, reconcile the spool. The node's thread calls it a
        few times a second; a test with a fake clock advances it and calls it."""
        self._queue_quiet()
        if self._next_sweep is None:
            self._next_sweep = self.clock() + self.sweep_interval_s
        elif self.clock() >= self._next_sweep:
            self._next_sweep = self.clock() + self.sweep_interval_s
            self.reconcile()

    def _queue_quiet(self) -> None:
        now = self.clock()
        with self._lock:
            due = [s for s, e in self._pending.items() if e.inflight == 0 and now - e.last >= self.quiet_s]
        for study in due:
            self._enqueue_pending(study, "quiet")

    def flush(self, reason: str = "flush") -> None:
        """Queue every study still waiting for its quiet timeout now."""
        with self._lock:
            studies = [s for s, e in self._pending.items() if e.inflight == 0]
        for study in studies:
            try:
                self._enqueue_pending(study, reason)
            except Exception:  # noqa: BLE001 - the files stay in the spool; the next start queues them
                LOGGER.exception("could not queue study %s on %s", study, reason)

    def _enqueue_pending(self, study: str, reason: str) -> None:
        with self._lock:
            entry = self._pending.get(study)
            if entry is None or entry.inflight:
                return
            seen = entry.stores
            calling = tuple(sorted(entry.calling))
        try:
            self._enqueue(study, reason, calling)
        except Exception:
            with self._lock:  # try again after another quiet period
                entry.last = self.clock()
            raise
        with self._lock:
            # Forget the study unless an instance arrived meanwhile: then the next
            # quiet timeout queues it again, and the queue merges it.
            if self._pending.get(study) is entry and entry.stores == seen and entry.inflight == 0:
                del self._pending[study]

    def _spooled(self, folder: Path) -> list[Path]:
        try:
            return sorted(p for p in folder.iterdir() if p.suffix == SPOOL_SUFFIX and not p.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):  # gone, or the spool itself is broken
            return []

    def _enqueue(self, study: str, reason: str, calling: tuple[str, ...] = ()) -> StudyQueued | None:
        folder = self.study_folder(study)
        files = self._spooled(folder)
        if not files:  # e.g. every write failed: nothing to explain
            return None
        payload = {"kind": "folder", "folder": str(folder), "deliver": "cstore"}
        job_id, created = self.queue.enqueue(job_key(study), payload)
        event = StudyQueued(study=study, folder=folder, instances=len(files), job_id=job_id, created=created,
                            reason=reason, calling_ae_titles=calling)
        LOGGER.info("study %s: %d instance(s) queued as job %s (%s%s)", study, len(files), job_id, reason,
                    "" if created else ", merged into the open job")
        if self.on_study is not None:
            try:
                self.on_study(event)
            except Exception:  # noqa: BLE001 - a notification must never break grouping
                LOGGER.exception("on_study callback failed")
        return event

    # ------------------------------------------------------------------ reconcile

    def reconcile(self, *, startup: bool = False) -> list[StudyQueued]:
        """Queue spool folders that have files but no open job and no job that has
        seen them; delete the files of done studies. Returns what was queued."""
        if not self.spool.is_dir():
            return []
        latest: dict[str, Any] = {}
        for job in self.queue.list(limit=-1):  # newest first
            if job.key.startswith(KEY_PREFIX):
                latest.setdefault(job.key, job)
        with self._lock:
            busy = set(self._pending)
        queued = []
        for folder in sorted(p for p in self.spool.iterdir() if p.is_dir() and not p.name.startswith(".")):
            study = folder.name
            if study in busy:
                continue
            self._remove_stale_tmp(folder, max_age_s=60.0 if startup else _STALE_TMP_S)
            files = self._spooled(folder)
            if not files:
                self._rmdir_if_empty(folder)
                continue
            job = latest.get(job_key(study))
            if job is not None and job.state in ("pending", "leased"):
                continue
            newest = max(p.stat().st_mtime for p in files)
            if job is None or newest > job.created:
                event = self._enqueue(study, "recovered")
                if event is not None:
                    queued.append(event)
            elif job.state == "done" and self.clean_done:
                with self._lock:  # an arrival registers under this lock before it writes
                    if study in self._pending:
                        continue
                    for path in files:
                        path.unlink(missing_ok=True)
                    self._rmdir_if_empty(folder)
                LOGGER.info("study %s: job %s done, %d spooled file(s) removed", study, job.id, len(files))
            # dead and nothing new: kept for `medxplain jobs retry`
        return queued

    def _remove_stale_tmp(self, folder: Path, max_age_s: float) -> None:
        now = self.wall_clock()
        for path in folder.glob(f".*{_TMP_SUFFIX}"):
            try:
                if now - path.stat().st_mtime > max_age_s:
                    path.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _rmdir_if_empty(folder: Path) -> None:
        try:
            folder.rmdir()  # fails while anything is in it: never removes a new arrival
        except OSError:
            pass
