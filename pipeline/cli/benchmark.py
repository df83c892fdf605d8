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
    paired: bool = typer.Option(False, help="each NORMAL image twice: untouched and with a lesion (the pair differs "
                                            "only by the lesion; --positive-fraction is then ignored)"),
    limit: int = typer.Option(None, help="use at most N NORMAL images per split (smoke tests)"),
) -> None:
    """Insert synthetic lesions of known mask into real NORMAL radiographs."""
    from explainers.lesions import LesionError
    from pipeline.evaluation.lesion_data import count_normal, make_lesion_dataset
    from pipeline.training.datasets import DatasetError

    try:
        total = count_normal(data)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            bar = progress.add_task("inserting lesions", total=total)
            result = make_lesion_dataset(data, out, seed=seed, positive_fraction=positive_fraction, limit=limit,
                                         paired=paired,
                                         on_image=lambda: progress.advance(bar))
    except (DatasetError, LesionError, ValueError, OSError) as exc:
        console.print(f"[red]cannot make the lesion data set:[/] {exc}")
        raise typer.Exit(2)
    summary = "; ".join(f"{split}: " + ", ".join(f"{n} {name}" for name, n in sorted(c.items()))
                        for split, c in sorted(result.counts.items()))
    console.print(f"[green]wrote[/] {result.root} — {summary}")


def benchmark_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier and explainers are benchmarked"),
    out: Path = typer.Option(..., help="report folder (report.md, report.html, PNG figures, .cache/ to resume)"),
    methods: str = typer.Option(None, help="comma-separated methods (default: every one the bundle can run)"),
    n: int = typer.Option(100, help="test cases (lesion data: positives with a mask; else class-balanced)"),
    data: Path = typer.Option(None, help="data folder with manifest.csv (default: the bundle's training data)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(16, help="images per explain() call"),
    robustness_n: int = typer.Option(32, help="cases explained again under each noise level"),
    sanity_n: int = typer.Option(8, help="cases explained again at each stage of the cascading model "
                                         "randomisation (Adebayo et al. 2018); 0 = skip"),
    steps: int = typer.Option(16, help="deletion / insertion steps"),
    seed: int = typer.Option(0),
) -> None:
    """Run every explainer on the same test images and write one report."""
    import shlex
    import time

    from pipeline.evaluation.benchmark import BenchmarkError, run_benchmark
    from pipeline.evaluation.benchmark_report import write_report

    started = time.perf_counter()
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as progress:
        bars: dict[str, int] = {}

        def on_method(name: str, state: str) -> None:
            bars[name] = progress.add_task(name, total=1.0, completed=1.0 if state == "cached" else 0.0)
            if state == "cached":
                progress.console.print(f"{name}: finished in an earlier run (cached in {out / '.cache'})")

        try:
            result = run_benchmark(
                bundle_path=bundle, out=out, methods=methods.split(",") if methods else None, n=n, data=data,
                device=device, batch_size=batch_size, robustness_n=robustness_n, steps=steps, seed=seed,
                sanity_n=sanity_n, on_method=on_method,
                on_progress=lambda name, f: progress.update(bars[name], completed=f))
        except BenchmarkError as exc:
            console.print(f"[red]cannot benchmark:[/] {exc}")
            raise typer.Exit(2)
    # Every option spelled out (not argv, which may be a test runner's): the exact command.
    command = " ".join(["medxplain", "benchmark", "--bundle", shlex.quote(str(bundle)), "--out",
                        shlex.quote(str(out))] + (["--methods", methods] if methods else [])
                       + ["--n", str(n)] + (["--data", shlex.quote(str(data))] if data else [])
                       + ["--device", device, "--batch-size", str(batch_size), "--robustness-n", str(robustness_n),
                          "--sanity-n", str(sanity_n), "--steps", str(steps), "--seed", str(seed)])
    report_md, report_html = write_report(result, command=command, wall_s=time.perf_counter() - started)
    for name, reason in result.skipped.items():
        console.print(f"[yellow]skipped {name}:[/] {reason}")
    console.print(f"[green]wrote[/] {report_md} and {report_html} ({time.perf_counter() - started:.0f} s)")


def register(app: typer.Typer) -> None:
    """Add `make-lesions` and `benchmark` to the `medxplain` app."""
    app.command("make-lesions")(make_lesions_command)
    app.command("benchmark")(benchmark_command)
