"""`medxplain orthanc`: a ready Orthanc with the medxplain plugin and worker."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

from config.schema import PROJECT_ROOT

DEFAULT_DATA = PROJECT_ROOT / "data" / "orthanc"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `medxplain` app."""
    app.command("orthanc")(orthanc_command)


def orthanc_command(
    data: Path = typer.Option(DEFAULT_DATA, "--data", help="data folder: storage, queue, logs, credentials"),
    http_port: int = typer.Option(None, help="HTTP port (loopback clients only); default 8043"),
    dicom_port: int = typer.Option(None, help="DICOM port; default 4243"),
    aet: str = typer.Option("ORTHANC", help="Orthanc's DICOM AE title"),
    allow_aet: list[str] = typer.Option(
        None, "--allow-aet", help="calling AE title allowed to C-STORE/C-ECHO from 127.0.0.1 (repeatable); "
                                  "default STORESCU, PYNETDICOM, MEDXPLAIN"),
    stable_age: int = typer.Option(5, min=1, help="seconds without new instances before a study is processed"),
    config: Path = typer.Option(None, help="medxplain YAML the worker config derives from "
                                           "(default: config/medxplain.yaml)"),
    explainers: str = typer.Option(None, help="comma-separated methods for the worker, e.g. gradcam"),
    no_worker: bool = typer.Option(False, "--no-worker", help="do not start the worker from Orthanc (run "
                                                               "`medxplain worker --config DIR/medxplain.yaml` "
                                                               "yourself, e.g. as a service)"),
    viewer: bool = typer.Option(True, "--viewer/--no-viewer",
                                help="serve OHIF under /ohif/ from this Orthanc (DICOMweb plugin; the app "
                                     "installed by scripts/install.sh)"),
    foreground: bool = typer.Option(False, "--foreground", help="stay attached; Ctrl-C stops Orthanc"),
    stop: bool = typer.Option(False, "--stop", help="stop the Orthanc (and worker) of --data"),
    status: bool = typer.Option(False, "--status", help="say whether Orthanc runs on --data"),
) -> None:
    """Start Orthanc (Debian package) with the medxplain plugin, a generated config
    (loopback, authentication on, storage in --data) and the plugin-supervised worker."""
    from pipeline.pacs import orthanc_launcher as launcher

    data = data.resolve()
    if stop:
        result = launcher.stop(data)
        typer.echo(f"Orthanc: {result['orthanc']}; worker: {result['worker']}")
        return
    if status:
        state = launcher.status(data)
        typer.echo(f"Orthanc: {'pid ' + str(state['orthanc_pid']) if state['orthanc_pid'] else 'not running'}; "
                   f"worker: {'pid ' + str(state['worker_pid']) if state['worker_pid'] else 'not running'}")
        raise typer.Exit(0 if state["orthanc_pid"] else 1)
    overrides = {"explainers": [m.strip() for m in explainers.split(",") if m.strip()]} if explainers else {}
    settings = launcher.OrthancSettings(
        data=data, http_port=http_port or launcher.DEFAULT_HTTP_PORT,
        dicom_port=dicom_port or launcher.DEFAULT_DICOM_PORT, aet=aet, stable_age=stable_age,
        start_worker=not no_worker, allowed_aets=tuple(allow_aet or launcher.DEFAULT_ALLOWED_AETS),
        base_config=config, worker_overrides=overrides, viewer=viewer)
    import time

    from config import ConfigError

    started_at = time.time()
    try:
        # Orthanc always gets its own session: a terminal's Ctrl-C reaches only this command,
        # which then stops Orthanc with one SIGTERM (Orthanc dies at once on a second signal).
        proc = launcher.start(settings)
    except (launcher.OrthancError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    p = launcher.paths(data)
    problems = launcher.plugin_problems(settings, started_at)
    if problems:
        typer.echo(f"Orthanc is running (pid {proc.pid}) but medxplain is NOT healthy:", err=True)
        for problem in problems:
            typer.echo(f"  - {problem}", err=True)
        typer.echo(f"  Details: {p['log']} and {settings.url}/medxplain/jobs; "
                   f"stop: medxplain orthanc --stop --data {data}", err=True)
        raise typer.Exit(3)
    worker = ("started and supervised by the plugin (log: " + str(p["worker_log"]) + ")" if not no_worker else
              f"not started; run: medxplain worker --config {p['worker_config']} "
              f"(with {launcher.PASSWORD_ENV} set to the '{launcher.WORKER_USER}' password)")
    typer.echo(f"""Orthanc is running (pid {proc.pid}) with the medxplain plugin.
  Web UI:        {settings.url}/app/explorer.html
  OHIF viewer:   {settings.url + "/ohif/" if viewer else "off (--no-viewer)"}
  Credentials:   {p['credentials']} (user '{launcher.ADMIN_USER}'; the worker uses '{launcher.WORKER_USER}')
  DICOM:         AET {settings.aet}, port {settings.dicom_port}, from 127.0.0.1 with calling AET \
{', '.join(settings.allowed_aets)}
                 e.g. storescu -aet STORESCU -aec {settings.aet} 127.0.0.1 {settings.dicom_port} FILE.dcm
  Jobs:          {settings.url}/medxplain/jobs  or  medxplain jobs list --config {p['worker_config']}
  Worker:        {worker}
  Logs:          {p['log']}
  Stop:          medxplain orthanc --stop --data {data}""")
    if not foreground:
        return
    typer.echo("(foreground: Ctrl-C stops Orthanc)")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        code = proc.wait()
        typer.echo(f"Orthanc exited with code {code}", err=True)
        launcher.stop(data)
        raise typer.Exit(1 if code else 0)
    except KeyboardInterrupt:
        result = launcher.stop(data)
        typer.echo(f"Orthanc: {result['orthanc']}; worker: {result['worker']}")
    sys.stdout.flush()
