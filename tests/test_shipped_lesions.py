"""The shipped lesion classifier (bundles/demo-lesions-v2, issue 15's localisation
benchmark): the data set is rebuilt from its recorded recipe (``medxplain make-lesions
--paired --seed 0`` over the shared Kermany images) and the classifier scores the test
AUROC its bundle records (the bar is 0.97). Both are deterministic on a CPU, so a
changed lesion generator, preprocessing or classifier shows here."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from typer.testing import CliRunner

from explainers import evaluation as ev
from explainers.base import explainer_class
from explainers.bundle import Bundle
from pipeline.cli import app
from pipeline.evaluation.benchmark import select_cases
from pipeline.training.explainers import training_splits
from tests.conftest import PROJECT_ROOT

LESION_BUNDLE = PROJECT_ROOT / "bundles" / "demo-lesions-v2"


@pytest.fixture(scope="module")
def lesion_test(kermany_dir, tmp_path_factory):
    """(bundle, the test split of the lesion data rebuilt from its recipe, its folder)."""
    out = tmp_path_factory.mktemp("lesions") / "lesions-paired"
    result = CliRunner().invoke(app, ["make-lesions", "--paired", "--data", str(kermany_dir), "--out", str(out),
                                      "--seed", "0"])
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(LESION_BUNDLE)
    return bundle, training_splits(bundle, out, max_images=None, seed=0)["test"], out


@pytest.mark.slow
def test_the_shipped_lesion_classifier_reaches_its_recorded_auroc_on_the_rebuilt_lesions(lesion_test):
    bundle, test, _ = lesion_test
    recorded = bundle.spec.metrics["test"]["auroc"]
    assert recorded >= 0.97
    assert int(test.labels.sum()) == len(test.labels) // 2  # paired: every NORMAL image twice
    classifier = bundle.load_classifier()
    with torch.no_grad():
        images = test.float_images()
        logits = torch.cat([classifier(images[i:i + 64]).reshape(-1) for i in range(0, len(images), 64)])
    auroc = float(binary_auroc(torch.sigmoid(logits), test.labels))
    assert auroc == pytest.approx(recorded, abs=2e-3)


@pytest.mark.slow
def test_the_shipped_conditional_sagen_flips_both_ways_on_lesion_images(lesion_test):
    # The conditional generator (the classifier's call as an input channel): 468 test
    # images: 1.000 / 1.000 flipped (with the cycle term; 0.972 / 0.992 without); the
    # unconditional one it replaced: 0.690 / 0.333.
    bundle, test, _ = lesion_test
    assert bundle.spec.explainers["sagen"].parameters["network"]["conditional"] is True
    classifier = bundle.load_classifier()
    images = test.float_images()[torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(0))[:64]]
    e = explainer_class("sagen").from_bundle(bundle).explain(images, classifier)
    flipped = torch.tensor([c["flipped"] for c in e.checks])
    positive = e.probability >= bundle.spec.task.threshold
    for called, name in ((positive, "LESION"), (~positive, "NORMAL")):
        assert int(called.sum()) >= 16, f"only {int(called.sum())} of 64 sampled cases called {name}"
        rate = float(flipped[called].float().mean())
        assert rate >= 0.85, f"{rate:.3f} of {int(called.sum())} cases called {name} flipped"


@pytest.mark.slow
def test_the_shipped_sagen_and_sagen_ig_localise_the_lesions(lesion_test):
    # The benchmark's 100 cases: sagen (conditional, cycle 30) IoU 0.562, pointing 0.90;
    # sagen_ig 0.655 / 0.92; IG 0.487 / 0.85. On these 24: 0.545 / 0.96 and 0.662 / 0.96.
    bundle, _, data = lesion_test
    cases = select_cases(data, bundle, n=24, seed=1)
    classifier = bundle.load_classifier()
    scores = {}
    for method in ("sagen", "sagen_ig"):
        e = explainer_class(method).from_bundle(bundle).explain(cases.images, classifier)
        scores[method] = (float(ev.iou_at_mask_area(e.saliency, cases.masks).mean()),
                          float(ev.pointing_game(e.saliency, cases.masks).mean()))
    print(f"\nFIGURE lesion localisation on 24 cases (IoU, pointing): {scores}")
    assert scores["sagen"][0] >= 0.45 and scores["sagen"][1] >= 0.8, scores  # 0.373 / 0.86 before the cycle term
    assert scores["sagen_ig"][0] >= scores["sagen"][0] + 0.08 and scores["sagen_ig"][1] >= 0.8, scores
