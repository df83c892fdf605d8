"""``queue.backend: celery``: the worker side of the distributed queue.

Topology (README "Deployment")::

    Orthanc A -- plugin --> outbox A (SQLite) -- dispatcher A --\\
    Orthanc B -- plugin --> outbox B (SQLite) -- dispatcher B ---> Redis (broker + results)
                                                                   |            |
                                                  medxplain worker 1 ... medxplain worker M (CPU or GPU)

One Celery task, :data:`TASK_NAME`, carries one outbox job (the ``Job`` row as JSON)
and the name of the Orthanc it came from (``origin``). The worker runs it with the
very same :class:`pipeline.pacs.worker.Worker` code as the SQLite backend (rules, already
done check, batches, delivery, audit, failure classes) against the Orthanc named
``queue.celery.origins[origin]`` (``default``: the top-level ``orthanc`` section); a
task naming an origin this worker does not know is refused (it never sends images
to an address that came in a message). The worker does not touch any outbox: what
the job came to (done, retry, permanent failure, deferral for an unavailable peer,
released on shutdown) is the task's JSON result, which the dispatcher of that
Orthanc records in its outbox (:mod:`pipeline.pacs.dispatcher`).

Broker settings that matter (:func:`configure`):

- JSON only (``task_serializer``, ``result_serializer``, ``accept_content``): a
  pickle from the broker would be code execution on every worker.
- ``task_acks_late``: a task is acknowledged after it ran, so a worker that dies
  mid-task leaves it on the broker; ``task_reject_on_worker_lost``: when a pool
  process dies (SIGKILL, OOM) the task is requeued at once; a whole worker machine
  that dies is redelivered by Redis after ``visibility_timeout_s``.
- ``worker_prefetch_multiplier=1``: a worker reserves one task per process, not a
  batch that waits behind a long study while other workers idle.
- ``visibility_timeout_s`` (Redis transport option) must exceed the longest task,
  else Redis hands a running task to a second worker. A redelivered or doubled task
  is harmless: output UIDs are deterministic and the worker's "already done" check
  (the SR in Orthanc) skips finished images; Orthanc keeps one copy of an instance
  stored twice (``OverwriteInstances`` false).

Run ``medxplain worker`` with a config whose ``queue.backend`` is ``celery``; it
calls :func:`run_worker` (a prefork pool of ``queue.celery.concurrency`` processes,
each with its own models, built when the process starts).
"""
from __future__ import annotations

import logging
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from config.schema import MedxplainConfig, OrthancConfig

__all__ = ["TASK_NAME", "app", "broker_urls", "configure", "run_worker", "Outcome"]

TASK_NAME = "medxplain.explain"
CONFIG_ENV = "MEDXPLAIN_CELERY_CONFIG"  # the config file of a worker's pool processes

logger = logging.getLogger("medxplain.celery")

app = Celery("medxplain", set_as_current=False)


def broker_urls(config: MedxplainConfig, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(broker URL, result backend URL) with the password from ``broker_password_env``
    put in (never written in the config file)."""
    env = os.environ if environ is None else environ
    c = config.queue.celery
    password = env.get(c.broker_password_env)

    def with_password(url: str) -> str:
        if not password:
            return url
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username or ""
        netloc = f"{urllib.parse.quote(user)}:{urllib.parse.quote(password, safe='')}@{host}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    return with_password(c.broker_url), with_password(c.result_backend or c.broker_url)


def configure(config: MedxplainConfig, celery_app: Celery = app) -> Celery:
    """Apply ``config.queue.celery`` to the Celery app (see the module docstring)."""
    c = config.queue.celery
    broker, backend = broker_urls(config)
    celery_app.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=c.task_queue,
        # Redis puts an unacknowledged task back after visibility_timeout; workers sweep for
        # such tasks every unacked_restore_interval s (kombu's default sweep is ~100 s).
        broker_transport_options={"visibility_timeout": c.visibility_timeout_s,
                                  "unacked_restore_interval": _sweep_s(c.visibility_timeout_s),
                                  "unacked_restore_throttle": 1},
        result_backend_transport_options={"visibility_timeout": c.visibility_timeout_s},
        # The broker may be down for a while: workers keep reconnecting, forever.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Results wait for the dispatcher; a dispatcher away longer than this re-publishes.
        result_expires=max(86400, int(c.redeliver_after_s * 4)),
        # A pool process builds its models at start (torch import, weights): give it time.
        worker_proc_alive_timeout=300.0,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_track_started=False,
        # Publishing while the broker is down fails fast; the dispatcher keeps the job.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1.0},
    )
    return celery_app


def _sweep_s(visibility_timeout_s: float) -> int:
    """How often a worker looks for tasks whose visibility timeout passed: a sixth of it,
    between 1 and 60 s (a dead worker's task is back within 7/6 of the timeout)."""
    return int(min(60, max(1, visibility_timeout_s // 6)))


@setup_logging.connect
def _keep_our_logging(**_: Any) -> None:
    """Celery would set the root logger to the worker's level (INFO): third-party INFO
    lines (highdicom logs source UIDs) would reach the log. The CLI's logging stays:
    root at WARNING, medxplain at INFO, UIDs hashed."""


# --------------------------------------------------------------------------- the task


class Outcome:
    """A stand-in for the job queue inside a Celery task: it records what the worker
    decided for the job (``report``) instead of writing it; the dispatcher applies it
    to the outbox with the same verbs (complete, fail, defer, release)."""

    def __init__(self, job: Any):
        self.job = job
        self.report: dict[str, Any] = {"verb": "lost", "wake": False}
        self.path = Path(f"celery:{job.key}")

    # the JobQueue verbs Worker.process calls ----------------------------------------
    def extend(self, job_id: str, owner: str, lease_s: float = 300.0) -> bool:
        return True  # the broker holds the task until it is acknowledged (late ack)

    def complete(self, job_id: str, owner: str, result: dict[str, Any] | None = None) -> bool:
        self.report.update(verb="complete", result=result or {})
        return True

    def fail(self, job_id: str, owner: str, error: str, *, retry: bool = True) -> str:
        self.report.update(verb="fail", error=error, retry=retry)
        return "pending" if retry and self.job.attempts < self.job.max_attempts else "dead"

    def defer(self, job_id: str, owner: str, error: str, *, delay_s: float) -> str:
        self.report.update(verb="defer", error=error, delay_s=delay_s)
        return "pending"

    def release(self, job_id: str, owner: str) -> bool:
        self.report.update(verb="release")
        return True

    def wake_deferred(self) -> int:
        self.report["wake"] = True  # this origin answers again: its deferred jobs may resume
        return 0


_state = threading.local()
_WORKERS: dict[str, Any] = {}
_ENGINES: dict[Any, Any] = {}


def _load_worker_config() -> MedxplainConfig:
    from config import load_config

    path = os.environ.get(CONFIG_ENV)
    return load_config(Path(path) if path else None)


def _origin(config: MedxplainConfig, origin: str) -> OrthancConfig | None:
    known = config.queue.celery.origins
    if origin in known:
        return known[origin]
    return config.orthanc if origin == "default" else None


def _worker_for(origin: str) -> Any:
    """One ``Worker`` per origin Orthanc (its client, its outage pause); the engines
    (models) are shared by all of them in this process."""
    from pipeline.pacs.orthanc_client import OrthancClient
    from pipeline.pacs.worker import Worker

    worker = _WORKERS.get(origin)
    if worker is None:
        config = getattr(_state, "config", None) or _load_worker_config()
        _state.config = config
        settings = _origin(config, origin)
        if settings is None:
            return None
        worker = Worker(config, None, f"celery:{os.getpid()}",  # type: ignore[arg-type]
                        orthanc=OrthancClient.from_config(settings))
        worker._engines = _ENGINES
        _WORKERS[origin] = worker
    return worker


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Build every rule's models when a pool process starts, so that a task's time is
    the study's own and a broken bundle shows at start-up."""
    if os.environ.get(CONFIG_ENV) is None:
        return
    config = _load_worker_config()
    _state.config = config
    worker = _worker_for(next(iter(config.queue.celery.origins), "default"))
    if worker is not None:
        worker.warm_up()


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def explain(job: dict[str, Any], origin: str) -> dict[str, Any]:
    """Run one outbox job; returns ``{"verb": complete|fail|defer|release, ...}`` for the
    dispatcher of ``origin`` (see :class:`Outcome`)."""
    from pipeline.pacs.jobqueue import Job

    row = Job(**job)
    worker = _worker_for(origin)
    if worker is None:
        # A configuration matter on this worker, not the job's fault: the dispatcher defers it.
        logger.error("task for unknown origin %r refused (queue.celery.origins of this worker: %s)",
                     origin, ", ".join(sorted(_state.config.queue.celery.origins)) or "none")
        return {"verb": "defer", "error": f"no worker knows origin {origin!r} (queue.celery.origins)",
                "delay_s": _state.config.queue.outage_retry_max_s, "wake": False}
    outcome = Outcome(row)
    worker.queue = outcome
    worker.process(row)
    return outcome.report


# --------------------------------------------------------------------------- the process


def run_worker(config: MedxplainConfig, config_path: Path | None, *, concurrency: int | None = None,
               name: str | None = None, loglevel: str = "INFO") -> None:
    """Run a Celery worker for ``config`` (blocks until SIGTERM: a warm shutdown lets the
    running tasks finish; their outcomes reach the dispatchers)."""
    if config_path is not None:
        os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
    configure(config)
    c = config.queue.celery
    argv = ["worker", f"--loglevel={loglevel}", "--pool=prefork", f"--concurrency={concurrency or c.concurrency}",
            "-Q", c.task_queue, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if name:
        argv += ["-n", name]
    app.worker_main(argv)
