"""cia (Major et al. 2020): the inpainter, the per-image mask search, the training loop
of the two inpainters and `medxplain train cia`.

Where the answer must be known exactly, the hand-made box classifier of
tests/generator_helpers.py is used, with "oracle" inpainters that fill with a known
intensity: the only mask that flips the decision covers the box. Real images and the
demo classifier are used for shapes, batch independence and the command line (on a
temporary copy of the demo bundle: the repository's bundle is never modified).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from explainers.base import available, explainer_class
from explainers.bundle import Bundle, BundleError
from explainers.cia import CiaExplainer, Inpainter, hole_l1, probe_masks, random_masks, total_variation
from explainers.evaluation import border_band_mask
from explainers.train_cia import CiaTrainer, CiaTrainingConfig, evaluate_inpainters
from explainers.training import fit
from explainers.validity import evaluate_explainer
from tests.conftest import PROJECT_ROOT
from tests.generator_helpers import (
    BOX,
    DEMO_BUNDLE,
    SIZE,
    TINY,
    BoxClassifier,
    box_images,
    bundle_copy,
    real_images,
    sampled_test_images,
    small_data,
)


class ConstantFill(Inpainter):
    """An inpainter whose fill is a known intensity everywhere."""

    def __init__(self, value: float, size: int | None = None):
        super().__init__(features=TINY, size=size)
        self.value = value

    def fill(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        # Through the network (times zero) so that gradients and shapes are the real ones.
        return super().fill(images, masks) * 0.0 + self.value


def tiny_inpainters(seed: int = 0, size: int | None = 64) -> dict[str, Inpainter]:
    torch.manual_seed(seed)
    return {"fill_negative": Inpainter(features=TINY, size=size), "fill_positive": Inpainter(features=TINY, size=size)}


def box_explainer(**kw) -> CiaExplainer:
    # Normal tissue is the dark background (0.3), pneumonia the bright blob (0.9).
    settings = {"search_steps": 80, "learning_rate": 0.2, "mask_size": 8, "margin": 1.0, "area_weight": 1.0,
                "tv_weight": 0.2, "threshold": 0.5, **kw}
    return CiaExplainer(fill_negative=ConstantFill(0.3), fill_positive=ConstantFill(0.9), **settings)


@pytest.fixture(scope="module")
def demo_classifier():
    return Bundle.load(DEMO_BUNDLE).load_classifier()


# -- the inpainter and the masks --------------------------------------------------

def test_inpainter_changes_only_the_masked_region():
    x = torch.rand(3, 1, 128, 128)
    network = tiny_inpainters()["fill_negative"].eval()
    with torch.no_grad():
        assert torch.equal(network(x, torch.zeros(3, 1, 128, 128)), x)  # no mask: the patient's pixels untouched
        masks = torch.zeros(3, 1, 128, 128)
        masks[:, :, 32:64, 40:90] = 1.0
        out = network(x, masks)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out[masks.expand_as(x) == 0], x[masks.expand_as(x) == 0])
    assert not torch.equal(out[:, :, 32:64, 40:90], x[:, :, 32:64, 40:90])
    with pytest.raises(ValueError, match="multiple of 16"):
        Inpainter(features=TINY, size=40)
    with pytest.raises(ValueError, match="must match"):
        network(x, torch.zeros(3, 1, 64, 64))


def test_random_masks_are_seeded_smooth_and_varied():
    a = random_masks(64, 64, torch.Generator().manual_seed(1))
    b = random_masks(64, 64, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (64, 1, 64, 64)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    area = a.flatten(1).mean(1)
    assert float(area.min()) > 0.01 and float(area.max()) < 0.9 and float(area.std()) > 0.05
    assert float(total_variation(a).mean()) < 0.2  # blobs, not salt and pepper
    probe = probe_masks(4, 64)
    assert torch.equal(probe[0], probe[3]) and 0.1 < float(probe[0].mean()) < 0.5
    assert set(probe.unique().tolist()) <= {0.0, 1.0}
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(hole_l1(x, x, torch.ones(2, 1, 8, 8)), torch.zeros(2))


# -- the mask search on the box classifier (the right answer is known) ---------------

def test_the_search_finds_the_box_and_flips_both_directions():
    images, labels = box_images(8, seed=3)
    classifier = BoxClassifier()
    e = box_explainer().explain(images, classifier)
    logit_x = classifier(images)
    logit_cf = classifier(e.counterfactuals[:, -1])
    positive = logit_x > 0
    assert bool((positive == labels.bool()).all())
    # Every case moves towards the other class and crosses the threshold by the margin.
    assert bool((logit_cf[positive] <= -1.0 + 1e-4).all()) and bool((logit_cf[~positive] >= 1.0 - 1e-4).all())
    assert all(c["flipped"] and c["goal_reached"] for c in e.checks)
    assert [c["fill"] for c in e.checks] == ["negative" if p else "positive" for p in positive.tolist()]
    # The saliency (the mask) lies on the box: its mean inside is several times the mean outside.
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[BOX[0]:BOX[1], BOX[2]:BOX[3]] = True
    ratio = e.saliency[:, inside].mean(dim=1) / e.saliency[:, ~inside].mean(dim=1)
    assert float(ratio.min()) > 3.0, ratio
    # Outside the mask the image is untouched: far from the box nothing moved.
    assert float((e.counterfactuals[:, -1, :, 26:, 26:] - images[:, :, 26:, 26:]).abs().max()) < 0.02


@pytest.mark.parametrize("steps", [1, 3])
def test_explanation_checks_are_consistent(steps):
    images, _ = box_images(4, seed=5)
    explainer = box_explainer(steps=steps, search_steps=40)
    e = explainer.explain(images, BoxClassifier())
    assert e.probability.shape == (4,) and e.saliency.shape == (4, SIZE, SIZE)
    assert e.counterfactuals.shape == (4, steps, 1, SIZE, SIZE) and e.path_probability.shape == (4, steps)
    assert float(e.saliency.min()) >= 0 and float(e.saliency.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    if steps > 1:  # the path scales the mask from 0 to m: equal steps along x -> counterfactual
        final = e.counterfactuals[:, -1]
        assert torch.allclose(e.counterfactuals[:, 0], images + (final - images) / steps, atol=1e-6)
    for i, check in enumerate(e.checks):
        assert set(check) >= {"flipped", "counterfactual_probability", "proximity_l1", "steps_used",
                              "mask_area", "inpainting_l1", "fill", "goal_reached"}
        assert check["counterfactual_probability"] == pytest.approx(float(e.path_probability[i, -1]))
        assert check["flipped"] == ((e.path_probability[i, -1] >= 0.5) != (e.probability[i] >= 0.5))
        assert check["proximity_l1"] == pytest.approx(float((e.counterfactuals[i, -1] - images[i]).abs().mean()),
                                                      rel=1e-4)
        assert isinstance(check["steps_used"], int) and 0 <= check["steps_used"] <= 40
        assert 0 < check["mask_area"] < 1 and check["inpainting_l1"] >= 0
    assert "cia" in available() and explainer_class("cia") is CiaExplainer


def test_the_search_runs_under_no_grad_as_the_engine_calls_it():
    images, _ = box_images(2, seed=11)
    explainer = box_explainer(search_steps=30)
    free = explainer.explain(images, BoxClassifier())
    with torch.no_grad():
        guarded = explainer.explain(images, BoxClassifier())
    assert torch.equal(free.counterfactuals, guarded.counterfactuals)
    assert all(c["flipped"] for c in guarded.checks) and not guarded.counterfactuals.requires_grad


def test_the_area_term_keeps_the_mask_small():
    images, labels = box_images(4, seed=7)
    positive = images[labels.bool()]
    loose = box_explainer(area_weight=0.0, tv_weight=0.0, margin=4.0).explain(positive, BoxClassifier())
    tight = box_explainer(area_weight=4.0, tv_weight=0.0, margin=4.0).explain(positive, BoxClassifier())
    assert all(c["flipped"] for c in tight.checks)
    assert sum(c["mask_area"] for c in tight.checks) < sum(c["mask_area"] for c in loose.checks)


def test_same_image_same_explanation_alone_or_in_a_batch(kermany_dir, demo_classifier):
    images = real_images(kermany_dir, 6)
    networks = tiny_inpainters()
    explainer = CiaExplainer(fill_negative=networks["fill_negative"], fill_positive=networks["fill_positive"],
                             steps=2, search_steps=4, threshold=0.808)
    batch = explainer.explain(images, demo_classifier)
    assert {c["fill"] for c in batch.checks} == {"negative", "positive"}  # both inpainters in one batch
    assert batch.counterfactuals.shape == (6, 2, 1, 128, 128)
    for i in (0, 4):
        alone = explainer.explain(images[i:i + 1], demo_classifier)
        assert torch.allclose(alone.saliency[0], batch.saliency[i], atol=1e-5)
        assert torch.allclose(alone.counterfactuals[0], batch.counterfactuals[i], atol=1e-5)
        assert torch.allclose(alone.path_probability[0], batch.path_probability[i], atol=1e-5)
        assert alone.checks[0]["steps_used"] == batch.checks[i]["steps_used"]
        assert alone.checks[0]["inpainting_l1"] == pytest.approx(batch.checks[i]["inpainting_l1"], abs=1e-5)


# -- training ------------------------------------------------------------------------

def train_cia(networks, train, train_labels, val, val_labels, config, directory):
    return fit(CiaTrainer(config, networks, train, train_labels, val, val_labels), directory)


def _tiny_config(epochs: int, **kw) -> CiaTrainingConfig:
    return CiaTrainingConfig(epochs=epochs, batch_size=8, learning_rate=3e-3, translate=1.0, rotate=0.05,
                             scale=0.02, **kw)


def test_tiny_inpainters_learn_to_fill_their_own_class(tmp_path):
    train, train_labels = box_images(48, seed=0)
    val, val_labels = box_images(16, seed=1)
    networks = tiny_inpainters(size=None)
    before = evaluate_inpainters(networks, val, val_labels)
    result = train_cia(networks, train, train_labels, val, val_labels, _tiny_config(4), tmp_path / "ckpt")
    assert result.validation["hole_l1"] < 0.5 * before["hole_l1"], (before, result.validation)
    assert len(result.log) == 4 and (tmp_path / "ckpt" / "cia_training_log.csv").is_file()
    # Each fills the box region with its own class: dark background or bright blob.
    masks = torch.zeros(1, 1, SIZE, SIZE)
    masks[:, :, BOX[0]:BOX[1], BOX[2]:BOX[3]] = 1.0
    with torch.no_grad():
        healthy = networks["fill_negative"](val[1:2], masks)  # val[1] has the blob
        diseased = networks["fill_positive"](val[0:1], masks)  # val[0] has none
    box = (slice(None), slice(None), slice(BOX[0], BOX[1]), slice(BOX[2], BOX[3]))
    assert float(healthy[box].mean()) < float(val[1:2][box].mean()) - 0.2
    assert float(diseased[box].mean()) > float(val[0:1][box].mean()) + 0.2


def test_training_resumes_from_its_checkpoint(tmp_path):
    train, train_labels = box_images(16, seed=0)
    val, val_labels = box_images(8, seed=1)

    interrupted = tiny_inpainters(size=None)
    first = train_cia(interrupted, train, train_labels, val, val_labels, _tiny_config(1), tmp_path / "a")
    assert [r["epoch"] for r in first.log] == [0.0]
    resumed = tiny_inpainters(size=None)
    second = train_cia(resumed, train, train_labels, val, val_labels, _tiny_config(2), tmp_path / "a")
    assert [r["epoch"] for r in second.log] == [0.0, 1.0] and second.log[0] == first.log[0]
    rows = list(csv.DictReader(open(tmp_path / "a" / "cia_training_log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and "val_hole_l1" in rows[0]

    straight = tiny_inpainters(size=None)
    train_cia(straight, train, train_labels, val, val_labels, _tiny_config(2), tmp_path / "b")
    last_a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    last_b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    for part in ("fill_negative", "fill_positive"):
        assert all(torch.equal(last_a[part][k], last_b[part][k]) for k in last_a[part])  # resume == uninterrupted

    with pytest.raises(ValueError, match="different setup"):
        train_cia(tiny_inpainters(size=16), train, train_labels, val, val_labels, _tiny_config(3), tmp_path / "a")
    with pytest.raises(ValueError, match="no training images"):
        train_cia(tiny_inpainters(size=None), train, torch.zeros_like(train_labels), val, val_labels,
                  _tiny_config(1), tmp_path / "c")


def test_evaluation_counts_both_called_classes():
    images, _ = box_images(6, seed=9)
    metrics = evaluate_explainer(box_explainer(search_steps=40), BoxClassifier(), images, batch_size=4)
    assert metrics["n"] == 6 and metrics["flip_rate"] == 1.0
    assert metrics["flip_rate_called_positive"] == 1.0 and metrics["flip_rate_called_negative"] == 1.0
    assert 0 < metrics["proximity_l1"] < 0.2 and 0 < metrics["proximity_ssim"] <= 1
    assert metrics["steps_used"] > 0 and metrics["ms_per_image"] > 0 and 0 < metrics["mask_area"] < 1
    # The change is at the box, in the middle: little of it in the outer 10 % band.
    assert metrics["border_area"] == pytest.approx(float(border_band_mask((32, 32)).float().mean()))
    assert 0 <= metrics["border_share"] < metrics["border_area"] / 2
    assert "lung_share" not in metrics  # 32 px boxes are no radiographs: no lung fields


# -- the command line and the bundle -------------------------------------------------

def test_missing_weights_give_a_clear_error(tmp_path):
    bundle = Bundle.load(bundle_copy(tmp_path))
    bundle.spec.explainers.pop("cia", None)
    with pytest.raises(BundleError, match="medxplain train cia"):
        CiaExplainer.from_bundle(bundle)


def test_bad_settings_are_refused():
    networks = tiny_inpainters()
    for bad in ({"steps": 0}, {"mask_size": 1}, {"initial_mask": 1.0}, {"margin": -1.0}, {"search_steps": -1}):
        with pytest.raises(ValueError):
            CiaExplainer(fill_negative=networks["fill_negative"], fill_positive=networks["fill_positive"], **bad)


@pytest.mark.slow
def test_train_cia_command_adds_a_working_explainer_to_a_bundle(tmp_path, kermany_dir):
    bundle_dir = bundle_copy(tmp_path)
    original = (DEMO_BUNDLE / "bundle.yaml").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "cia", "--bundle", str(bundle_dir),
         "--data", str(small_data(tmp_path, kermany_dir)), "--max-images", "32", "--epochs", "1", "--size", "32",
         "--width", "8", "--search-steps", "5"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "cia_fill_negative.safetensors" in done.stdout and "cia_fill_positive.safetensors" in done.stdout
    assert (DEMO_BUNDLE / "bundle.yaml").read_text() == original  # the repository's bundle is untouched

    bundle = Bundle.load(bundle_dir)  # verifies every pinned hash, the new weights included
    spec = bundle.spec.explainers["cia"]
    assert set(spec.weights) == {"fill_negative", "fill_positive"}
    assert spec.parameters["network"]["size"] == 32 and spec.parameters["search_steps"] == 5
    test = spec.training["test"]
    assert spec.training["data"]["splits"]["train"] == 32 and test["n"] == 16
    assert {"flip_rate", "flip_rate_called_positive", "flip_rate_called_negative", "proximity_l1",
            "proximity_ssim", "steps_used", "inpainting_l1", "ms_per_image"} <= set(test)
    rows = list(csv.DictReader(open(bundle_dir / "cia_training_log.csv")))
    assert len(rows) == 1 and "val_fill_negative_hole_l1" in rows[0]
    assert (bundle_dir / ".checkpoints" / "cia" / "last.ckpt").is_file()

    explainer = explainer_class("cia").from_bundle(bundle, steps=3, search_steps=3)
    images = real_images(kermany_dir, 4)
    e = explainer.explain(images, bundle.load_classifier())
    assert e.counterfactuals.shape == (4, 3, 1, 128, 128) and e.saliency.shape == (4, 128, 128)
    assert explainer.threshold == pytest.approx(bundle.spec.task.threshold)
    assert all(isinstance(c["flipped"], bool) for c in e.checks)

    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "cia", "--bundle", str(tmp_path / "none"),
                          "--data", str(kermany_dir)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot train cia" in bad.stdout


@pytest.mark.slow
def test_shipped_weights_flip_the_decision(kermany_dir, demo_classifier):
    bundle = Bundle.load(DEMO_BUNDLE)
    if "cia" not in bundle.spec.explainers:
        pytest.skip("the demo bundle has no cia weights yet (medxplain train cia)")
    explainer = CiaExplainer.from_bundle(bundle)
    images = sampled_test_images(kermany_dir, 32)
    e = explainer.explain(images, demo_classifier)
    flipped = sum(c["flipped"] for c in e.checks) / len(e.checks)
    assert flipped >= 0.85, f"flip rate {flipped:.3f} on a seeded sample of 32 shared test images"
    assert all(0 < c["mask_area"] < 1 for c in e.checks)
