"""The one interface every explainer implements, and the registry that finds them by name.

    explanation = explainer.explain(images, classifier)   # images: (B, C, H, W) in [0, 1]

Methods are swapped by name from config or the CLI, as Captum's ``attribute()``
lets attribution methods be swapped.
"""
from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

Check = float | bool | str


@dataclass
class Explanation:
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
    """Base class. Subclasses set ``name`` and ``version`` and implement ``explain``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    # The bundle.yaml explainers section whose trained networks the method needs
    # (None: it needs only the classifier). medxgan_ig uses medxgan's networks.
    bundle_section: ClassVar[str | None] = None

    def __init__(self, *, threshold: float = 0.5, **parameters: Any):
        self.threshold = float(threshold)
        self.parameters: dict[str, Any] = dict(parameters)

    @classmethod
    def from_bundle(cls, bundle: Any, **parameters: Any) -> "Explainer":
        """Build for a bundle: its decision threshold, plus whatever the method needs
        from it (methods with trained networks override this to load their weights)."""
        return cls(**{"threshold": bundle.spec.task.threshold, **parameters})

    @abstractmethod
    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """images (B, C, H, W) in model space [0, 1]; classifier returns the positive logit (B,)."""

    def settings_key(self, bundle_sha256: str) -> str:
        """Stable short hash of method + version + parameters + bundle: part of output UIDs."""
        payload = json.dumps({"method": self.name, "version": self.version, "parameters": self.parameters,
                              "threshold": self.threshold, "bundle": bundle_sha256}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


_REGISTRY: dict[str, Callable[..., Explainer]] = {}


def register(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    def decorate(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY:
            raise ValueError(f"explainer {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Explainer:
    if name not in _REGISTRY:
        raise KeyError(f"unknown explainer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**kwargs)


def explainer_class(name: str) -> type[Explainer]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown explainer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]  # type: ignore[return-value]


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
    return torch.where(probability >= threshold, 1.0, -1.0)
