"""Similar / adversarial generators (Charachon et al. 2020, "Combining Similarity and
Adversarial Learning to Generate Visual Explanation").

One shared U-Net (MONAI BasicUNet) with two heads, the authors' later form of the
two generators: from an input x it produces

- the *similar* image S(x): close to x and classified like x,
- the *adversarial* image A(x): close to x and classified as the other class.

The explanation is |S(x) - A(x)|: whatever the generator cannot reproduce exactly
(blur, small shifts) is in both images and cancels, what the classifier needs to
change its mind is in one only. The counterfactual is A(x); ``steps > 1`` gives the
linear path from S(x) to A(x). One forward pass at prediction time.

Each head predicts a *residual* added to x and clamped to [0, 1], with its last
layer initialised to zero, so both heads start as the identity: the similar head's
reconstruction is trivial from step one, the adversarial head's change is explicit
(exactly what the engine's residual trick maps back to the source grid), and
untouched regions stay bit-identical to the input instead of being re-synthesised.
Instance normalisation only, so the result for an image never depends on the rest
of its batch.

``conditional`` generators (Charachon et al. 2021, "Leveraging Conditional Generative
Models in a General Explanation Framework of Classifier Decisions", section 3: one
generator G(x, c) for both directions) also get the classifier's call as an input
channel (+1 called positive, -1 called negative). Without it the adversarial head must
infer the call from the image itself, which fails where the evidence is small: on the
lesion bundle the unconditional head flipped about half the cases, alternating between
"add a lesion everywhere" and "remove one everywhere" from epoch to epoch.

``sagen_ig`` keeps sagen's counterfactual and replaces the map: integrated gradients of
the called class's logit on the straight path from A(x) to x (Sundararajan et al. 2017,
section 3: the baseline is an input the model scores as the other class; here the
closest one the generator found). It is medXGAN's construction (integrated gradients
along the path from the counterfactual to the input, ``medxgan_ig``) on sagen's image-
space path, our combination rather than a method of either paper. Why: |S(x) - A(x)|
also shows every change the generator makes along with the essential one (on the
lesion bundle, before the cycle term of ``train sagen --weights-cycle``: a brightening of
one lung and a darkening of the other, the same on every image); the gradients along the
path weight each changed pixel by how much the classifier's score depends on it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from monai.networks.nets import BasicUNet
from torch import nn

from explainers._helpers import smooth_maps
from explainers.base import Explainer, Explanation, TargetLogit, decision_signs, normalise_maps, register
from explainers.networks import ResidualHead
from explainers.validity import counterfactual_checks

# Default widths: (level 0..4, decoder output). 1.82 M parameters, 7.3 MB of float32 weights.
DEFAULT_FEATURES = (16, 32, 64, 128, 256, 16)


class SagenGenerator(nn.Module):
    """Shared U-Net encoder/decoder with a similar and an adversarial head.

    ``size``: the side the U-Net works at (None: the input's own size). When it is
    smaller than the input, the input is area-downsampled, the residuals are
    bilinearly upsampled and added to the full-resolution input, so detail the
    generator does not touch is kept.
    """

    def __init__(self, *, features: Sequence[int] = DEFAULT_FEATURES, size: int | None = None,
                 in_channels: int = 1, upsample: str = "nontrainable", conditional: bool = False):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) != 6:
            raise ValueError(f"features must hold 6 widths (5 levels + decoder output), got {features}")
        if size is not None and (size < 16 or size % 16):
            raise ValueError(f"generator size must be a multiple of 16 (the U-Net pools 4 times), got {size}")
        self.features, self.size, self.in_channels, self.upsample = features, size, in_channels, upsample
        self.conditional = bool(conditional)
        # Bilinear upsampling in the decoder ("nontrainable"): transposed convolutions
        # leave a checkerboard that a confident classifier readily exploits.
        self.body = BasicUNet(spatial_dims=2, in_channels=in_channels + int(self.conditional),
                              out_channels=features[5], features=features,
                              norm=("instance", {"affine": True}), upsample=upsample)
        self.body.final_conv = nn.Identity()  # the decoder's features go to the two heads
        self.similar_head = ResidualHead(features[5], in_channels)
        self.adversarial_head = ResidualHead(features[5], in_channels)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in bundle.yaml."""
        return {"features": list(self.features), "size": self.size, "in_channels": self.in_channels,
                "upsample": self.upsample, "conditional": self.conditional}

    def forward(self, images: torch.Tensor, called: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [0, 1] -> (similar, adversarial), both (B, C, H, W) in [0, 1].
        ``called`` (B,) bool or {0, 1}: the classifier's call, required by (and only used by) a
        conditional generator. Raises ValueError when a conditional generator gets none."""
        if self.conditional and called is None:
            raise ValueError("a conditional sagen generator needs the classifier's call for each image")
        height, width = images.shape[-2:]
        resample = self.size is not None and (height, width) != (self.size, self.size)
        if not resample and (height % 16 or width % 16):
            raise ValueError(f"image sides must be multiples of 16 for the U-Net, got {height}x{width}")
        work = F.interpolate(images, size=(self.size, self.size), mode="area") if resample else images
        work = work * 2.0 - 1.0
        if self.conditional:
            sign = called.to(work.dtype).reshape(-1, 1, 1, 1) * 2.0 - 1.0
            work = torch.cat([work, sign.expand(-1, 1, *work.shape[-2:])], dim=1)
        hidden = self.body(work)
        residuals = torch.cat([self.similar_head(hidden), self.adversarial_head(hidden)], dim=1)
        if resample:
            residuals = F.interpolate(residuals, size=(height, width), mode="bilinear", align_corners=False)
        similar, adversarial = residuals.split(images.shape[1], dim=1)
        return (images + similar).clamp(0.0, 1.0), (images + adversarial).clamp(0.0, 1.0)


@register("sagen")
class SagenExplainer(Explainer):
    """saliency = smoothed |S(x) - A(x)|; counterfactual = A(x) (or the S -> A path)."""

    version = "1"
    bundle_section = "sagen"
    bundle_networks = {"generator": (SagenGenerator, "network")}

    def __init__(self, *, generator: SagenGenerator, steps: int = 1, smoothing_sigma: float = 2.0,
                 threshold: float = 0.5):
        """Charachon et al. 2020 (method section: the similar and adversarial generators).

        ``generator``: the trained two-headed ``SagenGenerator`` (put in eval mode).
        ``steps`` >= 1: images on the path S(x) -> A(x) (1: A(x) alone). ``smoothing_sigma``
        >= 0: Gaussian smoothing of the saliency, in pixels of the input. ``threshold``:
        the bundle's decision threshold on P(positive), in [0, 1]. Raises ValueError for
        steps < 1 or a negative sigma.
        """
        if int(steps) < 1:
            raise ValueError(f"sagen steps must be >= 1, got {steps}")
        if smoothing_sigma < 0:
            raise ValueError(f"sagen smoothing_sigma must be >= 0, got {smoothing_sigma}")
        super().__init__(threshold=threshold, steps=int(steps), smoothing_sigma=float(smoothing_sigma))
        self.generator = generator.eval()
        self.steps, self.smoothing_sigma = int(steps), float(smoothing_sigma)

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """One generator pass: saliency (B, H, W) in [0, 1] = smoothed |S(x) - A(x)|;
        counterfactuals (B, steps, C, H, W), the last A(x); path_probability (B, steps);
        checks: flipped, counterfactual_probability, proximity_l1 (explainers.validity),
        similar_l1, similar_probability, similar_kept_class.
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        generator = self.generator.to(images.device).eval()
        batch, steps = images.shape[0], self.steps
        with torch.no_grad():
            probability = torch.sigmoid(classifier(images).reshape(-1).float())
            called = probability >= self.threshold
            similar, adversarial = generator(images, called)
            alphas = torch.arange(1, steps + 1, device=images.device, dtype=images.dtype) / steps
            # lerp is exact at weight 1: the last step *is* A(x).
            path = torch.lerp(similar[:, None], adversarial[:, None], alphas.reshape(1, steps, 1, 1, 1))
            # One classifier call for the similar image and every path step.
            probs = torch.sigmoid(classifier(torch.cat([similar, path.flatten(0, 1)])).reshape(-1).float())
            similar_prob, path_probability = probs[:batch], probs[batch:].reshape(batch, steps)
            similar_l1 = (similar - images).abs().flatten(1).mean(dim=1)
        saliency, map_checks = self.saliency(images, similar, adversarial, classifier, probability)
        common = counterfactual_checks(probability, path_probability[:, -1], images, adversarial, self.threshold)
        checks = [{
            **common[i],
            "similar_l1": float(similar_l1[i]),
            "similar_probability": float(similar_prob[i]),
            "similar_kept_class": bool((similar_prob[i] >= self.threshold) == called[i]),
            **map_checks[i],
        } for i in range(batch)]
        return Explanation(probability=probability, saliency=saliency, counterfactuals=path,
                           path_probability=path_probability, checks=checks)

    def saliency(self, images: torch.Tensor, similar: torch.Tensor, adversarial: torch.Tensor,
                 classifier: nn.Module, probability: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """(maps (B, H, W) in [0, 1], extra checks per case): smoothed |S(x) - A(x)|."""
        with torch.no_grad():
            maps = normalise_maps(smooth_maps((similar - adversarial).abs().sum(dim=1), self.smoothing_sigma))
        return maps, [{} for _ in range(len(images))]


@register("sagen_ig")
class SagenIGExplainer(SagenExplainer):
    """sagen's counterfactual; saliency = the positive part (evidence for the called class)
    of the integrated gradients from A(x) to x, smoothed."""

    def __init__(self, *, ig_steps: int = 32, **kwargs: Any):
        """``ig_steps`` >= 2: Gauss-Legendre points of the path integral (Sundararajan et
        al. 2017, Captum); the other settings as ``SagenExplainer``. Raises ValueError
        for ig_steps < 2 and for sagen's own invalid settings."""
        if int(ig_steps) < 2:
            raise ValueError(f"sagen_ig ig_steps must be >= 2, got {ig_steps}")
        super().__init__(**kwargs)
        self.ig_steps = int(ig_steps)
        self.parameters["ig_steps"] = self.ig_steps  # part of the settings key of its outputs

    def saliency(self, images: torch.Tensor, similar: torch.Tensor, adversarial: torch.Tensor,
                 classifier: nn.Module, probability: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Integrated gradients of f_c = sign x logit from the baseline A(x) to x; extra
        checks: attribution_sum, score_gap f_c(x) - f_c(A(x)), completeness_relative
        (|sum - gap| / |gap|: the quadrature error)."""
        wrapped = TargetLogit(classifier, decision_signs(probability, self.threshold)).to(images.device)
        with torch.enable_grad():
            # internal_batch_size bounds memory: Captum runs the steps in passes of this many images.
            attributions, delta = IntegratedGradients(wrapped).attribute(
                images, baselines=adversarial, target=0, n_steps=self.ig_steps, method="gausslegendre",
                internal_batch_size=max(64, len(images)), return_convergence_delta=True)
        with torch.no_grad():
            gap = (wrapped(images) - wrapped(adversarial))[:, 0].float()
            total = attributions.detach().flatten(1).sum(dim=1).float()
            maps = normalise_maps(smooth_maps(attributions.detach().sum(dim=1).clamp_min(0), self.smoothing_sigma))
        checks = [{"attribution_sum": float(total[i]), "score_gap": float(gap[i]),
                   "completeness_relative": float(delta[i].abs() / gap[i].abs().clamp_min(1e-6))}
                  for i in range(len(images))]
        return maps, checks
