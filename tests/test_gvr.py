"""gvr (Seah et al. 2018): the autoencoder, the latent-search explainer (both modes),
its training loop and `medxplain train gvr`.

Where the answer must be known exactly, the hand-made box classifier of
tests/generator_helpers.py is used: the only way to change its decision is to
brighten or darken one box, so a counterfactual must move the box the requested
way. Real images and the demo classifier are used for shapes, checks, batch
independence and the command line (on a temporary copy of the demo bundle: the
repository's bundle is never modified).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from explainers.base import available, explainer_class
from explainers.bundle import Bundle, BundleError
from explainers.gvr import GvrAutoEncoder, GvrExplainer
from explainers.train_gvr import GvrTrainer, GvrTrainingConfig, evaluate_reconstruction
from explainers.training import fit
from explainers.validity import evaluate_explainer
from tests.conftest import PROJECT_ROOT
from tests.generator_helpers import (
    BOX,
    DEMO_BUNDLE,
    BoxClassifier,
    box_images,
    bundle_copy,
    real_images,
    sampled_test_images,
    small_data,
)

TINY_WIDTHS = (8, 16, 16)


def tiny_autoencoder(size: int | None = None, seed: int = 0) -> GvrAutoEncoder:
    torch.manual_seed(seed)
    return GvrAutoEncoder(widths=TINY_WIDTHS, latent_channels=4, size=size)


def train_gvr(autoencoder, train, val, config, directory):
    return fit(GvrTrainer(config, autoencoder, train, val), directory)


def _config(epochs: int, **kw) -> GvrTrainingConfig:
    return GvrTrainingConfig(epochs=epochs, batch_size=8, learning_rate=3e-3, rotate=0.05, scale=0.02,
                             translate=1.0, **kw)


@pytest.fixture(scope="module")
def demo_classifier():
    return Bundle.load(DEMO_BUNDLE).load_classifier()


@pytest.fixture(scope="module")
def box_autoencoder(tmp_path_factory):
    """A tiny autoencoder trained on box images (no labels, no classifier): 64 steps."""
    train, _ = box_images(64, seed=0)
    val, _ = box_images(16, seed=1)
    autoencoder = tiny_autoencoder()
    before = evaluate_reconstruction(autoencoder, val)["reconstruction_l1"]
    result = train_gvr(autoencoder, train, val, _config(8), tmp_path_factory.mktemp("gvr") / "ckpt")
    return autoencoder, before, result


# -- the network -----------------------------------------------------------------

def test_autoencoder_shapes_range_and_size_checks():
    autoencoder = tiny_autoencoder(size=32).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        z = autoencoder.encode(x)
        out = autoencoder.decode(z)
    assert z.shape == (3, 4, 4, 4) and out.shape == (3, 1, 32, 32)  # area-downsampled to its working size
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match="multiple of 8"):
        GvrAutoEncoder(widths=TINY_WIDTHS, size=36)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_autoencoder(size=None).encode(torch.rand(1, 1, 36, 36))


def test_training_learns_to_reconstruct(box_autoencoder):
    _, before, result = box_autoencoder
    assert result.validation["reconstruction_l1"] < 0.5 * before, (before, result.validation)
    assert len(result.log) == 8 and result.log[-1]["val_reconstruction_l1"] <= result.log[0]["val_reconstruction_l1"]


# -- the explanation, against a classifier whose answer is known -------------------

@pytest.mark.parametrize("mode", ["optimise", "gradient_shift"])
def test_counterfactual_moves_the_box_the_requested_way(box_autoencoder, mode):
    autoencoder, _, _ = box_autoencoder
    images, labels = box_images(16, seed=2)
    classifier = BoxClassifier()
    explainer = GvrExplainer(autoencoder=autoencoder, mode=mode, steps=4, search_steps=40, learning_rate=0.2,
                             similarity_weight=0.5, margin=1.0, max_shift=6.0, threshold=0.5)
    with torch.no_grad():  # as the engine calls explainers: the search must still have its gradients
        e = explainer.explain(images, classifier)
        logit_x, logit_cf = classifier(images), classifier(e.counterfactuals[:, -1])
    positive = logit_x > 0
    assert bool((positive == labels.bool()).all())  # the bright-box cases are the positives
    direction = torch.where(positive, -1.0, 1.0)
    moved = (logit_cf - logit_x) * direction
    assert bool((moved > 0).all()), moved  # every case moves towards the other class...
    flipped = sum(c["flipped"] for c in e.checks) / len(e.checks)
    assert flipped >= 0.75, [c["counterfactual_probability"] for c in e.checks]  # ...and most cross it
    # The change is where the classifier looks: the box holds most of the rationale's mass.
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[BOX[0] - 2:BOX[1] + 2, BOX[2] - 2:BOX[3] + 2] = True
    change = (e.counterfactuals[:, -1, 0] - images[:, 0]).abs()
    inside = change[:, box].mean(dim=1)
    outside = change[:, ~box].mean(dim=1)
    assert bool((inside > outside).all()), (inside, outside)
    # Along the path the probability moves monotonically enough to reach the far side at the end.
    assert bool(((e.path_probability[:, -1] - e.path_probability[:, 0]) * direction >= -1e-6).all())
    for c in e.checks:
        assert 0 <= c["steps_used"] <= 40 and c["mode"] == mode
        if c["flipped"] and mode == "optimise":
            assert c["steps_used"] < 40  # stopped at its goal, not at the budget


def test_optimisation_stops_at_the_goal_with_the_margin(box_autoencoder):
    autoencoder, _, _ = box_autoencoder
    images, _ = box_images(8, seed=3)
    explainer = GvrExplainer(autoencoder=autoencoder, steps=1, search_steps=60, learning_rate=0.2,
                             similarity_weight=0.5, margin=1.0, threshold=0.5)
    e = explainer.explain(images, BoxClassifier())
    logit_cf = torch.logit(e.path_probability[:, -1])
    sign = torch.where(e.probability >= 0.5, -1.0, 1.0)
    for i, c in enumerate(e.checks):
        if c["flipped"] and c["steps_used"] < 60:
            assert float(logit_cf[i] * sign[i]) >= 1.0 - 1e-4  # crossed by the margin (logit(0.5) = 0)


# -- the contract on real images -----------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_explain_shapes_ranges_and_checks(steps, kermany_dir, demo_classifier):
    images = real_images(kermany_dir, 4)
    autoencoder = tiny_autoencoder(size=64)
    explainer = GvrExplainer(autoencoder=autoencoder, steps=steps, search_steps=4, threshold=0.808)
    e = explainer.explain(images, demo_classifier)
    assert e.probability.shape == (4,) and e.saliency.shape == (4, 128, 128)
    assert e.counterfactuals.shape == (4, steps, 1, 128, 128) and e.path_probability.shape == (4, steps)
    assert float(e.saliency.min()) >= 0 and float(e.saliency.max()) <= 1
    assert 0 <= float(e.counterfactuals.min()) and float(e.counterfactuals.max()) <= 1
    with torch.no_grad():
        z0 = autoencoder.encode(images)
        reconstruction = (autoencoder.decode(z0) - autoencoder.working(images)).abs().flatten(1).mean(1)
    for i, check in enumerate(e.checks):
        assert set(check) >= {"flipped", "counterfactual_probability", "proximity_l1", "steps_used",
                              "reconstruction_l1", "latent_shift"}
        assert check["counterfactual_probability"] == pytest.approx(float(e.path_probability[i, -1]))
        assert check["flipped"] == bool((e.path_probability[i, -1] >= 0.808) != (e.probability[i] >= 0.808))
        assert check["proximity_l1"] == pytest.approx(float((e.counterfactuals[i, -1] - images[i]).abs().mean()),
                                                      rel=1e-4, abs=1e-7)
        assert isinstance(check["steps_used"], int) and 0 <= check["steps_used"] <= 4
        assert check["reconstruction_l1"] == pytest.approx(float(reconstruction[i]), rel=1e-4)
        if check["steps_used"] > 0:
            assert check["latent_shift"] > 0
    assert "gvr" in available() and explainer_class("gvr") is GvrExplainer
    with torch.no_grad():  # the classifier's own score of the input
        assert torch.allclose(e.probability, torch.sigmoid(demo_classifier(images).reshape(-1)), atol=1e-6)


def test_no_search_means_no_change(kermany_dir, demo_classifier):
    """With a zero step budget z* = z0: the residual trick returns the input itself."""
    images = real_images(kermany_dir, 2)
    e = GvrExplainer(autoencoder=tiny_autoencoder(size=64), steps=2, search_steps=0, threshold=0.808).explain(
        images, demo_classifier)
    assert torch.equal(e.counterfactuals[:, -1], images) and torch.equal(e.counterfactuals[:, 0], images)
    assert all(c["steps_used"] == 0 and not c["flipped"] and c["latent_shift"] == 0 for c in e.checks)
    assert float(e.saliency.max()) == 0  # an all-zero map stays zero


@pytest.mark.parametrize("mode", ["optimise", "gradient_shift"])
def test_same_image_same_explanation_alone_or_in_a_batch(mode, kermany_dir, demo_classifier):
    images = real_images(kermany_dir, 4)
    explainer = GvrExplainer(autoencoder=tiny_autoencoder(size=64), mode=mode, steps=2, search_steps=5,
                             threshold=0.808)
    batch = explainer.explain(images, demo_classifier)
    for i in (0, 3):
        alone = explainer.explain(images[i:i + 1], demo_classifier)
        assert alone.checks[0]["steps_used"] == batch.checks[i]["steps_used"]
        assert alone.checks[0]["flipped"] == batch.checks[i]["flipped"]
        # Not bit-identical: the classifier's convolutions round differently at another
        # batch size, and Adam's normalised first steps magnify that rounding in latent
        # elements whose gradient is nearly zero. Batch statistics would differ by far more.
        assert torch.allclose(alone.counterfactuals[0], batch.counterfactuals[i], atol=2e-3)
        assert torch.allclose(alone.path_probability[0], batch.path_probability[i], atol=2e-3)
        assert torch.allclose(alone.saliency[0], batch.saliency[i], atol=2e-2)


def test_evaluation_summarises_the_checks(box_autoencoder):
    autoencoder, _, _ = box_autoencoder
    images, _ = box_images(8, seed=4)
    explainer = GvrExplainer(autoencoder=autoencoder, steps=1, search_steps=30, learning_rate=0.2,
                             similarity_weight=0.5, threshold=0.5)
    metrics = evaluate_explainer(explainer, BoxClassifier(), images, batch_size=3)
    e = explainer.explain(images, BoxClassifier())
    assert metrics["n"] == 8 and metrics["ms_per_image"] > 0
    assert metrics["flip_rate"] == pytest.approx(sum(c["flipped"] for c in e.checks) / 8)
    assert metrics["steps_used"] == pytest.approx(sum(c["steps_used"] for c in e.checks) / 8)
    assert 0 < metrics["proximity_ssim"] <= 1 and metrics["proximity_l1"] > 0
    assert set(metrics) >= {"flip_rate_called_positive", "flip_rate_called_negative", "reconstruction_l1"}


def test_bad_settings_are_refused():
    autoencoder = tiny_autoencoder()
    with pytest.raises(ValueError, match="mode"):
        GvrExplainer(autoencoder=autoencoder, mode="sideways")
    with pytest.raises(ValueError, match="steps"):
        GvrExplainer(autoencoder=autoencoder, steps=0)
    with pytest.raises(ValueError, match="learning rate"):
        GvrExplainer(autoencoder=autoencoder, learning_rate=0)


# -- training ------------------------------------------------------------------------

def test_training_resumes_from_its_checkpoint(tmp_path):
    train, _ = box_images(16, seed=0)
    val, _ = box_images(8, seed=1)
    first = train_gvr(tiny_autoencoder(), train, val, _config(1), tmp_path / "a")
    assert [r["epoch"] for r in first.log] == [0.0]
    second = train_gvr(tiny_autoencoder(), train, val, _config(2), tmp_path / "a")
    assert [r["epoch"] for r in second.log] == [0.0, 1.0] and second.log[0] == first.log[0]
    rows = list(csv.DictReader(open(tmp_path / "a" / "gvr_training_log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and "val_reconstruction_l1" in rows[0]

    train_gvr(tiny_autoencoder(), train, val, _config(2), tmp_path / "b")
    last_a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["autoencoder"]
    last_b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["autoencoder"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # resume == uninterrupted

    with pytest.raises(ValueError, match="different setup"):
        train_gvr(GvrAutoEncoder(widths=(8, 8, 8), latent_channels=4, size=None), train, val, _config(3),
                  tmp_path / "a")


# -- the command line and the bundle -------------------------------------------------

def test_missing_weights_give_a_clear_error(tmp_path):
    bundle = Bundle.load(bundle_copy(tmp_path))
    bundle.spec.explainers.pop("gvr", None)
    with pytest.raises(BundleError, match="medxplain train gvr"):
        GvrExplainer.from_bundle(bundle)


@pytest.mark.slow
def test_train_gvr_command_adds_a_working_explainer_to_a_bundle(tmp_path, kermany_dir):
    bundle_dir = bundle_copy(tmp_path)
    original = (DEMO_BUNDLE / "bundle.yaml").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "gvr", "--bundle", str(bundle_dir),
         "--data", str(small_data(tmp_path, kermany_dir)), "--max-images", "64", "--epochs", "1", "--size", "32",
         "--width", "8", "--latent-channels", "4", "--search-steps", "3"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "gvr_autoencoder.safetensors" in done.stdout
    assert (DEMO_BUNDLE / "bundle.yaml").read_text() == original  # the repository's bundle is untouched

    bundle = Bundle.load(bundle_dir)  # verifies every pinned hash, the new weights included
    spec = bundle.spec.explainers["gvr"]
    assert spec.weights["autoencoder"].file == "gvr_autoencoder.safetensors"
    assert spec.parameters["network"]["size"] == 32 and spec.parameters["search_steps"] == 3
    assert spec.training["data"]["splits"]["train"] == 64
    test = spec.training["test"]
    assert set(test) >= {"flip_rate", "flip_rate_called_positive", "proximity_l1", "proximity_ssim", "steps_used",
                         "reconstruction_l1", "ms_per_image"} and test["n"] == 16
    assert 0 <= test["steps_used"] <= 3
    rows = list(csv.DictReader(open(bundle_dir / "gvr_training_log.csv")))
    assert len(rows) == 1 and "val_reconstruction_l1" in rows[0]
    assert (bundle_dir / ".checkpoints" / "gvr" / "last.ckpt").is_file()

    explainer = explainer_class("gvr").from_bundle(bundle, steps=3)
    assert explainer.budget.steps == 3 and explainer.threshold == pytest.approx(bundle.spec.task.threshold)
    e = explainer.explain(real_images(kermany_dir, 2), bundle.load_classifier())
    assert e.counterfactuals.shape == (2, 3, 1, 128, 128) and e.saliency.shape == (2, 128, 128)
    assert all(isinstance(c["flipped"], bool) for c in e.checks)

    refused = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "gvr", "--bundle", str(tmp_path / "nowhere"),
         "--data", str(kermany_dir)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "cannot train gvr" in refused.stdout


@pytest.mark.slow
def test_shipped_weights_flip_the_decision(kermany_dir, demo_classifier):
    bundle = Bundle.load(DEMO_BUNDLE)
    if "gvr" not in bundle.spec.explainers:
        pytest.skip("the demo bundle has no gvr weights yet (medxplain train gvr)")
    explainer = GvrExplainer.from_bundle(bundle)
    images = sampled_test_images(kermany_dir, 32)
    e = explainer.explain(images, demo_classifier)
    flipped = sum(c["flipped"] for c in e.checks) / len(e.checks)
    # 1.000 on all 624 test images (bundle.yaml training.test); the bar leaves room for other CPUs' rounding.
    assert flipped >= 0.9, f"flip rate {flipped:.3f} on a seeded sample of 32 shared test images"
    assert max(c["reconstruction_l1"] for c in e.checks) < 0.1
