"""`medxplain train METHOD`: a bundle + a data folder -> the bundle with the method's
trained networks (weights, settings and metrics in bundle.yaml, per-epoch CSV log).

One path for every method: the data at the bundle's input size, split by patient as
the classifier's; the method's ``Trainer`` built for the bundle (``for_bundle``);
``explainers.training.fit`` with a progress bar; the trained explainer scored on the
test split; its networks written as ``<method>_<part>.safetensors`` and its section
of bundle.yaml. Running the command again resumes ``<bundle>/.checkpoints/<method>``;
a finished checkpoint only re-evaluates (e.g. with other explainer parameters).
"""
from __future__ import annotations

import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dicom_io.preprocess import Preprocessor
from explainers.base import explainer_class
from explainers.bundle import Bundle, BundleError, ExplainerSpec, save_weights
from explainers.training import Trainer, TrainingSettings, bundle_trainers, fit
from explainers.validity import evaluate_explainer
from pipeline.engine import build_explainer
from pipeline.training.datasets import Split, load_splits

#: Every trainable explainer, by method id: its trainer declaration.
TRAINERS: dict[str, type[Trainer]] = bundle_trainers()


def seeded_subset(split: Split, limit: int | None, seed: int) -> Split:
    """A seeded random subset (the manifest is sorted by class: the first N would be one class)."""
    if limit is None or limit >= len(split.labels):
        return split
    index = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:limit]
    index = index.sort().values
    return Split(split.images[index], split.labels[index], [split.paths[i] for i in index.tolist()])


def training_splits(bundle: Bundle, data: Path, *, max_images: int | None, seed: int) -> dict[str, Split]:
    """train/val/test at the bundle's input size, split by patient exactly as the
    classifier was (its training seed), so "validation" means the same images;
    ``max_images`` keeps a seeded random subset of each (smoke runs)."""
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    spec = bundle.spec
    splits = load_splits(data, Preprocessor(spec.input.size, spec.input.aspect),
                         seed=int(spec.training.get("seed", 0)))
    return {name: seeded_subset(s, max_images, seed) for name, s in splits.items()}


def rounded_metrics(metrics: dict[str, float]) -> dict[str, float | int | None]:
    return {k: (int(v) if k == "n" else None if math.isnan(v) else round(v, 4)) for k, v in metrics.items()}


def add_explainer(root: Path, name: str, spec: ExplainerSpec) -> Bundle:
    """Write one explainer's section into bundle.yaml.

    The bundle is read again here, not at the start of training: two explainers
    trained at the same time on one bundle must not overwrite each other's section.
    """
    # Not verified here: a re-trained explainer's new weights no longer match its old
    # pin; everything is verified on the load below, once the new pin is written.
    bundle = Bundle.load(root, verify=False)
    if spec.classifier_sha256 != bundle.spec.classifier.weights.sha256:
        raise BundleError(f"{root}: {name} was trained against classifier sha256 {spec.classifier_sha256}, but "
                          f"the bundle's classifier is now {bundle.spec.classifier.weights.sha256} (replaced "
                          "during training?): not written")
    bundle.spec.explainers[name] = spec
    bundle.save_spec()
    return Bundle.load(root)


def _describe(row: dict[str, float], keys: tuple[str, ...]) -> str:
    shown = [k for k in keys if k in row] + [k for k in row if k.startswith("val_")]
    return ", ".join(f"{k} {row[k]:.4f}" for k in shown if not math.isnan(row[k]))


def train_explainer_bundle(method: str, *, bundle: Path, data: Path, settings: TrainingSettings,
                           max_images: int | None = None) -> Bundle:
    """Train ``method`` for the classifier of ``bundle`` on ``data`` (a folder with
    manifest.csv) and add it to the bundle. Raises KeyError for an unknown method,
    ``BundleError`` / ``DatasetError`` / ValueError for a bad bundle, data or settings."""
    if method not in TRAINERS:
        raise KeyError(f"no trainer for {method!r}; trainable: {', '.join(sorted(TRAINERS))}")
    trainer_class = TRAINERS[method]
    started = time.perf_counter()
    target = Bundle.load(bundle)
    s = settings
    splits = training_splits(target, data, max_images=max_images, seed=s.seed)
    classifier = target.load_classifier(device=s.device)
    trainer = trainer_class.for_bundle(s, target, classifier if trainer_class.needs_classifier else None, splits)
    steps = trainer.steps_per_epoch()
    log_file = f"{method}_training_log.csv"

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[losses]}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task(f"train {method}", total=s.epochs * steps, losses="")

        def on_step(epoch: int, step: int, losses: dict[str, float]) -> None:
            text = " ".join(f"{k} {losses[k]:.3f}" for k in trainer.progress_keys if k in losses)
            progress.update(bar, completed=epoch * steps + step, description=f"epoch {epoch + 1}/{s.epochs}",
                            losses=text)

        def on_epoch(row: dict[str, float]) -> None:
            # Visible in a log file too (the bar only draws on a terminal).
            progress.console.print(f"epoch {int(row['epoch']) + 1}/{s.epochs}: "
                                   f"{_describe(row, trainer.progress_keys)}, {row['seconds']:.0f} s")

        result = fit(trainer, target.root / ".checkpoints" / method, log_path=target.root / log_file,
                     on_step=on_step, on_epoch=on_epoch)
        validation = {**result.validation, **trainer.validate_explainer(classifier)}
        test_images = splits["test"].images
        scoring = progress.add_task("test: explaining", total=len(test_images), losses="")
        test = trainer.test(classifier, test_images,
                            on_batch=lambda done, _: progress.update(scoring, completed=done))

    weights = {part: save_weights(trainer.networks()[part], target.root / f"{method}_{part}.safetensors")
               for part in trainer.best_parts}
    optimiser: dict[str, Any] = {"name": "Adam", "learning_rate": s.learning_rate, "betas": list(s.betas)}
    if hasattr(s, "discriminator_learning_rate"):
        optimiser["discriminator_learning_rate"] = s.discriminator_learning_rate
    section = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters=trainer.bundle_parameters(),
        weights=weights,
        training={
            "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "epochs": s.epochs, "batch_size": s.batch_size, "seed": s.seed, "best_epoch": result.best_epoch,
            "selection": trainer.selection, "optimiser": optimiser,
            "augmentation": {"rotate_rad": s.rotate, "scale": s.scale, "translate_px": s.translate},
            **trainer.bundle_training(),
            "data": {"source": data.name, "max_images": max_images,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
            "validation": rounded_metrics(validation), "test": rounded_metrics(test),
            "training_time_s": round(result.wall_time_s, 1),
            "wall_time_s": round(time.perf_counter() - started, 1), "device": s.device,
            "torch": torch.__version__, "python": platform.python_version(), "log": log_file,
        },
    )
    return add_explainer(target.root, method, section)


#: Validation images an adopted explainer is scored on (per-image searches: a seeded subset).
ADOPTED_VALIDATION_IMAGES = 128


def adopt_explainer(method: str, *, bundle: Path, source: Path, data: Path,
                    parameters: dict[str, Any] | None = None, device: str = "cpu", batch_size: int = 32) -> Bundle:
    """Give ``bundle`` the trained networks of ``method`` from ``source`` (another bundle
    with the same input), re-validated against ``bundle``'s own classifier.

    For methods whose networks never see the classifier while training
    (``Trainer.needs_classifier`` False: gvr's autoencoder, cia's inpainters): their
    weights are the same whichever classifier they explain, so retraining would only
    repeat hours of CPU. Any method's networks that were trained against ``bundle``'s
    own classifier (same sha256; ``source`` may be ``bundle`` itself) can be adopted
    too: that is how a bundle's explainer gets new ``parameters`` with figures that
    match them. What does depend on the classifier and the parameters, the
    explainer's flips and changes, is measured again on ``data``'s validation subset
    and test split and replaces the source's figures; the training record keeps the
    source's training and says where the networks came from (``networks_from``).
    ``parameters`` change the explainer's stored parameters (e.g. ``outside_lungs``)
    before it is re-validated.

    Raises KeyError for an unknown method, ValueError for a method whose training read
    another classifier, ``BundleError`` when the source lacks the method or its input
    differs, ``DatasetError`` for bad data.
    """
    if method not in TRAINERS:
        raise KeyError(f"no trainer for {method!r}; trainable: {', '.join(sorted(TRAINERS))}")
    started = time.perf_counter()
    target, origin = Bundle.load(bundle), Bundle.load(source)
    if method not in origin.spec.explainers:
        raise BundleError(f"{source} has no trained {method}")
    bound_here = origin.spec.explainers[method].classifier_sha256 == target.spec.classifier.weights.sha256
    if TRAINERS[method].needs_classifier and not bound_here:
        raise ValueError(f"{method}'s networks are trained against the classifier: retrain them "
                         f"(`medxplain train {method} --bundle {bundle} --data DIR`) instead of adopting them")
    if origin.spec.input != target.spec.input:
        raise BundleError(f"{source}'s input {origin.spec.input.model_dump()} differs from {bundle}'s "
                          f"{target.spec.input.model_dump()}: its {method} networks do not fit")
    original = origin.spec.explainers[method]
    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - explainer_class(method).parameter_names())
    if unknown:
        raise ValueError(f"{method} has no parameter {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(explainer_class(method).parameter_names()))}")
    # Re-validate with the explainer built exactly as the engine builds it, from the source.
    explainer = build_explainer(method, origin, {"threshold": target.spec.task.threshold, **parameters})
    classifier = target.load_classifier(device=device)
    splits = training_splits(target, data, max_images=None, seed=int(original.training.get("seed", 0)))
    val = seeded_subset(splits["val"], ADOPTED_VALIDATION_IMAGES, int(original.training.get("seed", 0)))
    validation = evaluate_explainer(explainer, classifier, val.images, batch_size=batch_size, device=device)
    test = evaluate_explainer(explainer, classifier, splits["test"].images, batch_size=batch_size, device=device)
    if origin.root.resolve() == target.root.resolve():
        weights = dict(original.weights)  # the same files: never rewrite a file its tensors are mapped from
    else:
        weights = {part: save_weights(origin.load_state(method, part), target.root / ref.file)
                   for part, ref in original.weights.items()}
    section = ExplainerSpec(
        classifier_sha256=target.spec.classifier.weights.sha256,
        parameters={**original.parameters, **parameters},
        weights=weights,
        training={
            **original.training,
            "networks_from": {"bundle": f"{origin.spec.name} {origin.spec.version}",
                              "classifier_sha256": original.classifier_sha256,
                              "command": "medxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                              "why": ("the networks were trained against this bundle's classifier"
                                      if TRAINERS[method].needs_classifier
                                      else "the networks never see the classifier while training "
                                           f"({TRAINERS[method].__name__}.needs_classifier is False)"),
                              # An earlier adoption's record (e.g. v1 -> v2, then new parameters).
                              **({"previous": original.training["networks_from"]}
                                 if "networks_from" in original.training else {}),
                              "changed_parameters": parameters,
                              "original_validation": original.training.get("validation"),
                              "original_test": original.training.get("test"),
                              "wall_time_s": round(time.perf_counter() - started, 1)},
            "validation": rounded_metrics(validation), "test": rounded_metrics(test),
            "data": {**original.training.get("data", {}), "source": data.name,
                     "splits": {k: int(len(v.labels)) for k, v in splits.items()}},
        },
    )
    if original.training.get("log"):
        log = origin.root / original.training["log"]
        if log.exists():
            (target.root / log.name).write_bytes(log.read_bytes())
    return add_explainer(target.root, method, section)
