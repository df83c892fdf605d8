"""`medxplain train adopt`: classifier-independent networks (gvr's autoencoder, cia's
inpainters) reused by a bundle with another classifier, re-validated against it; and
a bundle's own classifier-bound networks re-validated with new parameters.

Real bundles: the shipped v1 bundle is the source, a temporary copy of the v2 bundle
(classifier only) the target; the repository's bundles are never modified."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from explainers.base import explainer_class
from explainers.bundle import Bundle, ClassifierMismatchError
from tests.conftest import PROJECT_ROOT
from tests.generator_helpers import DEMO_BUNDLE, real_images, small_data

V2_BUNDLE = PROJECT_ROOT / "bundles" / "demo-pneumonia-v2"


def _adopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "adopt", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture()
def target(tmp_path):
    copy = tmp_path / "v2"
    shutil.copytree(V2_BUNDLE, copy, ignore=shutil.ignore_patterns(".checkpoints", "gvr*", "cia*", "sagen*",
                                                                 "exaggeration*", "medxgan*"))
    spec = yaml.safe_load((copy / "bundle.yaml").read_text())
    spec["explainers"] = {}  # a classifier-only bundle, whatever has been trained into v2 since
    (copy / "bundle.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return copy


def test_adopted_networks_are_bound_to_the_new_classifier_and_revalidated(tmp_path, target, kermany_dir):
    source = Bundle.load(DEMO_BUNDLE)
    assert source.spec.classifier.weights.sha256 != Bundle.load(target).spec.classifier.weights.sha256
    data = small_data(tmp_path, kermany_dir)
    done = _adopt("gvr", "--bundle", str(target), "--from", str(DEMO_BUNDLE), "--data", str(data),
                  "--parameter", "search_steps=40")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "adopted gvr" in done.stdout

    bundle = Bundle.load(target)  # verifies every pinned hash
    spec = bundle.spec.explainers["gvr"]
    original = source.spec.explainers["gvr"]
    assert spec.classifier_sha256 == bundle.spec.classifier.weights.sha256
    assert spec.weights["autoencoder"].sha256 == original.weights["autoencoder"].sha256  # same networks
    assert spec.parameters == {**original.parameters, "search_steps": 40}
    origin = spec.training["networks_from"]
    assert origin["classifier_sha256"] == source.spec.classifier.weights.sha256
    assert origin["changed_parameters"] == {"search_steps": 40}
    assert origin["original_test"] == original.training["test"]
    # The figures are the new classifier's, on the data given (its 16 test images).
    assert spec.training["test"]["n"] == 16 and spec.training["test"] != original.training["test"]
    assert 0.0 <= spec.training["test"]["flip_rate"] <= 1.0
    assert 0.0 <= spec.training["test"]["lung_share"] <= 1.0 and 0.0 <= spec.training["test"]["border_share"] <= 1.0
    assert (target / "gvr_training_log.csv").is_file()

    assert explainer_class("gvr").from_bundle(bundle).budget.steps == 40  # what the bundle now runs
    explainer = explainer_class("gvr").from_bundle(bundle, steps=2, search_steps=3)
    e = explainer.explain(real_images(kermany_dir, 2), bundle.load_classifier())
    assert e.counterfactuals.shape == (2, 2, 1, 128, 128)


def test_methods_trained_against_the_classifier_cannot_be_adopted(tmp_path, target, kermany_dir):
    data = small_data(tmp_path, kermany_dir)
    refused = _adopt("sagen", "--bundle", str(target), "--from", str(DEMO_BUNDLE), "--data", str(data))
    assert refused.returncode == 2 and "trained against the classifier" in refused.stdout
    assert "sagen" not in Bundle.load(target).spec.explainers
    unknown = _adopt("gvr", "--bundle", str(target), "--from", str(DEMO_BUNDLE), "--data", str(data),
                     "--parameter", "no_such_thing=1")
    assert unknown.returncode == 2 and "no parameter no_such_thing" in unknown.stdout
    malformed = _adopt("gvr", "--bundle", str(target), "--from", str(DEMO_BUNDLE), "--data", str(data),
                       "--parameter", "outside_lungs")
    assert malformed.returncode == 2 and "must be NAME=VALUE" in malformed.stdout
    with pytest.raises(ClassifierMismatchError):  # and the binding still refuses a copied section
        copied = Bundle.load(target)
        copied.spec.explainers["sagen"] = Bundle.load(DEMO_BUNDLE).spec.explainers["sagen"]
        copied.check_classifier_binding("sagen")


def test_a_bundle_readopts_its_own_networks_with_new_parameters(tmp_path, kermany_dir):
    """medxgan is trained against v2's classifier, so it cannot come from v1, but v2 may
    adopt it from itself with other parameters: same weights, new figures."""
    bundle_dir = tmp_path / "v2"
    shutil.copytree(V2_BUNDLE, bundle_dir, ignore=shutil.ignore_patterns(".checkpoints", "gvr*", "cia*", "sagen*",
                                                                       "exaggeration*"))
    spec = yaml.safe_load((bundle_dir / "bundle.yaml").read_text())
    spec["explainers"] = {"medxgan": spec["explainers"]["medxgan"]}
    (bundle_dir / "bundle.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    before = Bundle.load(bundle_dir).spec.explainers["medxgan"]
    data = small_data(tmp_path, kermany_dir)
    done = _adopt("medxgan", "--bundle", str(bundle_dir), "--from", str(bundle_dir), "--data", str(data),
                  "--parameter", "walk=search", "--parameter", "search_steps=4", "--parameter", "refine_steps=1")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    after = Bundle.load(bundle_dir).spec.explainers["medxgan"]  # verifies every pinned hash
    assert {k: v.sha256 for k, v in after.weights.items()} == {k: v.sha256 for k, v in before.weights.items()}
    assert after.parameters == {**before.parameters, "walk": "search", "search_steps": 4, "refine_steps": 1}
    assert after.training["networks_from"]["why"] == "the networks were trained against this bundle's classifier"
    assert after.training["test"]["n"] == 16 and after.training["test"] != before.training["test"]
    assert explainer_class("medxgan").from_bundle(Bundle.load(bundle_dir)).walk == "search"
    # Adopting again keeps the earlier adoption's record.
    again = _adopt("medxgan", "--bundle", str(bundle_dir), "--from", str(bundle_dir), "--data", str(data),
                   "--parameter", "refine_steps=2")
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
    record = Bundle.load(bundle_dir).spec.explainers["medxgan"].training["networks_from"]
    assert record["changed_parameters"] == {"refine_steps": 2}
    assert record["previous"] == after.training["networks_from"]
    # From v1 (another classifier) it is still refused.
    refused = _adopt("medxgan", "--bundle", str(bundle_dir), "--from", str(DEMO_BUNDLE), "--data", str(data))
    assert refused.returncode == 2 and "trained against the classifier" in refused.stdout


def test_a_source_with_another_input_is_refused(tmp_path, target, kermany_dir):
    other = tmp_path / "other"
    shutil.copytree(DEMO_BUNDLE, other, ignore=shutil.ignore_patterns(".checkpoints"))
    spec = yaml.safe_load((other / "bundle.yaml").read_text())
    spec["input"]["aspect"] = "pad" if spec["input"]["aspect"] != "pad" else "squash"
    (other / "bundle.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    refused = _adopt("gvr", "--bundle", str(target), "--from", str(other), "--data", str(kermany_dir))
    assert refused.returncode == 2 and "differs" in refused.stdout
    assert "gvr" not in Bundle.load(target).spec.explainers
