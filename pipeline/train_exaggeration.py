"""`medxplain train exaggeration`: a bundle + a data folder -> the bundle with a trained
conditional generator for progressive exaggeration (weights, settings, per-epoch log)."""
from __future__ import annotations

import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from explainers.bundle import Bundle, ExplainerSpec, save_weights
from explainers.exaggeration import DEFAULT_BINS, DEFAULT_WIDTHS, ConditionalGenerator, ProjectionCritic
from explainers.train_exaggeration import (
    ExaggerationTrainingConfig,
    evaluate_exaggeration,
    train_exaggeration,
)
from pipeline.explainer_training import add_explainer, rounded_metrics, training_splits

WEIGHTS_FILE = "exaggeration_generator.safetensors"
LOG_FILE = "exaggeration_training_log.csv"
DEFAULT_SIZE = 64  # generator working side; the residual is upsampled to the bundle's input size
DEFAULT_STEPS = 10  # images on the counterfactual path (the paper's K = 10 bins)


def train_exaggeration_bundle(
    *, bundle: Path, data: Path, epochs: int = 8, size: int | None = DEFAULT_SIZE,
    widths: tuple[int, ...] = DEFAULT_WIDTHS, bins: int = DEFAULT_BINS, batch_size: int = 16, seed: int = 0,
    device: str = "cpu", max_images: int | None = None,
) -> Bundle:
    started = time.perf_counter()
    target = Bundle.load(bundle)
    spec = target.spec
    side = max(spec.input.size)
    if size is not None and size >= side:
        size = None  # work at the input size itself
    splits = training_splits(target, data, max_images=max_images, seed=seed)
    classifier = target.load_classifier(device=device)

    torch.manual_seed(seed)
    generator = ConditionalGenerator(widths=widths, bins=bins, size=size, in_channels=spec.input.channels)
    discriminator = ProjectionCritic(bins=bins, in_channels=spec.input.channels)
    config = ExaggerationTrainingConfig(epochs=epochs, batch_size=batch_size, threshold=spec.task.threshold,
                                        seed=seed, device=device)
    steps = (len(splits["train"].labels) + batch_size - 1) // batch_size

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("G {task.fields[g]:.3f} D {task.fields[d]:.3f} tracking {task.fields[mae]:.3f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train exaggeration", total=epochs * steps, g=float("nan"), d=float("nan"),
                                mae=float("nan"))

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=epoch * steps + step, description=f"epoch {epoch + 1}/{epochs}",
                            g=losses["loss_g"], d=losses["loss_d"], mae=losses["train_tracking_mae"])

        def on_epoch(row: dict[str, float]) -> None:
            progress.console.print(
                f"epoch {int(row['epoch']) + 1}/{epochs}: G {row['loss_g']:.4f}, D {row['loss_d']:.4f}, "
                f"val flip rate {row['val_flip_rate']:.3f} (called positive "
                f"{row['val_flip_rate_called_positive']:.3f}, negative {row['val_flip_rate_called_negative']:.3f}), "
                f"tracking MAE {row['val_posterior_tracking_mae']:.3f}, L1 end {row['val_proximity_l1']:.4f}, "
                f"L1 start {row['val_reconstruction_l1']:.4f}, {row['seconds']:.0f} s")

        result = train_exaggeration(
            generator, classifier, splits["train"].images, splits["val"].images, config,
            target.root / ".checkpoints" / "exaggeration", discriminator=discriminator,
            log_path=target.root / LOG_FILE, on_step=on_step, on_epoch=on_epoch,
        )

    test = evaluate_exaggeration(generator, classifier, splits["test"].images, spec.task.threshold, device=device)
    ref = save_weights(generator, target.root / WEIGHTS_FILE)
    explainer = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters={
            "architecture": "medxplain.ConditionalGenerator (U-Net, conditional instance norm on the posterior "
                            "bin, residual output)",
            "network": generator.config(),
            "steps": DEFAULT_STEPS,
            "smoothing_sigma": 2.0,
            "loss_weights": asdict(config.weights),
        },
        weights={"generator": ref},
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "best_epoch": result.best_epoch,
            "selection": "highest validation flip rate of the sweep's end; ties: lowest posterior tracking error",
            "optimiser": {"name": "Adam", "learning_rate": config.learning_rate,
                          "discriminator_learning_rate": config.discriminator_learning_rate,
                          "betas": list(config.betas)},
            "discriminator": "projection discriminator with ordinal bin embedding, spectral norm, hinge loss",
            "augmentation": {"rotate_rad": config.rotate, "scale": config.scale, "translate_px": config.translate},
            "targets": "requested posterior bins drawn uniformly; reconstruction at the bin of the classifier's "
                       "own posterior (not the labels)",
            "data": {"source": data.name, "max_images": max_images,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
            "validation": rounded_metrics(result.validation), "test": rounded_metrics(test),
            "wall_time_s": round(time.perf_counter() - started, 1), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "log": LOG_FILE,
        },
    )
    return add_explainer(target.root, "exaggeration", explainer)
