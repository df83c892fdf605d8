"""What the `medxplain train <explainer>` commands share: data subsets, rounded
metrics for bundle.yaml, and adding the trained explainer to the bundle."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from explainers.bundle import Bundle, ExplainerSpec
from pipeline.datasets import Split


def seeded_subset(split: Split, limit: int | None, seed: int) -> Split:
    """A seeded random subset (the manifest is sorted by class: the first N would be one class)."""
    if limit is None or limit >= len(split.labels):
        return split
    index = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:limit]
    index = index.sort().values
    return Split(split.images[index], split.labels[index], [split.paths[i] for i in index.tolist()])


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
    bundle.spec.explainers[name] = spec
    bundle.save_spec()
    return Bundle.load(root)
