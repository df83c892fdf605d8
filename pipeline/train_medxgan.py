"""`medxplain train medxgan`: a bundle + a data folder -> the bundle with a trained
medXGAN generator and its inversion encoder (weights, settings in bundle.yaml, log)."""
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
from explainers.medxgan import ANATOMY_DIM, DEFAULT_WIDTHS, PATHOLOGY_DIM, MedxganEncoder, MedxganExplainer, \
    MedxganGenerator
from explainers.sagen import PatchCritic
from explainers.train_medxgan import MedxganTrainingConfig, evaluate_medxgan, train_medxgan
from pipeline.explainer_training import add_explainer, rounded_metrics, training_splits

GENERATOR_FILE = "medxgan_generator.safetensors"
ENCODER_FILE = "medxgan_encoder.safetensors"
LOG_FILE = "medxgan_training_log.csv"
DEFAULT_SIZE = 64  # generator side; its change is upsampled to the bundle's input size
# Explanation settings stored with the weights (bundle.yaml parameters; config may override).
EXPLAINER_DEFAULTS = {"inversion": "encoder", "inversion_steps": 30, "official_steps": 5000,
                      "learning_rate": 0.02, "tolerance": 1e-3, "patience": 10, "probability_weight": 0.1,
                      "negative_scale": 1.0, "steps": 8, "ig_steps": 32, "smoothing_sigma": 2.0}


def train_medxgan_bundle(
    *, bundle: Path, data: Path, epochs: int = 10, size: int = DEFAULT_SIZE,
    widths: tuple[int, ...] = DEFAULT_WIDTHS, anatomy_dim: int = ANATOMY_DIM, pathology_dim: int = PATHOLOGY_DIM,
    batch_size: int = 32, seed: int = 0, device: str = "cpu", max_images: int | None = None, margin: float = 1.0,
) -> Bundle:
    started = time.perf_counter()
    target = Bundle.load(bundle)
    spec = target.spec
    splits = training_splits(target, data, max_images=max_images, seed=seed)
    classifier = target.load_classifier(device=device)

    torch.manual_seed(seed)
    channels = spec.input.channels
    generator = MedxganGenerator(anatomy_dim=anatomy_dim, pathology_dim=pathology_dim, widths=widths, size=size,
                                 in_channels=channels)
    encoder = MedxganEncoder(latent_dim=generator.latent_dim, widths=tuple(reversed(widths)), size=size,
                             in_channels=channels)
    discriminator = PatchCritic(in_channels=channels)
    config = MedxganTrainingConfig(epochs=epochs, batch_size=batch_size, threshold=spec.task.threshold,
                                   margin=margin, seed=seed, device=device)
    explainer_parameters = {k: v for k, v in EXPLAINER_DEFAULTS.items() if k != "ig_steps"}
    steps = (len(splits["train"].labels) + batch_size - 1) // batch_size

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("G {task.fields[g]:.3f} D {task.fields[d]:.3f} E {task.fields[e]:.3f} "
                             "class {task.fields[rate]:.2f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train medxgan", total=epochs * steps, g=float("nan"), d=float("nan"),
                                e=float("nan"), rate=float("nan"))

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=epoch * steps + step, description=f"epoch {epoch + 1}/{epochs}",
                            g=losses["loss_g"], d=losses["loss_d"], e=losses["loss_e"],
                            rate=losses["train_class_rate"])

        def on_epoch(row: dict[str, float]) -> None:
            progress.console.print(
                f"epoch {int(row['epoch']) + 1}/{epochs}: G {row['loss_g']:.4f}, D {row['loss_d']:.4f}, "
                f"E {row['loss_e']:.4f}, generated on the asked side {row['train_class_rate']:.3f}, "
                f"val flip rate {row['val_flip_rate']:.3f} (called positive "
                f"{row['val_flip_rate_called_positive']:.3f}, negative {row['val_flip_rate_called_negative']:.3f}), "
                f"inversion L1 {row['val_inversion_l1']:.4f}, L1 {row['val_proximity_l1']:.4f}, "
                f"{row['seconds']:.0f} s")

        result = train_medxgan(
            generator, encoder, classifier, splits["train"].images, splits["val"].images, config,
            target.root / ".checkpoints" / "medxgan", discriminator=discriminator,
            explainer_parameters=explainer_parameters, log_path=target.root / LOG_FILE,
            on_step=on_step, on_epoch=on_epoch,
        )

    explainer = MedxganExplainer(generator=generator, encoder=encoder, threshold=spec.task.threshold,
                                 **explainer_parameters)
    test = evaluate_medxgan(explainer, classifier, splits["test"].images, device=device)
    weights = {"generator": save_weights(generator, target.root / GENERATOR_FILE),
               "encoder": save_weights(encoder, target.root / ENCODER_FILE)}
    section = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters={
            "architecture": "medxplain.MedxganGenerator (MONAI Generator, instance norm, sigmoid) + "
                            "MedxganEncoder (MONAI Regressor)",
            "network": generator.config(),
            "encoder_network": encoder.config(),
            **EXPLAINER_DEFAULTS,
            "loss_weights": asdict(config.weights),
            "margin_logits": config.margin,
        },
        weights=weights,
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "best_epoch": result.best_epoch,
            "selection": f"highest flip rate of the explainer on a seeded sample of {config.validation_images} "
                         "validation images; ties: lowest inversion L1",
            "optimiser": {"name": "Adam", "learning_rate": config.learning_rate,
                          "discriminator_learning_rate": config.discriminator_learning_rate,
                          "betas": list(config.betas)},
            "discriminator": "MONAI PatchDiscriminator, 32 channels, 3 layers, instance norm, hinge loss",
            "augmentation": {"rotate_rad": config.rotate, "scale": config.scale, "translate_px": config.translate},
            "targets": "class drawn 50/50 per generated sample: z2 = 0 -> below the threshold by the margin, "
                       "z2 ~ N(0, I) -> above it (the classifier's decision, not the labels)",
            "data": {"source": data.name, "max_images": max_images,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
            "validation": rounded_metrics(result.validation), "test": rounded_metrics(test),
            "wall_time_s": round(time.perf_counter() - started, 1), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "log": LOG_FILE,
        },
    )
    return add_explainer(target.root, "medxgan", section)
