"""`medxplain serve-dicom`: the standalone DICOM node (see pipeline/pacs/dicom_node.py)."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `medxplain` app."""
    app.command("serve-dicom")(serve_dicom_command)


def serve_dicom_command(
    config: Path = typer.Option(None, help="YAML config (default: config/medxplain.yaml)"),
    port: int = typer.Option(None, help="listen port (default: config dicom_node.port)"),
    ae_title: str = typer.Option(None, "--ae-title", help="our AE title (default: config dicom_node.ae_title)"),
) -> None:
    """Run a DICOM Storage SCP that queues received studies for explanation, until Ctrl-C.

    Only the calling AE titles in dicom_node.allowed_calling_ae_titles may send.
    A study is queued once it has had no new instance for dicom_node.quiet_s;
    the worker explains it and C-STOREs the results to
    delivery.cstore.
    """
    import logging
    import signal
    import sqlite3
    import time

    from pydantic import ValidationError
    from rich.console import Console
    from rich.markup import escape

    from config import ConfigError, load_config
    from config.schema import DicomNodeConfig, resolve
    from pipeline.pacs.dicom_node import DicomNode, StudyQueued

    console = Console(width=None if Console().is_terminal else 160)
    try:
        cfg = load_config(config)
        if port is not None or ae_title is not None:
            updated = cfg.dicom_node.model_dump()
            updated.update({k: v for k, v in {"port": port, "ae_title": ae_title}.items() if v is not None})
            cfg = cfg.model_copy(update={"dicom_node": DicomNodeConfig.model_validate(updated)})
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2)
    except ValidationError as exc:
        lines = [f"  --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in exc.errors()]
        console.print("[red]invalid option[/]\n" + escape("\n".join(lines)))
        raise typer.Exit(2)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_study(event: StudyQueued) -> None:
        peers = ", ".join(event.calling_ae_titles) or "spool"
        verb = "queued as job" if event.created else "merged into open job"
        console.print(f"study {event.study}: {event.instances} instance(s) from {escape(peers)} "
                      f"{verb} {event.job_id} ({event.reason})")

    def on_rejected(calling: str, address: str, reason: str) -> None:
        hint = " (dicom_node.allowed_calling_ae_titles)" if "calling" in reason else ""
        console.print(f"[yellow]rejected association[/] from calling AE {escape(repr(calling))} at {address}: "
                      f"{escape(reason)}{hint}")

    node_cfg = cfg.dicom_node
    try:
        node = DicomNode.from_config(cfg, on_study=on_study, on_rejected=on_rejected)
    except (OSError, sqlite3.Error) as exc:
        console.print(f"[red]cannot open the queue:[/] {escape(str(exc))}")
        raise typer.Exit(1)
    # A service manager stops us with SIGTERM: shut down as for Ctrl-C. SIGINT is set
    # too, because a process started in the background by a shell inherits SIGINT
    # *ignored*, and then Python never raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        bound = node.start()
    except OSError as exc:
        console.print(f"[red]cannot listen on {node_cfg.host}:{node.port}:[/] {escape(str(exc))}")
        raise typer.Exit(1)
    console.print(f"[bold]medxplain DICOM node[/] AE [bold]{escape(node.ae_title)}[/] on {node_cfg.host}:{bound} "
                  f"(called AE title must be {escape(node.ae_title)})")
    if node.allowed_calling_ae_titles:
        console.print("allowed calling AE titles: " + escape(", ".join(node.allowed_calling_ae_titles)))
    else:
        console.print("[yellow]no calling AE title is allowed (dicom_node.allowed_calling_ae_titles is empty): "
                      "every association will be rejected[/]")
    console.print(f"spool {node.spool}; queue {resolve(cfg.queue.path)}; a study is queued after "
                  f"{node_cfg.quiet_s:g} s without new instances")
    dest = cfg.delivery.cstore
    if dest is None:
        console.print("[yellow]delivery.cstore is not set: the worker has nowhere to C-STORE the results[/]")
    else:
        console.print(f"results go to {escape(dest.ae_title)} at {dest.host}:{dest.port} "
                      f"(calling AE {escape(dest.calling_ae_title)})")
    console.print("Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping: finishing running associations, queueing waiting studies")
        node.stop()
    console.print(f"stopped ({node.ignored_own_output} medxplain output instance(s) ignored, "
                  f"{node.failed_writes} failed write(s))")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
