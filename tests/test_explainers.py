"""The explainer interface, the registry and the baselines (Grad-CAM, IG, Occlusion).

The baselines are run on a hand-made classifier whose answer is known exactly: its
logit is k * (mean of the "lesion" box - mean of the "healthy" box). A bright
blob in the lesion box makes it positive; a bright blob in the healthy box makes
it negative; a bright "distractor" blob elsewhere, present in every image, must
never be shown as evidence. Each method explains the class the classifier
called, so a positive case's evidence lies in the lesion box and a negative
case's in the healthy box.

The classifier holds a BatchNorm layer whose running statistics are the identity:
in eval mode it changes nothing, in training mode it normalises with batch
statistics — so an explainer that leaves the model in training mode makes one
image's map depend on the rest of the batch, and these tests see it.
"""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DenseNet
from torch import nn

from explainers.base import (
    Explainer,
    Explanation,
    TargetLogit,
    available,
    create,
    decision_signs,
    explainer_class,
    normalise_maps,
    register,
)
from explainers.networks import BinaryClassifier

SIZE = 64
LESION = (8, 24, 36, 52)  # rows [8, 24), cols [36, 52)
HEALTHY = (40, 56, 36, 52)
DISTRACTOR = (40, 50, 6, 16)
K = 10.0  # logit per unit of mean-intensity difference between the boxes

METHODS = {
    "gradcam": {"cam_layer": "features"},
    "ig": {"steps": 16, "smoothing_sigma": 1.0},
    "occlusion": {"window": 16, "stride": 8},
}


def box_mask(box: tuple[int, int, int, int]) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE)
    mask[box[0]:box[1], box[2]:box[3]] = 1.0
    return mask


def dilate(box: tuple[int, int, int, int], by: int) -> tuple[int, int, int, int]:
    return (max(box[0] - by, 0), min(box[1] + by, SIZE), max(box[2] - by, 0), min(box[3] + by, SIZE))


class MaskedFeatures(nn.Module):
    """A 3x3 conv that copies the image into two channels, each kept only inside its box."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 1, 1] = 1.0
        self.register_buffer("mask", torch.stack([box_mask(LESION), box_mask(HEALTHY)])[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.mask


class BoxNet(nn.Module):
    """logit = K * (mean over LESION - mean over HEALTHY); Grad-CAM hooks ``features``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = MaskedFeatures()
        self.norm = nn.BatchNorm2d(2)  # running mean 0, var 1: identity in eval mode
        self.head = nn.Linear(2, 1)
        area = (LESION[1] - LESION[0]) * (LESION[3] - LESION[2])
        scale = K * SIZE * SIZE / area
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[scale, -scale]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)).mean(dim=(2, 3)))


def make_image(kind: str, seed: int) -> torch.Tensor:
    """(1, H, W): dim noisy background, the distractor, and a 10x10 blob in the box of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    image = 0.1 + 0.05 * torch.rand(1, SIZE, SIZE, generator=g)
    image[:, DISTRACTOR[0]:DISTRACTOR[1], DISTRACTOR[2]:DISTRACTOR[3]] = 1.0
    box = LESION if kind == "positive" else HEALTHY
    top = box[0] + int(torch.randint(0, 6, (1,), generator=g))
    left = box[2] + int(torch.randint(0, 6, (1,), generator=g))
    image[:, top:top + 10, left:left + 10] = 1.0
    return image


@pytest.fixture()
def classifier() -> BinaryClassifier:
    return BinaryClassifier(BoxNet(), mean=0.0, std=1.0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # positive, negative, positive
    return torch.stack([make_image("positive", 0), make_image("negative", 1), make_image("positive", 2)])


def _fraction_in(saliency: torch.Tensor, box: tuple[int, int, int, int]) -> float:
    return float((saliency * box_mask(box)).sum() / saliency.sum())


def _in_box(row: float, col: float, box: tuple[int, int, int, int]) -> bool:
    return box[0] <= row < box[1] and box[2] <= col < box[3]


# -- the hand-made classifier is what the tests assume ------------------------------

def test_box_classifier_calls_the_expected_classes(classifier, images):
    logits = classifier(images).detach()
    assert logits.shape == (3,)
    assert logits[0] > 2 and logits[2] > 2 and logits[1] < -2
    # the distractor alone does not move the logit
    blank = 0.1 * torch.ones(1, 1, SIZE, SIZE)
    with_distractor = blank.clone()
    with_distractor[..., DISTRACTOR[0]:DISTRACTOR[1], DISTRACTOR[2]:DISTRACTOR[3]] = 1.0
    assert torch.allclose(classifier(blank), classifier(with_distractor), atol=1e-6)


# -- the baselines on it -------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_explanation_shape_range_and_probability(method, classifier, images):
    explanation = create(method, **METHODS[method]).explain(images, classifier)
    assert isinstance(explanation, Explanation)
    saliency = explanation.saliency
    assert saliency.shape == (3, SIZE, SIZE)
    assert torch.isfinite(saliency).all()
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0 + 1e-6
    # every case called with evidence is scaled to a peak of 1
    assert torch.allclose(saliency.flatten(1).amax(dim=1), torch.ones(3), atol=1e-5)
    expected = torch.sigmoid(classifier(images)).detach()
    assert torch.allclose(explanation.probability, expected, atol=1e-6)
    assert len(explanation.checks) == 3
    assert explanation.counterfactuals is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_evidence_lies_in_the_box_of_the_called_class(method, classifier, images):
    """Positive cases: lesion box; negative case: healthy box; never the distractor.
    (MONAI's default CAM postprocessing inverts the map and would put the lesion
    box at 0; explaining the positive logit for a negative case would give an empty map.)"""
    saliency = create(method, **METHODS[method]).explain(images, classifier).saliency
    # occlusion spreads evidence over the windows that touch the blob
    margin = METHODS[method]["window"] // 2 if method == "occlusion" else 0
    for i, box in enumerate([LESION, HEALTHY, LESION]):
        s = saliency[i]
        assert s.sum() > 0, f"{method}: case {i} has an empty map"
        peak = int(s.argmax())
        where = divmod(peak, SIZE)
        assert _in_box(*where, dilate(box, margin)), f"{method}: case {i} peaks at {where}"
        axis = torch.arange(SIZE, dtype=torch.float32)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        centroid = (float((s * rows).sum() / s.sum()), float((s * cols).sum() / s.sum()))
        assert _in_box(*centroid, box), f"{method}: case {i} centroid {centroid}"
        assert _fraction_in(s, dilate(box, margin)) > 0.9, method
        assert _fraction_in(s, DISTRACTOR) < 0.01, method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_image_gets_the_same_map_alone_and_in_a_batch(method, classifier, images):
    explainer = create(method, **METHODS[method])
    batched = explainer.explain(images, classifier)
    for i in range(len(images)):
        alone = explainer.explain(images[i:i + 1], classifier)
        torch.testing.assert_close(alone.saliency[0], batched.saliency[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.probability[0], batched.probability[i], atol=1e-6, rtol=0)


def test_explainers_leave_the_classifier_in_eval_mode_and_unchanged(classifier, images):
    """MONAI's CAM restores the *wrapper's* mode after its pass; a wrapper created in
    training mode used to flip the classifier's BatchNorm to batch statistics."""
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    alone_before = create("ig", **METHODS["ig"]).explain(images[:1], classifier).saliency
    for method in ("gradcam", "occlusion", "ig"):
        create(method, **METHODS[method]).explain(images, classifier)
        assert not classifier.training, f"{method} left the classifier in training mode"
        assert not any(m.training for m in classifier.modules()), method
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before[key]), f"explaining changed {key}"
    # and a later explanation still does not depend on the batch
    alone_after = create("ig", **METHODS["ig"]).explain(images[:1], classifier).saliency
    torch.testing.assert_close(alone_after, alone_before, atol=1e-5, rtol=0)


def test_a_classifier_in_training_mode_is_not_switched_to_eval():
    """The wrapper mirrors the classifier's mode instead of imposing one."""
    net = BinaryClassifier(BoxNet(), mean=0.0, std=1.0).train()
    wrapped = TargetLogit(net, torch.ones(1))
    assert wrapped.training and net.training
    net.eval()
    assert not TargetLogit(net, torch.ones(1)).training


def test_target_logit_signs_follow_captum_batch_expansion():
    classifier = BinaryClassifier(BoxNet(), mean=0.0, std=1.0).eval()
    x = torch.stack([make_image("positive", 3), make_image("negative", 4)])
    logits = classifier(x).detach()
    sign = decision_signs(torch.sigmoid(logits), 0.5)
    assert sign.tolist() == [1.0, -1.0]
    wrapped = TargetLogit(classifier, sign)
    out = wrapped(x).detach()
    assert out.shape == (2, 1)
    assert torch.allclose(out[:, 0], logits.abs())
    # Captum stacks the steps: [step0 case0, step0 case1, step1 case0, step1 case1, ...]
    expanded = wrapped(torch.cat([x, x, x])).detach()[:, 0]
    assert torch.allclose(expanded, logits.abs().repeat(3))


# -- Integrated Gradients completeness on a real (nonlinear) MONAI network ------------

def test_ig_completeness_on_a_nonlinear_network():
    """sum(attributions) = target logit(x) - target logit(baseline), up to the
    quadrature error the explainer reports; one case called positive, one negative."""
    torch.manual_seed(0)
    network = DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=8, growth_rate=8,
                       block_config=(2, 2))
    classifier = BinaryClassifier(network, mean=0.5, std=0.25).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    x[1] = x[1] * 0.5
    with torch.no_grad():
        p = torch.sigmoid(classifier(x))
        gap_positive = classifier(x) - classifier(torch.zeros_like(x))
    assert p[0] != p[1]
    # a threshold between the two cases: one is called positive, the other negative
    threshold = float(p.mean())
    assert sorted(decision_signs(p, threshold).tolist()) == [-1.0, 1.0]
    explanation = create("ig", steps=32, smoothing_sigma=0.0, threshold=threshold).explain(x, classifier)
    for i in range(2):
        check = explanation.checks[i]
        assert check["completeness_relative"] < 0.05, check  # stated tolerance: 5 % of the logit gap
        assert check["completeness_delta"] <= 0.05 * abs(float(gap_positive[i])) + 1e-6, check
    assert torch.isfinite(explanation.saliency).all()
    # the check measures something: far fewer steps give a visibly larger error
    coarse = create("ig", steps=4, smoothing_sigma=0.0, threshold=threshold).explain(x, classifier).checks
    assert sum(c["completeness_delta"] for c in coarse) > sum(c["completeness_delta"] for c in explanation.checks)


def test_ig_attributions_sum_to_the_logit_gap_via_captum():
    """Independent check of the completeness figure the explainer reports."""
    from captum.attr import IntegratedGradients

    classifier = BinaryClassifier(BoxNet(), mean=0.0, std=1.0).eval()
    x = torch.stack([make_image("positive", 6), make_image("negative", 7)])
    sign = decision_signs(torch.sigmoid(classifier(x).detach()), 0.5)
    wrapped = TargetLogit(classifier, sign)
    attributions = IntegratedGradients(wrapped).attribute(x, baselines=torch.zeros_like(x), target=0, n_steps=16)
    with torch.no_grad():
        gap = (wrapped(x) - wrapped(torch.zeros_like(x)))[:, 0]
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), gap, atol=1e-3, rtol=1e-3)
    report = create("ig", steps=16).explain(x, classifier).checks
    assert all(c["completeness_relative"] < 1e-3 for c in report)


# -- registry ---------------------------------------------------------------------

def test_registry_creates_baselines_by_name():
    assert {"gradcam", "ig", "occlusion"} <= set(available())
    assert available() == sorted(available())
    ig = create("ig", steps=8)
    assert isinstance(ig, Explainer) and ig.name == "ig" and ig.steps == 8
    assert explainer_class("occlusion") is type(create("occlusion"))
    assert create("gradcam", cam_layer="features").cam_layer == "features"


def test_unknown_explainer_lists_the_available_ones():
    with pytest.raises(KeyError) as info:
        create("no-such-method")
    message = str(info.value)
    assert "no-such-method" in message
    for name in ("gradcam", "ig", "occlusion"):
        assert name in message
    with pytest.raises(KeyError, match="available"):
        explainer_class("no-such-method")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        @register("ig")
        class Again(Explainer):  # noqa: F841
            def explain(self, images, classifier):  # pragma: no cover
                raise NotImplementedError


def test_settings_key_is_stable_and_parameter_sensitive():
    bundle = "a" * 64
    key = create("ig", steps=8).settings_key(bundle)
    assert key == create("ig", steps=8).settings_key(bundle)
    assert len(key) == 16 and int(key, 16) >= 0
    assert key != create("ig", steps=16).settings_key(bundle)
    assert key != create("ig", steps=8, smoothing_sigma=0.5).settings_key(bundle)
    assert key != create("ig", steps=8, threshold=0.7).settings_key(bundle)
    assert key != create("ig", steps=8).settings_key("b" * 64)
    occlusion = create("occlusion").settings_key(bundle)
    assert occlusion != create("occlusion", window=16, stride=4).settings_key(bundle)
    assert occlusion != key  # another method is another setting
    gradcam_a = create("gradcam", cam_layer="a").settings_key(bundle)
    assert gradcam_a != create("gradcam", cam_layer="b").settings_key(bundle)


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="steps"):
        create("ig", steps=1)
    with pytest.raises(ValueError, match="stride"):
        create("occlusion", window=8, stride=16)
    with pytest.raises(ValueError, match="stride"):
        create("occlusion", window=8, stride=0)
    with pytest.raises(TypeError):
        create("gradcam")  # cam_layer is required


# -- Explanation and helpers ---------------------------------------------------------

def test_explanation_validates_shapes():
    p = torch.rand(2)
    ok = Explanation(probability=p, saliency=torch.zeros(2, 8, 8), checks=[{}, {}],
                     counterfactuals=torch.zeros(2, 3, 1, 8, 8), path_probability=torch.zeros(2, 3))
    assert ok.saliency.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="saliency"):
        Explanation(probability=p, saliency=torch.zeros(3, 8, 8), checks=[{}, {}])
    with pytest.raises(ValueError, match="saliency"):
        Explanation(probability=p, saliency=torch.zeros(2, 1, 8, 8), checks=[{}, {}])
    with pytest.raises(ValueError, match="counterfactuals"):
        Explanation(probability=p, saliency=torch.zeros(2, 8, 8), checks=[{}, {}],
                    counterfactuals=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="counterfactuals"):
        Explanation(probability=p, saliency=torch.zeros(2, 8, 8), checks=[{}, {}],
                    counterfactuals=torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="path_probability"):
        Explanation(probability=p, saliency=torch.zeros(2, 8, 8), checks=[{}, {}],
                    path_probability=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="checks"):
        Explanation(probability=p, saliency=torch.zeros(2, 8, 8), checks=[{}])


def test_normalise_maps_scales_each_map_and_keeps_zero_maps_zero():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 4.0
    maps[0, 2, 2] = 2.0
    maps[1, 0, 0] = -5.0  # negative evidence is dropped
    maps[1, 3, 3] = 0.5
    out = normalise_maps(maps)
    assert out.shape == maps.shape
    assert out[0, 1, 1] == 1.0 and out[0, 2, 2] == 0.5
    assert out[1, 3, 3] == 1.0 and out[1, 0, 0] == 0.0
    assert torch.equal(out[2], torch.zeros(4, 4))
    assert torch.isfinite(out).all()


def test_decision_signs_use_the_threshold_inclusively():
    probability = torch.tensor([0.2, 0.5, 0.8])
    assert decision_signs(probability, 0.5).tolist() == [-1.0, 1.0, 1.0]
    assert decision_signs(probability, 0.9).tolist() == [-1.0, -1.0, -1.0]
