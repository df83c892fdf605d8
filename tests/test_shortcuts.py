"""Synthetic shortcut cues (explainers.shortcuts) and the classifier's shortcut_robust augmentation."""
from __future__ import annotations

import pytest
import torch

from explainers.shortcuts import (
    CORNERS,
    RandBorderBands,
    RandBurnedInText,
    RandCollimation,
    RandSideMarker,
    border_band,
    burn_in_text,
    collimate,
    side_marker,
)
from explainers.train_classifier import ClassifierTrainingConfig, augmentation


def _image(size: int = 128) -> torch.Tensor:
    torch.manual_seed(0)
    return (0.3 + 0.2 * torch.rand(1, size, size))


def test_text_strip_in_the_bottom_3_percent_touches_only_those_rows():
    image = _image()
    out = burn_in_text(image, "PORTABLE AP 12/03", top_fraction=0.97, height_fraction=0.03)
    changed = (out != image).any(dim=0)
    rows = changed.any(dim=1).nonzero().flatten()
    assert len(rows) > 0 and rows.min() >= 124  # 4 rows (3 % of 128, at least 3) at the bottom edge
    assert torch.equal(image, _image())  # the input is left alone
    assert out.max() <= 1.0 and out.min() >= 0.0


def test_side_marker_lies_in_its_corner_and_rejects_an_unknown_corner():
    image = _image()
    for corner in CORNERS:
        changed = (side_marker(image, "R", corner, size_fraction=0.1) != image)[0]
        rows, cols = changed.nonzero().unbind(1)
        assert (rows < 64).all() == corner.startswith("top") and (cols < 64).all() == corner.endswith("left")
    with pytest.raises(ValueError, match="corner"):
        side_marker(image, "L", "middle")


def test_border_band_and_collimation_change_only_the_edges():
    image = _image()
    band = border_band(image, "left", 0.1, 0.0)
    assert (band[:, :, :13] == 0).all() and torch.equal(band[:, :, 13:], image[:, :, 13:])
    field = collimate(image, (0.1, 0.1, 0.1, 0.1), 0.0)
    assert torch.equal(field[:, 20:108, 20:108], image[:, 20:108, 20:108]) and (field[:, :10] == 0).all()
    with pytest.raises(ValueError, match="side"):
        border_band(image, "centre", 0.1, 0.0)


@pytest.mark.parametrize("transform", [RandBurnedInText, RandSideMarker, RandBorderBands, RandCollimation])
def test_random_cues_are_reproducible_under_their_seed(transform):
    image = _image()
    t = transform(prob=1.0)
    t.set_random_state(seed=7)
    first = [t(image) for _ in range(3)]
    t.set_random_state(seed=7)
    again = [t(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, image) for a in first)
    t = transform(prob=0.0)
    assert torch.equal(t(image), image)


def test_shortcut_robust_is_the_default_and_an_unknown_augmentation_is_refused():
    assert ClassifierTrainingConfig().augmentation == "shortcut_robust"
    compose = augmentation(ClassifierTrainingConfig())
    assert {type(t).__name__ for t in compose.transforms} >= {"RandBurnedInText", "RandSideMarker",
                                                             "RandBorderBands", "RandCollimation"}
    with pytest.raises(ValueError, match="augmentation"):
        augmentation(ClassifierTrainingConfig(augmentation="heavy"))


def test_model_card_shows_shortcut_figures_and_the_earlier_versions(tmp_path):
    from pathlib import Path

    from explainers.bundle import Bundle
    from pipeline.training.classifier import write_model_card

    demo = Bundle.load(Path(__file__).resolve().parents[1] / "bundles" / "demo-pneumonia")
    figures = {"n": 624, "command": "python benchmarks/bench_shortcut.py --record", "overlays": {
        "text_bottom_3pct": {"median": 0.001, "p90": 0.05, "median_uncertain": 0.02, "n_uncertain": 40,
                             "decisions_changed": 0.01, "auroc": 0.97, "held_out": False},
        "marker_AP_large_grey": {"median": 0.0, "p90": 0.01, "median_uncertain": None, "n_uncertain": 0,
                                 "decisions_changed": 0.0, "auroc": 0.97, "held_out": True}}}
    spec = demo.spec.model_copy(deep=True)
    spec.metrics["shortcut_sensitivity"] = figures
    spec.metrics["history"] = [{"name": "demo-pneumonia", "version": "1.0.0", "classifier_sha256": "ab" * 32,
                                "test_auroc": 0.9704, "note": "basic augmentation", "shortcut_sensitivity": figures}]
    write_model_card(Bundle(tmp_path, spec, ""))
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "## Shortcut sensitivity" in card and "| text_bottom_3pct | 0.0010 | 0.0500 | 0.0200 (40) |" in card
    assert "marker_AP_large_grey (held out) | 0.0000 | 0.0100 | — (0)" in card
    assert "## History" in card and "Test AUROC 0.9704" in card


def test_a_lesion_classifiers_model_card_gives_its_data_sets_recipe(tmp_path):
    from pathlib import Path

    from explainers.bundle import Bundle
    from pipeline.training.classifier import write_model_card

    demo = Bundle.load(Path(__file__).resolve().parents[1] / "bundles" / "demo-pneumonia")
    spec = demo.spec.model_copy(deep=True)
    spec.task.finding, spec.task.positive_label = "Lesion", "LESION"
    spec.data["recipe"] = {"design": "paired", "seed": 0, "source": "kermany-cxr224", "positive_fraction": None,
                           "limit": None, "generator_sha256": "cd" * 32,
                           "command": "medxplain make-lesions --data k --out o --seed 0 --paired"}
    write_model_card(Bundle(tmp_path, spec, ""))
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "**The lesions are synthetic**" in card
    assert "each NORMAL image twice, untouched (label 0) and with a lesion (label 1); seed 0" in card
    assert "`medxplain make-lesions --data k --out o --seed 0 --paired`" in card and "cd" * 32 in card
