"""The `medxplain` command line."""
from __future__ import annotations

from pathlib import Path

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
) -> None:
    """Train a binary classifier and write a bundle with a model card."""
    from pipeline.train import train_classifier_bundle

    bundle = train_classifier_bundle(data=data, out=out, name=name or out.name, task=task, size=size,
                                     epochs=epochs, batch_size=batch_size, seed=seed, device=device)
    test = bundle.spec.metrics["test"]
    console.print(f"[green]wrote[/] {bundle.root} — test AUROC {test['auroc']:.4f}, accuracy {test['accuracy']:.4f}, "
                  f"sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}")


@train_app.command("sagen")
def train_sagen_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier is explained (generator added to it)"),
    data: Path = typer.Option(..., help="folder with manifest.csv (path, split, label, source_patient_token)"),
    epochs: int = typer.Option(10, help="total epochs; a checkpoint in <bundle>/.checkpoints/sagen is resumed"),
    size: int = typer.Option(64, help="side the generator works at (multiple of 16); its change is upsampled "
                                      "to the bundle's input size"),
    width: int = typer.Option(16, help="U-Net base width: features (w, 2w, 4w, 8w, 16w, w)"),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_images: int = typer.Option(None, help="use at most N images per split (smoke tests)"),
    proximity: float = typer.Option(2.0, help="weight of L1(A(x), x): higher keeps the counterfactual closer "
                                              "to the input, lower flips more decisions"),
    margin: float = typer.Option(1.0, help="logits by which the adversarial image must cross the threshold"),
) -> None:
    """Train the similar/adversarial generator (sagen) against a bundle's classifier."""
    from explainers.bundle import BundleError
    from pipeline.datasets import DatasetError
    from explainers.train_sagen import SagenLossWeights
    from pipeline.train_sagen import train_sagen_bundle

    try:
        result = train_sagen_bundle(bundle=bundle, data=data, epochs=epochs, size=size,
                                    features=(width, 2 * width, 4 * width, 8 * width, 16 * width, width),
                                    batch_size=batch_size, seed=seed, device=device, max_images=max_images,
                                    weights=SagenLossWeights(proximity=proximity), margin=margin)
    except (BundleError, DatasetError, ValueError) as exc:
        console.print(f"[red]cannot train sagen:[/] {exc}")
        raise typer.Exit(2)
    training = result.spec.explainers["sagen"].training
    test = training["test"]
    console.print(f"[green]wrote[/] {result.root / result.spec.explainers['sagen'].weights['generator'].file} — "
                  f"test flip rate {test['flip_rate']:.3f}, similar kept {test['similar_kept_rate']:.3f}, "
                  f"L1 |A-x| {test['proximity_l1']:.4f} (best epoch {training['best_epoch'] + 1})")


@train_app.command("exaggeration")
def train_exaggeration_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier is explained (generator added to it)"),
    data: Path = typer.Option(..., help="folder with manifest.csv (path, split, label, source_patient_token)"),
    epochs: int = typer.Option(8, help="total epochs; a checkpoint in <bundle>/.checkpoints/exaggeration is resumed"),
    size: int = typer.Option(64, help="side the generator works at (multiple of 8); its change is upsampled "
                                      "to the bundle's input size"),
    width: int = typer.Option(16, help="U-Net base width: widths (w, 2w, 4w, 8w)"),
    bins: int = typer.Option(10, help="posterior bins K the generator is conditioned on"),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_images: int = typer.Option(None, help="use at most N images per split (smoke tests)"),
) -> None:
    """Train the progressive-exaggeration generator (Singla et al.) against a bundle's classifier."""
    from explainers.bundle import BundleError
    from pipeline.datasets import DatasetError
    from pipeline.train_exaggeration import train_exaggeration_bundle

    try:
        result = train_exaggeration_bundle(bundle=bundle, data=data, epochs=epochs, size=size,
                                           widths=(width, 2 * width, 4 * width, 8 * width), bins=bins,
                                           batch_size=batch_size, seed=seed, device=device, max_images=max_images)
    except (BundleError, DatasetError, ValueError) as exc:
        console.print(f"[red]cannot train exaggeration:[/] {exc}")
        raise typer.Exit(2)
    spec = result.spec.explainers["exaggeration"]
    test = spec.training["test"]
    console.print(f"[green]wrote[/] {result.root / spec.weights['generator'].file} — "
                  f"test flip rate {test['flip_rate']:.3f}, "
                  f"posterior tracking MAE {test['posterior_tracking_mae']:.3f}, "
                  f"L1 {test['proximity_l1']:.4f} (best epoch {spec.training['best_epoch'] + 1})")


@train_app.command("cia")
def train_cia_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier is explained (inpainters added to it)"),
    data: Path = typer.Option(..., help="folder with manifest.csv (path, split, label, source_patient_token)"),
    epochs: int = typer.Option(8, help="total epochs; a checkpoint in <bundle>/.checkpoints/cia is resumed (a "
                                       "finished one only re-evaluates, e.g. with other search settings)"),
    size: int = typer.Option(64, help="side the inpainters work at (multiple of 16); the fill is upsampled "
                                      "to the bundle's input size"),
    width: int = typer.Option(16, help="U-Net base width: features (w, 2w, 4w, 8w, 16w, w)"),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_images: int = typer.Option(None, help="use at most N images per split (smoke tests)"),
    search_steps: int = typer.Option(60, help="per-image mask search: at most this many Adam steps"),
    margin: float = typer.Option(1.0, help="logits by which the counterfactual must cross the threshold"),
    area_weight: float = typer.Option(1.0, help="lambda1: weight of the mask's mean area"),
    tv_weight: float = typer.Option(3.0, help="lambda2: weight of the mask's total variation"),
) -> None:
    """Train the inpainters of counterfactual impact analysis (cia) and evaluate the mask search."""
    from explainers.bundle import BundleError
    from pipeline.datasets import DatasetError
    from pipeline.train_cia import CiaSearch, train_cia_bundle

    try:
        result = train_cia_bundle(bundle=bundle, data=data, epochs=epochs, size=size,
                                  features=(width, 2 * width, 4 * width, 8 * width, 16 * width, width),
                                  batch_size=batch_size, seed=seed, device=device, max_images=max_images,
                                  search=CiaSearch(search_steps=search_steps, margin=margin,
                                                   area_weight=area_weight, tv_weight=tv_weight))
    except (BundleError, DatasetError, ValueError) as exc:
        console.print(f"[red]cannot train cia:[/] {exc}")
        raise typer.Exit(2)
    spec = result.spec.explainers["cia"]
    test = spec.training["test"]
    console.print(f"[green]wrote[/] {', '.join(str(result.root / r.file) for r in spec.weights.values())} — "
                  f"test flip rate {test['flip_rate']:.3f} (called positive {test['flip_rate_called_positive']}, "
                  f"negative {test['flip_rate_called_negative']}), L1 {test['proximity_l1']:.4f}, "
                  f"SSIM {test['proximity_ssim']:.3f}, {test['steps_used']:.1f} steps, "
                  f"{test['ms_per_image']:.0f} ms/image (best epoch {spec.training['best_epoch'] + 1})")


@train_app.command("gvr")
def train_gvr_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier is explained (autoencoder added to it)"),
    data: Path = typer.Option(..., help="folder with manifest.csv (path, split, label, source_patient_token)"),
    epochs: int = typer.Option(30, help="total epochs; a checkpoint in <bundle>/.checkpoints/gvr is resumed"),
    size: int = typer.Option(64, help="side the autoencoder works at (multiple of 8); its change is upsampled "
                                      "to the bundle's input size"),
    width: int = typer.Option(32, help="encoder base width: widths (w, 2w, 4w)"),
    latent_channels: int = typer.Option(16, help="channels of the (size/8 x size/8) latent"),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_images: int = typer.Option(None, help="use at most N images per split (smoke tests)"),
    search_steps: int = typer.Option(60, help="per-image Adam steps at most when explaining (stored in bundle.yaml)"),
    similarity: float = typer.Option(2.0, help="weight of mean |D(z) - D(z0)|: higher keeps the rationale smaller, "
                                               "lower flips more decisions"),
    margin: float = typer.Option(1.0, help="logits by which the counterfactual must cross the threshold"),
) -> None:
    """Train the autoencoder of generative visual rationales (gvr, Seah et al.) for a bundle's classifier."""
    from explainers.bundle import BundleError
    from pipeline.datasets import DatasetError
    from pipeline.train_gvr import train_gvr_bundle

    try:
        result = train_gvr_bundle(bundle=bundle, data=data, epochs=epochs, size=size,
                                  widths=(width, 2 * width, 4 * width), latent_channels=latent_channels,
                                  batch_size=batch_size, seed=seed, device=device, max_images=max_images,
                                  explainer={"search_steps": search_steps, "similarity_weight": similarity,
                                             "margin": margin})
    except (BundleError, DatasetError, ValueError) as exc:
        console.print(f"[red]cannot train gvr:[/] {exc}")
        raise typer.Exit(2)
    spec = result.spec.explainers["gvr"]
    test = spec.training["test"]
    console.print(f"[green]wrote[/] {result.root / spec.weights['autoencoder'].file} — "
                  f"test flip rate {test['flip_rate']:.3f}, L1 {test['proximity_l1']:.4f}, "
                  f"reconstruction L1 {test['reconstruction_l1']:.4f}, {test['ms_per_image']:.0f} ms/image "
                  f"(best epoch {spec.training['best_epoch'] + 1})")


@train_app.command("medxgan")
def train_medxgan_command(
    bundle: Path = typer.Option(..., help="bundle folder whose classifier is explained (networks added to it)"),
    data: Path = typer.Option(..., help="folder with manifest.csv (path, split, label, source_patient_token)"),
    epochs: int = typer.Option(10, help="total epochs; a checkpoint in <bundle>/.checkpoints/medxgan is resumed"),
    size: int = typer.Option(64, help="side of the generated images (multiple of 16); their change is upsampled "
                                      "to the bundle's input size"),
    width: int = typer.Option(16, help="generator widths (8w, 4w, 2w, w); the encoder mirrors them"),
    anatomy_dim: int = typer.Option(64, help="size of the anatomy code z1"),
    pathology_dim: int = typer.Option(16, help="size of the pathology code z2"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_images: int = typer.Option(None, help="use at most N images per split (smoke tests)"),
    margin: float = typer.Option(1.0, help="logits by which generated images must sit on their class's side"),
) -> None:
    """Train the medXGAN generator and its inversion encoder against a bundle's classifier."""
    from explainers.bundle import BundleError
    from pipeline.datasets import DatasetError
    from pipeline.train_medxgan import train_medxgan_bundle

    try:
        result = train_medxgan_bundle(bundle=bundle, data=data, epochs=epochs, size=size,
                                      widths=(8 * width, 4 * width, 2 * width, width), anatomy_dim=anatomy_dim,
                                      pathology_dim=pathology_dim, batch_size=batch_size, seed=seed, device=device,
                                      max_images=max_images, margin=margin)
    except (BundleError, DatasetError, ValueError) as exc:
        console.print(f"[red]cannot train medxgan:[/] {exc}")
        raise typer.Exit(2)
    spec = result.spec.explainers["medxgan"]
    test = spec.training["test"]
    console.print(f"[green]wrote[/] {result.root / spec.weights['generator'].file} and "
                  f"{spec.weights['encoder'].file} — test flip rate {test['flip_rate']:.3f}, "
                  f"inversion L1 {test['inversion_l1']:.4f}, L1 {test['proximity_l1']:.4f}, "
                  f"{test['ms_per_image']:.0f} ms/image (best epoch {spec.training['best_epoch'] + 1})")


@app.command("explain")
def explain_command(
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="output folder: one sub-folder of DICOM objects per image"),
    bundle: Path = typer.Option(None, help="model bundle folder (default: config 'bundle')"),
    explainers: str = typer.Option(None, help="comma-separated methods, e.g. gradcam,ig,occlusion"),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
    batch_size: int = typer.Option(None, help="images per batch"),
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
        if o.ok:
            r = o.result
            cells = [f"{m.milliseconds / 1000:.2f} s" + ("" if m.flipped is None else
                                                         (" flipped" if m.flipped else " NOT flipped"))
                     for m in r.methods]
            table.add_row(o.path.name, f"{r.probability:.3f}", r.decision, *cells,
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
    for split, m in s.metrics.items():
        console.print(f"{split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in m.items()))
    table = Table(title="weights (sha256 verified)")
    table.add_column("part")
    table.add_column("file")
    table.add_column("sha256")
    for name, ref in loaded.weight_refs().items():
        table.add_row(name, ref.file, ref.sha256[:16] + "…  [green]ok[/]" if name in verified else "")
    console.print(table)
    import pipeline.engine  # noqa: F401  (registers every explainer)

    # Baselines need nothing but the classifier; generative methods need their trained networks.
    sections = {m: explainer_class(m).bundle_section for m in available()}
    ready = ([m for m, section in sections.items() if section is None]
             + [m for m, section in sections.items() if section is not None and section in s.explainers])
    missing = sorted(set(available()) - set(ready))
    console.print("explainers available with this bundle: " + ", ".join(ready))
    if missing:
        console.print("not trained for this bundle (medxplain train METHOD): " + ", ".join(missing))


def _load(loader, path, overrides):
    from config import ConfigError

    try:
        return loader(path, overrides)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2)


# PACS commands (worker and jobs, orthanc, serve-dicom) live in their own modules.
from pipeline import benchmark_cli, dicom_node_cli, orthanc_cli, worker_cli  # noqa: E402

for _module in (worker_cli, orthanc_cli, dicom_node_cli, benchmark_cli):
    _module.register(app)

if __name__ == "__main__":
    app()
