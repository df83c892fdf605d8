"""Where a counterfactual's change lies: lung fields and the border band."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explainers.evaluation import EvaluationError, border_band_mask, change_location
from explainers.lesions import LesionError, lung_fields


def test_a_uniform_change_scores_its_area_and_a_border_change_scores_one():
    images = torch.full((2, 1, 40, 40), 0.5)
    border = border_band_mask((40, 40), 0.1)
    assert border.float().mean() == pytest.approx(1 - 0.8 ** 2)
    counterfactuals = images.clone()
    counterfactuals[0] += 0.1  # uniform
    counterfactuals[1, 0, :4, :] += 0.2  # the top band only
    shares = change_location(images, counterfactuals, {"border": border})
    assert shares["border_share"][0] == pytest.approx(float(shares["border_area"][0]))
    assert shares["border_share"][1] == pytest.approx(1.0)
    unchanged = change_location(images, images.clone(), {"border": border})["border_share"]
    assert torch.isnan(unchanged).all()  # no change: no location
    with pytest.raises(EvaluationError):
        change_location(images, counterfactuals, {"border": torch.ones(10, 10, dtype=torch.bool)})


def _phantom(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A bright thorax on a dark background with two dark elliptical lungs: (image, lungs)."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    image = np.where((cols > 0.04) & (cols < 0.96), 0.75, 0.05)
    lungs = np.zeros((size, size), dtype=bool)
    for centre in (0.28, 0.72):
        lungs |= ((rows - 0.5) / 0.3) ** 2 + ((cols - centre) / 0.15) ** 2 <= 1
    image = np.where(lungs, 0.3, image) + np.random.default_rng(0).normal(0, 0.02, (size, size))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), lungs


def test_lung_fields_find_the_lungs_of_a_phantom():
    image, lungs = _phantom()
    found = lung_fields(image)
    iou = (found & lungs).sum() / (found | lungs).sum()
    assert iou > 0.85
    with pytest.raises(LesionError):
        lung_fields(np.zeros((10, 10), dtype=np.uint8))
