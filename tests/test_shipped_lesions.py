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

from explainers.bundle import Bundle
from pipeline.cli import app
from pipeline.training.explainers import training_splits
from tests.conftest import PROJECT_ROOT

LESION_BUNDLE = PROJECT_ROOT / "bundles" / "demo-lesions-v2"


@pytest.mark.slow
def test_the_shipped_lesion_classifier_reaches_its_recorded_auroc_on_the_rebuilt_lesions(kermany_dir, tmp_path):
    out = tmp_path / "lesions-paired"
    result = CliRunner().invoke(app, ["make-lesions", "--paired", "--data", str(kermany_dir), "--out", str(out),
                                      "--seed", "0"])
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(LESION_BUNDLE)
    recorded = bundle.spec.metrics["test"]["auroc"]
    assert recorded >= 0.97
    test = training_splits(bundle, out, max_images=None, seed=0)["test"]
    assert int(test.labels.sum()) == len(test.labels) // 2  # paired: every NORMAL image twice
    classifier = bundle.load_classifier()
    with torch.no_grad():
        images = test.float_images()
        logits = torch.cat([classifier(images[i:i + 64]).reshape(-1) for i in range(0, len(images), 64)])
    auroc = float(binary_auroc(torch.sigmoid(logits), test.labels))
    assert auroc == pytest.approx(recorded, abs=2e-3)
