"""Validity and proximity of counterfactuals: one definition for every method, used by
each explainer's per-case checks, by training validation and by the benchmark.

- **flipped**: the classifier's decision on the counterfactual differs from its
  decision on the input, both at the bundle's threshold on P(positive)
  (DESIGN.md "Every counterfactual is checked").
- **probability change**: how far P(positive) moved *towards the other class*,
  ``sign * (p(counterfactual) - p(input))`` with sign -1 for cases called positive,
  +1 for cases called negative; in [-1, 1], negative when it moved away.
- **proximity**: mean absolute pixel change |counterfactual - input| in model-space
  intensity [0, 1] (SSIM: ``explainers.evaluation.proximity_ssim``).

``evaluate_explainer`` runs an explainer over a set of images and reports these
(overall and per class the classifier called) with the mean of every other numeric
check the method records.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from explainers._helpers import as_float


def flipped(probability: torch.Tensor, counterfactual_probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) bool: the decision at ``threshold`` differs between input and counterfactual.
    Both probabilities (B,) in [0, 1]."""
    return (counterfactual_probability >= threshold) != (probability >= threshold)


def probability_change(probability: torch.Tensor, counterfactual_probability: torch.Tensor,
                       threshold: float) -> torch.Tensor:
    """(B,) in [-1, 1]: how far P(positive) moved towards the other class (negative: away from it)."""
    direction = torch.where(probability >= threshold, -1.0, 1.0).to(probability.dtype)
    return direction * (counterfactual_probability - probability)


def proximity_l1(images: torch.Tensor, counterfactuals: torch.Tensor) -> torch.Tensor:
    """(B,) mean |counterfactual - image| over (C, H, W), images (B, C, H, W) in [0, 1]."""
    return (counterfactuals.float() - images.float()).abs().flatten(1).mean(dim=1)


def counterfactual_checks(probability: torch.Tensor, counterfactual_probability: torch.Tensor,
                          images: torch.Tensor, counterfactuals: torch.Tensor,
                          threshold: float) -> list[dict[str, Any]]:
    """The checks every counterfactual carries, one dict per case: ``flipped`` (bool),
    ``counterfactual_probability`` (float in [0, 1]) and ``proximity_l1`` (float)."""
    flips = flipped(probability, counterfactual_probability, threshold)
    proximity = proximity_l1(images, counterfactuals)
    return [{"flipped": bool(flips[i]), "counterfactual_probability": float(counterfactual_probability[i]),
             "proximity_l1": float(proximity[i])} for i in range(len(probability))]


# Checks that are not averaged as they are: they feed flip_rate and probability_change.
_NOT_AVERAGED = ("flipped", "counterfactual_probability")


#: Smallest image side on which lung fields are looked for (``explainers.lesions``).
MIN_LUNG_FIELD_SIDE = 64


def evaluate_explainer(explainer: Any, classifier: nn.Module, images: torch.Tensor, *, batch_size: int = 32,
                       device: str = "cpu", ssim: bool = True,
                       on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Run ``explainer.explain`` over ``images`` (N, C, H, W), uint8 (x 255) or float in
    [0, 1], in batches of ``batch_size`` on ``device``, and summarise:

    - ``lung_share`` (also ``lung_share_called_positive``: the positive -> negative
      direction) and ``border_share``: the share of |counterfactual - input| inside the
      lung fields and inside the outer 10 % band (``explainers.evaluation.change_location``),
      next to ``lung_area`` and ``border_area``, the shares a uniform change would score
      (no lung figures for images under ``MIN_LUNG_FIELD_SIDE`` pixels: not radiographs);
    - ``flip_rate``, and per class the classifier called ``flip_rate_called_positive`` /
      ``flip_rate_called_negative`` (NaN where it called none of that class);
    - ``probability_change`` (mean, towards the other class), ``proximity_l1`` and,
      with ``ssim``, ``proximity_ssim`` (torchmetrics SSIM, data range 1);
    - the mean of every other numeric or boolean check of the method under its own
      name (a boolean's mean is the fraction of cases where it holds);
    - ``ms_per_image`` (wall time, includes the classifier) and ``n``.

    ``on_batch(done, total)`` is told after every batch. The explainer must return
    counterfactuals (generative methods). Raises ValueError for an empty set.
    """
    if len(images) == 0:
        raise ValueError("no images to evaluate the explainer on")
    from explainers.evaluation import proximity_ssim  # torchmetrics' SSIM: only when asked for

    classifier = classifier.to(device)
    from explainers.evaluation import border_band_mask, change_location
    from explainers.lesions import lung_field_masks

    rows: dict[str, list[float]] = {"flipped": [], "called": [], "change": [], "ssim": [], "lungs": [], "border": []}
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        e = explainer.explain(x, classifier)
        counterfactual_probability = e.path_probability[:, -1]
        rows["flipped"] += [float(c["flipped"]) for c in e.checks]
        rows["called"] += (e.probability >= explainer.threshold).float().tolist()
        rows["change"] += probability_change(e.probability, counterfactual_probability,
                                             explainer.threshold).tolist()
        if ssim:
            rows["ssim"] += proximity_ssim(x, e.counterfactuals[:, -1]).tolist()
        regions = {"border": border_band_mask(tuple(x.shape[-2:]))}
        if min(x.shape[-2:]) >= MIN_LUNG_FIELD_SIDE:
            regions["lungs"] = lung_field_masks(x, side=x.shape[-1])[:, 0].bool()
        location = change_location(x, e.counterfactuals[:, -1], regions)
        if "lungs" in regions:
            rows["lungs"] += location["lungs_share"].tolist()
            rows.setdefault("lung_area", []).extend(location["lungs_area"].tolist())
        rows["border"] += location["border_share"].tolist()
        rows.setdefault("border_area", []).extend(location["border_area"].tolist())
        for check in e.checks:
            for key, value in check.items():
                if key not in _NOT_AVERAGED and isinstance(value, (bool, int, float)):
                    rows.setdefault(key, []).append(float(value))
        if on_batch:
            on_batch(min(start + batch_size, len(images)), len(images))
    seconds = time.perf_counter() - started
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}
    positive = t["called"] > 0

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if len(values) else float("nan")

    def located(values: torch.Tensor) -> float:  # images left unchanged have no location (NaN)
        return float(values.nanmean()) if len(values) and not values.isnan().all() else float("nan")

    out = {"flip_rate": mean(t["flipped"]),
           "flip_rate_called_positive": mean(t["flipped"][positive]),
           "flip_rate_called_negative": mean(t["flipped"][~positive]),
           "probability_change": mean(t["change"])}
    if ssim:
        out["proximity_ssim"] = mean(t["ssim"])
    out["border_share"] = located(t["border"])
    if len(t["lungs"]):
        out.update({"lung_share": located(t["lungs"]), "lung_share_called_positive": located(t["lungs"][positive])})
    out.update({k: mean(v) for k, v in t.items() if k not in ("flipped", "called", "change", "ssim", "lungs",
                                                              "border")})
    out.update({"ms_per_image": 1000.0 * seconds / len(images), "n": float(len(images))})
    return out
