"""The `medxplain` command line."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Counterfactual and saliency explanations for radiograph classifiers, inside the PACS.",
                  no_args_is_help=True)
train_app = typer.Typer(help="Train a classifier or an explainer into a bundle.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()


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


if __name__ == "__main__":
    app()
