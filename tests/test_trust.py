"""Trust (issue 13): the domain guard, the classifier binding of trained explainers, and the
plain-language cautions on the overlay and in the SR.

Real parts: the shipped demo bundle and its calibrated guard, the shared Kermany test
images and adult CRs, a photograph and a nuclear-medicine whole-body image from the
shared DICOM cases and pydicom's own test files. Bundle variants are a copied
bundle.yaml with the weights symlinked (the repository's bundle is never modified).
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from config.schema import MedxplainConfig
from dicom_io.preprocess import Preprocessor
from dicom_io.reader import read_radiograph
from explainers.base import explainer_class
from explainers.bundle import BUNDLE_FILE, Bundle, ClassifierMismatchError
from explainers.domain import DomainGuard, fit_statistics, mahalanobis
from pipeline.cli import app
from tests.conftest import SHARED_DATA, kermany_subset
from tests.dicom_validation import assert_valid
from tests.generator_helpers import DEMO_BUNDLE, sampled_test_images

OTHER_SHA = "0" * 64


def linked_bundle(tmp_path: Path, edit=None) -> Path:
    """The demo bundle's bundle.yaml (optionally edited) with its weights symlinked."""
    root = tmp_path / "bundle"
    root.mkdir()
    for path in DEMO_BUNDLE.iterdir():
        if path.suffix == ".safetensors":
            (root / path.name).symlink_to(path)
    spec = yaml.safe_load((DEMO_BUNDLE / BUNDLE_FILE).read_text())
    if edit:
        edit(spec)
    (root / BUNDLE_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def demo():
    bundle = Bundle.load(DEMO_BUNDLE)
    classifier = bundle.load_classifier()
    return bundle, classifier, DomainGuard.from_bundle(bundle, classifier)


def model_space(path: Path | str) -> torch.Tensor:
    return Preprocessor((128, 128), "squash")(read_radiograph(path).display).as_tensor()[None]


def photograph() -> torch.Tensor:
    """The shared case's photograph (flowers), its stored values as grey in [0, 1]: the
    reader refuses this file's header (empty Modality LUT item), the pixels are fine."""
    pixels = pydicom.dcmread(SHARED_DATA / "dicom-cases" / "sc_empty_modality_lut_item.dcm").pixel_array
    pixels = pixels.astype("float32")
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    return Preprocessor((128, 128), "squash")(pixels).as_tensor()[None]


# -- the score ---------------------------------------------------------------------

def test_mahalanobis_is_the_distance_in_standard_deviations_to_the_nearest_class_mean():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 4.0], dtype=torch.float64)
    features = torch.cat([torch.randn(4000, 2, generator=g, dtype=torch.float64) * scale,
                          torch.randn(4000, 2, generator=g, dtype=torch.float64) * scale + 100.0])
    labels = torch.cat([torch.zeros(4000, dtype=torch.long), torch.ones(4000, dtype=torch.long)])
    stats = fit_statistics(features, labels, shrinkage=0.0)
    probes = torch.tensor([[3.0, 0.0], [0.0, 12.0], [103.0, 100.0]], dtype=torch.float64)
    assert mahalanobis(probes, **stats).tolist() == pytest.approx([3.0, 3.0, 3.0], rel=0.05)


# -- the shipped guard ---------------------------------------------------------------

def test_the_shipped_guard_passes_kermany_test_images(demo, kermany_dir):
    _, _, guard = demo
    assert guard is not None, "bundles/demo-pneumonia has no domain guard"
    result = guard(sampled_test_images(kermany_dir, 32))
    # Calibrated at the validation split's 0.98 quantile; 0.973 of the full test split passes.
    assert result.in_domain.float().mean() >= 0.9


def test_the_shipped_guard_catches_images_the_classifier_was_not_made_for(demo, kermany_dir):
    _, _, guard = demo
    g = torch.Generator().manual_seed(0)
    cases = {
        "adult CR (RG1)": model_space(SHARED_DATA / "dicom" / "RG1_UNCR.dcm"),
        "adult CR (NIH, SIIM)": model_space(SHARED_DATA / "dicom" / "siim_cr_chest_jpeg_baseline.dcm"),
        "photograph": photograph(),
        "NM whole-body bone scan": model_space(get_testdata_file("JPGExtended.dcm")),
        "inverted Kermany": 1.0 - sampled_test_images(kermany_dir, 4, seed=1),
        "uniform noise": torch.rand(2, 1, 128, 128, generator=g),
        "Gaussian noise": (0.5 + 0.2 * torch.randn(2, 1, 128, 128, generator=g)).clamp(0, 1),
    }
    missed = {name: guard(images).score.tolist() for name, images in cases.items()
              if guard(images).in_domain.any()}
    assert not missed, f"in domain by mistake (threshold {guard.threshold}): {missed}"


# -- classifier binding ----------------------------------------------------------------

def _retrained_elsewhere(spec):
    spec["explainers"]["sagen"]["classifier_sha256"] = OTHER_SHA


def test_an_explainer_trained_against_another_classifier_is_refused_naming_both(tmp_path):
    root = linked_bundle(tmp_path, _retrained_elsewhere)
    bundle = Bundle.load(root)
    with pytest.raises(ClassifierMismatchError) as caught:
        explainer_class("sagen").from_bundle(bundle)
    assert OTHER_SHA in str(caught.value) and bundle.spec.classifier.weights.sha256 in str(caught.value)
    # The other methods of the bundle still load.
    explainer_class("exaggeration").from_bundle(bundle)


def test_an_explainer_that_does_not_record_its_classifier_is_refused(tmp_path):
    root = linked_bundle(tmp_path, lambda spec: spec["explainers"]["gvr"].pop("classifier_sha256"))
    with pytest.raises(ClassifierMismatchError, match="does not record the classifier"):
        explainer_class("gvr").from_bundle(Bundle.load(root))


def test_the_research_override_loads_it_and_remembers_it(tmp_path):
    bundle = Bundle.load(linked_bundle(tmp_path, _retrained_elsewhere), classifier_override=True)
    explainer_class("sagen").from_bundle(bundle)
    assert bundle.binding_overrides == {"sagen": OTHER_SHA}


def test_a_guard_calibrated_on_another_classifier_is_refused(tmp_path):
    def edit(spec):
        spec["domain_guard"]["classifier_sha256"] = OTHER_SHA

    bundle = Bundle.load(linked_bundle(tmp_path, edit))
    with pytest.raises(ClassifierMismatchError, match="recalibrate"):
        DomainGuard.from_bundle(bundle, bundle.load_classifier())


# -- the engine: skip, or explain with visible cautions ---------------------------------

def _sr_items(ds) -> list:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items += _sr_items(item)
    return items


def test_out_of_domain_is_skipped_with_a_reason_by_default(cr_jpeg):
    from pipeline.engine import Engine

    engine = Engine(MedxplainConfig(bundle=DEMO_BUNDLE, explainers=["gradcam"], device="cpu"))
    [result] = engine.run([read_radiograph(cr_jpeg)])
    assert result.skipped.startswith("out_of_domain:") and result.datasets() == []
    assert result.domain is not None and not result.domain.in_domain


def test_warn_mode_explains_with_the_domain_score_and_cautions_in_sr_and_overlay(tmp_path, cr_jpeg):
    from pipeline.engine import Engine

    config = MedxplainConfig(bundle=linked_bundle(tmp_path, _retrained_elsewhere), explainers=["gradcam", "sagen"],
                             device="cpu", trust={"out_of_domain": "warn", "explainer_classifier_override": True})
    [result] = Engine(config).run([read_radiograph(cr_jpeg)])
    assert result.skipped is None
    items = _sr_items(result.report)
    named = {i.ConceptNameCodeSequence[0].CodeValue: i for i in items if "ConceptNameCodeSequence" in i}
    assert float(named["DOMSCORE"].MeasuredValueSequence[0].NumericValue) > float(
        named["DOMTHR"].MeasuredValueSequence[0].NumericValue)
    assert named["INDOMAIN"].ConceptCodeSequence[0].CodeMeaning == "No"
    cautions = [i.TextValue for i in items if i.get("ConceptNameCodeSequence")
                and i.ConceptNameCodeSequence[0].CodeValue == "CAUTION"]
    assert any(c.startswith("out of domain") for c in cautions)
    assert any("research override: sagen" in c for c in cautions)
    assert any(i.get("TextValue", "").startswith("research override: trained against classifier sha256 " + OTHER_SHA)
               for i in items)
    assert any(i.get("TextValue") in ("counterfactual did not flip", "counterfactual flipped the decision")
               for i in items)
    overlays = [ds for m in result.methods for ds in m.datasets if ds.PhotometricInterpretation == "RGB"]
    assert overlays and all("out of domain" in ds.ImageComments for ds in overlays)
    for ds in [result.report, *overlays]:
        assert_valid(ds)


# -- calibration command ------------------------------------------------------------------

def test_train_domain_guard_writes_a_pinned_calibrated_guard(tmp_path, kermany_dir):
    root = linked_bundle(tmp_path, lambda spec: spec.pop("domain_guard"))
    data = kermany_subset(kermany_dir, tmp_path / "data", {"train": 96, "test": 16})
    done = CliRunner().invoke(app, ["train", "domain-guard", "--bundle", str(root), "--data", str(data),
                                    "--quantile", "0.9"])
    assert done.exit_code == 0, done.output
    bundle = Bundle.load(root)  # verifies the statistics file against its pinned sha256
    guard = bundle.spec.domain_guard
    assert guard.classifier_sha256 == bundle.spec.classifier.weights.sha256
    assert guard.layers == ["features.transition3", "features.denseblock4"]
    assert guard.calibration["in_domain_rate"]["val"] >= 0.75 and guard.threshold > 0  # 0.9 quantile of ~6 images
    assert "domain_guard.statistics" in bundle.verify()


def test_the_pacs_worker_skips_out_of_domain_with_the_reason_in_the_audit(tmp_path, cr_jpeg):
    import shutil

    from pipeline.pacs.audit import AuditLog
    from pipeline.pacs.worker import Worker, open_queue
    from tests.test_worker import make_config

    cfg = make_config(tmp_path, DEMO_BUNDLE)  # trust.out_of_domain unset: the PACS default, skip
    queue = open_queue(cfg)
    spool = tmp_path / "spool" / "study-1"
    spool.mkdir(parents=True)
    shutil.copy(cr_jpeg, spool / "1.dcm")
    out = tmp_path / "out"
    queue.enqueue("dicom:study-1", {"kind": "folder", "folder": str(spool), "deliver": "folder", "out": str(out)})
    assert Worker(cfg, queue, "w1").run_once() == ["done"]
    [line] = AuditLog(cfg.worker.audit_log).read()
    assert line["skipped"] == {"out_of_domain": 1} and line["instances"]["explained"] == 0
    assert not list(out.rglob("*.dcm"))
