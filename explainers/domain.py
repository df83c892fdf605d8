"""Domain guard: is this image one the bundle's classifier was made for?

Score (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS, eq. 2): the Mahalanobis distance of the
classifier's own features to the nearest class mean, under one covariance shared by
the classes ("tied"). The features are global-average-pooled activations of a few
named layers of the classifier network, concatenated (early layers see intensity and
texture - an inverted image, noise, a photograph -, the last one sees content).

    guard = DomainGuard.from_bundle(bundle, classifier)
    result = guard(images)        # images (B, C, H, W) in model space [0, 1]
    result.score                  # (B,) float, >= 0; larger = further from the training data
    result.in_domain              # (B,) bool, score <= threshold

The means and the covariance are estimated on the training split; the threshold is a
quantile of the validation split's scores (``fit``), so that the stated share of
in-domain images passes. Nothing here knows DICOM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Layers whose pooled activations form the feature vector, per classifier architecture.
#: Chosen on the demo bundle (DenseNet, 128 px): the last transition and the last dense
#: block separate adult radiographs, other images and corrupted inputs from the Kermany
#: validation split better than the penultimate feature alone or all four stages
#: (README, "Domain guard"; measured with `medxplain train domain-guard`).
DEFAULT_LAYERS: dict[str, list[str]] = {
    "monai.DenseNet": ["features.transition3", "features.denseblock4"],
    "monai.DenseNet121": ["features.transition3", "features.denseblock4"],
    "monai.ResNet": ["layer3", "layer4"],
}


class DomainGuardError(Exception):
    """The guard cannot be built: a named layer is missing, or statistics do not fit."""


@dataclass
class DomainResult:
    score: torch.Tensor  # (B,) Mahalanobis distance to the nearest class mean (feature units)
    threshold: float
    in_domain: torch.Tensor  # (B,) bool


class PooledFeatures:
    """Global-average-pooled activations of named modules, concatenated: (B, D) float64."""

    def __init__(self, network: nn.Module, layers: list[str]):
        modules = dict(network.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise DomainGuardError(f"domain guard layers {missing} are not in the classifier network "
                                   f"(it has e.g. {[n for n in list(modules)[1:8]]})")
        self.network = network
        self.layers = list(layers)
        self._modules = [modules[name] for name in layers]

    @torch.no_grad()
    def __call__(self, classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output.float().mean(dim=tuple(range(2, output.ndim))))

        handles = [m.register_forward_hook(hook) for m in self._modules]
        try:
            classifier(images)
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(captured, dim=1).double()


def features_in_batches(extract: PooledFeatures, classifier: nn.Module, images: torch.Tensor, *,
                        batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Features of ``images`` (N, C, H, W) in [0, 1] (uint8 tensors are scaled by 1/255): (N, D)."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        if batch.dtype == torch.uint8:
            batch = batch.float() / 255.0
        out.append(extract(classifier, batch.to(device)).cpu())
    return torch.cat(out)


def fit_statistics(features: torch.Tensor, labels: torch.Tensor, *, shrinkage: float = 0.01
                   ) -> dict[str, torch.Tensor]:
    """Class means (K, D) and the precision (D, D) of the tied covariance.

    The covariance is shrunk towards its mean variance (``shrinkage`` of the way), so it
    stays invertible when D approaches N or features are nearly collinear.
    """
    classes = torch.unique(labels)
    means = torch.stack([features[labels == c].mean(dim=0) for c in classes])
    centred = features - means[torch.searchsorted(classes, labels)]
    covariance = centred.T @ centred / max(1, features.shape[0] - len(classes))
    target = torch.eye(covariance.shape[0], dtype=covariance.dtype) * covariance.diagonal().mean()
    covariance = (1 - shrinkage) * covariance + shrinkage * target
    return {"means": means, "precision": torch.linalg.inv(covariance)}


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Distance (not squared) of each row of ``features`` (N, D) to the nearest of ``means`` (K, D)."""
    diff = features[:, None, :] - means[None, :, :].to(features)  # (N, K, D)
    squared = torch.einsum("nkd,de,nke->nk", diff, precision.to(features), diff)
    return squared.clamp_min(0).min(dim=1).values.sqrt()


class DomainGuard:
    """A calibrated guard for one classifier (see the module docstring)."""

    def __init__(self, classifier: nn.Module, layers: list[str], means: torch.Tensor, precision: torch.Tensor,
                 threshold: float):
        network = getattr(classifier, "network", classifier)
        self.classifier = classifier
        self.extract = PooledFeatures(network, layers)
        self.means = means.double()
        self.precision = precision.double()
        self.threshold = float(threshold)
        probe_dim = self.means.shape[1]
        if self.precision.shape != (probe_dim, probe_dim):
            raise DomainGuardError(f"domain guard statistics do not fit: means {tuple(self.means.shape)}, "
                                   f"precision {tuple(self.precision.shape)}")

    @classmethod
    def from_bundle(cls, bundle, classifier: nn.Module) -> "DomainGuard | None":
        """The bundle's guard, or None when the bundle has none (``medxplain train domain-guard``)."""
        spec = bundle.spec.domain_guard
        if spec is None:
            return None
        stats = bundle.load_domain_statistics()
        return cls(classifier, spec.layers, stats["means"], stats["precision"], spec.threshold)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in model space [0, 1] -> (B,) distance, on the CPU."""
        features = self.extract(self.classifier, images)
        if features.shape[1] != self.means.shape[1]:
            raise DomainGuardError(f"classifier features have {features.shape[1]} dimensions, the guard's "
                                   f"statistics {self.means.shape[1]}: recalibrate the guard")
        return mahalanobis(features.cpu(), self.means, self.precision).float()

    def __call__(self, images: torch.Tensor) -> DomainResult:
        score = self.score(images)
        return DomainResult(score=score, threshold=self.threshold, in_domain=score <= self.threshold)
