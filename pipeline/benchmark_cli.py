"""CLI of the evaluation side: `medxplain make-lesions` (ground-truth data set) and
`medxplain benchmark` (every explainer side by side, one report).

torch is imported inside the commands, so `medxplain --help` stays fast.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(width=None if Console().is_terminal else 160)


def make_lesions_command(
    data: Path = typer.Option(..., help="Kermany-layout folder (manifest.csv); only its NORMAL images are used"),
    out: Path = typer.Option(..., help="folder to write (PNG images, masks/, manifest.csv)"),
    seed: int = typer.Option(0, help="seed of the lesion draws and of which images get one"),
    positive_fraction: float = typer.Option(0.5, help="fraction of NORMAL images per split that get a lesion"),
    limit: int = typer.Option(None, help="use at most N NORMAL images per split (smoke tests)"),
) -> None:
    """Insert synthetic lesions of known mask into real NORMAL radiographs."""
    from explainers.lesions import LesionError
    from pipeline.datasets import DatasetError
    from pipeline.lesion_data import count_normal, make_lesion_dataset

    try:
        total = count_normal(data)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            bar = progress.add_task("inserting lesions", total=total)
            result = make_lesion_dataset(data, out, seed=seed, positive_fraction=positive_fraction, limit=limit,
                                         on_image=lambda: progress.advance(bar))
    except (DatasetError, LesionError, ValueError, OSError) as exc:
        console.print(f"[red]cannot make the lesion data set:[/] {exc}")
        raise typer.Exit(2)
    summary = "; ".join(f"{split}: " + ", ".join(f"{n} {name}" for name, n in sorted(c.items()))
                        for split, c in sorted(result.counts.items()))
    console.print(f"[green]wrote[/] {result.root} — {summary}")


def register(app: typer.Typer) -> None:
    """Add `make-lesions` and `benchmark` to the `medxplain` app."""
    app.command("make-lesions")(make_lesions_command)
