"""Counterfactual impact analysis with inpainting (Major et al. 2020, "Interpreting
medical image classifiers by optimization based counterfactual impact analysis").

An inpainter is trained to fill a masked region of a radiograph from its
neighbourhood; for every image a smooth low-resolution mask m is optimised so that
the classifier's score of the infilled image x * (1 - m) + fill * m moves to the
other class, while the mask stays small and smooth:

    loss(m) = BCE(f(x_m) - t -+ margin, other class) + lambda1 * mean(m) + lambda2 * TV(m)

(t = logit of the bundle's decision threshold, so the counterfactual must cross the
threshold by ``margin`` logits). The saliency is the mask, the counterfactual the
infilled image; ``steps > 1`` gives the path that scales the mask from 0 to m.

Extension of the paper (both directions). The paper's inpainter is trained on
healthy tissue, so it can only *remove* a finding. Validity is measured on every
case here, so two inpainters with identical architecture and training are kept:

- ``fill_negative``, trained on images of the negative class (NORMAL: the paper's
  setting): used for cases the classifier calls positive (what must be removed for
  it to call them negative?);
- ``fill_positive``, trained on images of the positive class (e.g. PNEUMONIA): used
  for cases the classifier calls negative (where would the finding have to be for
  it to call them positive?).

The training sets are chosen by the ground-truth labels (what tissue of each class
looks like), never by the classifier. Bundles written before the task-neutral names
store the two networks as ``fill_normal`` and ``fill_pneumonia``; they load as
``fill_negative`` and ``fill_positive``.

Design details:
- Inpainter: MONAI BasicUNet (instance norm) at a 64 px working size; input
  (x * (1 - m), m), output a whole image through a sigmoid. Only the masked part of
  its output is used, and it is upsampled and composed with the full-resolution
  input (the residual trick): outside the mask the patient's pixels are untouched.
- Mask: logits at ``mask_size`` x ``mask_size`` (16), m = sigmoid(logits) bilinearly
  upsampled to the input size: smooth by construction. The search starts from a
  small uniform mask (``initial_mask``) and grows it where the classifier needs it;
  the area term pushes everything else down. Each image stops at the first of: its
  counterfactual crosses the threshold by the margin (the smallest mask the search
  found that flips it: shrinking further would trade validity for area, and costs
  time), convergence (``tolerance``), or the budget (``search_steps``). The result
  is the final state, flipped or not (the checks say which).
- The per-image search is ``explainers.optimise.per_image_adam``: each image has its
  own variables and stopping rule, finished images are frozen, and the inpainter
  uses instance norm only, so an image's result does not depend on its batch. Within
  the search the networks see one image at a time: a batched convolution rounds
  differently (1e-7) and Adam's sign-like steps amplify that to visible differences
  within a few steps; on a CPU batch 1 costs about the same per image.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import nn

from explainers._helpers import frozen
from explainers.base import Explainer, Explanation, normalise_maps, register, threshold_logit
from explainers.lesions import outside_lung_weights
from explainers.optimise import SearchBudget, counterfactual_loss, per_image_adam
from explainers.validity import counterfactual_checks

# Default widths: (level 0..4, decoder output). 1.8 M parameters per inpainter.
DEFAULT_FEATURES = (16, 32, 64, 128, 256, 16)
_PROBE_SEED = 20200  # the fixed held-out mask on which the inpainter's own error is measured


class Inpainter(nn.Module):
    """Fills the masked part of an image from its neighbourhood.

    ``size``: the side the U-Net works at (None: the input's own size). The input and
    mask are area-downsampled to it; the fill is bilinearly upsampled back and used
    inside the mask only.
    """

    def __init__(self, *, features: Sequence[int] = DEFAULT_FEATURES, size: int | None = 64, in_channels: int = 1):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) != 6:
            raise ValueError(f"features must hold 6 widths (5 levels + decoder output), got {features}")
        if size is not None and (size < 16 or size % 16):
            raise ValueError(f"inpainter size must be a multiple of 16 (the U-Net pools 4 times), got {size}")
        self.features, self.size, self.in_channels = features, size, in_channels
        self.body = BasicUNet(spatial_dims=2, in_channels=in_channels + 1, out_channels=in_channels,
                              features=features, norm=("instance", {"affine": True}), upsample="nontrainable")

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in bundle.yaml."""
        return {"features": list(self.features), "size": self.size, "in_channels": self.in_channels}

    def fill(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """At the working size: images (B, C, s, s), masks (B, 1, s, s) in [0, 1] -> the
        network's whole-image prediction (B, C, s, s) in [0, 1]; only its masked part is used."""
        visible = images * (1.0 - masks)
        return torch.sigmoid(self.body(torch.cat([visible * 2.0 - 1.0, masks * 2.0 - 1.0], dim=1)))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1], masks (B, 1, H, W) in [0, 1] -> the infilled image
        x * (1 - m) + upsample(fill) * m at the input size."""
        height, width = images.shape[-2:]
        resample = self.size is not None and (height, width) != (self.size, self.size)
        if not resample and (height % 16 or width % 16):
            raise ValueError(f"image sides must be multiples of 16 for the U-Net, got {height}x{width}")
        if masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"mask {tuple(masks.shape)} must match the images {tuple(images.shape)}")
        if resample:
            work = F.interpolate(images, size=(self.size, self.size), mode="area")
            work_masks = F.interpolate(masks, size=(self.size, self.size), mode="area")
            filled = F.interpolate(self.fill(work, work_masks), size=(height, width), mode="bilinear",
                                   align_corners=False)
        else:
            filled = self.fill(images, masks)
        return images * (1.0 - masks) + filled * masks


def random_masks(n: int, size: int, generator: torch.Generator, *, coverage: tuple[float, float] = (0.05, 0.6),
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """(n, 1, size, size) smooth random masks in [0, 1]: thresholded low-resolution noise
    (blobs of varied size and number) with soft edges, half of them joined by a random
    rectangle, a third of them at a partial opacity (the search's masks are soft too)."""
    grid = int(torch.randint(3, 9, (1,), generator=generator))
    noise = torch.randn(n, 1, grid, grid, generator=generator)
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).flatten(1)
    wanted = coverage[0] + (coverage[1] - coverage[0]) * torch.rand(n, generator=generator)
    level = torch.quantile(field, 1.0 - wanted, dim=1).diagonal()[:, None]  # row i at its own level
    spread = field.std(dim=1, keepdim=True).clamp_min(1e-6)
    masks = torch.sigmoid((field - level) / (0.1 * spread)).reshape(n, 1, size, size)
    corners = torch.rand(n, 4, generator=generator)
    rows = torch.arange(size).float()[None, :] / size
    top, left = corners[:, 0:1] * 0.7, corners[:, 1:2] * 0.7
    bottom, right = top + 0.1 + corners[:, 2:3] * 0.3, left + 0.1 + corners[:, 3:4] * 0.3
    box = (((rows >= top) & (rows < bottom)).float()[:, :, None]
           * ((rows >= left) & (rows < right)).float()[:, None, :])
    use_box = (torch.rand(n, generator=generator) < 0.5).float()[:, None, None]
    masks = torch.maximum(masks, (box * use_box)[:, None])
    opacity = torch.where(torch.rand(n, generator=generator) < 1 / 3, 0.3 + 0.7 * torch.rand(n, generator=generator),
                          torch.ones(n))
    return (masks * opacity[:, None, None, None]).clamp(0.0, 1.0).to(device)


def probe_masks(n: int, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The fixed held-out masks (the same for every image and batch) on which an
    inpainter's own reconstruction error is measured."""
    masks = random_masks(1, size, torch.Generator().manual_seed(_PROBE_SEED), coverage=(0.25, 0.25))
    return (masks > 0.5).float().expand(n, 1, size, size).to(device)


def hole_l1(prediction: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) mean |prediction - image| inside each mask (weighted by the mask)."""
    weight = masks.expand_as(images).flatten(1)
    return ((prediction - images).abs().flatten(1) * weight).sum(1) / weight.sum(1).clamp_min(1e-8)


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute difference between neighbouring pixels of (B, 1, h, w) maps."""
    return ((maps[..., 1:, :] - maps[..., :-1, :]).abs().flatten(1).mean(1)
            + (maps[..., :, 1:] - maps[..., :, :-1]).abs().flatten(1).mean(1))


@register("cia")
class CiaExplainer(Explainer):
    """saliency = the optimised mask; counterfactual = the infilled image (or the path scaling the mask)."""

    version = "1"
    bundle_section = "cia"
    bundle_networks = {"fill_negative": (Inpainter, "network"), "fill_positive": (Inpainter, "network")}
    weight_aliases = {"fill_negative": "fill_normal", "fill_positive": "fill_pneumonia"}

    def __init__(self, *, fill_negative: Inpainter, fill_positive: Inpainter, steps: int = 1,
                 search_steps: int = 60, learning_rate: float = 0.4, tolerance: float = 1e-3, patience: int = 10,
                 margin: float = 1.0, area_weight: float = 1.0, tv_weight: float = 3.0, mask_size: int = 16,
                 initial_mask: float = 0.1, outside_lungs: float = 0.0, refine_steps: int = 0,
                 threshold: float = 0.5):
        """Major et al. 2020 (method section: the mask objective with area and total
        variation terms), in both directions (see the module docstring).

        ``fill_negative`` / ``fill_positive``: the trained ``Inpainter`` of each class.
        ``steps`` >= 1: images on the path scaling the mask from 0 to m. ``search_steps``,
        ``learning_rate``, ``tolerance``, ``patience``, ``refine_steps`` >= 0: the per-image
        Adam budget (``explainers.optimise.SearchBudget``; ``refine_steps`` > 0 goes on
        shrinking the mask after the decision has crossed, keeping the best crossed mask).
        ``margin`` >= 0 (logits), ``area_weight`` (lambda1) >= 0, ``tv_weight`` (lambda2)
        >= 0, ``mask_size`` >= 2 (side of the mask's logit grid), ``initial_mask`` in
        (0, 1). ``outside_lungs`` >= 0: the area term counts mask outside the lung fields
        1 + this times (``explainers.lesions.outside_lung_weights``; 0: the paper's plain
        mean area), and the mask starts there at ``initial_mask`` / (1 + this), so every
        cell starts at the same area cost. Raises ValueError for values out of these ranges.
        """
        if int(steps) < 1:
            raise ValueError(f"cia steps must be >= 1, got {steps}")
        if int(mask_size) < 2:
            raise ValueError(f"cia mask_size must be >= 2, got {mask_size}")
        if not 0.0 < initial_mask < 1.0:
            raise ValueError(f"cia initial_mask must be in (0, 1), got {initial_mask}")
        if margin < 0 or area_weight < 0 or tv_weight < 0 or outside_lungs < 0:
            raise ValueError(f"cia margin, area_weight, tv_weight and outside_lungs must be >= 0, got {margin}, "
                             f"{area_weight}, {tv_weight}, {outside_lungs}")
        budget = SearchBudget(steps=int(search_steps), learning_rate=float(learning_rate),
                              tolerance=float(tolerance), patience=int(patience), refine_steps=int(refine_steps))
        super().__init__(threshold=threshold, steps=int(steps), search_steps=budget.steps,
                         learning_rate=budget.learning_rate, tolerance=budget.tolerance, patience=budget.patience,
                         refine_steps=budget.refine_steps,
                         margin=float(margin), area_weight=float(area_weight), tv_weight=float(tv_weight),
                         mask_size=int(mask_size), initial_mask=float(initial_mask),
                         outside_lungs=float(outside_lungs))
        self.fill_negative, self.fill_positive = fill_negative.eval(), fill_positive.eval()
        self.steps, self.budget = int(steps), budget
        self.margin, self.area_weight, self.tv_weight = float(margin), float(area_weight), float(tv_weight)
        self.mask_size, self.initial_mask = int(mask_size), float(initial_mask)
        self.outside_lungs = float(outside_lungs)

    def _masks(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(torch.sigmoid(logits), size=size, mode="bilinear", align_corners=False)

    def _infill(self, images: torch.Tensor, masks: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Cases called positive are filled by fill_negative, the others by fill_positive."""
        out = torch.empty_like(images)
        for network, chosen in ((self.fill_negative, positive), (self.fill_positive, ~positive)):
            if chosen.any():
                out[chosen] = network(images[chosen], masks[chosen])
        return out

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """Per-image mask search: saliency (B, H, W) in [0, 1] = the mask; counterfactuals
        (B, steps, C, H, W), the last the infilled image; checks: flipped,
        counterfactual_probability, proximity_l1, steps_used, goal_reached, mask_area,
        inpainting_l1, fill ("negative" / "positive": which inpainter filled).
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        device = images.device
        self.fill_negative.to(device).eval().requires_grad_(False)
        self.fill_positive.to(device).eval().requires_grad_(False)
        batch, size = images.shape[0], tuple(images.shape[-2:])
        offset = threshold_logit(self.threshold)
        with torch.no_grad():
            probability = torch.sigmoid(classifier(images).reshape(-1).float())
        called = probability >= self.threshold
        wanted = (~called).float()  # the class the counterfactual must reach
        # Per-cell cost of mask area, on the mask's grid (all ones: the paper's plain mean).
        grid = (self.mask_size, self.mask_size)
        area_cost = outside_lung_weights(images, self.outside_lungs, grid)

        def loss_fn(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # The networks see one image at a time: convolutions batched differently round
            # differently (1e-7), and Adam's sign-like steps amplify that within a few steps,
            # so batched passes would make an image's search depend on its batch-mates.
            # On a CPU, batch 1 costs about the same per image.
            z = torch.cat([classifier(self._infill(images[j:j + 1], self._masks(logits[k:k + 1], size),
                                                   called[j:j + 1])).reshape(-1)
                           for k, j in enumerate(index.tolist())]).float() - offset
            m = torch.sigmoid(logits)
            loss, reached = counterfactual_loss(z, wanted[index], self.margin, penalty=m, cost=area_cost[index],
                                                weight=self.area_weight)
            return loss + self.tv_weight * total_variation(m), reached.detach()

        # Every cell starts at the same area cost: initial_mask inside the lungs, less outside
        # them when outside_lungs > 0 (a mask of 0.1 everywhere would otherwise leak a tenth of
        # the fill into borders and markers that the search has no gradient to take back).
        start = (self.initial_mask / area_cost).clamp(1e-4, 1.0 - 1e-4)
        initial = torch.log(start / (1.0 - start))
        # Gradients for the mask only: the classifier's parameters get none (frozen).
        with torch.enable_grad(), frozen(classifier):
            result = per_image_adam(initial, loss_fn, self.budget)

        with torch.no_grad():
            masks = self._masks(result.variables, size)
            counterfactual = self._infill(images, masks, called)
            alphas = torch.arange(1, self.steps + 1, device=device, dtype=images.dtype) / self.steps
            # The path scales the mask from 0 to m: x + alpha * (infilled - x); lerp is exact at alpha = 1.
            path = torch.lerp(images[:, None], counterfactual[:, None], alphas.reshape(1, self.steps, 1, 1, 1))
            logits = classifier(path.flatten(0, 1)).reshape(-1).float()
            path_probability = torch.sigmoid(logits).reshape(batch, self.steps)
            saliency = normalise_maps(masks[:, 0])
            area = masks.flatten(1).mean(dim=1)
            inpainting = self.inpainting_error(images, called)
        common = counterfactual_checks(probability, path_probability[:, -1], images, counterfactual, self.threshold)
        checks = [{
            **common[i],
            "steps_used": int(result.steps_used[i]),
            "goal_reached": bool(result.reached[i]),
            "mask_area": float(area[i]),
            "inpainting_l1": float(inpainting[i]),
            "fill": "negative" if called[i] else "positive",
        } for i in range(batch)]
        return Explanation(probability=probability, saliency=saliency, counterfactuals=path,
                           path_probability=path_probability, checks=checks)

    @torch.no_grad()
    def inpainting_error(self, images: torch.Tensor, called: torch.Tensor) -> torch.Tensor:
        """(B,) the inpainter's own reconstruction error on this image: mean |fill - x| inside
        a fixed held-out mask (25% of the image), at the inpainter's working size."""
        errors = torch.empty(images.shape[0], device=images.device)
        for network, chosen in ((self.fill_negative, called), (self.fill_positive, ~called)):
            if chosen.any():
                side = network.size or images.shape[-1]
                work = F.interpolate(images[chosen], size=(side, side), mode="area")
                masks = probe_masks(len(work), side, images.device)
                errors[chosen] = hole_l1(network.fill(work, masks), work, masks)
        return errors
