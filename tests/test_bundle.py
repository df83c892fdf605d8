"""Model bundles (explainers/bundle.py) and classifier networks (explainers/networks.py).

A bundle is written to a temporary folder exactly as `medxplain train` writes one
(save_weights + BundleSpec + Bundle.save_spec), then loaded back: the classifier
must give the same outputs, any tampering must be refused with the file named, and
a TorchScript classifier (code-bearing) must be refused unless pinned by hash.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from explainers.base import create
from explainers.bundle import (
    BUNDLE_FILE,
    Bundle,
    BundleError,
    BundleSpec,
    ClassifierSpec,
    ExplainerSpec,
    InputSpec,
    TaskSpec,
    save_weights,
    sha256_file,
)
from explainers.networks import DEFAULT_CAM_LAYER, BinaryClassifier, build_network

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = PROJECT_ROOT / "bundles" / "demo-pneumonia"
SIZE = 32
TINY = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "init_features": 8, "growth_rate": 8,
        "block_config": [2, 2]}


def _tiny_network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    network = build_network("monai.DenseNet", dict(TINY))
    # non-trivial BatchNorm statistics, so that a load that dropped buffers would show
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def _spec(classifier: ClassifierSpec, **extra) -> BundleSpec:
    return BundleSpec(
        name="test-bundle", version="0.1", description="written by tests",
        task=TaskSpec(finding="Lesion", positive_label="LESION", negative_label="NORMAL", threshold=0.4),
        input=InputSpec(size=(SIZE, SIZE), aspect="squash", mean=0.5, std=0.25),
        classifier=classifier, **extra,
    )


def _write_bundle(root: Path, network: nn.Module) -> Bundle:
    root.mkdir(parents=True, exist_ok=True)
    ref = save_weights(network, root / "classifier.safetensors")
    decoder = save_weights({"w": torch.arange(6.0).reshape(2, 3)}, root / "gvr_decoder.safetensors")
    spec = _spec(
        ClassifierSpec(architecture="monai.DenseNet", parameters=dict(TINY), weights=ref),
        explainers={"gvr": ExplainerSpec(parameters={"latent": 16}, weights={"decoder": decoder},
                                         classifier_sha256=ref.sha256)},
    )
    bundle = Bundle(root, spec, sha256="")
    bundle.save_spec()
    return bundle


@pytest.fixture()
def network() -> nn.Module:
    return _tiny_network()


@pytest.fixture()
def bundle_dir(tmp_path: Path, network: nn.Module) -> Path:
    _write_bundle(tmp_path / "bundle", network)
    return tmp_path / "bundle"


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# -- round trip -----------------------------------------------------------------

def test_saved_bundle_loads_and_reproduces_the_classifier(bundle_dir, network):
    bundle = Bundle.load(bundle_dir)
    assert bundle.spec.name == "test-bundle"
    assert bundle.spec.task.threshold == 0.4
    assert tuple(bundle.spec.input.size) == (SIZE, SIZE)
    assert bundle.sha256 == sha256_file(bundle_dir / BUNDLE_FILE)
    verified = bundle.verify()
    assert set(verified) == {"classifier", "gvr.decoder"}

    loaded = bundle.load_classifier()
    assert isinstance(loaded, BinaryClassifier)
    assert not loaded.training
    reference = BinaryClassifier(network, mean=0.5, std=0.25).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), atol=1e-6, rtol=0)
    assert loaded(x).shape == (3,)
    # every tensor, buffers included, came back
    for key, value in network.state_dict().items():
        torch.testing.assert_close(loaded.network.state_dict()[key], value, atol=0, rtol=0)
    state = bundle.load_state("gvr", "decoder")
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))


def test_bundle_yaml_holds_the_pinned_hashes(bundle_dir):
    raw = yaml.safe_load((bundle_dir / BUNDLE_FILE).read_text())
    assert raw["format"] == "medxplain-bundle/1"
    assert raw["classifier"]["weights"]["sha256"] == sha256_file(bundle_dir / "classifier.safetensors")
    assert raw["explainers"]["gvr"]["weights"]["decoder"]["file"] == "gvr_decoder.safetensors"


def test_bundle_hash_changes_when_the_spec_changes(tmp_path, network):
    first = _write_bundle(tmp_path / "a", network)
    same = _write_bundle(tmp_path / "b", network)
    assert first.sha256 == same.sha256  # deterministic: same content, same hash
    first.spec.version = "0.2"
    first.save_spec()
    assert first.sha256 != same.sha256
    assert Bundle.load(tmp_path / "a").sha256 == first.sha256


def test_cam_layer_defaults_to_a_real_layer_and_gradcam_runs_on_the_loaded_classifier(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    assert bundle.cam_layer == DEFAULT_CAM_LAYER["monai.DenseNet"]
    classifier = bundle.load_classifier()
    assert bundle.cam_layer in dict(classifier.network.named_modules())
    explanation = create("gradcam", cam_layer=bundle.cam_layer, threshold=bundle.spec.task.threshold).explain(
        _images(2), classifier)
    assert explanation.saliency.shape == (2, SIZE, SIZE)
    assert torch.isfinite(explanation.saliency).all()
    assert not classifier.training


def test_unknown_cam_layer_architecture_needs_an_explicit_layer(tmp_path):
    ref = save_weights({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
    bundle = Bundle(tmp_path, _spec(ClassifierSpec(format="torchscript", weights=ref)), sha256="")
    with pytest.raises(BundleError, match="cam_layer"):
        _ = bundle.cam_layer


# -- tampering and malformed bundles ------------------------------------------------

def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_weights_are_refused_naming_the_file(bundle_dir):
    _flip_a_byte(bundle_dir / "classifier.safetensors")
    with pytest.raises(BundleError, match="classifier.safetensors"):
        Bundle.load(bundle_dir)
    # loading without verification works; verifying then fails
    unverified = Bundle.load(bundle_dir, verify=False)
    with pytest.raises(BundleError, match="classifier.safetensors.*does not match"):
        unverified.verify()


def test_tampered_explainer_weights_are_refused_naming_the_file(bundle_dir):
    _flip_a_byte(bundle_dir / "gvr_decoder.safetensors")
    with pytest.raises(BundleError, match="gvr_decoder.safetensors"):
        Bundle.load(bundle_dir)


def test_missing_weights_file_is_refused_naming_it(bundle_dir):
    (bundle_dir / "gvr_decoder.safetensors").unlink()
    with pytest.raises(BundleError, match="gvr_decoder.safetensors.*missing"):
        Bundle.load(bundle_dir)


def test_missing_bundle_yaml_is_refused(tmp_path):
    with pytest.raises(BundleError, match="bundle.yaml"):
        Bundle.load(tmp_path)
    with pytest.raises(BundleError, match="bundle.yaml"):
        Bundle.load(tmp_path / "does-not-exist")


def test_invalid_yaml_is_refused(bundle_dir):
    (bundle_dir / BUNDLE_FILE).write_text("name: [unclosed\n  version: : :\n")
    with pytest.raises(BundleError, match="invalid bundle description"):
        Bundle.load(bundle_dir)


def test_unknown_key_is_refused_naming_it(bundle_dir):
    raw = yaml.safe_load((bundle_dir / BUNDLE_FILE).read_text())
    raw["classifier"]["wieghts_typo"] = "x"
    (bundle_dir / BUNDLE_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(BundleError, match="wieghts_typo"):
        Bundle.load(bundle_dir)


@pytest.mark.parametrize("mutate", [
    lambda raw: raw.pop("task"),
    lambda raw: raw.update(format="medxplain-bundle/99"),
    lambda raw: raw["task"].update(threshold=1.5),
    lambda raw: raw["input"].update(std=0),
    lambda raw: raw["input"].update(channels=3),
], ids=["missing-task", "unknown-format", "threshold>1", "std=0", "3-channels"])
def test_invalid_values_are_refused(bundle_dir, mutate):
    raw = yaml.safe_load((bundle_dir / BUNDLE_FILE).read_text())
    mutate(raw)
    (bundle_dir / BUNDLE_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(BundleError):
        Bundle.load(bundle_dir)


def test_non_mapping_yaml_is_refused(bundle_dir):
    (bundle_dir / BUNDLE_FILE).write_text("- just\n- a list\n")
    with pytest.raises(BundleError):
        Bundle.load(bundle_dir)


def test_safetensors_classifier_needs_an_architecture(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    bundle.spec.classifier.architecture = None
    with pytest.raises(BundleError, match="architecture"):
        bundle.load_classifier()


# -- TorchScript classifiers --------------------------------------------------------

def _torchscript_bundle(root: Path) -> tuple[Bundle, nn.Module]:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    network = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 1)).eval()
    scripted = torch.jit.trace(network, torch.rand(1, 1, SIZE, SIZE))
    path = root / "classifier.pt"
    scripted.save(str(path))
    ref = {"file": path.name, "sha256": sha256_file(path)}
    spec = _spec(ClassifierSpec.model_validate({"format": "torchscript", "weights": ref}))
    bundle = Bundle(root, spec, sha256="")
    bundle.save_spec()
    return Bundle.load(root), network


def test_torchscript_is_refused_unless_pinned(tmp_path):
    bundle, _ = _torchscript_bundle(tmp_path)
    with pytest.raises(BundleError, match="trusted_torchscript"):
        bundle.load_classifier()
    with pytest.raises(BundleError, match="trusted_torchscript"):
        bundle.load_classifier(trusted_torchscript=("0" * 64,))


def test_pinned_torchscript_loads_and_matches(tmp_path):
    bundle, network = _torchscript_bundle(tmp_path)
    pin = sha256_file(tmp_path / "classifier.pt")
    classifier = bundle.load_classifier(trusted_torchscript=("0" * 64, pin))
    reference = BinaryClassifier(network, mean=0.5, std=0.25).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), reference(x), atol=1e-6, rtol=0)


def test_pinned_torchscript_swapped_after_load_is_refused(tmp_path):
    bundle, _ = _torchscript_bundle(tmp_path)
    pin = bundle.spec.classifier.weights.sha256
    _flip_a_byte(tmp_path / "classifier.pt")
    with pytest.raises(BundleError, match="does not match"):
        bundle.load_classifier(trusted_torchscript=(pin,))


# -- networks -------------------------------------------------------------------

def test_build_network_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="monai.DenseNet121"):
        build_network("torchvision.resnet50", {})


def test_binary_classifier_outputs():
    torch.manual_seed(0)
    two = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2))
    x = _images(4)
    classifier = BinaryClassifier(two, mean=0.5, std=0.25, output="two_logits").eval()
    with torch.no_grad():
        z = two((x - 0.5) / 0.25)
        torch.testing.assert_close(classifier(x), z[:, 1] - z[:, 0])
        # sigmoid(z1 - z0) is the softmax probability of class 1
        torch.testing.assert_close(classifier.probability(x), torch.softmax(z, dim=1)[:, 1])
    one = BinaryClassifier(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 1)), mean=0.0, std=1.0)
    assert one(x).shape == (4,)
    with pytest.raises(ValueError, match="output"):
        BinaryClassifier(two, mean=0.5, std=0.25, output="softmax")
    with pytest.raises(ValueError, match="std"):
        BinaryClassifier(two, mean=0.5, std=0.0)


# -- the repository's demo bundle ---------------------------------------------------

def test_demo_bundle_loads_and_verifies():
    if not (DEMO_BUNDLE / BUNDLE_FILE).is_file():
        pytest.skip(f"demo bundle not built yet ({DEMO_BUNDLE / BUNDLE_FILE} missing; run `medxplain train`)")
    bundle = Bundle.load(DEMO_BUNDLE)
    verified = bundle.verify()
    assert "classifier" in verified
    classifier = bundle.load_classifier()
    size = tuple(bundle.spec.input.size)
    with torch.no_grad():
        p = classifier.probability(torch.full((1, 1, *size), 0.5))
    assert p.shape == (1,) and 0.0 <= float(p) <= 1.0
    assert bundle.cam_layer in dict(classifier.network.named_modules())
