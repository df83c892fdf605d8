"""The `medxplain` command line."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Counterfactual and saliency explanations for radiograph classifiers, inside the PACS.",
                  no_args_is_help=True)
train_app = typer.Typer(help="Train a classifier or an explainer into a bundle.", no_args_is_help=True)
app.add_typer(train_app, name="train")
# Wide enough for the summary table when output goes to a file or CI log.
console = Console(width=None if Console().is_terminal else 160)


@train_app.command("classifier")
def train_classifier_command(
    data: Path = typer.Option(..., help="folder with manifest.csv (path, split, label, source_patient_token)"),
    out: Path = typer.Option(..., help="bundle folder to write"),
    name: str = typer.Option(None, help="bundle name (default: the folder name)"),
    task: str = typer.Option("pneumonia", help="pneumonia | lesions"),
    size: int = typer.Option(128, help="input side in pixels"),
    epochs: int = typer.Option(12),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    augmentation: str = typer.Option("shortcut_robust", help="shortcut_robust (synthetic text, L/R markers, border "
                                     "bands, collimation, brightness jitter) | basic (geometry, gamma, noise)"),
    learning_rate: float = typer.Option(1e-3, help="peak learning rate of the one-cycle schedule (AdamW)"),
    init_from: Path = typer.Option(None, help="bundle whose classifier weights start the training (same "
                                   "architecture and input; fine-tuning), instead of a random start"),
) -> None:
    """Train a binary classifier and write a bundle with a model card."""
    from explainers.bundle import BundleError
    from pipeline.training.classifier import train_classifier_bundle

    try:
        bundle = train_classifier_bundle(data=data, out=out, name=name or out.name, task=task, size=size,
                                         epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                                         augmentation=augmentation, learning_rate=learning_rate, init_from=init_from)
    except (BundleError, ValueError) as exc:
        console.print(f"[red]cannot train the classifier:[/] {exc}")
        raise typer.Exit(2)
    test = bundle.spec.metrics["test"]
    console.print(f"[green]wrote[/] {bundle.root} — test AUROC {test['auroc']:.4f}, accuracy {test['accuracy']:.4f}, "
                  f"sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}")


def _train_command(method: str, trainer: Any) -> Callable[..., None]:
    """`medxplain train METHOD`: its options are the method's training settings
    (``explainers.training.settings_fields``), plus the bundle, the data and a limit."""
    from explainers.training import settings_fields

    def command(**options: Any) -> None:
        from explainers.bundle import BundleError
        from explainers.training import settings_from_options
        from pipeline.training.datasets import DatasetError
        from pipeline.training.explainers import train_explainer_bundle

        bundle, data, max_images = options.pop("bundle"), options.pop("data"), options.pop("max_images")
        try:
            settings = settings_from_options(trainer.settings_class, options)
            result = train_explainer_bundle(method, bundle=bundle, data=data, settings=settings,
                                            max_images=max_images)
        except (BundleError, DatasetError, ValueError) as exc:
            console.print(f"[red]cannot train {method}:[/] {exc}")
            raise typer.Exit(2)
        spec = result.spec.explainers[method]
        test = spec.training["test"]
        console.print(f"[green]wrote[/] {', '.join(str(result.root / r.file) for r in spec.weights.values())} — "
                      f"test flip rate {test['flip_rate']:.3f} (called positive {test['flip_rate_called_positive']}, "
                      f"negative {test['flip_rate_called_negative']}), L1 {test['proximity_l1']:.4f}, "
                      f"{test['ms_per_image']:.0f} ms/image (best epoch {spec.training['best_epoch'] + 1})")

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("bundle", keyword, annotation=Path, default=typer.Option(
            ..., help=f"bundle folder whose classifier is explained ({method} is added to it)")),
        inspect.Parameter("data", keyword, annotation=Path, default=typer.Option(
            ..., help="folder with manifest.csv (path, split, label, source_patient_token)")),
        inspect.Parameter("max_images", keyword, annotation=Optional[int], default=typer.Option(
            None, help="use at most N images per split (smoke tests)")),
    ]
    for name, kind, default, text in settings_fields(trainer.settings_class):
        parameters.append(inspect.Parameter(name, keyword, annotation=kind,
                                            default=typer.Option(default, help=text or None)))
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    summary = (sys.modules[trainer.__module__].__doc__ or method).split(",")[0].strip()
    command.__doc__ = f"{summary}, for a bundle's classifier (explainers/train_{method}.py)."
    return command


def _register_train_commands() -> None:
    from pipeline.training.explainers import TRAINERS

    for method, trainer in TRAINERS.items():
        train_app.command(method)(_train_command(method, trainer))


_register_train_commands()


@train_app.command("adopt")
def train_adopt_command(
    method: str = typer.Argument(..., help="gvr or cia (networks that never see the classifier in training), or any "
                                           "method whose networks were trained against this bundle's classifier"),
    bundle: Path = typer.Option(..., help="bundle that receives the networks (its classifier is explained)"),
    networks_from: Path = typer.Option(..., "--from", help="bundle with the trained networks (same input)"),
    data: Path = typer.Option(..., help="folder with manifest.csv: the re-validation's val and test splits"),
    parameter: list[str] = typer.Option([], help="NAME=VALUE: change an explainer parameter (repeatable), "
                                                 "e.g. outside_lungs=4"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Reuse another bundle's classifier-independent networks, re-validated against this bundle's classifier."""
    from explainers.base import parameter_overrides
    from explainers.bundle import BundleError
    from pipeline.training.datasets import DatasetError
    from pipeline.training.explainers import adopt_explainer

    try:
        changed = parameter_overrides(parameter)
        result = adopt_explainer(method, bundle=bundle, source=networks_from, data=data, parameters=changed,
                                 device=device)
    except (KeyError, BundleError, DatasetError, ValueError) as exc:
        console.print(f"[red]cannot adopt {method}:[/] {exc}")
        raise typer.Exit(2)
    test = result.spec.explainers[method].training["test"]
    console.print(f"[green]adopted[/] {method} from {networks_from} into {result.root} — test flip rate "
                  f"{test['flip_rate']:.3f} (called positive {test['flip_rate_called_positive']}, negative "
                  f"{test['flip_rate_called_negative']}), L1 {test['proximity_l1']:.4f}")


@train_app.command("domain-guard")
def train_domain_guard_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier the guard protects"),
    data: Path = typer.Option(..., help="folder with manifest.csv: the classifier's training data"),
    quantile: float = typer.Option(0.98, help="share of validation images that must pass (sets the threshold)"),
    layers: str = typer.Option(None, help="comma-separated classifier modules (default: per architecture)"),
    max_images: int = typer.Option(None, help="use at most N images per split (smoke tests)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Fit and calibrate the bundle's domain guard (out-of-distribution score on the classifier's features)."""
    from explainers.bundle import BundleError
    from explainers.domain import DomainGuardError
    from pipeline.training.datasets import DatasetError
    from pipeline.training.domain_guard import train_domain_guard

    try:
        result = train_domain_guard(bundle=bundle, data=data, quantile=quantile, max_images=max_images,
                                    layers=layers.split(",") if layers else None, device=device)
    except (BundleError, DatasetError, DomainGuardError, ValueError) as exc:
        console.print(f"[red]cannot calibrate the domain guard:[/] {exc}")
        raise typer.Exit(2)
    guard = result.spec.domain_guard
    rates = guard.calibration["in_domain_rate"]
    console.print(f"[green]wrote[/] {result.root / guard.statistics.file} — threshold {guard.threshold:.2f}; "
                  "in domain: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))


@app.command("explain")
def explain_command(
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="output folder: one sub-folder of DICOM objects per image"),
    bundle: Path = typer.Option(None, help="model bundle folder (default: config 'bundle')"),
    explainers: str = typer.Option(None, help="comma-separated methods, e.g. gradcam,ig,occlusion"),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
    batch_size: int = typer.Option(None, help="images per batch"),
    out_of_domain: str = typer.Option(None, help="skip | warn: an image the bundle's domain guard rejects is "
                                                 "skipped, or explained with a caution (default: config "
                                                 "trust.out_of_domain, else warn)"),
    config: Path = typer.Option(None, help="YAML config (default: config/medxplain.yaml)"),
) -> None:
    """Explain radiographs; writes SC overlays, SEG, counterfactual SC and the SR per image."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from config import load_config
    from pipeline.engine import Engine
    from pipeline.runner import expand_inputs, explain_paths

    overrides = {"bundle": bundle, "device": device, "batch_size": batch_size,
                 "explainers": explainers.split(",") if explainers else None}
    cfg = _load(load_config, config, overrides)
    if out_of_domain not in (None, "skip", "warn"):
        console.print(f"[red]--out-of-domain must be skip or warn, got {out_of_domain!r}[/]")
        raise typer.Exit(2)
    if out_of_domain or cfg.trust.out_of_domain is None:
        # Here a person asked for these files: unless told otherwise, explain with the caution.
        cfg = cfg.model_copy(update={"trust": cfg.trust.model_copy(update={"out_of_domain": out_of_domain or "warn"})})
    files = expand_inputs(paths)
    if not files:
        console.print("[red]no input files found[/]")
        raise typer.Exit(2)
    from explainers.bundle import BundleError

    try:
        with console.status("loading bundle and models"):
            engine = Engine(cfg)
    except (BundleError, KeyError, RuntimeError) as exc:
        # Setup errors (bundle, explainer names, device) stop before any file is touched.
        console.print(f"[red]cannot start:[/] {exc.args[0] if isinstance(exc, KeyError) else exc}")
        raise typer.Exit(2)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("explaining", total=len(files))
        outcomes = explain_paths(engine, files, out, on_file=lambda _: progress.advance(bar))

    table = Table(title=f"medxplain — bundle {engine.bundle.spec.name} on {engine.device}",
                  caption="times are per image: its own preprocessing and writing plus an equal share of its "
                          "batch's model time (--batch-size 1 for fully separate times)")
    for column in ("file", "P(" + engine.bundle.spec.task.positive_label + ")", "decision",
                   *cfg.explainers, "total", "outputs"):
        table.add_column(column)
    failed = 0
    for o in outcomes:
        if o.ok and o.skipped:
            r = o.result
            table.add_row(o.path.name, f"{r.probability:.3f}", "[yellow]not explained[/]",
                          *["—"] * len(cfg.explainers), "—", f"[yellow]{o.skipped}[/]")
        elif o.ok:
            r = o.result
            cells = [f"{m.milliseconds / 1000:.2f} s" + ("" if m.flipped is None else
                                                         (" flipped" if m.flipped else " did not flip"))
                     for m in r.methods]
            decision = r.decision + "".join(f"\n[yellow]{c}[/]" for c in r.cautions)
            table.add_row(o.path.name, f"{r.probability:.3f}", decision, *cells,
                          f"{r.milliseconds / 1000:.2f} s", f"{o.folder} ({len(o.written)} files)")
        else:
            failed += 1
            table.add_row(o.path.name, "—", "[red]failed[/]", *["—"] * len(cfg.explainers), "—",
                          f"[red]{o.error}[/]")
    console.print(table)
    for o in outcomes:  # the reader's decisions on doubtful headers (codes; details in the log)
        notes = sorted({w.split(":", 1)[0] for w in (o.result.source.warnings if o.ok else ())})
        if notes:
            console.print(f"[yellow]{o.path.name}[/]: {', '.join(notes)}")
    if failed:
        console.print(f"[red]{failed} of {len(outcomes)} files failed[/]")
        raise typer.Exit(1)


@app.command("verify")
def verify_command(
    paths: list[Path] = typer.Argument(..., help="output folders or files of `medxplain explain` (SR + SCs)"),
    bundle: Path = typer.Option(None, help="model bundle folder (default: config 'bundle')"),
    tolerance: float = typer.Option(0.02, help="largest accepted |P(SC re-classified) - P(SR)|"),
    config: Path = typer.Option(None, help="YAML config (default: config/medxplain.yaml)"),
) -> None:
    """Re-classify every written counterfactual SC and check it against what its SR reports."""
    from rich.table import Table

    from config import load_config
    from explainers.bundle import Bundle, BundleError
    from pipeline.verify import VerifyError, verify_outputs

    cfg = _load(load_config, config, {"bundle": bundle})
    try:
        checks = verify_outputs(paths, Bundle.load(cfg.bundle_path()))
    except (BundleError, VerifyError) as exc:
        console.print(f"[red]cannot verify:[/] {exc}")
        raise typer.Exit(2)
    table = Table(title=f"counterfactual re-verification (tolerance {tolerance})")
    for column in ("report", "method", "P(SR)", "P(SC re-classified)", "flipped (SR)", "flipped (SC)", "agrees"):
        table.add_column(column)
    bad = 0
    for c in checks:
        ok = c.agrees(tolerance)
        bad += not ok
        table.add_row(f"{c.report.parent.name}/{c.report.name}", c.method, f"{c.sr_counterfactual_probability:.3f}",
                      c.reason or f"{c.reclassified:.3f}", str(c.sr_flipped), str(c.flipped),
                      "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(table)
    console.print(f"{len(checks) - bad} of {len(checks)} counterfactuals agree with their SR")
    if bad:
        raise typer.Exit(1)


@app.command("info")
def info_command(bundle: Path = typer.Argument(..., help="bundle folder")) -> None:
    """Show what a bundle holds and verify every weights file against its sha256."""
    from rich.table import Table

    from explainers.base import available, explainer_class
    from explainers.bundle import Bundle, BundleError

    try:
        loaded = Bundle.load(bundle, verify=False)
        verified = loaded.verify()
    except BundleError as exc:
        console.print(f"[red]bundle check failed:[/] {exc}")
        raise typer.Exit(1)
    s = loaded.spec
    console.print(f"[bold]{s.name}[/] {s.version} — {s.description}")
    console.print(f"bundle.yaml sha256 {loaded.sha256}")
    console.print(f"task: {s.task.positive_label} vs {s.task.negative_label}, threshold {s.task.threshold:.4f}; "
                  f"input {s.input.size[0]}x{s.input.size[1]} ({s.input.aspect})")
    console.print(f"classifier: {s.classifier.architecture or s.classifier.format} {s.classifier.parameters}")
    for key, value in s.metrics.items():
        console.print(f"{key}: {_metric_summary(value)}")
    table = Table(title="weights (sha256 verified)")
    table.add_column("part")
    table.add_column("file")
    table.add_column("sha256")
    for name, ref in loaded.weight_refs().items():
        table.add_row(name, ref.file, ref.sha256[:16] + "…  [green]ok[/]" if name in verified else "")
    console.print(table)
    # Baselines need nothing but the classifier; generative methods need their trained networks.
    sections = {m: explainer_class(m).bundle_section for m in available()}
    ready = ([m for m, section in sections.items() if section is None]
             + [m for m, section in sections.items() if section is not None and section in s.explainers])
    missing = sorted(set(available()) - set(ready))
    console.print("explainers available with this bundle: " + ", ".join(ready))
    if missing:
        console.print("not trained for this bundle (medxplain train METHOD): " + ", ".join(missing))


def _metric_summary(value: Any) -> str:
    """One line for a bundle.yaml ``metrics`` entry: a split's figures, the shortcut
    sensitivity (median |dP| on uncertain images per overlay) or the version history."""
    if isinstance(value, list):  # history: earlier versions of the classifier
        return "; ".join(f"{v.get('name')} {v.get('version', '')} test AUROC {v.get('test_auroc')}"
                         if isinstance(v, dict) else str(v) for v in value)
    if isinstance(value, dict) and isinstance(value.get("overlays"), dict):
        return ", ".join(f"{name} median |dP| (uncertain) {o.get('median_uncertain')}"
                         for name, o in value["overlays"].items())
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    return str(value)


def _load(loader, path, overrides):
    from config import ConfigError

    try:
        return loader(path, overrides)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2)


# PACS commands (worker and jobs, orthanc, serve-dicom) live in their own modules.
from pipeline.cli import benchmark, dicom_node, orthanc, worker  # noqa: E402

for _module in (worker, orthanc, dicom_node, benchmark):
    _module.register(app)
