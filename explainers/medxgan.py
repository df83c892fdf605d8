"""medXGAN (Dravid et al. 2022, "medXGAN: Visual Explanations for Medical Classifiers
through a Generative Latent Space").

A generator G(z1, z2) with an *anatomy* code z1 and a *pathology* code z2, trained
against the frozen classifier so that z2 = 0 gives images it calls negative and
z2 ~ N(0, I) images it calls positive (explainers/train_medxgan.py). To explain an
image x:

1. invert: find (z1, z2) with G(z1, z2) ≈ x and f(G(z1, z2)) ≈ f(x). The official
   code runs 5,000 Adam steps from z = 0 (``inversion="optimise"``); the fast route
   (``inversion="encoder"``, the default) starts from an encoder's prediction E(x),
   trained alongside G, and refines it for a few steps;
2. walk the pathology code (``walk="zero"``, the paper's): z2 -> 0 for a case called
   positive. For a case called negative (z2 ≈ 0 already, which the paper does not
   explain) the walk goes the other way: z2 -> z2 + r u, with u the unit direction of
   the called class's steepest descent in z2 and r the typical norm of a positive
   code (sqrt(dim z2)). ``walk="search"`` (not in the paper) instead finds the end
   z* by a per-image search over the whole code (z1, z2), in both directions: the
   classifier must cross the threshold by ``margin`` logits while the generated
   change stays small, change outside the lung fields counting 1 + ``outside_lungs``
   times, with refinement after the crossing (explainers/optimise.py), as gvr's
   search. z2 -> 0 re-synthesises the whole image wherever the generator ties
   pathology to global appearance (on the v2 demo bundle half the change lay outside
   the lungs); a search over z2 alone is confined to 16 global directions (lung share
   0.57 on 16 test images), over the whole code 0.68 (docs/benchmarks.md, issue 15);
3. residual trick: the counterfactual shown at the input resolution is
   x + upsample(G(z1, z2') - G(z1, z2)): the generator's 64 px limit never blurs the
   patient's image, only its *change* is synthesised.

``medxgan``: saliency = smoothed |G(z) - G(z_end)|, counterfactuals = the
walk. ``medxgan_ig``: integrated gradients of the classifier along that walk, with
the class the classifier called fixed at every step (a known pitfall of the public
code is to re-choose it per step). The path is not a straight line in image space,
so each step's gradient multiplies that step's own image difference (the path
method of Sundararajan et al.); the sum of the attributions then equals the score
difference up to the quadrature error, which the checks report.

Instance normalisation only, per-image optimisation (explainers/optimise.py): an
image's explanation never depends on the rest of its batch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import Generator, Regressor
from torch import nn

from explainers._helpers import frozen, smooth_maps, to_working
from explainers.base import Explainer, Explanation, decision_signs, normalise_maps, register, threshold_logit
from explainers.lesions import outside_lung_weights
from explainers.optimise import SearchBudget, counterfactual_loss, per_image_adam
from explainers.validity import counterfactual_checks

DEFAULT_WIDTHS = (128, 64, 32, 16)  # channels at 4, 8, 16, 32 px; the last layer makes the 64 px image
ANATOMY_DIM, PATHOLOGY_DIM = 64, 16
WALKS = ("zero", "search")


class MedxganGenerator(nn.Module):
    """G(z1, z2) -> (B, C, size, size) in [0, 1]: MONAI Generator (instance norm) + sigmoid."""

    def __init__(self, *, anatomy_dim: int = ANATOMY_DIM, pathology_dim: int = PATHOLOGY_DIM,
                 widths: Sequence[int] = DEFAULT_WIDTHS, size: int = 64, in_channels: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        levels = len(widths)
        if size % (2 ** levels) or size // (2 ** levels) < 2:
            raise ValueError(f"generator size {size} must be a multiple of {2 ** levels} (2^levels) and >= "
                             f"{2 ** (levels + 1)}")
        if anatomy_dim < 1 or pathology_dim < 1:
            raise ValueError(f"latent sizes must be >= 1, got anatomy {anatomy_dim}, pathology {pathology_dim}")
        self.anatomy_dim, self.pathology_dim = int(anatomy_dim), int(pathology_dim)
        self.widths, self.size, self.in_channels = widths, int(size), int(in_channels)
        start = size // (2 ** levels)
        self.network = Generator(latent_shape=(self.latent_dim,), start_shape=(widths[0], start, start),
                                 channels=widths[1:] + (in_channels,), strides=(2,) * levels, num_res_units=1)

    @property
    def latent_dim(self) -> int:
        return self.anatomy_dim + self.pathology_dim

    def config(self) -> dict[str, Any]:
        return {"anatomy_dim": self.anatomy_dim, "pathology_dim": self.pathology_dim,
                "widths": list(self.widths), "size": self.size, "in_channels": self.in_channels}

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z[:, :self.anatomy_dim], z[:, self.anatomy_dim:]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, anatomy_dim + pathology_dim) = [z1, z2]."""
        return torch.sigmoid(self.network(z))


class MedxganEncoder(nn.Module):
    """E(x) -> z (B, anatomy_dim + pathology_dim): MONAI Regressor (instance norm) at the generator's size."""

    def __init__(self, *, latent_dim: int = ANATOMY_DIM + PATHOLOGY_DIM, widths: Sequence[int] = (16, 32, 64, 128),
                 size: int = 64, in_channels: int = 1):
        super().__init__()
        self.latent_dim, self.widths = int(latent_dim), tuple(int(w) for w in widths)
        self.size, self.in_channels = int(size), int(in_channels)
        self.network = Regressor(in_shape=(in_channels, size, size), out_shape=(self.latent_dim,),
                                 channels=self.widths, strides=(2,) * len(self.widths), num_res_units=1)

    def config(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "widths": list(self.widths), "size": self.size,
                "in_channels": self.in_channels}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images at any size, in [0, 1]; area-resampled to the working size."""
        return self.network(to_working(images, self.size) * 2.0 - 1.0)


def to_input(change: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A change at the working size, bilinearly resampled to the input's (H, W)."""
    if change.shape[-2:] == tuple(shape):
        return change
    return F.interpolate(change, size=tuple(shape), mode="bilinear", align_corners=False)


def invert(generator: MedxganGenerator, classifier: nn.Module, images: torch.Tensor, *,
           encoder: MedxganEncoder | None, budget: SearchBudget, probability_weight: float = 0.1,
           trace: list[torch.Tensor] | None = None):
    """(z, SearchResult): z with G(z) ≈ x at the working size and f(up(G(z))) ≈ f(x).

    Starts from E(x) when an encoder is given (the fast route), else from z = 0 (the
    official code's start). Loss per image: L1 + MSE to the area-resampled image,
    plus ``probability_weight`` x BCE between the classifier's probabilities.
    ``trace``: if given, each step appends the active images' L1 error (benchmarks).
    """
    target = to_working(images, generator.size)
    with torch.no_grad():
        wanted = torch.sigmoid(classifier(images).reshape(-1).float())
        start = encoder(images) if encoder is not None else torch.zeros(len(images), generator.latent_dim,
                                                                            device=images.device)

    def loss_fn(z: torch.Tensor, index: torch.Tensor):
        generated = generator(z)
        l1 = (generated - target[index]).abs().flatten(1).mean(1)
        if trace is not None:
            trace.append(l1.detach())
        error = l1 + (generated - target[index]).pow(2).flatten(1).mean(1)
        if probability_weight > 0:
            logits = classifier(to_input(generated, images.shape[-2:])).reshape(-1).float()
            error = error + probability_weight * F.binary_cross_entropy_with_logits(logits, wanted[index],
                                                                                  reduction="none")
        return error, None

    result = per_image_adam(start, loss_fn, budget)
    return result.variables, result


class _MedxganBase(Explainer):
    """What medxgan and medxgan_ig share: the networks, the inversion and the latent walk."""

    version = "1"
    bundle_section = "medxgan"
    bundle_networks = {"generator": (MedxganGenerator, "network"), "encoder": (MedxganEncoder, "encoder_network")}
    optional_networks = ("encoder",)

    def __init__(self, *, generator: MedxganGenerator, encoder: MedxganEncoder | None = None,
                 inversion: str = "encoder", inversion_steps: int = 30, official_steps: int = 5000,
                 learning_rate: float = 0.02, tolerance: float = 1e-3, patience: int = 10,
                 probability_weight: float = 0.1, negative_scale: float = 1.0, steps: int = 8,
                 smoothing_sigma: float = 2.0, walk: str = "zero", search_steps: int = 200,
                 search_learning_rate: float = 0.05, search_patience: int = 1000, refine_steps: int = 100,
                 margin: float = 1.0, similarity_weight: float = 8.0, outside_lungs: float = 8.0,
                 threshold: float = 0.5):
        """Dravid et al. 2022 (method section: inversion and the pathology-code walk).

        ``generator`` / ``encoder``: the trained networks (the encoder is needed for
        ``inversion="encoder"``, the fast route; "optimise" is the official zero start
        with ``official_steps`` Adam steps). ``inversion_steps``, ``learning_rate``,
        ``tolerance``, ``patience``: the refinement budget. ``probability_weight`` >= 0:
        weight of matching the classifier's probability while inverting.
        ``negative_scale``: length of the walk for cases called negative, in
        sqrt(dim z2). ``steps`` >= 2: images on the walk. ``smoothing_sigma``: pixels.
        ``walk``: "zero" (the paper's z2 -> 0) or "search" (module docstring, step 2);
        the search's budget: ``search_steps``, ``search_learning_rate``,
        ``search_patience`` (convergence before the crossing, tolerance ``tolerance``),
        ``refine_steps`` >= 0; its terms: ``margin`` >= 0 logits, ``similarity_weight``
        >= 0 on mean(cost x |G(z*) - G(z)|) at the generator's size, ``outside_lungs`` >= 0
        (``explainers.lesions.outside_lung_weights``; 0: a plain mean). These are unused
        with walk "zero". Raises ValueError for an unknown inversion or walk, a missing
        encoder, steps < 2 or a search value out of its range.
        """
        if inversion not in ("encoder", "optimise"):
            raise ValueError(f"medxgan inversion must be 'encoder' or 'optimise', got {inversion!r}")
        if inversion == "encoder" and encoder is None:
            raise ValueError("medxgan inversion 'encoder' needs the trained encoder")
        if int(steps) < 2:
            raise ValueError(f"medxgan steps must be >= 2 (start and end of the walk), got {steps}")
        if walk not in WALKS:
            raise ValueError(f"medxgan walk must be one of {', '.join(WALKS)}, got {walk!r}")
        if margin < 0 or similarity_weight < 0 or outside_lungs < 0:
            raise ValueError("medxgan margin, similarity_weight and outside_lungs must be >= 0, "
                             f"got {margin}, {similarity_weight}, {outside_lungs}")
        try:
            self.search_budget = SearchBudget(steps=int(search_steps), learning_rate=float(search_learning_rate),
                                              tolerance=float(tolerance), patience=int(search_patience),
                                              refine_steps=int(refine_steps))  # validates
        except ValueError as exc:
            raise ValueError(f"medxgan search_steps, search_learning_rate, search_patience or refine_steps: {exc}") \
                from exc
        super().__init__(threshold=threshold, inversion=inversion, inversion_steps=int(inversion_steps),
                         official_steps=int(official_steps), learning_rate=float(learning_rate),
                         tolerance=float(tolerance), patience=int(patience),
                         probability_weight=float(probability_weight), negative_scale=float(negative_scale),
                         steps=int(steps), smoothing_sigma=float(smoothing_sigma), walk=walk,
                         search_steps=int(search_steps), search_learning_rate=float(search_learning_rate),
                         search_patience=int(search_patience), refine_steps=int(refine_steps), margin=float(margin),
                         similarity_weight=float(similarity_weight), outside_lungs=float(outside_lungs))
        self.generator = generator.eval().requires_grad_(False)
        self.encoder = encoder.eval().requires_grad_(False) if encoder is not None else None
        self.inversion = inversion
        # The official route: zero start, fixed number of steps (no early stopping).
        self.budget = (SearchBudget(steps=int(inversion_steps), learning_rate=float(learning_rate),
                                    tolerance=float(tolerance), patience=int(patience))
                       if inversion == "encoder" else
                       SearchBudget(steps=int(official_steps), learning_rate=float(learning_rate), tolerance=0.0,
                                    patience=int(official_steps) + 1))
        self.probability_weight, self.negative_scale = float(probability_weight), float(negative_scale)
        self.steps, self.smoothing_sigma = int(steps), float(smoothing_sigma)
        self.walk, self.margin = walk, float(margin)
        self.similarity_weight, self.outside_lungs = float(similarity_weight), float(outside_lungs)

    def _walk(self, images: torch.Tensor, classifier: nn.Module):
        """Inversion and the latent walk: (probability, z, z_end, inversion search result,
        inversion L1, walk_steps (B,) on the CPU: Adam steps of walk "search", else 0)."""
        generator = self.generator.to(images.device)
        encoder = self.encoder.to(images.device) if self.encoder is not None else None
        with torch.enable_grad(), frozen(classifier):
            z, search = invert(generator, classifier, images, encoder=encoder if self.inversion == "encoder" else None,
                               budget=self.budget, probability_weight=self.probability_weight)
        with torch.no_grad():
            probability = torch.sigmoid(classifier(images).reshape(-1).float())
            rebuilt = generator(z)
            inversion_l1 = (rebuilt - to_working(images, generator.size)).abs().flatten(1).mean(1)
        called = probability >= self.threshold
        z1, z2 = generator.split(z)
        if self.walk == "search":
            with torch.enable_grad(), frozen(classifier):
                z_end, walk_steps = self._search(images, classifier, z, wanted=(~called).float())
            return probability, z, z_end, search, inversion_l1, walk_steps
        z2_end, walk_steps = torch.zeros_like(z2), torch.zeros(len(images), dtype=torch.long)
        if (~called).any():
            with frozen(classifier):
                z2_end[~called] = self._towards_positive(images[~called], classifier, z[~called])
        return probability, z, torch.cat([z1, z2_end], dim=1), search, inversion_l1, walk_steps

    def _search(self, images: torch.Tensor, classifier: nn.Module, z: torch.Tensor, wanted: torch.Tensor):
        """walk "search": (z* (B, latent_dim), Adam steps (B,)), per image from the inverted z."""
        generator = self.generator
        offset = threshold_logit(self.threshold)
        with torch.no_grad():
            base = generator(z)
        cost = outside_lung_weights(images, self.outside_lungs, tuple(base.shape[-2:]))

        def loss_fn(code: torch.Tensor, index: torch.Tensor):
            change = generator(code) - base[index]
            shown = (images[index] + to_input(change, images.shape[-2:])).clamp(0.0, 1.0)
            logit = classifier(shown).reshape(-1).float() - offset
            return counterfactual_loss(logit, wanted[index], self.margin, penalty=change.abs(), cost=cost[index],
                                       weight=self.similarity_weight)

        result = per_image_adam(z, loss_fn, self.search_budget)
        return result.variables, result.steps_used.cpu()

    def _towards_positive(self, images: torch.Tensor, classifier: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """z2 + r u for cases called negative: u = the direction in z2 that raises the positive
        logit of the shown counterfactual fastest, r = negative_scale x sqrt(dim z2)."""
        generator = self.generator
        z1, z2 = generator.split(z)
        with torch.enable_grad():
            moving = z2.detach().clone().requires_grad_(True)
            base = generator(z).detach()
            shown = images + to_input(generator(torch.cat([z1, moving], 1)) - base, images.shape[-2:])
            classifier(shown).reshape(-1).sum().backward()
        direction = moving.grad / moving.grad.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12)
        return z2 + self.negative_scale * math.sqrt(generator.pathology_dim) * direction

    def _path(self, images: torch.Tensor, z: torch.Tensor, z_end: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W): x + up(G(lerp(z, z_end, a)) - G(z)) for each alpha, clamped to [0, 1]."""
        generator = self.generator
        batch, steps = len(images), len(alphas)
        codes = torch.lerp(z[:, None], z_end[:, None], alphas.reshape(1, steps, 1)).flatten(0, 1)
        change = generator(codes) - generator(z).repeat_interleave(steps, dim=0)
        shown = images.repeat_interleave(steps, dim=0) + to_input(change, images.shape[-2:])
        return shown.clamp(0.0, 1.0).reshape(batch, steps, *images.shape[1:])

    def _checks(self, probability, path_probability, path, images, search, inversion_l1, z, z_end,
                walk_steps) -> list[dict]:
        z2_norm = self.generator.split(z)[1].norm(dim=1)
        shift = (z_end - z).norm(dim=1)
        checks = counterfactual_checks(probability, path_probability[:, -1], images, path[:, -1], self.threshold)
        return [{
            **checks[i],
            "steps_used": int(search.steps_used[i]),
            "inversion": self.inversion,
            "inversion_l1": float(inversion_l1[i]),
            "pathology_code_norm": float(z2_norm[i]),
            "latent_shift": float(shift[i]),
            "walk": self.walk,
            "walk_steps": int(walk_steps[i]),
        } for i in range(len(images))]


@register("medxgan")
class MedxganExplainer(_MedxganBase):
    """saliency = smoothed |G(z) - G(z_end)|; counterfactuals = the walk z -> z_end (z_end: z2 -> 0, or searched)."""

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """Inversion and walk: saliency (B, H, W) in [0, 1] = smoothed |G(z) - G(z_end)|
        upsampled; counterfactuals (B, steps, C, H, W) = x + up(G(z_t) - G(z)); checks:
        flipped, counterfactual_probability, proximity_l1, steps_used, inversion,
        inversion_l1, pathology_code_norm, latent_shift, walk, walk_steps (Adam steps of
        walk "search"; 0 for "zero").
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        probability, z, z_end, search, inversion_l1, walk_steps = self._walk(images, classifier)
        alphas = torch.arange(1, self.steps + 1, device=images.device, dtype=images.dtype) / self.steps
        with torch.no_grad():
            path = self._path(images, z, z_end, alphas)
            path_probability = torch.sigmoid(classifier(path.flatten(0, 1)).reshape(-1).float()).reshape(
                len(images), self.steps)
            difference = to_input(self.generator(z) - self.generator(z_end), images.shape[-2:])
            saliency = normalise_maps(smooth_maps(difference.abs().sum(dim=1), self.smoothing_sigma))
        checks = self._checks(probability, path_probability, path, images, search, inversion_l1, z, z_end,
                              walk_steps)
        return Explanation(probability=probability, saliency=saliency, counterfactuals=path,
                           path_probability=path_probability, checks=checks)


@register("medxgan_ig")
class MedxganIGExplainer(_MedxganBase):
    """Integrated gradients of the called class's logit along the latent walk.

    attribution = sum_k (grad f(x_k) + grad f(x_{k+1})) / 2 * (x_{k+1} - x_k) over the
    ``ig_steps`` + 1 images x_0 = counterfactual end ... x_K = x (trapezoid rule);
    saliency = its positive part (evidence for the called class), smoothed.
    """

    def __init__(self, *, ig_steps: int = 32, **kwargs: Any):
        """``ig_steps`` >= 2: trapezoid steps along the walk (Sundararajan et al. 2017,
        path method); the other settings as ``MedxganExplainer``. Raises ValueError."""
        if int(ig_steps) < 2:
            raise ValueError(f"medxgan_ig ig_steps must be >= 2, got {ig_steps}")
        super().__init__(**kwargs)
        self.ig_steps = int(ig_steps)
        self.parameters["ig_steps"] = self.ig_steps  # part of the settings key of its outputs

    def attribute(self, images: torch.Tensor, classifier: nn.Module, z: torch.Tensor, z_end: torch.Tensor,
                  sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attributions (B, C, H, W), score gap f_c(x) - f_c(x_end) (B,)); f_c = sign x logit."""
        batch, k = len(images), self.ig_steps
        # alpha = 1 is the end of the walk (the counterfactual), alpha = 0 the input itself.
        alphas = torch.linspace(1.0, 0.0, k + 1, device=images.device, dtype=images.dtype)
        with torch.no_grad():
            points = self._path(images, z, z_end, alphas).flatten(0, 1)  # (B*(K+1), C, H, W), case-major
        gradients = []
        for start in range(0, len(points), 64):  # bounded memory for any batch and step count
            chunk = points[start:start + 64].detach().requires_grad_(True)
            case = torch.arange(start, start + len(chunk), device=images.device) // (k + 1)
            with torch.enable_grad():
                score = classifier(chunk).reshape(-1).float() * sign[case]
                (grad,) = torch.autograd.grad(score.sum(), chunk)
            gradients.append(grad)
        grads = torch.cat(gradients).reshape(batch, k + 1, *images.shape[1:])
        points = points.reshape(batch, k + 1, *images.shape[1:])
        steps = points[:, 1:] - points[:, :-1]
        attributions = ((grads[:, 1:] + grads[:, :-1]) / 2 * steps).sum(dim=1)
        with torch.no_grad():
            ends = classifier(torch.stack([points[:, -1], points[:, 0]], 1).flatten(0, 1)).reshape(batch, 2)
            gap = (ends[:, 0] - ends[:, 1]).float() * sign
        return attributions, gap

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """As ``MedxganExplainer.explain``, with saliency = the positive part of the
        integrated gradients along the walk; extra checks: attribution_sum, score_gap,
        completeness_relative (|sum - gap| / |gap|: the quadrature error).
        """
        probability, z, z_end, search, inversion_l1, walk_steps = self._walk(images, classifier)
        sign = decision_signs(probability, self.threshold)
        attributions, gap = self.attribute(images, classifier, z, z_end, sign)
        alphas = torch.arange(1, self.steps + 1, device=images.device, dtype=images.dtype) / self.steps
        with torch.no_grad():
            path = self._path(images, z, z_end, alphas)
            path_probability = torch.sigmoid(classifier(path.flatten(0, 1)).reshape(-1).float()).reshape(
                len(images), self.steps)
            saliency = normalise_maps(smooth_maps(attributions.sum(dim=1).clamp_min(0), self.smoothing_sigma))
            total = attributions.flatten(1).sum(1)
        checks = self._checks(probability, path_probability, path, images, search, inversion_l1, z, z_end,
                              walk_steps)
        for i, check in enumerate(checks):
            check["attribution_sum"] = float(total[i])
            check["score_gap"] = float(gap[i])
            check["completeness_relative"] = float((total[i] - gap[i]).abs() / gap[i].abs().clamp_min(1e-6))
        return Explanation(probability=probability, saliency=saliency, counterfactuals=path,
                           path_probability=path_probability, checks=checks)
