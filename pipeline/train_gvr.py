"""`medxplain train gvr`: a bundle + a data folder -> the bundle with a trained
autoencoder for generative visual rationales (weights, explainer parameters and
the search budget in bundle.yaml, per-epoch log)."""
from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from explainers.bundle import Bundle, ExplainerSpec, save_weights
from explainers.gvr import DEFAULT_LATENT_CHANNELS, DEFAULT_WIDTHS, GvrAutoEncoder, GvrExplainer
from explainers.train_gvr import GvrTrainingConfig, evaluate_gvr, train_gvr
from pipeline.explainer_training import add_explainer, rounded_metrics, seeded_subset, training_splits

WEIGHTS_FILE = "gvr_autoencoder.safetensors"
LOG_FILE = "gvr_training_log.csv"
DEFAULT_SIZE = 64  # autoencoder working side; its change is upsampled to the bundle's input size
VALIDATION_EXPLAINED = 128  # validation images the explainer is scored on (a seeded subset: it is per-image search)
EVALUATION_BATCH = 32

# The explainer's defaults as written to bundle.yaml (editable there without retraining).
DEFAULT_PARAMETERS: dict[str, Any] = {
    "mode": "optimise", "steps": 5, "search_steps": 60, "learning_rate": 0.1, "tolerance": 1e-3, "patience": 10,
    "margin": 1.0, "similarity_weight": 2.0, "max_shift": 3.0, "smoothing_sigma": 4.0,
}


def train_gvr_bundle(
    *, bundle: Path, data: Path, epochs: int = 30, size: int | None = DEFAULT_SIZE,
    widths: tuple[int, ...] = DEFAULT_WIDTHS, latent_channels: int = DEFAULT_LATENT_CHANNELS, batch_size: int = 16,
    seed: int = 0, device: str = "cpu", max_images: int | None = None, explainer: dict[str, Any] | None = None,
) -> Bundle:
    started = time.perf_counter()
    target = Bundle.load(bundle)
    spec = target.spec
    side = max(spec.input.size)
    if size is not None and size >= side:
        size = None  # work at the input size itself
    parameters = {**DEFAULT_PARAMETERS, **(explainer or {})}
    splits = training_splits(target, data, max_images=max_images, seed=seed)

    torch.manual_seed(seed)
    autoencoder = GvrAutoEncoder(widths=widths, latent_channels=latent_channels, size=size,
                                 in_channels=spec.input.channels)
    GvrExplainer(autoencoder=autoencoder, threshold=spec.task.threshold, **parameters)  # refuse bad settings early
    config = GvrTrainingConfig(epochs=epochs, batch_size=batch_size, seed=seed, device=device)
    steps = (len(splits["train"].labels) + batch_size - 1) // batch_size

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("L1 {task.fields[l1]:.4f} MSE {task.fields[mse]:.5f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train gvr", total=epochs * steps, l1=float("nan"), mse=float("nan"))

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=epoch * steps + step, description=f"epoch {epoch + 1}/{epochs}",
                            l1=losses["l1"], mse=losses["mse"])

        def on_epoch(row: dict[str, float]) -> None:
            progress.console.print(
                f"epoch {int(row['epoch']) + 1}/{epochs}: train L1 {row['l1']:.4f}, MSE {row['mse']:.5f}, "
                f"val reconstruction L1 {row['val_reconstruction_l1']:.4f}, "
                f"MSE {row['val_reconstruction_mse']:.5f}, {row['seconds']:.0f} s")

        result = train_gvr(autoencoder, splits["train"].images, splits["val"].images, config,
                           target.root / ".checkpoints" / "gvr", log_path=target.root / LOG_FILE,
                           on_step=on_step, on_epoch=on_epoch)

    classifier = target.load_classifier(device=device)
    explain = GvrExplainer(autoencoder=autoencoder, threshold=spec.task.threshold, **parameters)
    validation_images = seeded_subset(splits["val"], VALIDATION_EXPLAINED, seed).images
    validation = {**result.validation,
                  **evaluate_gvr(explain, classifier, validation_images, batch_size=EVALUATION_BATCH, device=device)}
    test = evaluate_gvr(explain, classifier, splits["test"].images, batch_size=EVALUATION_BATCH, device=device)
    ref = save_weights(autoencoder, target.root / WEIGHTS_FILE)
    section = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters={
            "architecture": "medxplain.GvrAutoEncoder (MONAI residual units, spatial latent, sigmoid output)",
            "network": autoencoder.config(),
            **parameters,
        },
        weights={"autoencoder": ref},
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "best_epoch": result.best_epoch,
            "selection": "lowest validation reconstruction L1",
            "loss": f"L1 + {config.mse_weight} * MSE reconstruction at the working size (no labels, no classifier)",
            "optimiser": {"name": "Adam", "learning_rate": config.learning_rate, "betas": list(config.betas)},
            "augmentation": {"rotate_rad": config.rotate, "scale": config.scale, "translate_px": config.translate},
            "data": {"source": data.name, "max_images": max_images,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
            "validation": rounded_metrics(validation), "test": rounded_metrics(test),
            "evaluation": f"explainer with the parameters above, batches of {EVALUATION_BATCH}; validation on a "
                          f"seeded subset of {min(VALIDATION_EXPLAINED, len(splits['val'].labels))} images",
            "wall_time_s": round(time.perf_counter() - started, 1), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "log": LOG_FILE,
        },
    )
    return add_explainer(target.root, "gvr", section)
