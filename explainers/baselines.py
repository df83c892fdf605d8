"""The references the papers compare against: Grad-CAM (MONAI), Integrated
Gradients and Occlusion (Captum). Each explains the class the classifier called."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Occlusion
from monai.visualize import GradCAM
from torch import nn

from explainers._helpers import smooth_maps
from explainers.base import Explainer, Explanation, TargetLogit, decision_signs, normalise_maps, register


def _predict(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(classifier(images).reshape(-1))


@register("gradcam")
class GradCAMExplainer(Explainer):
    """Grad-CAM on the classifier's last feature map (bundle's ``cam_layer``)."""

    version = "1"

    def __init__(self, *, cam_layer: str, threshold: float = 0.5):
        """Selvaraju et al. 2017 (MONAI GradCAM). ``cam_layer``: the classifier's feature
        layer, a module path inside the network (bundle.yaml ``classifier.cam_layer``)."""
        super().__init__(threshold=threshold, cam_layer=cam_layer)
        self.cam_layer = cam_layer

    @classmethod
    def from_bundle(cls, bundle, **parameters):
        parameters.setdefault("cam_layer", bundle.cam_layer)
        return super().from_bundle(bundle, **parameters)

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """saliency (B, H, W) in [0, 1] for the class the classifier called; no
        counterfactuals. checks: saliency_peak_raw.
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        probability = _predict(classifier, images)
        wrapped = TargetLogit(classifier, decision_signs(probability, self.threshold)).to(images.device)
        # MONAI's default postprocessing maps (min, max) to (1, 0), i.e. inverts the
        # map; we take the raw ReLU'd CAM and scale it ourselves.
        cam = GradCAM(nn_module=wrapped, target_layers=f"classifier.network.{self.cam_layer}",
                      postprocessing=lambda x: x)
        with torch.enable_grad():
            raw = cam(images, class_idx=0)  # (B, 1, H, W), already upsampled to the input
        saliency = normalise_maps(raw[:, 0].detach().clamp_min(0))
        return Explanation(probability=probability, saliency=saliency,
                           checks=[{"saliency_peak_raw": float(raw[i].detach().max())} for i in range(len(images))])


@register("ig")
class IntegratedGradientsExplainer(Explainer):
    """Integrated Gradients from a black baseline, all steps batched through Captum."""

    version = "1"

    def __init__(self, *, steps: int = 50, internal_batch_size: int = 16, smoothing_sigma: float = 1.5,
                 threshold: float = 0.5):
        """Sundararajan et al. 2017 (Captum, Gauss-Legendre). ``steps`` >= 2 integration
        points; ``internal_batch_size`` images per pass; ``smoothing_sigma`` in pixels.
        Raises ValueError for steps < 2."""
        if steps < 2:
            raise ValueError(f"ig steps must be >= 2, got {steps}")
        super().__init__(threshold=threshold, steps=steps, smoothing_sigma=smoothing_sigma)
        self.steps, self.internal_batch_size, self.smoothing_sigma = steps, internal_batch_size, smoothing_sigma

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """saliency (B, H, W) in [0, 1] for the class the classifier called; no
        counterfactuals. checks: completeness_delta, completeness_relative.
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        probability = _predict(classifier, images)
        wrapped = TargetLogit(classifier, decision_signs(probability, self.threshold)).to(images.device)
        ig = IntegratedGradients(wrapped)
        baseline = torch.zeros_like(images)
        with torch.enable_grad():
            attributions, delta = ig.attribute(
                images, baselines=baseline, target=0, n_steps=self.steps, method="gausslegendre",
                internal_batch_size=max(self.internal_batch_size, len(images)), return_convergence_delta=True,
            )
        with torch.no_grad():
            score_gap = (wrapped(images) - wrapped(baseline))[:, 0]
        # Evidence for the explained class = positive attributions.
        evidence = attributions.detach().sum(dim=1).clamp_min(0)
        saliency = normalise_maps(smooth_maps(evidence, self.smoothing_sigma))
        checks = [{"completeness_delta": float(delta[i].abs()),
                   "completeness_relative": float(delta[i].abs() / score_gap[i].abs().clamp_min(1e-6))}
                  for i in range(len(images))]
        return Explanation(probability=probability, saliency=saliency, checks=checks)


@register("occlusion")
class OcclusionExplainer(Explainer):
    """Occlusion: the drop in the called class's logit when a patch is replaced by
    a blurred copy of itself (removes local detail, keeps overall brightness)."""

    version = "1"

    def __init__(self, *, window: int = 16, stride: int = 8, perturbations_per_eval: int = 64,
                 threshold: float = 0.5):
        """Zeiler & Fergus 2014 (Captum Occlusion). ``window`` and ``stride`` in pixels,
        0 < stride <= window (else ValueError); ``perturbations_per_eval``: patches per pass."""
        if not 0 < stride <= window:
            raise ValueError(f"occlusion needs 0 < stride <= window, got stride={stride}, window={window}")
        super().__init__(threshold=threshold, window=window, stride=stride)
        self.window, self.stride, self.perturbations_per_eval = window, stride, perturbations_per_eval

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """saliency (B, H, W) in [0, 1] for the class the classifier called; no
        counterfactuals. checks: none beyond the probability.
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        probability = _predict(classifier, images)
        wrapped = TargetLogit(classifier, decision_signs(probability, self.threshold)).to(images.device)
        channels = images.shape[1]
        blurred = F.avg_pool2d(images, kernel_size=self.window + 1, stride=1, padding=self.window // 2,
                               count_include_pad=False)
        with torch.no_grad():
            attributions = Occlusion(wrapped).attribute(
                images, sliding_window_shapes=(channels, self.window, self.window),
                strides=(channels, self.stride, self.stride), baselines=blurred, target=0,
                perturbations_per_eval=self.perturbations_per_eval,
            )
        saliency = normalise_maps(attributions.sum(dim=1).clamp_min(0))
        return Explanation(probability=probability, saliency=saliency, checks=[{} for _ in range(len(images))])
