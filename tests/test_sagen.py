"""sagen (Charachon et al. 2020): the two-headed generator, its explainer, its
training loop and `medxplain train sagen`.

Where the answer must be known exactly, the hand-made box classifier of
tests/generator_helpers.py is used. Real images and the demo classifier are used for
shapes, batch independence and the command line (on a temporary copy of the demo
bundle: the repository's bundle is never modified).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from torch import nn

from explainers.base import available, explainer_class
from explainers.bundle import Bundle, BundleError
from explainers.sagen import SagenExplainer, SagenGenerator, SagenIGExplainer
from explainers.train_sagen import SagenLossWeights, SagenTrainer, SagenTrainingConfig
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


def randomised(generator: SagenGenerator, seed: int = 0) -> SagenGenerator:
    """Non-zero heads, so that both outputs differ from the input (the trained case)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (generator.similar_head, generator.adversarial_head):
            head.out.weight.copy_(0.05 * torch.randn(head.out.weight.shape, generator=g))
    return generator.eval()


@pytest.fixture(scope="module")
def demo_classifier():
    return Bundle.load(DEMO_BUNDLE).load_classifier()


# -- the network and the explanation ---------------------------------------------

def test_generator_starts_as_identity_and_stays_in_range():
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        similar, adversarial = SagenGenerator(features=TINY, size=32)(x)
        assert torch.equal(similar, x) and torch.equal(adversarial, x)
        similar, adversarial = randomised(SagenGenerator(features=TINY, size=32))(x)
    assert similar.shape == adversarial.shape == x.shape
    assert 0 <= float(adversarial.min()) and float(adversarial.max()) <= 1
    assert not torch.equal(adversarial, x)
    with pytest.raises(ValueError, match="multiple of 16"):
        SagenGenerator(features=TINY, size=40)


def test_a_conditional_generator_reads_the_call_and_requires_it():
    x = torch.rand(2, 1, 64, 64)
    conditional = randomised(SagenGenerator(features=TINY, size=32, conditional=True))
    with torch.no_grad():
        as_positive = conditional(x, torch.tensor([True, True]))
        as_negative = conditional(x, torch.tensor([False, False]))
        assert not torch.equal(as_positive[1], as_negative[1])  # the adversarial image depends on the call
        mixed = conditional(x, torch.tensor([True, False]))
        assert torch.equal(mixed[1][0], as_positive[1][0]) and torch.equal(mixed[1][1], as_negative[1][1])
        with pytest.raises(ValueError, match="needs the classifier's call"):
            conditional(x)
        plain = randomised(SagenGenerator(features=TINY, size=32))
        assert torch.equal(plain(x)[1], plain(x, torch.tensor([True, False]))[1])  # ignored when unconditional
    assert SagenGenerator(**conditional.config()).conditional is True
    assert SagenGenerator(**{k: v for k, v in plain.config().items() if k != "conditional"}).conditional is False


@pytest.mark.parametrize("steps", [1, 4])
def test_explain_shapes_ranges_and_checks(steps, kermany_dir, demo_classifier):
    images = real_images(kermany_dir, 4)
    explainer = SagenExplainer(generator=randomised(SagenGenerator(features=TINY, size=64)), steps=steps,
                               threshold=0.808)
    e = explainer.explain(images, demo_classifier)
    assert e.probability.shape == (4,) and e.saliency.shape == (4, 128, 128)
    assert e.counterfactuals.shape == (4, steps, 1, 128, 128) and e.path_probability.shape == (4, steps)
    assert float(e.saliency.min()) >= 0 and float(e.saliency.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    assert 0 <= float(e.counterfactuals.min()) and float(e.counterfactuals.max()) <= 1
    assert ((0 <= e.path_probability) & (e.path_probability <= 1)).all()
    with torch.no_grad():
        similar, adversarial = explainer.generator(images)
    assert torch.allclose(e.counterfactuals[:, -1], adversarial)  # the last step is A(x) itself
    if steps > 1:  # the path runs from S(x) towards A(x)
        assert torch.allclose(e.counterfactuals[:, 0], similar + (adversarial - similar) / steps, atol=1e-6)
    for i, check in enumerate(e.checks):
        assert set(check) >= {"flipped", "counterfactual_probability", "proximity_l1", "similar_l1"}
        assert check["counterfactual_probability"] == pytest.approx(float(e.path_probability[i, -1]))
        assert check["flipped"] == ((e.path_probability[i, -1] >= 0.808) != (e.probability[i] >= 0.808))
        assert check["proximity_l1"] == pytest.approx(float((adversarial[i] - images[i]).abs().mean()), rel=1e-4)
    assert "sagen" in available() and explainer_class("sagen") is SagenExplainer


def test_same_image_same_explanation_alone_or_in_a_batch(kermany_dir, demo_classifier):
    images = real_images(kermany_dir, 6)
    explainer = SagenExplainer(generator=randomised(SagenGenerator(features=TINY, size=64)), steps=2,
                               threshold=0.808)
    batch = explainer.explain(images, demo_classifier)
    for i in (0, 3):
        alone = explainer.explain(images[i:i + 1], demo_classifier)
        assert torch.allclose(alone.saliency[0], batch.saliency[i], atol=1e-5)
        assert torch.allclose(alone.counterfactuals[0], batch.counterfactuals[i], atol=1e-5)
        assert torch.allclose(alone.path_probability[0], batch.path_probability[i], atol=1e-5)
        assert alone.checks[0]["flipped"] == batch.checks[i]["flipped"]


class BoxAndDistractor(nn.Module):
    """A hand-made two-headed generator for the box classifier: S(x) = x; A(x) darkens
    BOX (what the classifier reads) *and* an equally large patch the classifier ignores,
    by the same amount: the change a trained generator makes beside the essential one."""

    DISTRACTOR = (slice(20, 32), slice(20, 32))

    def forward(self, images, called=None):
        adversarial = images.clone()
        adversarial[:, :, BOX[0]:BOX[1], BOX[2]:BOX[3]] -= 0.4
        adversarial[:, :, self.DISTRACTOR[0], self.DISTRACTOR[1]] -= 0.4
        return images, adversarial.clamp(0.0, 1.0)


def test_sagen_ig_credits_only_the_change_the_classifier_reads():
    """|S - A| shows both changed patches alike; the integrated gradients from A(x) to x
    put the evidence in BOX and sum to the score gap (Gauss-Legendre: exact for this
    classifier, linear along the straight path)."""
    images, labels = box_images(4, seed=2)
    positive = images[labels == 1]
    classifier = BoxClassifier()
    plain = SagenExplainer(generator=BoxAndDistractor(), smoothing_sigma=0.0).explain(positive, classifier)
    ig = SagenIGExplainer(generator=BoxAndDistractor(), smoothing_sigma=0.0, ig_steps=8).explain(positive, classifier)
    box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    box[BOX[0]:BOX[1], BOX[2]:BOX[3]] = True
    for e in (plain, ig):
        assert all(c["flipped"] for c in e.checks)
        assert torch.equal(e.counterfactuals, plain.counterfactuals)  # the same counterfactual
    inside = lambda maps: float(maps[:, box].sum() / maps.sum())  # noqa: E731
    assert inside(plain.saliency) < 0.6  # the distractor holds half of |S - A|
    assert inside(ig.saliency) == pytest.approx(1.0)
    for check in ig.checks:
        assert check["score_gap"] > 0  # the called class's score falls from x to A(x)
        assert check["attribution_sum"] == pytest.approx(check["score_gap"], rel=1e-3)
        assert check["completeness_relative"] < 1e-3
    assert explainer_class("sagen_ig") is SagenIGExplainer and ig.checks[0]["similar_kept_class"]
    assert ig.saliency.shape == plain.saliency.shape == (len(positive), SIZE, SIZE)
    with pytest.raises(ValueError, match="ig_steps"):
        SagenIGExplainer(generator=BoxAndDistractor(), ig_steps=1)


def test_sagen_ig_is_read_from_the_sagen_section():
    explainer = explainer_class("sagen_ig").from_bundle(Bundle.load(DEMO_BUNDLE))
    assert isinstance(explainer.generator, SagenGenerator) and explainer.ig_steps == 32
    assert explainer.parameters["ig_steps"] == 32 and "smoothing_sigma" in explainer.parameters


# -- training ----------------------------------------------------------------------

def train_sagen(generator, classifier, train, val, config, directory):
    return fit(SagenTrainer(config, generator, classifier, train, val), directory)


def _tiny_config(epochs: int, **kw) -> SagenTrainingConfig:
    return SagenTrainingConfig(epochs=epochs, batch_size=8, learning_rate=3e-3, discriminator_learning_rate=1e-3,
                               threshold=0.5, translate=1.0, rotate=0.05, scale=0.02,
                               weights=SagenLossWeights(classification=1.0, reconstruction=10.0, proximity=1.0,
                                                        adversarial=0.05), **kw)


@pytest.mark.parametrize("conditional", [False, True])
def test_a_tiny_generator_learns_to_move_the_decision(conditional, tmp_path):
    torch.manual_seed(0)
    train, _ = box_images(64, seed=0)
    val, _ = box_images(32, seed=1)
    classifier = BoxClassifier()
    generator = SagenGenerator(features=TINY, conditional=conditional)
    before = evaluate_explainer(SagenExplainer(generator=generator, threshold=0.5), classifier, val)
    assert before["flip_rate"] == 0.0  # identity at start
    result = train_sagen(generator, classifier, train, val, _tiny_config(5), tmp_path / "ckpt")  # 40 steps
    with torch.no_grad():
        similar, adversarial = generator(val, classifier(val) > 0)
        logit_x, logit_s, logit_a = classifier(val), classifier(similar), classifier(adversarial)
    positive = logit_x > 0
    # The adversarial head moves every image towards the other class...
    direction = torch.where(positive, -1.0, 1.0)
    assert bool(((logit_a - logit_x) * direction > 0).all())
    assert float(((logit_a - logit_x) * direction).mean()) > 2.0
    assert result.validation["flip_rate"] >= 0.75, result.validation
    # ...and the similar head keeps the class, close to the input.
    assert bool(((logit_s > 0) == positive).all())
    assert result.validation["similar_l1"] < 0.05
    assert len(result.log) == 5 and (tmp_path / "ckpt" / "sagen_training_log.csv").is_file()


def test_training_resumes_from_its_checkpoint(tmp_path):
    train, _ = box_images(16, seed=0)
    val, _ = box_images(8, seed=1)
    classifier = BoxClassifier()

    def fresh() -> SagenGenerator:
        torch.manual_seed(0)
        return SagenGenerator(features=TINY)

    interrupted = fresh()
    first = train_sagen(interrupted, classifier, train, val, _tiny_config(1), tmp_path / "a")
    assert [r["epoch"] for r in first.log] == [0.0]
    resumed = fresh()
    second = train_sagen(resumed, classifier, train, val, _tiny_config(2), tmp_path / "a")
    assert [r["epoch"] for r in second.log] == [0.0, 1.0]
    assert second.log[0] == first.log[0]
    rows = list(csv.DictReader(open(tmp_path / "a" / "sagen_training_log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and "val_flip_rate" in rows[0]

    straight = fresh()
    train_sagen(straight, classifier, train, val, _tiny_config(2), tmp_path / "b")
    last_a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["generator"]
    last_b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["generator"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # resume == uninterrupted

    with pytest.raises(ValueError, match="different setup"):
        train_sagen(SagenGenerator(features=(8, 8, 16, 16, 16, 8)), classifier, train, val, _tiny_config(3),
                    tmp_path / "a")


# -- the command line and the bundle -------------------------------------------------

def test_missing_weights_give_a_clear_error(tmp_path):
    bundle = Bundle.load(bundle_copy(tmp_path))
    bundle.spec.explainers.pop("sagen", None)
    with pytest.raises(BundleError, match="medxplain train sagen"):
        SagenExplainer.from_bundle(bundle)


@pytest.mark.slow
def test_train_sagen_command_adds_a_working_explainer_to_a_bundle(tmp_path, kermany_dir):
    bundle_dir = bundle_copy(tmp_path)
    original = (DEMO_BUNDLE / "bundle.yaml").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "sagen", "--bundle", str(bundle_dir),
         "--data", str(small_data(tmp_path, kermany_dir)), "--max-images", "64", "--epochs", "1", "--size", "32"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "sagen_generator.safetensors" in done.stdout
    assert (DEMO_BUNDLE / "bundle.yaml").read_text() == original  # the repository's bundle is untouched

    bundle = Bundle.load(bundle_dir)  # verifies every pinned hash, the new weights included
    spec = bundle.spec.explainers["sagen"]
    assert spec.weights["generator"].file == "sagen_generator.safetensors"
    assert spec.parameters["network"]["size"] == 32 and "loss_weights" in spec.parameters
    assert spec.training["data"]["splits"]["train"] == 64 and "flip_rate" in spec.training["test"]
    assert 0 < spec.training["called_positive_fraction"] < 1 and spec.training["balance_classes"] is True
    rows = list(csv.DictReader(open(bundle_dir / "sagen_training_log.csv")))
    assert len(rows) == 1 and "val_flip_rate" in rows[0]
    assert (bundle_dir / ".checkpoints" / "sagen" / "last.ckpt").is_file()

    explainer = explainer_class("sagen").from_bundle(bundle, steps=3)
    images = real_images(kermany_dir, 4)
    e = explainer.explain(images, bundle.load_classifier())
    assert e.counterfactuals.shape == (4, 3, 1, 128, 128) and e.saliency.shape == (4, 128, 128)
    assert explainer.threshold == pytest.approx(bundle.spec.task.threshold)
    assert all(isinstance(c["flipped"], bool) for c in e.checks)


def test_shipped_weights_flip_the_decision(kermany_dir, demo_classifier):
    bundle = Bundle.load(DEMO_BUNDLE)
    if "sagen" not in bundle.spec.explainers:
        pytest.skip("the demo bundle has no sagen weights yet (medxplain train sagen)")
    explainer = SagenExplainer.from_bundle(bundle)
    images = sampled_test_images(kermany_dir, 64)
    e = explainer.explain(images, demo_classifier)
    flipped = sum(c["flipped"] for c in e.checks) / len(e.checks)
    assert flipped >= 0.85, f"flip rate {flipped:.3f} on a seeded sample of 64 shared test images"


def test_the_cycle_term_needs_a_conditional_generator():
    train, _ = box_images(8, seed=0)
    config = _tiny_config(1)
    config.weights.cycle = 1.0
    with pytest.raises(ValueError, match="conditional"):
        SagenTrainer(config, SagenGenerator(features=TINY), BoxClassifier(), train, train)


def test_the_cycle_term_makes_the_opposite_call_undo_the_change(tmp_path):
    """Charachon et al. 2021, cyclic approximation: A(A(x, yhat), 1 - yhat) comes back to x."""
    train, _ = box_images(64, seed=0)
    val, _ = box_images(32, seed=1)
    classifier = BoxClassifier()

    def cycle_l1(cycle: float) -> tuple[float, float]:
        torch.manual_seed(0)
        generator = SagenGenerator(features=TINY, conditional=True)
        config = _tiny_config(5)
        config.weights.cycle = cycle
        result = train_sagen(generator, classifier, train, val, config, tmp_path / f"cycle{cycle}")
        with torch.no_grad():
            called = classifier(val) > 0
            adversarial = generator(val, called)[1]
            back = generator(adversarial, ~called)[1]
        return float((back - val).abs().mean()), result.validation["flip_rate"]

    without, _ = cycle_l1(0.0)
    with_cycle, flips = cycle_l1(10.0)
    assert with_cycle < 0.5 * without, (with_cycle, without)  # measured: 0.010 against 0.055
    assert flips >= 0.75
