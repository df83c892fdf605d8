"""What the `medxplain train <explainer>` commands share: data subsets, rounded
metrics for bundle.yaml, and adding the trained explainer to the bundle."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dicom_io.preprocess import InputSpec
from explainers.bundle import Bundle, BundleError, ExplainerSpec
from pipeline.datasets import Split, load_splits


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
    splits = load_splits(data, InputSpec(tuple(spec.input.size), spec.input.aspect),
                         seed=int(spec.training.get("seed", 0)))
    return {name: seeded_subset(s, max_images, seed) for name, s in splits.items()}


def rounded_metrics(metrics: dict[str, float]) -> dict[str, float]:
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
