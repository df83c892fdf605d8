"""Progressive exaggeration (Singla et al.): the conditional generator, its explainer,
its training loop and `medxplain train exaggeration`.

The hand-made box classifier (tests/generator_helpers.py) gives known answers for
training; real images and the demo classifier are used for shapes, batch
independence and the command line (on a copy of the demo bundle).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from explainers.base import available, explainer_class
from explainers.bundle import Bundle, BundleError
from explainers.exaggeration import (
    ConditionalGenerator,
    ExaggerationExplainer,
    ProjectionCritic,
    bin_centre,
    bin_of,
    sweep_targets,
)
from explainers.train_exaggeration import ExaggerationLossWeights, ExaggerationTrainer, ExaggerationTrainingConfig
from explainers.training import fit
from explainers.validity import evaluate_explainer
from tests.conftest import PROJECT_ROOT
from tests.generator_helpers import (
    DEMO_BUNDLE,
    BoxClassifier,
    box_images,
    bundle_copy,
    real_images,
    sampled_test_images,
    small_data,
)

TINY = (8, 16, 32)


def randomised(generator: ConditionalGenerator, seed: int = 0) -> ConditionalGenerator:
    """Non-zero output layer and conditioning, so that G(x, k) differs from x and between bins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        generator.head.out.weight.copy_(0.05 * torch.randn(generator.head.out.weight.shape, generator=g))
        for block in (*generator.down, *generator.up):
            block.film.weight.copy_(0.5 * torch.randn(block.film.weight.shape, generator=g))
    return generator.eval()


@pytest.fixture(scope="module")
def demo_classifier():
    return Bundle.load(DEMO_BUNDLE).load_classifier()


# -- bins, sweep, networks ----------------------------------------------------------

def test_bins_and_the_sweep_cross_the_threshold():
    p = torch.tensor([0.0, 0.049, 0.1, 0.55, 0.999, 1.0])
    assert bin_of(p, 10).tolist() == [0, 0, 1, 5, 9, 9]
    assert bin_centre(torch.tensor([0, 9]), 10).tolist() == pytest.approx([0.05, 0.95])
    sweep = sweep_targets(torch.tensor([0.9, 0.6, 0.2]), threshold=0.7, steps=4)
    assert sweep.shape == (3, 4)
    assert sweep[:, 0].tolist() == pytest.approx([0.9, 0.6, 0.2])  # starts at f(x)
    # ends on the other side of the threshold even where 1 - f(x) would not (0.6 -> 0.4 < 0.7 stays negative)
    assert sweep[:, -1].tolist() == pytest.approx([0.05, 0.95, 0.95])
    assert bool((sweep.diff(dim=1)[0] < 0).all()) and bool((sweep.diff(dim=1)[1:] > 0).all())


def test_generator_starts_as_identity_stays_in_range_and_depends_on_the_bin():
    x = torch.rand(3, 1, 64, 64)
    k = torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(ConditionalGenerator(widths=TINY, size=32)(x, k), x)  # zero-initialised head
        g = randomised(ConditionalGenerator(widths=TINY, size=32))
        low, high = g(x, torch.zeros(3, dtype=torch.long)), g(x, torch.full((3,), 9))
    assert low.shape == x.shape and 0 <= float(low.min()) and float(high.max()) <= 1
    assert not torch.allclose(low, high)  # the condition reaches the output
    with pytest.raises(ValueError, match="multiple of 4"):
        ConditionalGenerator(widths=TINY, size=30)
    with pytest.raises(ValueError, match="one bin per image"):
        g(x, torch.tensor([1]))
    critic = ProjectionCritic(bins=10, widths=(8, 16))
    assert critic(x, k).shape == (3,)


@pytest.mark.parametrize("steps", [2, 5])
def test_explain_shapes_ranges_and_checks(steps, kermany_dir, demo_classifier):
    images = real_images(kermany_dir, 4)
    explainer = ExaggerationExplainer(generator=randomised(ConditionalGenerator(widths=TINY, size=64)),
                                      steps=steps, threshold=0.808)
    e = explainer.explain(images, demo_classifier)
    assert e.probability.shape == (4,) and e.saliency.shape == (4, 128, 128)
    assert e.counterfactuals.shape == (4, steps, 1, 128, 128) and e.path_probability.shape == (4, steps)
    assert float(e.saliency.min()) >= 0 and float(e.saliency.amax(dim=(1, 2)).max()) <= 1
    assert 0 <= float(e.counterfactuals.min()) and float(e.counterfactuals.max()) <= 1
    requested = sweep_targets(e.probability, 0.808, steps)
    with torch.no_grad():  # the last step is G(x, bin of the far end of the sweep)
        end = explainer.generator(images, bin_of(requested[:, -1], 10))
    assert torch.allclose(e.counterfactuals[:, -1], end, atol=1e-6)
    for i, check in enumerate(e.checks):
        assert check["counterfactual_probability"] == pytest.approx(float(e.path_probability[i, -1]))
        assert check["flipped"] == ((e.path_probability[i, -1] >= 0.808) != (e.probability[i] >= 0.808))
        assert check["requested_probability"] == pytest.approx(float(requested[i, -1]))
        assert check["posterior_tracking_mae"] == pytest.approx(
            float((e.path_probability[i] - requested[i]).abs().mean()), rel=1e-4)
        assert 0 <= check["monotone_fraction"] <= 1
    assert "exaggeration" in available() and explainer_class("exaggeration") is ExaggerationExplainer
    with pytest.raises(ValueError, match="steps must be >= 2"):
        ExaggerationExplainer(generator=ConditionalGenerator(widths=TINY), steps=1)


def test_same_image_same_explanation_alone_or_in_a_batch(kermany_dir, demo_classifier):
    """No batch statistics at test time (the public code's conditional batch norm had them)."""
    images = real_images(kermany_dir, 6)
    explainer = ExaggerationExplainer(generator=randomised(ConditionalGenerator(widths=TINY, size=64)), steps=3,
                                      threshold=0.808)
    batch = explainer.explain(images, demo_classifier)
    for i in (0, 4):
        alone = explainer.explain(images[i:i + 1], demo_classifier)
        assert torch.allclose(alone.saliency[0], batch.saliency[i], atol=1e-5)
        assert torch.allclose(alone.counterfactuals[0], batch.counterfactuals[i], atol=1e-5)
        assert torch.allclose(alone.path_probability[0], batch.path_probability[i], atol=1e-5)


# -- training ----------------------------------------------------------------------

def train_exaggeration(generator, classifier, train, val, config, directory):
    return fit(ExaggerationTrainer(config, generator, classifier, train, val), directory)


def _tiny_config(epochs: int) -> ExaggerationTrainingConfig:
    return ExaggerationTrainingConfig(epochs=epochs, batch_size=8, learning_rate=3e-3,
                                      discriminator_learning_rate=1e-3, threshold=0.5, translate=1.0, rotate=0.05,
                                      scale=0.02,
                                      # box images are no radiographs: no lung fields to weight by
                                      weights=ExaggerationLossWeights(adversarial=0.05, outside_lungs=0.0))


def test_a_tiny_generator_learns_to_follow_the_requested_posterior(tmp_path):
    torch.manual_seed(0)
    train, _ = box_images(64, seed=0)
    val, _ = box_images(32, seed=1)
    classifier = BoxClassifier()
    generator = ConditionalGenerator(widths=TINY, bins=10)
    before = evaluate_explainer(ExaggerationExplainer(generator=generator, threshold=0.5), classifier, val)
    assert before["flip_rate"] == 0.0  # identity at the start
    result = train_exaggeration(generator, classifier, train, val, _tiny_config(6), tmp_path / "ckpt")  # 48 steps
    with torch.no_grad():
        logit_x = classifier(val)
        low = classifier(generator(val, torch.zeros(len(val), dtype=torch.long)))
        high = classifier(generator(val, torch.full((len(val),), 9)))
        rebuilt = generator(val, bin_of(torch.sigmoid(logit_x), 10))
    # Asking for the lowest bin lowers the logit of every image not already there, asking
    # for the highest raises it (the box images sit in bin 0 or bin 9)...
    own = bin_of(torch.sigmoid(logit_x), 10)
    assert set(own.tolist()) == {0, 9}
    assert bool((low < logit_x)[own == 9].all()) and bool((high > logit_x)[own == 0].all())
    assert float((high - low).mean()) > 3.0
    assert result.validation["flip_rate"] >= 0.75, result.validation
    assert result.validation["posterior_tracking_mae"] < before["posterior_tracking_mae"]
    # ...while asking for the image's own bin gives the image back.
    assert float((rebuilt - val).abs().mean()) < 0.05
    assert len(result.log) == 6 and (tmp_path / "ckpt" / "exaggeration_training_log.csv").is_file()


def test_training_resumes_from_its_checkpoint(tmp_path):
    train, _ = box_images(16, seed=0)
    val, _ = box_images(8, seed=1)
    classifier = BoxClassifier()

    def fresh() -> ConditionalGenerator:
        torch.manual_seed(0)
        return ConditionalGenerator(widths=TINY)

    first = train_exaggeration(fresh(), classifier, train, val, _tiny_config(1), tmp_path / "a")
    second = train_exaggeration(fresh(), classifier, train, val, _tiny_config(2), tmp_path / "a")
    assert [r["epoch"] for r in second.log] == [0.0, 1.0] and second.log[0] == first.log[0]
    train_exaggeration(fresh(), classifier, train, val, _tiny_config(2), tmp_path / "b")
    last_a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["generator"]
    last_b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["generator"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # resume == uninterrupted
    with pytest.raises(ValueError, match="different setup"):
        train_exaggeration(ConditionalGenerator(widths=(8, 8, 16)), classifier, train, val, _tiny_config(3),
                           tmp_path / "a")


# -- the command line and the bundle -------------------------------------------------

def test_missing_weights_give_a_clear_error(tmp_path):
    bundle = Bundle.load(bundle_copy(tmp_path))
    bundle.spec.explainers.pop("exaggeration", None)
    with pytest.raises(BundleError, match="medxplain train exaggeration"):
        ExaggerationExplainer.from_bundle(bundle)


@pytest.mark.slow
def test_train_exaggeration_command_adds_a_working_explainer_to_a_bundle(tmp_path, kermany_dir):
    bundle_dir = bundle_copy(tmp_path)
    original = (DEMO_BUNDLE / "bundle.yaml").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "exaggeration", "--bundle", str(bundle_dir),
         "--data", str(small_data(tmp_path, kermany_dir)), "--max-images", "48", "--epochs", "1", "--size", "32",
         "--width", "8"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "exaggeration_generator.safetensors" in done.stdout
    assert (DEMO_BUNDLE / "bundle.yaml").read_text() == original  # the repository's bundle is untouched

    bundle = Bundle.load(bundle_dir)  # verifies every pinned hash, the new weights included
    spec = bundle.spec.explainers["exaggeration"]
    assert spec.parameters["network"]["size"] == 32 and spec.parameters["network"]["bins"] == 10
    assert spec.training["data"]["splits"]["train"] == 48 and "flip_rate" in spec.training["test"]
    rows = list(csv.DictReader(open(bundle_dir / "exaggeration_training_log.csv")))
    assert len(rows) == 1 and "val_posterior_tracking_mae" in rows[0]

    explainer = explainer_class("exaggeration").from_bundle(bundle, steps=3)
    e = explainer.explain(real_images(kermany_dir, 2), bundle.load_classifier())
    assert e.counterfactuals.shape == (2, 3, 1, 128, 128)
    assert explainer.threshold == pytest.approx(bundle.spec.task.threshold)

    # Training on (resume to 2 epochs) replaces the weights and their pin in bundle.yaml.
    again = subprocess.run(done.args[:-8] + ["--max-images", "48", "--epochs", "2", "--size", "32", "--width", "8"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
    retrained = Bundle.load(bundle_dir)  # verifies the new pin
    assert retrained.spec.explainers["exaggeration"].weights["generator"].sha256 != spec.weights["generator"].sha256
    assert len(list(csv.DictReader(open(bundle_dir / "exaggeration_training_log.csv")))) == 2


def test_shipped_weights_flip_the_decision(kermany_dir, demo_classifier):
    bundle = Bundle.load(DEMO_BUNDLE)
    if "exaggeration" not in bundle.spec.explainers:
        pytest.skip("the demo bundle has no exaggeration weights yet (medxplain train exaggeration)")
    explainer = ExaggerationExplainer.from_bundle(bundle)
    e = explainer.explain(sampled_test_images(kermany_dir, 64), demo_classifier)
    flipped = sum(c["flipped"] for c in e.checks) / len(e.checks)
    assert flipped >= 0.9, f"flip rate {flipped:.3f} on a seeded sample of 64 shared test images"
    # the path follows the requested posterior on average (the paper's consistency)
    assert sum(c["posterior_tracking_mae"] for c in e.checks) / len(e.checks) < 0.3


@pytest.mark.slow
def test_explain_writes_the_path_as_valid_dicom(tmp_path, shared_dicom_files):
    """`medxplain explain --explainers exaggeration` on a real CR: one counterfactual SC per
    path step, an overlay, a SEG and an SR that holds the checks; all valid for dciodvfy."""
    from explainers.bundle import ExplainerSpec, save_weights
    from tests.dicom_validation import assert_valid

    bundle = Bundle.load(bundle_copy(tmp_path))
    generator = randomised(ConditionalGenerator(widths=TINY, size=64))
    bundle.spec.explainers["exaggeration"] = ExplainerSpec(
        classifier_sha256=bundle.spec.classifier.weights.sha256,
        parameters={"network": generator.config(), "steps": 4},
        weights={"generator": save_weights(generator, bundle.root / "exaggeration_generator.safetensors")})
    bundle.save_spec()
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "explain", str(shared_dicom_files[0]), "--out", str(out),
         "--bundle", str(bundle.root), "--explainers", "exaggeration"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    files = sorted(out.glob("*/*.dcm"))
    import pydicom

    datasets = {f: pydicom.dcmread(f) for f in files}
    kinds = sorted(ds.Modality for ds in datasets.values())
    assert kinds.count("SR") == 1 and kinds.count("SEG") <= 1
    counterfactuals = [ds for ds in datasets.values() if "COUNTERFACTUAL" in str(ds.get("SeriesDescription", ""))]
    assert len(counterfactuals) == 4, sorted(str(ds.get("SeriesDescription")) for ds in datasets.values())
    for path in files:
        assert_valid(path)
    sr = next(ds for ds in datasets.values() if ds.Modality == "SR")
    text = str(sr)
    assert "posterior_tracking_mae" in text and "exaggeration" in text
