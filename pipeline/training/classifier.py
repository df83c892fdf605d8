"""`medxplain train classifier`: data folder -> a new bundle (weights, bundle.yaml, model card)."""
from __future__ import annotations

import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dicom_io.preprocess import Preprocessor
from explainers.bundle import Bundle, BundleError, BundleSpec, ClassifierSpec, InputSpec, TaskSpec, save_weights
from explainers.metrics import classification_metrics
from explainers.networks import DEFAULT_CAM_LAYER, BinaryClassifier, build_network
from explainers.train_classifier import ClassifierTrainer, ClassifierTrainingConfig, predict_probabilities
from explainers.training import fit
from pipeline.training.datasets import load_splits, read_recipe

KERMANY_ATTRIBUTION = (
    "Kermany D, Zhang K, Goldbaum M (2018), \"Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification\", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2; Kermany et al., Cell "
    "172(5):1122-1131, 2018. Licence CC BY 4.0."
)

# A compact MONAI DenseNet (1.05 M parameters, 4 MB of float32 weights): about
# 0.65 s per batch of 32 at 128 px on 2 CPU cores.
DEFAULT_ARCHITECTURE = "monai.DenseNet"
DEFAULT_PARAMETERS = {
    "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
    "init_features": 32, "growth_rate": 16, "block_config": [6, 12, 16, 8],
}

TASKS = {
    "pneumonia": TaskSpec(finding="Pneumonia", positive_label="PNEUMONIA", negative_label="NORMAL"),
    "lesions": TaskSpec(finding="Lesion", positive_label="LESION", negative_label="NORMAL"),
}


# What a model card must say about each task's data, beyond the split sizes.
TASK_DATA_NOTES = {
    "pneumonia": [
        "- Caveats: paediatric patients (age 1-5); images squashed to 224x224 and JPEG re-compressed;",
        "  74% pneumonia in train. Performance on adult radiographs is unknown.",
    ],
    "lesions": [
        "- **The lesions are synthetic**: round nodules, irregular opacities and diffuse patches inserted by",
        "  `medxplain make-lesions` (explainers/lesions.py, seeded) into the real NORMAL Kermany radiographs.",
        "  The classifier detects *these* lesions: it is a ground-truth benchmark model, not a clinical detector.",
        "- Caveats: paediatric patients (age 1-5); images squashed to 224x224 and JPEG re-compressed, stored as PNG.",
    ],
}


def train_classifier_bundle(
    *, data: Path, out: Path, name: str, task: str = "pneumonia", size: int = 128, epochs: int = 12,
    batch_size: int = 32, seed: int = 0, device: str = "cpu", augmentation: str = "shortcut_robust",
    learning_rate: float = 1e-3, init_from: Path | None = None,
) -> Bundle:
    """Train ``DEFAULT_ARCHITECTURE`` at ``size`` px on ``data`` (a manifest folder) and
    write a bundle to ``out``. ``init_from``: a bundle whose classifier (same architecture,
    parameters and input) is the starting point, recorded in the training record as
    "initialised_from"; None: a seeded random start. Raises ValueError for an unknown
    task, BundleError for an ``init_from`` that does not fit."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    input_model = InputSpec(size=(size, size), aspect="squash", mean=0.5, std=0.25)
    torch.manual_seed(seed)
    network = build_network(DEFAULT_ARCHITECTURE, DEFAULT_PARAMETERS)
    initialised_from = None
    if init_from is not None:
        network, initialised_from = _starting_network(init_from, input_model)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(data, Preprocessor((size, size), "squash"), seed=seed)
    model = BinaryClassifier(network, mean=input_model.mean, std=input_model.std)
    config = ClassifierTrainingConfig(epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                                      augmentation=augmentation, learning_rate=learning_rate)
    trainer = ClassifierTrainer(config, model, splits["train"].images, splits["train"].labels,
                                splits["val"].images, splits["val"].labels)
    steps = trainer.steps_per_epoch()

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train classifier", total=epochs * steps, loss=float("nan"))

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=epoch * steps + step, loss=losses["train_loss"],
                            description=f"epoch {epoch + 1}/{epochs}")

        def on_epoch(row: dict[str, float]) -> None:
            # Visible in a log file too (the bar only draws on a terminal).
            progress.console.print(f"epoch {int(row['epoch']) + 1}/{epochs}: loss {row['train_loss']:.4f}, "
                                   f"val AUROC {row['val_auroc']:.4f}, {row['seconds']:.0f} s")

        result = fit(trainer, out / ".checkpoints", log_path=out / "classifier_training_log.csv",
                     on_step=on_step, on_epoch=on_epoch)

    threshold = trainer.decision_threshold()
    validation = classification_metrics(predict_probabilities(model, splits["val"].images, device),
                                        splits["val"].labels, threshold)
    test_prob = predict_probabilities(model, splits["test"].images, device)
    test = classification_metrics(test_prob, splits["test"].labels, threshold)
    weights = save_weights(model.network, out / "classifier.safetensors")
    task_spec = TASKS[task].model_copy(update={"threshold": round(threshold, 6)})
    spec = BundleSpec(
        name=name,
        version="1.0.0",
        description=f"{task_spec.positive_label} vs {task_spec.negative_label} classifier on chest radiographs",
        task=task_spec,
        input=input_model,
        classifier=ClassifierSpec(
            architecture=DEFAULT_ARCHITECTURE, parameters=DEFAULT_PARAMETERS,
            cam_layer=DEFAULT_CAM_LAYER[DEFAULT_ARCHITECTURE], weights=weights,
        ),
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "best_epoch": result.best_epoch,
            "augmentation": augmentation, "settings": config.as_dict(), "initialised_from": initialised_from,
            # fit's training time over all runs: a resumed run's own time would leave out the earlier epochs
            "wall_time_s": round(result.wall_time_s, 1), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "log": "classifier_training_log.csv",
        },
        metrics={"validation": _rounded(validation), "test": _rounded(test)},
        data={
            "source": str(data.name),
            "splits": {k: int(len(v.labels)) for k, v in splits.items()},
            "validation_split": "10% of training patients (source_patient_token), seeded",
            "attribution": KERMANY_ATTRIBUTION,
            **({"recipe": recipe} if (recipe := read_recipe(data)) else {}),
        },
    )
    bundle = Bundle(out, spec, "")
    bundle.save_spec()
    write_model_card(bundle)
    return Bundle.load(out)


def _starting_network(source: Path, input_model: InputSpec) -> tuple[torch.nn.Module, str]:
    """The classifier network of bundle ``source`` and how the record names it ("<name>
    <version> sha256=<weights>"). Raises BundleError unless it has the architecture,
    parameters and input this training builds."""
    bundle = Bundle.load(source)
    spec = bundle.spec
    if (spec.classifier.architecture, spec.classifier.parameters) != (DEFAULT_ARCHITECTURE, DEFAULT_PARAMETERS):
        raise BundleError(f"{source}: its classifier is {spec.classifier.architecture} {spec.classifier.parameters}, "
                          f"not {DEFAULT_ARCHITECTURE} {DEFAULT_PARAMETERS}; it cannot start this training")
    if spec.input != input_model:
        raise BundleError(f"{source}: its input {spec.input.model_dump()} differs from {input_model.model_dump()}")
    return (bundle.load_classifier().network,
            f"{spec.name} {spec.version} sha256={spec.classifier.weights.sha256}")


def _task_of(spec: BundleSpec) -> str:
    for name, task in TASKS.items():
        if (task.positive_label, task.negative_label) == (spec.task.positive_label, spec.task.negative_label):
            return name
    raise ValueError(f"no model-card notes for task {spec.task.positive_label} vs {spec.task.negative_label}")


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _shortcut_table(figures: dict[str, Any]) -> list[str]:
    rows = ["| overlay | median abs dP | p90 abs dP | median abs dP, 0.05<P<0.95 (n) | decisions changed | "
            "AUROC overlaid |", "|---|---|---|---|---|---|"]
    for name, f in figures.get("overlays", {}).items():
        rows.append(f"| {name}{' (held out)' if f.get('held_out') else ''} | {f['median']:.4f} | {f['p90']:.4f} | "
                    f"{_figure(f['median_uncertain'])} ({f['n_uncertain']}) | {f['decisions_changed']:.3f} | "
                    f"{f['auroc']:.4f} |")
    return rows


def _shortcut_lines(figures: dict[str, Any] | None) -> list[str]:
    """The model card's shortcut-sensitivity section (``benchmarks/bench_shortcut.py --record``)."""
    if not figures:
        return []
    return ["", "## Shortcut sensitivity",
            f"|P(overlaid) - P(clean)| on {figures['n']} test images when only a burned-in text strip or a side "
            "marker is added (held out: kinds the training augmentation never draws). "
            f"Command: `{figures['command']}`", "", *_shortcut_table(figures)]


def _history_lines(history: list[dict[str, Any]]) -> list[str]:
    """Earlier versions' figures, measured in the same run as this version's."""
    if not history:
        return []
    lines = ["## History", ""]
    for entry in history:
        lines += [f"### {entry['name']} {entry.get('version', '')} (classifier sha256 `{entry['classifier_sha256']}`)",
                  f"- {entry.get('note', '')}", f"- Test AUROC {entry['test_auroc']:.4f}", "",
                  *_shortcut_table(entry.get("shortcut_sensitivity", {})), ""]
    return lines


DESIGNS = {
    "paired": "each NORMAL image twice, untouched (label 0) and with a lesion (label 1)",
    "split": "each NORMAL image once, with a lesion (label 1) or untouched (label 0)",
}


def _recipe_lines(recipe: dict[str, Any] | None) -> list[str]:
    """The model card's lines for a data set made by ``medxplain make-lesions`` (its recipe.json)."""
    if not recipe:
        return []
    return [f"- Design: {DESIGNS[recipe['design']]}; seed {recipe['seed']}, from {recipe['source']}.",
            f"  Data set: `{recipe['command']}`",
            f"  Lesion generator: explainers/lesions.py sha256 `{recipe['generator_sha256']}`"]


def write_model_card(bundle: Bundle) -> None:
    s = bundle.spec
    test, val = s.metrics.get("test", {}), s.metrics.get("validation", {})
    source = s.training.get("initialised_from")
    start = f"fine-tuned from the classifier of {source}" if source else "random initialisation (seeded)"
    lines = [
        f"# Model card: {s.name} {s.version}",
        "",
        f"{s.description}. **Not for diagnostic use**: a demonstration model for explainers.",
        "",
        "## Model",
        f"- Architecture: `{s.classifier.architecture}` {s.classifier.parameters}",
        f"- Input: {s.input.size[0]}x{s.input.size[1]} grayscale, aspect `{s.input.aspect}`, display range [0,1], "
        f"normalised (x - {s.input.mean}) / {s.input.std} inside the classifier",
        f"- Output: one logit for {s.task.positive_label}; decision threshold {s.task.threshold:.4f} "
        "(Youden's J on the validation split)",
        f"- Weights: `{s.classifier.weights.file}` sha256 `{s.classifier.weights.sha256}`",
        "",
        "## Data",
        f"- {s.data.get('source')}: splits {s.data.get('splits')}; {s.data.get('validation_split')}",
        *TASK_DATA_NOTES[_task_of(s)],
        *_recipe_lines(s.data.get("recipe")),
        "",
        "## Metrics (threshold from validation)",
        "| split | AUROC | accuracy | sensitivity | specificity | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in (("validation", val), ("test", test)):
        if m:
            lines.append(f"| {name} | {m['auroc']:.4f} | {m['accuracy']:.4f} | {m['sensitivity']:.4f} | "
                         f"{m['specificity']:.4f} | {m['n']} |")
    lines += _shortcut_lines(s.metrics.get("shortcut_sensitivity"))
    lines += [
        "",
        "## Training",
        f"- Command: `{s.training.get('command')}`",
        f"- Training time: {s.training.get('wall_time_s')} s over all runs (resumed ones included) on "
        f"{s.training.get('device')} "
        f"(torch {s.training.get('torch')}), seed {s.training.get('seed')}, best epoch {s.training.get('best_epoch')}",
        f"- Augmentation: `{s.training.get('augmentation', 'basic')}` (explainers/train_classifier.py `augmentation`)",
        f"- Start: {start}",
        f"- Per-epoch log: `{s.training.get('log')}`",
        "",
        *_history_lines(s.metrics.get("history", [])),
        "## Attribution",
        f"Trained on data from {s.data.get('attribution')}",
        "",
    ]
    (bundle.root / "MODEL_CARD.md").write_text("\n".join(lines))
