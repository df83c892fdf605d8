"""The one interface every explainer implements, and the registry that finds them by name.

    explanation = explainer.explain(images, classifier)   # images: (B, C, H, W) in [0, 1]

Methods are swapped by name from config or the CLI, as Captum's ``attribute()``
lets attribution methods be swapped.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

Check = float | bool | str


@dataclass
class Explanation:
    """What every method returns (DESIGN.md "The explainer interface"); shapes are
    checked on construction (ValueError naming the field)."""

    probability: torch.Tensor  # (B,) P(positive) of the input
    saliency: torch.Tensor  # (B, H, W) in [0, 1]: where the evidence lies
    counterfactuals: torch.Tensor | None = None  # (B, T, C, H, W); last step = full counterfactual
    path_probability: torch.Tensor | None = None  # (B, T)
    checks: list[dict[str, Check]] = field(default_factory=list)  # one dict per case

    def __post_init__(self) -> None:
        b = self.probability.shape[0]
        if self.saliency.ndim != 3 or self.saliency.shape[0] != b:
            raise ValueError(f"saliency must be (B, H, W) with B={b}, got {tuple(self.saliency.shape)}")
        if self.counterfactuals is not None and (self.counterfactuals.ndim != 5 or self.counterfactuals.shape[0] != b):
            raise ValueError(f"counterfactuals must be (B, T, C, H, W), got {tuple(self.counterfactuals.shape)}")
        if self.path_probability is not None and self.path_probability.shape[:1] != (b,):
            raise ValueError(f"path_probability must be (B, T), got {tuple(self.path_probability.shape)}")
        if len(self.checks) != b:
            raise ValueError(f"checks must hold one dict per case ({b}), got {len(self.checks)}")


class Explainer(ABC):
    """Base class of every method. Subclasses are registered with ``@register(name)``,
    set ``version``, implement ``explain`` and, when they need trained networks,
    declare them in ``bundle_networks`` so that ``from_bundle`` can build them.

    ``threshold``: the bundle's decision threshold on P(positive), in [0, 1]; a case is
    called positive when P(positive) >= threshold. ``parameters``: the method's
    settings, part of the output UIDs (``settings_key``).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    # The bundle.yaml explainers section whose trained networks the method needs
    # (None: it needs only the classifier). medxgan_ig uses medxgan's networks.
    bundle_section: ClassVar[str | None] = None
    # The trained networks the constructor takes: keyword -> (network class, the key of
    # bundle.yaml's parameters that holds its constructor arguments).
    bundle_networks: ClassVar[dict[str, tuple[Callable[..., nn.Module], str]]] = {}
    # Networks a bundle may lack (the constructor then gets none for them).
    optional_networks: ClassVar[tuple[str, ...]] = ()
    # Older names of a network's weights in bundle.yaml: keyword -> name (bundles written before a rename).
    weight_aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, *, threshold: float = 0.5, **parameters: Any):
        self.threshold = float(threshold)
        self.parameters: dict[str, Any] = dict(parameters)

    @classmethod
    def from_bundle(cls, bundle: Any, **parameters: Any) -> "Explainer":
        """Build for a bundle: its decision threshold, the trained networks of
        ``bundle_networks`` (weights verified by hash), and as defaults every
        constructor parameter stored in bundle.yaml's ``explainers.<section>.parameters``;
        ``parameters`` override them.

        Raises ``explainers.bundle.BundleError`` (naming the ``medxplain train`` command)
        when the bundle lacks a network, or when the weights do not fit the stored settings.
        """
        kwargs: dict[str, Any] = {}
        if cls.bundle_section is not None:
            section = bundle.spec.explainers.get(cls.bundle_section)
            weights = section.weights if section is not None else {}
            for keyword, (build, settings) in cls.bundle_networks.items():
                part = keyword
                if part not in weights and cls.weight_aliases.get(keyword) in weights:
                    part = cls.weight_aliases[keyword]
                if part not in weights and keyword in cls.optional_networks:
                    continue
                kwargs[keyword] = bundle.load_network(cls.bundle_section, part, build, settings=settings)
            names = cls.parameter_names()
            kwargs.update({k: v for k, v in (section.parameters if section is not None else {}).items()
                           if k in names})
        return cls(**{"threshold": bundle.spec.task.threshold, **kwargs, **parameters})

    @classmethod
    def parameter_names(cls) -> set[str]:
        """The constructor's keyword parameters (over the class hierarchy), networks and threshold excepted."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            names |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        return names - set(cls.bundle_networks) - {"threshold"}

    @abstractmethod
    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """Explain the classifier's decision on each image.

        ``images``: (B, C, H, W) float in model space [0, 1], at the bundle's input size,
        on the device the method runs on. ``classifier``: maps images to the logit of the
        positive class, shape (B,) (``explainers.networks.BinaryClassifier``); it is
        left in eval mode without parameter gradients. Returns an ``Explanation``: the
        result for an image never depends on the rest of its batch.
        """

    def settings_key(self, bundle_sha256: str) -> str:
        """Stable short hash of method + version + parameters + bundle: part of output UIDs."""
        payload = json.dumps({"method": self.name, "version": self.version, "parameters": self.parameters,
                              "threshold": self.threshold, "bundle": bundle_sha256}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


_REGISTRY: dict[str, Callable[..., Explainer]] = {}
# The modules that register the shipped methods; imported on the first look-up, so
# that the registry is complete whoever asks (no side-effect imports elsewhere).
METHOD_MODULES = ("explainers.baselines", "explainers.cia", "explainers.exaggeration", "explainers.gvr",
                  "explainers.medxgan", "explainers.sagen")


def _registry() -> dict[str, Callable[..., Explainer]]:
    for module in METHOD_MODULES:
        importlib.import_module(module)  # a no-op once imported
    return _REGISTRY


def register(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: register an ``Explainer`` under ``name`` (ValueError if taken)."""
    def decorate(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY:
            raise ValueError(f"explainer {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def available() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_registry())


def create(name: str, **kwargs: Any) -> Explainer:
    """``explainer_class(name)(**kwargs)``. Raises KeyError naming the available methods."""
    return explainer_class(name)(**kwargs)


def explainer_class(name: str) -> type[Explainer]:
    """The class registered as ``name``. Raises KeyError naming the available methods."""
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown explainer {name!r}; available: {', '.join(available())}")
    return registry[name]  # type: ignore[return-value]


_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parameter_overrides(items: list[str]) -> dict[str, Any]:
    """["NAME=VALUE", ...] -> {NAME: VALUE}, each value read as YAML (4 -> int, 0.3 and
    1e-3 -> float, true -> bool, other text -> str): explainer parameters given on a command line, to
    pass to ``Explainer.from_bundle``. Raises ValueError for an item without NAME=."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"an explainer parameter must be NAME=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _FLOAT_LITERAL.fullmatch(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as text; a number is meant
        overrides[name.strip()] = parsed
    return overrides


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-image scaling of non-negative maps (B, H, W) to [0, 1]; an all-zero map stays zero."""
    flat = maps.reshape(maps.shape[0], -1).clamp_min(0)
    peak = flat.amax(dim=1, keepdim=True)
    return (flat / peak.clamp_min(1e-12)).reshape(maps.shape)


class TargetLogit(nn.Module):
    """Presents a binary classifier as a one-output network whose output is the
    logit of the class to explain: +logit for cases called positive, -logit for
    cases called negative. Captum and MONAI then explain output index 0."""

    def __init__(self, classifier: nn.Module, sign: torch.Tensor):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("sign", sign.reshape(-1, 1).float(), persistent=False)
        # A new module starts in training mode; MONAI's CAM restores the wrapper's
        # mode after its pass, which would flip the classifier's BatchNorm to batch
        # statistics and make one image's map depend on the rest of the batch.
        self.train(classifier.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images).reshape(-1, 1)
        sign = self.sign
        if sign.shape[0] != logits.shape[0]:
            # Captum expands the batch (steps x cases, case-major within each step).
            sign = sign.repeat(logits.shape[0] // sign.shape[0], 1)
        return logits * sign


def threshold_logit(threshold: float) -> float:
    """The decision threshold on P(positive) as a logit: a classifier's logit minus this
    is >= 0 exactly for the cases it calls positive."""
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    return math.log(t / (1 - t))


def decision_signs(probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) +1.0 for cases called positive (P >= threshold), -1.0 for the others."""
    return torch.where(probability >= threshold, 1.0, -1.0)
