"""`medxplain train cia`: a bundle + a data folder -> the bundle with the two trained
inpainters of cia (weights, search settings in bundle.yaml, per-epoch log).

Training needs no classifier; the classifier is used for the test-split evaluation
of the whole explainer (per-image mask search on every test image). Running the
command again after training has finished resumes the finished checkpoint and only
re-evaluates: that is how the search settings (margin, weights, budget) are tuned.
"""
from __future__ import annotations

import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from explainers.bundle import Bundle, ExplainerSpec, save_weights
from explainers.cia import DEFAULT_FEATURES, CiaExplainer, Inpainter
from explainers.train_cia import PARTS, CiaTrainingConfig, evaluate_cia, steps_per_epoch, train_cia
from pipeline.explainer_training import add_explainer, rounded_metrics, training_splits

LOG_FILE = "cia_training_log.csv"
DEFAULT_SIZE = 64  # inpainter working side; the fill is upsampled to the bundle's input size
EVAL_BATCH = 32


def weights_file(part: str) -> str:
    return f"cia_{part}.safetensors"


@dataclass
class CiaSearch:
    """The per-image search settings stored in bundle.yaml (CiaExplainer's defaults)."""

    steps: int = 1
    search_steps: int = 60
    learning_rate: float = 0.4
    tolerance: float = 1e-3
    patience: int = 10
    margin: float = 1.0
    area_weight: float = 1.0
    tv_weight: float = 3.0
    mask_size: int = 16
    initial_mask: float = 0.1


def train_cia_bundle(
    *, bundle: Path, data: Path, epochs: int = 8, size: int | None = DEFAULT_SIZE,
    features: tuple[int, ...] = DEFAULT_FEATURES, batch_size: int = 16, seed: int = 0, device: str = "cpu",
    max_images: int | None = None, search: CiaSearch | None = None,
) -> Bundle:
    started = time.perf_counter()
    target = Bundle.load(bundle)
    spec = target.spec
    search = search or CiaSearch()
    side = max(spec.input.size)
    if size is not None and size >= side:
        size = None if side % 16 == 0 else size  # work at the input size itself
    splits = training_splits(target, data, max_images=max_images, seed=seed)
    classifier = target.load_classifier(device=device)

    torch.manual_seed(seed)
    networks = {part: Inpainter(features=features, size=size, in_channels=spec.input.channels) for part in PARTS}
    config = CiaTrainingConfig(epochs=epochs, batch_size=batch_size, seed=seed, device=device)
    steps = steps_per_epoch(splits["train"].labels, batch_size)

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[part]} hole L1 {task.fields[hole]:.4f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train cia", total=epochs * steps, part="", hole=float("nan"))

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=epoch * steps + step, description=f"epoch {epoch + 1}/{epochs}",
                            part=PARTS[int(losses["part"])], hole=losses["hole_l1"])

        def on_epoch(row: dict[str, float]) -> None:
            progress.console.print(
                f"epoch {int(row['epoch']) + 1}/{epochs}: train hole L1 normal {row['fill_normal_hole_l1']:.4f}, "
                f"pneumonia {row['fill_pneumonia_hole_l1']:.4f}; val hole L1 normal "
                f"{row['val_fill_normal_hole_l1']:.4f}, pneumonia {row['val_fill_pneumonia_hole_l1']:.4f}, "
                f"{row['seconds']:.0f} s")

        result = train_cia(
            networks, splits["train"].images, splits["train"].labels, splits["val"].images, splits["val"].labels,
            config, target.root / ".checkpoints" / "cia", log_path=target.root / LOG_FILE,
            on_step=on_step, on_epoch=on_epoch,
        )

        explainer = CiaExplainer(fill_normal=networks["fill_normal"], fill_pneumonia=networks["fill_pneumonia"],
                                 threshold=spec.task.threshold, **asdict(search))
        test_images = splits["test"].images
        evaluation = progress.add_task("test: per-image mask search", total=len(test_images), part="",
                                       hole=float("nan"))
        test = evaluate_cia(explainer, classifier, test_images, batch_size=EVAL_BATCH, device=device,
                            on_batch=lambda done, _: progress.update(evaluation, completed=done))

    refs = {part: save_weights(networks[part], target.root / weights_file(part)) for part in PARTS}
    explainer_spec = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters={
            "architecture": "medxplain.Inpainter (MONAI BasicUNet, input (x*(1-m), m), sigmoid fill used "
                            "inside the mask only)",
            "network": networks["fill_normal"].config(),
            **asdict(search),
            "fills": {"fill_normal": "trained on NORMAL images; used for cases called positive",
                      "fill_pneumonia": "trained on PNEUMONIA images; used for cases called negative"},
        },
        weights=refs,
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "best_epoch": result.best_epoch,
            "selection": "lowest validation hole L1 (mean of both inpainters, fixed seeded masks)",
            "optimiser": {"name": "Adam", "learning_rate": config.learning_rate, "betas": list(config.betas)},
            "loss": f"L1(fill, x) + {config.hole_weight} * L1 inside the mask",
            "masks": "random smooth blobs (thresholded 3-8 px noise, soft edges) of 5-60% area, half joined "
                     "by a rectangle, a third at partial opacity",
            "augmentation": {"rotate_rad": config.rotate, "scale": config.scale, "translate_px": config.translate},
            "targets": "by ground-truth label: fill_normal on NORMAL, fill_pneumonia on PNEUMONIA (no classifier)",
            "data": {"source": data.name, "max_images": max_images,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
            "validation": rounded_metrics(result.validation), "test": rounded_metrics(test),
            "test_evaluation": f"per-image mask search on every test image, batches of {EVAL_BATCH}, "
                               f"{torch.get_num_threads()} thread(s) on {device}",
            "training_time_s": round(result.wall_time_s, 1),
            "wall_time_s": round(time.perf_counter() - started, 1), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "log": LOG_FILE,
        },
    )
    return add_explainer(target.root, "cia", explainer_spec)
