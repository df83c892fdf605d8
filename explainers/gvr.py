"""Generative Visual Rationales (Seah et al. 2018, "Chest Radiographs in Congestive
Heart Failure: Visualizing Neural Network Learning").

An autoencoder (encoder E, decoder D) is trained on images alone, without labels or
classifier. To explain an image x, its latent code z0 = E(x) is moved to a z* that
the classifier calls the other class while the decoded image stays close:

    minimise over z   BCE(f(cf(z)) - t -+ m, other class) + lambda * mean |D(z) - D(z0)|
    cf(z) = clamp(x + up(D(z) - D(z0)), 0, 1)

with t = logit(threshold) and m a margin in logits. The rationale is D(z0) - D(z*):
what the latent change removed (or added). The decoder's *change* is upsampled and
added to the full-resolution input (the residual trick), so the patient's image is
never replaced by the autoencoder's blurred reconstruction: D(z0) - D(z0) = 0, the
counterfactual starts as x itself. Both directions are explained: cases called
positive are pushed below the threshold, cases called negative above it.

Two ways to find z*:

- ``optimise`` (default, the paper's method): per-image Adam from z0
  (explainers/optimise.py), stopping when the decision has crossed the threshold by
  the margin, when the loss stops improving, or at the step budget. Adam's first
  step from z0 already is a (sign-)gradient shift, so starting from a gradient
  shift instead gains nothing, and starting at z0 keeps the similarity term zero
  at the start.
- ``gradient_shift`` (fast variant, the closed-form "latent shift"): one gradient of
  the classification loss at z0, then the shift z0 - a * g / |g| for a on a fixed
  grid of ``search_steps`` amounts up to ``max_shift`` (per latent element, RMS);
  the smallest amount that reaches the goal is kept (else the one with the lowest
  loss). One backward pass plus ``search_steps`` forward passes, no iteration.

The counterfactual path is the decoded linear interpolation z0 -> z* in ``steps``
steps, each through the residual trick; the last step is the counterfactual.
Instance normalisation only and per-image optimisation, so an image's result does
not depend on the rest of its batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from explainers._helpers import smooth_maps
from explainers.base import Explainer, Explanation, normalise_maps, register, threshold_logit
from explainers.lesions import outside_lung_weights
from explainers.optimise import SearchBudget, counterfactual_loss, per_image_adam
from explainers.validity import counterfactual_checks

# Encoder widths per level (each halves the side) and latent channels: at 64 px an
# 8 x 8 x 16 latent (1,024 numbers for 4,096 pixels).
DEFAULT_WIDTHS = (32, 64, 128)
DEFAULT_LATENT_CHANNELS = 16
MODES = ("optimise", "gradient_shift")
_NORM = ("instance", {"affine": True})


class GvrAutoEncoder(nn.Module):
    """Convolutional autoencoder with a small spatial latent, from MONAI blocks.

    Encoder: one strided residual unit per width, then a 1x1 convolution to the
    latent (linear: no normalisation or activation, so every latent value is
    reachable by the search). Decoder: bilinear upsampling + residual unit per
    level (no transposed convolutions: their checkerboard is a pattern a classifier
    readily exploits), a final convolution and a sigmoid. ``size``: the side it
    works at; inputs of another size are area-resampled to it.
    """

    def __init__(self, *, widths: Sequence[int] = DEFAULT_WIDTHS, latent_channels: int = DEFAULT_LATENT_CHANNELS,
                 size: int | None = 64, in_channels: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or latent_channels < 1:
            raise ValueError(f"widths and latent_channels must be positive, got {widths}, {latent_channels}")
        factor = 2 ** len(widths)
        if size is not None and (size < factor or size % factor):
            raise ValueError(f"autoencoder size must be a multiple of {factor} ({len(widths)} halvings), got {size}")
        self.widths, self.latent_channels, self.size, self.in_channels = widths, int(latent_channels), size, in_channels
        encoder: list[nn.Module] = []
        channels = in_channels
        for w in widths:
            encoder.append(ResidualUnit(spatial_dims=2, in_channels=channels, out_channels=w, strides=2,
                                        subunits=1, norm=_NORM))
            channels = w
        encoder.append(Convolution(spatial_dims=2, in_channels=channels, out_channels=latent_channels,
                                   kernel_size=1, conv_only=True))
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [Convolution(spatial_dims=2, in_channels=latent_channels, out_channels=widths[-1],
                                                kernel_size=3, norm=_NORM)]
        channels = widths[-1]
        for w in reversed(widths):
            decoder += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                        ResidualUnit(spatial_dims=2, in_channels=channels, out_channels=w, strides=1,
                                     subunits=1, norm=_NORM)]
            channels = w
        decoder.append(Convolution(spatial_dims=2, in_channels=channels, out_channels=in_channels, kernel_size=3,
                                   conv_only=True))
        self.decoder = nn.Sequential(*decoder)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in bundle.yaml."""
        return {"widths": list(self.widths), "latent_channels": self.latent_channels, "size": self.size,
                "in_channels": self.in_channels}

    def working(self, images: torch.Tensor) -> torch.Tensor:
        """images at any size -> the working size (area resampling)."""
        if self.size is None or tuple(images.shape[-2:]) == (self.size, self.size):
            return images
        return F.interpolate(images, size=(self.size, self.size), mode="area")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] -> latent (B, latent_channels, h, w)."""
        work = self.working(images)
        factor = 2 ** len(self.widths)
        if work.shape[-1] % factor or work.shape[-2] % factor:
            raise ValueError(f"image sides must be multiples of {factor}, got {tuple(work.shape[-2:])}")
        return self.encoder(work * 2.0 - 1.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent -> images (B, C, h, w) in [0, 1] at the working size."""
        return torch.sigmoid(self.decoder(latent))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction D(E(x)) at the working size."""
        return self.decode(self.encode(images))


@register("gvr")
class GvrExplainer(Explainer):
    """rationale = D(z0) - D(z*); counterfactual = x + up(D(z*) - D(z0)) (or the z0 -> z* path)."""

    version = "1"
    bundle_section = "gvr"
    bundle_networks = {"autoencoder": (GvrAutoEncoder, "network")}

    def __init__(self, *, autoencoder: GvrAutoEncoder, mode: str = "optimise", steps: int = 5,
                 search_steps: int = 60, learning_rate: float = 0.1, tolerance: float = 1e-3, patience: int = 10,
                 margin: float = 1.0, similarity_weight: float = 2.0, max_shift: float = 3.0,
                 smoothing_sigma: float = 4.0, outside_lungs: float = 0.0, refine_steps: int = 0,
                 threshold: float = 0.5):
        """Seah et al. 2018/2019 (methods: generative visual rationales, the latent search).

        ``autoencoder``: the trained ``GvrAutoEncoder``. ``mode``: "optimise" (per-image
        Adam, the paper's) or "gradient_shift" (one gradient, a grid of shifts).
        ``steps`` >= 1: images on the path z0 -> z*. ``search_steps``, ``learning_rate``,
        ``tolerance``, ``patience``, ``refine_steps`` >= 0: the search budget
        (``explainers.optimise.SearchBudget``; ``refine_steps`` > 0 goes on lowering the
        similarity term after the decision has crossed, keeping the best crossed point).
        ``margin`` >= 0: logits by which the counterfactual must cross the threshold.
        ``similarity_weight`` >= 0: weight of mean |D(z) - D(z0)|. ``max_shift`` > 0:
        largest gradient shift (RMS per latent element). ``smoothing_sigma`` >= 0: pixels.
        ``outside_lungs`` >= 0: the similarity term counts change outside the input's lung
        fields 1 + this times (``explainers.lesions.outside_lung_weights``, at the
        autoencoder's working size; 0: the paper's plain mean). Not in the paper: without
        it the search's cheapest route runs through borders and the heart (issue 15).
        Raises ValueError for values out of these ranges.
        """
        if mode not in MODES:
            raise ValueError(f"gvr mode must be one of {', '.join(MODES)}, got {mode!r}")
        if int(steps) < 1:
            raise ValueError(f"gvr steps must be >= 1, got {steps}")
        if int(search_steps) < 1 and mode == "gradient_shift":
            raise ValueError(f"gvr gradient_shift needs search_steps >= 1, got {search_steps}")
        if margin < 0 or similarity_weight < 0 or smoothing_sigma < 0 or outside_lungs < 0 or max_shift <= 0:
            raise ValueError("gvr margin, similarity_weight, smoothing_sigma and outside_lungs must be >= 0, "
                             f"max_shift > 0; got {margin}, {similarity_weight}, {smoothing_sigma}, {outside_lungs}, "
                             f"{max_shift}")
        self.budget = SearchBudget(steps=int(search_steps), learning_rate=float(learning_rate),
                                   tolerance=float(tolerance), patience=int(patience),
                                   refine_steps=int(refine_steps))  # validates
        super().__init__(threshold=threshold, mode=mode, steps=int(steps), search_steps=int(search_steps),
                         learning_rate=float(learning_rate), tolerance=float(tolerance), patience=int(patience),
                         refine_steps=int(refine_steps),
                         margin=float(margin), similarity_weight=float(similarity_weight),
                         max_shift=float(max_shift), smoothing_sigma=float(smoothing_sigma),
                         outside_lungs=float(outside_lungs))
        self.autoencoder = autoencoder.eval()
        self.mode, self.steps = mode, int(steps)
        self.margin, self.similarity_weight = float(margin), float(similarity_weight)
        self.max_shift, self.smoothing_sigma = float(max_shift), float(smoothing_sigma)
        self.outside_lungs = float(outside_lungs)

    # -- the search -------------------------------------------------------------------

    def _objective(self, images: torch.Tensor, reference: torch.Tensor, wanted: torch.Tensor,
                   classifier: nn.Module):
        """loss(z, index) for the images ``index``: classification towards ``wanted``
        with the margin + similarity weight * mean(cost * |D(z) - D(z0)|), cost the per-pixel
        weight of ``outside_lungs`` (ones when 0); goal = crossed by the margin."""
        offset = threshold_logit(self.threshold)
        ae = self.autoencoder
        cost = outside_lung_weights(images, self.outside_lungs, tuple(reference.shape[-2:]))

        def loss_fn(latent: torch.Tensor, index: torch.Tensor):
            decoded = ae.decode(latent)
            change = decoded - reference[index]
            cf = residual(images[index], change)
            logit = classifier(cf).reshape(-1).float() - offset
            return counterfactual_loss(logit, wanted[index], self.margin, penalty=change.abs(), cost=cost[index],
                                       weight=self.similarity_weight)

        return loss_fn

    def _gradient_shift(self, z0: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        batch = z0.shape[0]
        index = torch.arange(batch, device=z0.device)
        latent = z0.detach().clone().requires_grad_(True)
        loss, _ = loss_fn(latent, index)
        (grad,) = torch.autograd.grad(loss.sum(), latent)
        # Unit RMS per latent element: the shift amount means the same for every image.
        rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
        direction = -grad / rms.reshape(-1, *[1] * (grad.ndim - 1))
        n = self.budget.steps
        best = z0.detach().clone()
        best_loss = torch.full((batch,), float("inf"), device=z0.device)
        found = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        used = torch.zeros(batch, dtype=torch.long, device=z0.device)
        with torch.no_grad():
            for k in range(1, n + 1):
                todo = (~found).nonzero().reshape(-1)
                if len(todo) == 0:
                    break
                candidate = z0[todo] + (self.max_shift * k / n) * direction[todo]
                loss, done = loss_fn(candidate, todo)
                used[todo] += 1
                better = done | (loss < best_loss[todo])
                best[todo[better]] = candidate[better]
                best_loss[todo[better]] = loss[better]
                found[todo[done]] = True
        return best, used

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """Per-image latent search: rationale D(z0) - D(z*) as saliency (B, H, W) in [0, 1];
        counterfactuals (B, steps, C, H, W) = x + up(D(z_t) - D(z0)); checks: flipped,
        counterfactual_probability, proximity_l1, steps_used, reconstruction_l1,
        latent_shift, mode.
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        ae = self.autoencoder.to(images.device).eval()
        batch, steps = images.shape[0], self.steps
        networks = [*classifier.parameters(), *ae.parameters()]
        modes = [p.requires_grad for p in networks]
        for p in networks:
            p.requires_grad_(False)  # gradients flow to the latent only
        try:
            with torch.no_grad():
                probability = torch.sigmoid(classifier(images).reshape(-1).float())
                z0 = ae.encode(images)
                reference = ae.decode(z0)
                reconstruction_l1 = (reference - ae.working(images)).abs().flatten(1).mean(dim=1)
            called = probability >= self.threshold
            wanted = (~called).float()
            loss_fn = self._objective(images, reference, wanted, classifier)
            with torch.enable_grad():  # the search needs gradients even when the caller runs under no_grad
                if self.mode == "optimise":
                    result = per_image_adam(z0, loss_fn, self.budget)
                    z_star, steps_used = result.variables, result.steps_used
                else:
                    z_star, steps_used = self._gradient_shift(z0, loss_fn)
            with torch.no_grad():
                alphas = torch.arange(1, steps + 1, device=images.device, dtype=z0.dtype) / steps
                # lerp is exact at weight 1: the last step decodes z* itself.
                latents = torch.lerp(z0[:, None], z_star[:, None], alphas.reshape(1, steps, *[1] * (z0.ndim - 1)))
                decoded = ae.decode(latents.flatten(0, 1)).reshape(batch, steps, *reference.shape[1:])
                changes = decoded - reference[:, None]
                path = residual(images.repeat_interleave(steps, dim=0), changes.flatten(0, 1))
                path_probability = torch.sigmoid(classifier(path).reshape(-1).float()).reshape(batch, steps)
                path = path.reshape(batch, steps, *images.shape[1:])
                rationale = upsample(-changes[:, -1], images.shape[-2:])  # D(z0) - D(z*)
                # Smoothed at about the latent's cell size (default sigma 4 px at 128 px: a
                # cell spans 16 px), else the zero crossings of a smooth signed change cut
                # one region into rings.
                saliency = normalise_maps(smooth_maps(rationale.abs().sum(dim=1), self.smoothing_sigma))
                shift = (z_star - z0).abs().flatten(1).mean(dim=1)
        finally:
            for p, flag in zip(networks, modes):
                p.requires_grad_(flag)
        common = counterfactual_checks(probability, path_probability[:, -1], images, path[:, -1], self.threshold)
        checks = [{
            **common[i],
            "steps_used": int(steps_used[i]),
            "reconstruction_l1": float(reconstruction_l1[i]),
            "latent_shift": float(shift[i]),
            "mode": self.mode,
        } for i in range(batch)]
        return Explanation(probability=probability, saliency=saliency, counterfactuals=path,
                           path_probability=path_probability, checks=checks)


def upsample(change: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(change.shape[-2:]) == tuple(size):
        return change
    return F.interpolate(change, size=tuple(size), mode="bilinear", align_corners=False)


def residual(images: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The residual trick: the working-size change upsampled onto the full-size input."""
    return (images + upsample(change, images.shape[-2:])).clamp(0.0, 1.0)
