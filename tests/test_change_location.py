"""Where a counterfactual's change lies: lung fields and the border band."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explainers.evaluation import EvaluationError, border_band_mask, change_location
from explainers.lesions import LesionError, lung_field_masks, lung_fields, lung_weighted_l1, outside_lung_weights


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


def test_lung_weighted_proximity_charges_change_outside_the_lungs_more():
    image, lungs = _phantom()
    x = torch.from_numpy(image).float()[None, None] / 255
    masks = lung_field_masks(x)
    assert masks.shape == (1, 1, 128, 128)
    found = masks[0, 0].bool().numpy()
    assert (found & lungs).sum() / (found | lungs).sum() > 0.8  # found at 64 px, scaled back
    inside, outside = x.clone(), x.clone()
    lung_pixels = torch.from_numpy(lungs & found)
    outside_pixels = torch.from_numpy(~lungs & ~found)
    inside[0, 0][lung_pixels] += 0.1
    outside[0, 0][outside_pixels] += 0.1
    # Per changed pixel, change outside the lungs costs 1 + 4 times as much.
    per_pixel_in = float(lung_weighted_l1(inside, x, 4.0)) / float(lung_pixels.float().mean())
    per_pixel_out = float(lung_weighted_l1(outside, x, 4.0)) / float(outside_pixels.float().mean())
    assert per_pixel_out / per_pixel_in == pytest.approx(5.0, rel=1e-3)
    # Weight 0 is plain L1; a negative weight is refused.
    assert float(lung_weighted_l1(outside, x, 0.0)) == pytest.approx(float(torch.nn.functional.l1_loss(outside, x)))
    with pytest.raises(ValueError):
        lung_weighted_l1(outside, x, -1.0)


def test_outside_lung_weights_at_a_coarser_grid_average_the_cost():
    image, _ = _phantom()
    x = torch.from_numpy(image).float()[None, None] / 255
    fine = outside_lung_weights(x, 4.0)
    coarse = outside_lung_weights(x, 4.0, (16, 16))
    assert coarse.shape == (1, 1, 16, 16)
    assert float(coarse.mean()) == pytest.approx(float(fine.mean()), rel=1e-5)
    assert float(coarse.min()) >= 1.0 and float(coarse.max()) <= 5.0
    assert torch.equal(outside_lung_weights(x, 0.0), torch.ones_like(fine))


# gvr refines after the goal: its search crosses the threshold within a few Adam steps,
# driven by the classification term alone (the change, and so the similarity term's
# gradient, starts at zero), so without refinement the weighting moved its lung share only
# from 0.454 to 0.461 on these images.
SEARCH_SETTINGS = {
    "cia": {},
    "gvr": {"refine_steps": 60, "search_steps": 160, "patience": 1000},
}


@pytest.mark.parametrize("method", sorted(SEARCH_SETTINGS))
def test_the_searches_move_their_change_into_the_lungs_when_outside_costs_more(method, kermany_dir):
    from explainers.base import explainer_class
    from explainers.bundle import Bundle
    from explainers.evaluation import change_location
    from tests.generator_helpers import DEMO_BUNDLE, sampled_test_images

    bundle = Bundle.load(DEMO_BUNDLE)
    classifier = bundle.load_classifier()
    images = sampled_test_images(kermany_dir, 6)
    lungs = lung_field_masks(images)[:, 0].bool()

    def lung_share(outside_lungs: float) -> float:
        e = explainer_class(method).from_bundle(bundle, outside_lungs=outside_lungs,
                                                **SEARCH_SETTINGS[method]).explain(images, classifier)
        shares = change_location(images, e.counterfactuals[:, -1], {"lungs": lungs})["lungs_share"]
        return float(shares.nanmean())

    plain, weighted = lung_share(0.0), lung_share(8.0)
    print(f"FIGURE {method} lung share of the change: outside_lungs 0 -> {plain:.3f}, 8 -> {weighted:.3f}")
    assert weighted > plain + 0.05, f"{method}: lung share {plain:.3f} -> {weighted:.3f}"


def test_cia_mask_starts_at_one_area_cost_per_cell(kermany_dir):
    """With outside_lungs = w the mask starts at initial_mask inside the lung fields and at
    initial_mask / (1 + w) outside them, so the start leaks little fill into borders and
    markers; w = 0 is the paper's uniform start."""
    import torch.nn.functional as F

    from explainers.base import explainer_class
    from explainers.bundle import Bundle
    from explainers.lesions import outside_lung_weights
    from tests.generator_helpers import DEMO_BUNDLE, sampled_test_images

    bundle = Bundle.load(DEMO_BUNDLE)
    classifier = bundle.load_classifier()
    images = sampled_test_images(kermany_dir, 2)
    grid = (16, 16)
    for weight in (0.0, 4.0):
        explanation = explainer_class("cia").from_bundle(bundle, outside_lungs=weight, search_steps=0,
                                                         initial_mask=0.1).explain(images, classifier)
        # With no search step the saliency is the starting mask (normalised to a peak of 1).
        start = F.interpolate(0.1 / outside_lung_weights(images, weight, grid), size=images.shape[-2:],
                              mode="bilinear", align_corners=False)[:, 0]
        expected = start / start.flatten(1).amax(1)[:, None, None]
        assert torch.allclose(explanation.saliency, expected, atol=1e-4), weight
        assert all(c["steps_used"] == 0 for c in explanation.checks)
    # The weighted start really is lower outside the lungs (not uniform).
    assert float(expected.amin()) < 0.5
