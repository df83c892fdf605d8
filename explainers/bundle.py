"""Model bundles: a folder with bundle.yaml, safetensors weights and a model card.

Loading never unpickles: weights come from safetensors, and a TorchScript
classifier is accepted only when its sha256 is in the caller's pinned list.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from explainers.networks import DEFAULT_CAM_LAYER, BinaryClassifier, build_network

BUNDLE_FORMAT = "medxplain-bundle/1"
BUNDLE_FILE = "bundle.yaml"


class BundleError(Exception):
    """A bundle is missing, malformed, or its files do not match their hashes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(_Strict):
    type: Literal["binary"] = "binary"
    finding: str = Field(description="name of the finding the positive class means, e.g. Pneumonia")
    positive_label: str
    negative_label: str
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="decision threshold on P(positive)")


class InputSpec(_Strict):
    size: tuple[int, int]
    channels: Literal[1] = 1
    aspect: Literal["squash", "pad"] = "squash"
    mean: float = Field(0.5, description="classifier-internal normalisation of [0,1] model space")
    std: float = Field(0.25, gt=0)


class WeightsRef(_Strict):
    file: str
    sha256: str


class ClassifierSpec(_Strict):
    format: Literal["safetensors", "torchscript"] = "safetensors"
    architecture: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    output: Literal["logit", "two_logits"] = "logit"
    cam_layer: str | None = None
    weights: WeightsRef


class ExplainerSpec(_Strict):
    """A trained explainer's networks and settings (added by `medxplain train <method>`)."""

    parameters: dict[str, Any] = Field(default_factory=dict)
    weights: dict[str, WeightsRef] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    classifier_sha256: str | None = Field(
        None, description="sha256 of the classifier weights the networks were trained against; loading them "
                          "with another classifier is refused (Bundle.check_classifier_binding)")


class DomainGuardSpec(_Strict):
    """The bundle's domain guard (explainers/domain.py), written by `medxplain train domain-guard`."""

    method: Literal["mahalanobis"] = "mahalanobis"
    layers: list[str] = Field(min_length=1, description="classifier modules whose pooled activations are the "
                                                        "features")
    shrinkage: float = Field(0.05, ge=0, le=1)
    threshold: float = Field(gt=0, description="scores above this are out of domain")
    statistics: WeightsRef = Field(description="safetensors with 'means' (K, D) and 'precision' (D, D)")
    classifier_sha256: str = Field(description="sha256 of the classifier whose features the statistics describe")
    calibration: dict[str, Any] = Field(default_factory=dict)


class BundleSpec(_Strict):
    format: Literal["medxplain-bundle/1"] = BUNDLE_FORMAT
    name: str
    version: str
    description: str = ""
    task: TaskSpec
    input: InputSpec
    classifier: ClassifierSpec
    explainers: dict[str, ExplainerSpec] = Field(default_factory=dict)
    domain_guard: DomainGuardSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ClassifierMismatchError(BundleError):
    """An explainer network or the domain guard was made for another classifier than the bundle's."""


class Bundle:
    """A loaded, verified bundle folder.

    ``classifier_override``: research use only - load explainer networks trained against
    another classifier than the bundle's (normally refused); each such load is listed in
    ``binding_overrides`` (method -> sha256 it was trained against) for the SR.
    """

    def __init__(self, root: Path, spec: BundleSpec, sha256: str, *, classifier_override: bool = False):
        self.root = root
        self.spec = spec
        self.sha256 = sha256  # of bundle.yaml, which pins every weights file by hash
        self.classifier_override = classifier_override
        self.binding_overrides: dict[str, str] = {}

    @classmethod
    def load(cls, root: str | Path, *, verify: bool = True, classifier_override: bool = False) -> "Bundle":
        root = Path(root)
        manifest = root / BUNDLE_FILE
        if not manifest.is_file():
            raise BundleError(f"{root}: no {BUNDLE_FILE} (is this a medxplain bundle folder?)")
        try:
            raw = yaml.safe_load(manifest.read_text())
            spec = BundleSpec.model_validate(raw)
        except (yaml.YAMLError, ValidationError) as exc:
            raise BundleError(f"{manifest}: invalid bundle description:\n{exc}") from exc
        bundle = cls(root, spec, sha256_file(manifest), classifier_override=classifier_override)
        if verify:
            bundle.verify()
        return bundle

    def weight_refs(self) -> dict[str, WeightsRef]:
        refs = {"classifier": self.spec.classifier.weights}
        for method, explainer in self.spec.explainers.items():
            for part, ref in explainer.weights.items():
                refs[f"{method}.{part}"] = ref
        if self.spec.domain_guard is not None:
            refs["domain_guard.statistics"] = self.spec.domain_guard.statistics
        return refs

    def verify(self) -> dict[str, str]:
        """Check every weights file against its pinned sha256; returns name -> path."""
        checked = {}
        for name, ref in self.weight_refs().items():
            path = self.root / ref.file
            if not path.is_file():
                raise BundleError(f"{self.root}: weights file {ref.file} for {name} is missing")
            actual = sha256_file(path)
            if actual != ref.sha256:
                raise BundleError(
                    f"{self.root}: {ref.file} sha256 {actual[:12]}… does not match pinned {ref.sha256[:12]}…"
                )
            checked[name] = str(path)
        return checked

    def load_classifier(self, *, trusted_torchscript: tuple[str, ...] = (), device: str = "cpu") -> BinaryClassifier:
        spec = self.spec.classifier
        path = self.root / spec.weights.file
        if spec.format == "torchscript":
            # TorchScript archives carry code; accept only a file pinned in config.
            if spec.weights.sha256 not in trusted_torchscript:
                raise BundleError(
                    f"{path.name}: TorchScript classifier sha256 {spec.weights.sha256} is not in "
                    "config 'trusted_torchscript'; add it there to allow loading"
                )
            if sha256_file(path) != spec.weights.sha256:
                raise BundleError(f"{path.name}: TorchScript file does not match its pinned sha256")
            network: nn.Module = torch.jit.load(str(path), map_location=device)
        else:
            if not spec.architecture:
                raise BundleError(f"{self.root}: classifier.architecture is required for safetensors weights")
            network = build_network(spec.architecture, spec.parameters)
            try:
                network.load_state_dict(load_file(str(path), device="cpu"))
            except (RuntimeError, SafetensorError) as exc:
                raise BundleError(f"{path.name}: weights do not fit {spec.architecture} {spec.parameters}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        model = BinaryClassifier(network, mean=self.spec.input.mean, std=self.spec.input.std, output=spec.output)
        return model.to(device).eval()

    def check_classifier_binding(self, method: str) -> None:
        """Refuse an explainer whose networks were trained against another classifier.

        An amortised explainer (a generator trained against one classifier) explains that
        classifier only: with another one its maps and counterfactuals describe the wrong
        model (Adebayo et al. 2018: such maps pass no model-randomisation check). Raises
        ClassifierMismatchError naming both sha256, unless ``classifier_override`` is set:
        then the load is recorded in ``binding_overrides``.
        """
        spec = self.spec.explainers.get(method)
        if spec is None:
            return
        current = self.spec.classifier.weights.sha256
        trained = spec.classifier_sha256
        if trained == current:
            return
        if self.classifier_override:
            self.binding_overrides[method] = trained or "unrecorded"
            return
        what = (f"was trained against classifier sha256 {trained}" if trained
                else "does not record the classifier it was trained against (explainers."
                     f"{method}.classifier_sha256)")
        raise ClassifierMismatchError(
            f"{self.root}: explainer {method} {what}; this bundle's classifier is sha256 {current}. "
            f"Retrain it (`medxplain train {method} --bundle {self.root} --data DIR`), or for research only "
            "set config 'explainer_classifier_override: true' (recorded in the SR)")

    def load_state(self, method: str, part: str) -> dict[str, torch.Tensor]:
        """Weights of one network of an explainer (verified by hash at load, bound to the classifier)."""
        try:
            ref = self.spec.explainers[method].weights[part]
        except KeyError as exc:
            raise BundleError(f"{self.root}: bundle has no weights {method}.{part}; train them first") from exc
        self.check_classifier_binding(method)
        return load_file(str(self.root / ref.file), device="cpu")

    def load_domain_statistics(self) -> dict[str, torch.Tensor]:
        """The domain guard's 'means' and 'precision'; refused when made for another classifier."""
        guard = self.spec.domain_guard
        if guard is None:
            raise BundleError(f"{self.root}: bundle has no domain guard; run `medxplain train domain-guard "
                              f"--bundle {self.root} --data DIR`")
        current = self.spec.classifier.weights.sha256
        if guard.classifier_sha256 != current:
            raise ClassifierMismatchError(
                f"{self.root}: domain guard was calibrated on classifier sha256 {guard.classifier_sha256}; this "
                f"bundle's classifier is sha256 {current}: recalibrate it (`medxplain train domain-guard`)")
        state = load_file(str(self.root / guard.statistics.file), device="cpu")
        missing = {"means", "precision"} - set(state)
        if missing:
            raise BundleError(f"{self.root}: {guard.statistics.file} lacks {sorted(missing)}")
        return state

    def load_network(self, method: str, part: str, build: Callable[..., nn.Module], *,
                     settings: str = "network") -> nn.Module:
        """An explainer's trained network: ``build(**parameters[settings])`` with its weights.

        Missing weights say which `medxplain train` command makes them; weights that do
        not fit the stored network settings say so, naming both.
        """
        spec = self.spec.explainers.get(method)
        if spec is None or part not in spec.weights:
            raise BundleError(
                f"{self.root}: bundle has no trained {method} {part} (explainers.{method}.weights.{part}); "
                f"run `medxplain train {method} --bundle {self.root} --data <kermany folder>` first")
        network = build(**spec.parameters.get(settings, {}))
        try:
            network.load_state_dict(self.load_state(method, part))
        except RuntimeError as exc:
            raise BundleError(f"{self.root}: {method} {part} weights do not fit the network "
                              f"{spec.parameters.get(settings)}: {str(exc).splitlines()[0]}") from exc
        return network

    @property
    def cam_layer(self) -> str:
        spec = self.spec.classifier
        layer = spec.cam_layer or DEFAULT_CAM_LAYER.get(spec.architecture or "")
        if not layer:
            raise BundleError(f"{self.root}: set classifier.cam_layer for Grad-CAM on {spec.architecture}")
        return layer

    def save_spec(self) -> None:
        text = yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        (self.root / BUNDLE_FILE).write_text(text)
        self.sha256 = sha256_file(self.root / BUNDLE_FILE)


def save_weights(module_or_state: nn.Module | dict[str, torch.Tensor], path: Path) -> WeightsRef:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return WeightsRef(file=path.name, sha256=sha256_file(path))
