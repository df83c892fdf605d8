"""CLI of the PACS worker: `medxplain worker`, `medxplain dispatcher` (queue.backend celery) and
`medxplain jobs list|retry|purge|add|add-dicomweb`.

torch is imported only when the worker builds its first engine, so the `jobs`
commands answer at once.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

console = Console(width=None if Console().is_terminal else 160)

jobs_app = typer.Typer(help="Inspect and manage the durable job queue (config queue.path, or --queue).",
                       no_args_is_help=True)

_CONFIG_HELP = "YAML config (default: config/medxplain.yaml)"
_QUEUE_HELP = "queue file (default: config queue.path, relative to the project root)"


def _config(path: Path | None):
    from config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2)


def _open(cfg, queue_path: Path | None):
    """The queue, or a clear message and exit status 2 when its file is emptied or damaged
    (its owner, the Orthanc plugin or the DICOM node, recovers it at start-up)."""
    from pipeline.pacs.jobqueue import QueueDamaged
    from pipeline.pacs.worker import open_queue

    try:
        return open_queue(cfg, queue_path)
    except QueueDamaged as exc:
        console.print(f"[red]{exc}[/]\nRestart its owner (`medxplain orthanc` or `medxplain serve-dicom`): it moves "
                      f"the file aside and rebuilds the queue from Orthanc or the spool.")
        raise typer.Exit(2)


def _queue(config_path: Path | None, queue_path: Path | None):
    return _open(_config(config_path), queue_path)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _setup_logging(verbose: bool) -> None:
    """Our lines at INFO (DEBUG with -v), other libraries' at WARNING; every UID hashed."""
    from pipeline.pacs.audit import ScrubUIDsFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ScrubUIDsFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("medxplain").setLevel(logging.DEBUG if verbose else logging.INFO)


def worker_command(
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
    once: bool = typer.Option(False, "--once", help="process the jobs that are ready now, then exit (tests, cron)"),
    warm: bool = typer.Option(None, "--warm/--no-warm",
                              help="load every rule's models at start (default: yes, except with --once)"),
    owner: str = typer.Option(None, help="worker id recorded on leased jobs (default host:pid:random)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Run the worker: lease jobs, explain eligible images, deliver, audit. SIGTERM/SIGINT
    finish the current batch and release the job; a second signal stops at once."""
    import os
    import threading

    from pipeline.pacs.worker import Worker, install_signal_handlers

    _setup_logging(verbose)
    cfg = _config(config)
    if cfg.queue.backend == "celery":
        # Tasks come from the broker (pipeline/pacs/celery_queue.py), not from a queue file.
        if once or queue is not None:
            console.print("[red]--once and --queue apply to queue.backend sqlite; this config uses celery[/]")
            raise typer.Exit(2)
        from pipeline.pacs.celery_queue import run_worker

        run_worker(cfg, config, name=owner, loglevel="DEBUG" if verbose else "INFO")
        return
    job_queue = _open(cfg, queue)
    worker = Worker(cfg, job_queue, owner)
    stop = threading.Event()
    install_signal_handlers(stop)
    worker.stop_event = stop
    if cfg.delivery.orthanc and not os.environ.get(cfg.orthanc.password_env):
        logging.getLogger("medxplain.worker").warning(
            "%s is not set: Orthanc jobs will fail until the worker runs with the password of Orthanc user %r",
            cfg.orthanc.password_env, cfg.orthanc.username)
    if warm if warm is not None else not once:
        from explainers.bundle import BundleError

        try:
            worker.warm_up()
        except (BundleError, KeyError, RuntimeError, OSError) as exc:
            console.print(f"[red]cannot start the worker:[/] {exc.args[0] if isinstance(exc, KeyError) else exc}")
            raise typer.Exit(2)
    try:
        if once:
            outcomes = worker.run_once()
            summary = ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes))) or "nothing to do"
            console.print(f"processed {len(outcomes)} job(s): {summary}")
        else:
            worker.run_forever(stop)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def dispatcher_command(
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """queue.backend celery: publish this Orthanc's outbox (the queue file) to Celery and
    record each job's outcome back in it. The Orthanc plugin starts it like the worker."""
    import threading

    from pipeline.pacs.dispatcher import Dispatcher
    from pipeline.pacs.worker import install_signal_handlers

    _setup_logging(verbose)
    cfg = _config(config)
    if cfg.queue.backend != "celery":
        console.print("[red]the dispatcher needs queue.backend: celery (with sqlite, run `medxplain worker`)[/]")
        raise typer.Exit(2)
    dispatcher = Dispatcher(cfg, _open(cfg, queue))
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        dispatcher.run_forever(stop)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@jobs_app.command("list")
def jobs_list(
    state: str = typer.Option(None, "--state", help="pending | leased | done | dead"),
    limit: int = typer.Option(100, help="newest jobs first, at most this many"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line instead of a table"),
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
) -> None:
    """List jobs: id, key, state, attempts, last error, age."""
    from rich.table import Table

    from pipeline.pacs.jobqueue import STATES

    if state is not None and state not in STATES:
        console.print(f"[red]unknown state {state!r}; one of {', '.join(STATES)}[/]")
        raise typer.Exit(2)
    job_queue = _queue(config, queue)
    jobs = job_queue.list(state, limit=limit)
    if as_json:
        for job in jobs:
            typer.echo(json.dumps(job.as_dict(), default=str))
        return
    now = time.time()
    table = Table(title=f"jobs in {job_queue.path}" + (f" ({state})" if state else ""))
    for column in ("id", "key", "state", "attempts", "last error", "age"):
        table.add_column(column, overflow="fold")
    colours = {"done": "green", "dead": "red", "leased": "yellow", "pending": "cyan"}
    for job in jobs:
        table.add_row(job.id[:12], job.key, f"[{colours[job.state]}]{job.state}[/]",
                      f"{job.attempts}/{job.max_attempts}", (job.last_error or "")[:160], _age(now - job.created))
    console.print(table)
    counts = job_queue.counts()
    console.print("  ".join(f"{name} {n}" for name, n in counts.items()))


def _find(job_queue, prefix: str):
    matches = [job for job in job_queue.list(limit=-1) if job.id.startswith(prefix)]
    if len(matches) != 1:
        console.print(f"[red]{'no job' if not matches else f'{len(matches)} jobs'} with id {prefix!r}[/]")
        raise typer.Exit(1)
    return matches[0]


@jobs_app.command("retry")
def jobs_retry(
    job_id: str = typer.Argument(None, help="job id (or a unique prefix, as `jobs list` shows it)"),
    all_dead: bool = typer.Option(False, "--all-dead", help="retry every dead job"),
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
) -> None:
    """Put a dead (or done) job back to pending with fresh attempts."""
    if bool(job_id) == all_dead:
        console.print("[red]give a JOB_ID or --all-dead (not both)[/]")
        raise typer.Exit(2)
    job_queue = _queue(config, queue)
    jobs = job_queue.list("dead", limit=-1) if all_dead else [_find(job_queue, job_id)]
    retried = refused = 0
    for job in jobs:
        if job_queue.retry(job.id):
            retried += 1
        else:
            refused += 1
            why = ("an open job for the same key exists" if job.state in ("dead", "done")
                   else f"it is {job.state}")
            console.print(f"[yellow]{job.id[:12]} not retried: {why}[/]")
    console.print(f"{retried} job(s) back to pending")
    if refused and not all_dead:
        raise typer.Exit(1)


@jobs_app.command("purge")
def jobs_purge(
    state: list[str] = typer.Option(["done"], "--state", help="done and/or dead (repeat the option)"),
    older_than_hours: float = typer.Option(0.0, "--older-than-hours", help="only jobs last updated before this"),
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
) -> None:
    """Delete finished jobs (open jobs are never purged)."""
    job_queue = _queue(config, queue)
    try:
        removed = job_queue.purge(states=tuple(state), older_than_s=older_than_hours * 3600.0)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2)
    console.print(f"purged {removed} job(s) ({', '.join(state)}"
                  + (f", older than {older_than_hours:g} h" if older_than_hours else "") + ")")


@jobs_app.command("add")
def jobs_add(
    folder: Path = typer.Argument(..., help="folder of DICOM files (one study)"),
    out: Path = typer.Option(None, "--out", help="write results under this folder"),
    cstore: bool = typer.Option(False, "--cstore", help="C-STORE results to delivery.cstore instead"),
    orthanc: bool = typer.Option(False, "--orthanc", help="store results into Orthanc instead"),
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
) -> None:
    """Queue a folder for the worker (results to a folder, C-STORE or Orthanc). The folder is kept."""
    from pipeline.pacs.audit import hash_text

    if (out is not None) + cstore + orthanc != 1:
        console.print("[red]give exactly one of --out DIR, --cstore, --orthanc[/]")
        raise typer.Exit(2)
    if not folder.is_dir():
        console.print(f"[red]not a folder: {folder}[/]")
        raise typer.Exit(2)
    folder = folder.resolve()
    payload: dict = {"kind": "folder", "folder": str(folder), "delete_folder": False}
    if out is not None:
        payload.update(deliver="folder", out=str(out.resolve()))
    else:
        payload["deliver"] = "cstore" if cstore else "orthanc"
    job_queue = _queue(config, queue)
    job_id, created = job_queue.enqueue(f"folder:{hash_text(str(folder))}", payload)
    console.print(f"{'queued' if created else 'already queued'}: job {job_id}")


@jobs_app.command("add-dicomweb")
def jobs_add_dicomweb(
    study_uids: list[str] = typer.Argument(..., help="Study Instance UID(s) on the `dicomweb` server"),
    config: Path = typer.Option(None, "--config", help=_CONFIG_HELP),
    queue: Path = typer.Option(None, "--queue", help=_QUEUE_HELP),
) -> None:
    """Queue studies of the DICOMweb server (config `dicomweb`): fetched by QIDO-RS/WADO-RS,
    results stored back by STOW-RS. Job key dicomweb:<StudyInstanceUID>."""
    from pydicom.valuerep import validate_value

    cfg = _config(config)
    if cfg.dicomweb is None:
        console.print("[red]no DICOMweb server configured: set the `dicomweb` section (url, auth)[/]")
        raise typer.Exit(2)
    for uid in study_uids:
        try:
            validate_value("UI", uid, validation_mode=2)
        except ValueError:
            console.print("[red]not a valid Study Instance UID (digits and dots, at most 64 characters)[/]")
            raise typer.Exit(2)
    job_queue = _open(cfg, queue)
    for uid in study_uids:
        job_id, created = job_queue.enqueue(f"dicomweb:{uid}", {"kind": "dicomweb", "study_uid": uid})
        console.print(f"{'queued' if created else 'already queued'}: job {job_id}")


def register(app: typer.Typer) -> None:
    """Add `worker` and `jobs` to the `medxplain` app."""
    app.command("worker")(worker_command)
    app.command("dispatcher")(dispatcher_command)
    app.add_typer(jobs_app, name="jobs")
