"""`medxplain train sagen`: a bundle + a data folder -> the bundle with a trained
similar/adversarial generator (weights, settings in bundle.yaml, per-epoch log)."""
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
from explainers.sagen import DEFAULT_FEATURES, PatchCritic, SagenGenerator
from explainers.train_sagen import SagenLossWeights, SagenTrainingConfig, evaluate_sagen, train_sagen
from pipeline.explainer_training import add_explainer, rounded_metrics, training_splits

WEIGHTS_FILE = "sagen_generator.safetensors"
LOG_FILE = "sagen_training_log.csv"
DEFAULT_SIZE = 64  # generator working side; the residual is upsampled to the bundle's input size


def train_sagen_bundle(
    *, bundle: Path, data: Path, epochs: int = 10, size: int | None = DEFAULT_SIZE,
    features: tuple[int, ...] = DEFAULT_FEATURES, batch_size: int = 16, seed: int = 0, device: str = "cpu",
    max_images: int | None = None, weights: SagenLossWeights | None = None, margin: float = 1.0,
) -> Bundle:
    started = time.perf_counter()
    target = Bundle.load(bundle)
    spec = target.spec
    side = max(spec.input.size)
    if size is not None and size >= side:
        size = None if side % 16 == 0 else size  # work at the input size itself
    splits = training_splits(target, data, max_images=max_images, seed=seed)
    classifier = target.load_classifier(device=device)

    torch.manual_seed(seed)
    generator = SagenGenerator(features=features, size=size, in_channels=spec.input.channels)
    discriminator = PatchCritic(in_channels=spec.input.channels)
    config = SagenTrainingConfig(epochs=epochs, batch_size=batch_size, threshold=spec.task.threshold,
                                 weights=weights or SagenLossWeights(), margin=margin, seed=seed,
                                 device=device)
    steps = (len(splits["train"].labels) + batch_size - 1) // batch_size

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("G {task.fields[g]:.3f} D {task.fields[d]:.3f} flip {task.fields[flip]:.2f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train sagen", total=epochs * steps, g=float("nan"), d=float("nan"),
                                flip=float("nan"))

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=epoch * steps + step, description=f"epoch {epoch + 1}/{epochs}",
                            g=losses["loss_g"], d=losses["loss_d"], flip=losses["train_flip_rate"])

        def on_epoch(row: dict[str, float]) -> None:
            progress.console.print(
                f"epoch {int(row['epoch']) + 1}/{epochs}: G {row['loss_g']:.4f}, D {row['loss_d']:.4f}, "
                f"val flip rate {row['val_flip_rate']:.3f} (called positive "
                f"{row['val_flip_rate_called_positive']:.3f}, negative {row['val_flip_rate_called_negative']:.3f}), "
                f"similar kept {row['val_similar_kept_rate']:.3f}, "
                f"L1 |A-x| {row['val_proximity_l1']:.4f}, |S-x| {row['val_similar_l1']:.4f}, "
                f"{row['seconds']:.0f} s")

        result = train_sagen(
            generator, classifier, splits["train"].images, splits["val"].images, config,
            target.root / ".checkpoints" / "sagen", discriminator=discriminator,
            log_path=target.root / LOG_FILE, on_step=on_step, on_epoch=on_epoch,
        )

    test = evaluate_sagen(generator, classifier, splits["test"].images, spec.task.threshold, device=device)
    ref = save_weights(generator, target.root / WEIGHTS_FILE)
    explainer = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters={
            "architecture": "medxplain.SagenGenerator (MONAI BasicUNet, two residual heads)",
            "network": generator.config(),
            "steps": 1,
            "smoothing_sigma": 2.0,
            "loss_weights": asdict(config.weights),
            "margin_logits": config.margin,
        },
        weights={"generator": ref},
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "best_epoch": result.best_epoch,
            "selection": "highest validation flip rate; ties: lowest |S-x| + |A-x|",
            "optimiser": {"name": "Adam", "learning_rate": config.learning_rate,
                          "discriminator_learning_rate": config.discriminator_learning_rate,
                          "betas": list(config.betas)},
            "discriminator": "MONAI PatchDiscriminator, 32 channels, 3 layers, instance norm, hinge loss",
            "augmentation": {"rotate_rad": config.rotate, "scale": config.scale, "translate_px": config.translate},
            "targets": "classifier's own thresholded predictions on the augmented input (not the labels)",
            "balance_classes": config.balance_classes,
            "called_positive_fraction": round(result.called_positive_fraction, 4),
            "data": {"source": data.name, "max_images": max_images,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
            "validation": rounded_metrics(result.validation), "test": rounded_metrics(test),
            "wall_time_s": round(time.perf_counter() - started, 1), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "log": LOG_FILE,
        },
    )
    return add_explainer(target.root, "sagen", explainer)
