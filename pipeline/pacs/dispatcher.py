"""The dispatcher: from one Orthanc's outbox (its SQLite job queue) to Celery, and
each job's outcome back into that outbox.

It runs next to its Orthanc as a separate process (``medxplain dispatcher``; the
Orthanc plugin starts and supervises it when ``queue.backend`` is ``celery``, exactly
as it does the worker), never inside Orthanc's interpreter: the plugin's import
closure stays the standard library.

Each round (:meth:`Dispatcher.step`):

1. *outcomes*: for every job in flight, the task's state in the result backend.
   A result ``{"verb": ...}`` (:class:`pipeline.pacs.celery_queue.Outcome`) is
   applied to the outbox with the same verb (``complete``, ``fail`` with or
   without retry, ``defer`` for an unavailable peer, ``release``); a success that
   says the Orthanc answers again wakes the jobs deferred for its outage. A task
   that raised is a counted failure (back-off, dead after ``queue.max_attempts``).
   A task with no outcome ``queue.celery.redeliver_after_s`` after it was published
   is published again with the same task id (a message lost by a broker without
   persistence; a doubled task is harmless).
2. *leases*: leases of the jobs in flight are renewed (a third of ``queue.lease_s``).
3. *publish*: up to ``max_in_flight`` ready jobs are leased from the outbox and
   published. If the broker cannot be reached the job is released (pending again,
   no attempt spent) and the dispatcher pauses, doubling from ``queue.backoff_s`` to
   ``queue.outage_retry_max_s``; the outbox keeps every job meanwhile.

The task id is ``<job id>.<attempt>``: a re-publication of the same attempt
overwrites the same result, and the outcome of an older attempt is never taken
for a newer one. When the dispatcher dies, its supervisor releases its leases
(``JobQueue.reclaim_orphans``) and the next dispatcher publishes those jobs again
(a new attempt); the tasks of the old one finish harmlessly.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from config.schema import MedxplainConfig
from dicom_io.uids import hash_text
from pipeline.pacs.jobqueue import Job, JobQueue, make_owner

__all__ = ["Dispatcher"]

logger = logging.getLogger("medxplain.dispatcher")


@dataclass
class _InFlight:
    job: Job
    task_id: str
    published: float


def _broker_errors() -> tuple[type[BaseException], ...]:
    """What a broker or result backend that cannot be reached raises."""
    import kombu.exceptions
    import redis.exceptions

    return (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            ConnectionError, TimeoutError, OSError)


class Dispatcher:
    """``Dispatcher(config, outbox).run_forever(stop_event)``; ``step()`` is one round."""

    def __init__(self, config: MedxplainConfig, outbox: JobQueue, *, owner: str | None = None,
                 celery_app: Any = None, clock: Callable[[], float] = time.time):
        from pipeline.pacs import celery_queue

        self.config = config
        self.outbox = outbox
        self.owner = owner or make_owner()
        self.app = celery_app or celery_queue.configure(config)
        self.task_name = celery_queue.TASK_NAME
        self.clock = clock
        self.in_flight: dict[str, _InFlight] = {}
        self.pause_s = 0.0          # > 0 while the broker is unreachable
        self.down_since: float | None = None
        self._last_extend = 0.0
        self._errors = _broker_errors()
        self.stop_event = threading.Event()

    # ------------------------------------------------------------------ the loop
    def run_forever(self, stop_event: threading.Event | None = None) -> None:
        if stop_event is not None:
            self.stop_event = stop_event
        c = self.config.queue.celery
        logger.info("dispatcher %s: outbox %s -> Celery queue %r as origin %r", self.owner, self.outbox.path.name,
                    c.task_queue, c.origin)
        while not self.stop_event.is_set():
            try:
                busy = self.step()
            except Exception:  # the outbox itself failed (disk, lock): log, wait, go on
                logger.exception("dispatcher loop error; retrying in 1 s")
                busy = False
                self.stop_event.wait(1.0)
            if self.pause_s:
                self.stop_event.wait(self.pause_s)
            elif not busy:
                self.stop_event.wait(c.poll_interval_s)
        # Jobs in flight stay leased by us; the supervisor (or the next dispatcher on this
        # machine) sees this process gone and releases them.
        logger.info("dispatcher %s stopped with %d job(s) in flight", self.owner, len(self.in_flight))

    def step(self) -> bool:
        """One round: outcomes, lease renewal, publishing. True when something happened."""
        busy = self._collect()
        self._extend()
        busy = self._publish() or busy
        return busy

    # ------------------------------------------------------------------ outcomes
    def _collect(self) -> bool:
        from celery.result import AsyncResult

        busy = False
        now = self.clock()
        for flight in list(self.in_flight.values()):
            result = AsyncResult(flight.task_id, app=self.app)
            try:
                state = result.state
                value = result.result if state in ("SUCCESS", "FAILURE") else None
            except self._errors as exc:
                self._broker_down(exc)
                return busy
            self._broker_up()
            if state == "SUCCESS":
                self._apply(flight, value if isinstance(value, dict) else {"verb": "lost"})
            elif state == "FAILURE":
                self._apply(flight, {"verb": "fail", "retry": True,
                                     "error": f"task raised {type(value).__name__}: {str(value)[:300]}"})
            elif now - flight.published >= self.config.queue.celery.redeliver_after_s:
                logger.warning("job %s: no outcome %.0f s after publishing; publishing again",
                               flight.job.id[:8], now - flight.published)
                if not self._send(flight.job, flight.task_id):
                    return busy
                flight.published = now
                continue
            else:
                continue
            busy = True
            try:
                result.forget()
            except self._errors:
                pass  # it expires by itself (result_expires)
        return busy

    def _apply(self, flight: _InFlight, report: dict[str, Any]) -> None:
        job, verb = flight.job, report.get("verb")
        self.in_flight.pop(job.id, None)
        error = str(report.get("error") or "")
        if verb == "complete":
            state = "done" if self.outbox.complete(job.id, self.owner, report.get("result") or {}) else "lease_lost"
            if report.get("wake"):
                woken = self.outbox.wake_deferred()
                if woken:
                    logger.info("job %s: the Orthanc answers again; %d deferred job(s) resume", job.id[:8], woken)
        elif verb == "fail":
            state = self.outbox.fail(job.id, self.owner, error, retry=bool(report.get("retry", True))) or "lease_lost"
        elif verb == "defer":
            state = self.outbox.defer(job.id, self.owner, error,
                                      delay_s=float(report.get("delay_s") or self.config.queue.backoff_s)) \
                or "lease_lost"
        elif verb == "release":
            state = "released" if self.outbox.release(job.id, self.owner) else "lease_lost"
        else:
            state = self.outbox.fail(job.id, self.owner, f"task outcome not understood: {str(report)[:200]}",
                                     retry=True) or "lease_lost"
        log = logger.info if state in ("done", "released", "pending") else logger.warning
        log("job %s (%s): %s -> %s%s", job.id[:8], hash_text(job.key), verb, state, f": {error}" if error else "")

    # ------------------------------------------------------------------ leases
    def _extend(self) -> None:
        lease_s = self.config.queue.lease_s
        now = self.clock()
        if now - self._last_extend < lease_s / 3.0:
            return
        self._last_extend = now
        for flight in list(self.in_flight.values()):
            if not self.outbox.extend(flight.job.id, self.owner, lease_s):
                # Someone reset the job (e.g. `medxplain jobs retry`): it is no longer ours to record.
                logger.warning("job %s: lease lost; its outcome will be ignored", flight.job.id[:8])
                self.in_flight.pop(flight.job.id, None)

    # ------------------------------------------------------------------ publish
    def _publish(self) -> bool:
        busy = False
        c = self.config.queue.celery
        while len(self.in_flight) < c.max_in_flight and not self.stop_event.is_set():
            job = self.outbox.lease(self.owner, self.config.queue.lease_s)
            if job is None:
                break
            task_id = f"{job.id}.{job.attempts}"
            if not self._send(job, task_id):
                self.outbox.release(job.id, self.owner)
                break
            self.in_flight[job.id] = _InFlight(job, task_id, self.clock())
            logger.info("job %s (%s): published as attempt %d", job.id[:8], hash_text(job.key), job.attempts)
            busy = True
        return busy

    def _send(self, job: Job, task_id: str) -> bool:
        c = self.config.queue.celery
        try:
            self.app.send_task(self.task_name, kwargs={"job": job.as_dict(), "origin": c.origin},
                               task_id=task_id, queue=c.task_queue)
        except self._errors as exc:
            self._broker_down(exc)
            return False
        self._broker_up()
        return True

    # ------------------------------------------------------------------ broker outage
    def _broker_down(self, exc: BaseException) -> None:
        q = self.config.queue
        if self.down_since is None:
            self.down_since = self.clock()
            logger.warning("broker unreachable (%s); jobs stay in the outbox, retrying", type(exc).__name__)
        self.pause_s = min(q.outage_retry_max_s, max(q.backoff_s, self.pause_s * 2))

    def _broker_up(self) -> None:
        if self.down_since is not None:
            logger.info("broker reachable again after %.1f s", self.clock() - self.down_since)
            self.down_since = None
        self.pause_s = 0.0
