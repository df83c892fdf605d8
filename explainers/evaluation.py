"""Metrics that score explanations (no files, no DICOM): localisation against masks or
boxes, validity and proximity of counterfactuals, realism (Fréchet distance on our own
features), faithfulness (deletion / insertion), robustness to input noise, and cost.

Library first: average precision, SSIM and Spearman's rank correlation come from
torchmetrics. Written here is only what the libraries lack or cannot do offline:
- IoU at the mask-area threshold and the pointing game (a few lines each);
- deletion / insertion (Petsiuk et al. 2018): Captum has no such metric, and Quantus is
  not a dependency (it pins its own stack); ours perturbs towards a blurred copy,
  as our Occlusion baseline does, so "removed" means "detail removed, brightness kept";
- nothing for the Fréchet distance: torchmetrics' FID runs with a custom feature
  network (its default Inception weights would be downloaded at run time, which this
  project forbids); we give it features of a network we ship, so the numbers are
  NOT comparable with published FIDs.

Conventions: maps and masks are (B, H, W); images (B, C, H, W) in [0, 1]; every
per-image metric returns a (B,) tensor, aggregation is the caller's choice.
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_average_precision
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.functional.regression import spearman_corrcoef
from torchmetrics.image.fid import FrechetInceptionDistance

from explainers._helpers import smooth_maps
from explainers.validity import flipped, probability_change
from explainers.validity import proximity_l1 as _proximity_l1


class EvaluationError(ValueError):
    """Inputs to a metric have the wrong shape, type or content."""


# -- input checks -----------------------------------------------------------------

def _maps_and_masks(saliency: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if saliency.ndim != 3:
        raise EvaluationError(f"saliency must be (B, H, W), got {tuple(saliency.shape)}")
    if mask.shape != saliency.shape:
        raise EvaluationError(f"mask shape {tuple(mask.shape)} does not match saliency {tuple(saliency.shape)}")
    mask = mask.bool()
    empty = (~mask.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise EvaluationError(f"ground truth is empty for case(s) {empty}: localisation is undefined there")
    return saliency.float(), mask


# -- localisation ---------------------------------------------------------------

def iou_at_mask_area(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IoU between the mask and the map's top-k pixels, k = the mask's area: the
    threshold that keeps as many pixels as the ground truth (no free parameter).
    Ties at the cut are broken by pixel order, the same for every method."""
    saliency, mask = _maps_and_masks(saliency, mask)
    flat, truth = saliency.flatten(1), mask.flatten(1)
    scores = []
    for values, gt in zip(flat, truth):
        k = int(gt.sum())
        top = torch.zeros_like(gt)
        top[torch.topk(values, k, sorted=False).indices] = True
        scores.append((top & gt).sum() / (top | gt).sum())
    return torch.stack(scores).float()


def pointing_game(saliency: torch.Tensor, mask: torch.Tensor, *, tolerance: int = 0) -> torch.Tensor:
    """Hit if the map's peak lies in the mask (grown by ``tolerance`` pixels, as
    Zhang et al. allow 15 px at 224). A map with several equal peaks scores the
    fraction of them that hit, so a flat map scores the chance level (mask area)."""
    saliency, mask = _maps_and_masks(saliency, mask)
    if tolerance < 0:
        raise EvaluationError(f"tolerance must be >= 0, got {tolerance}")
    if tolerance:
        mask = F.max_pool2d(mask[:, None].float(), 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0].bool()
    flat, truth = saliency.flatten(1), mask.flatten(1)
    peaks = flat == flat.amax(dim=1, keepdim=True)
    return ((peaks & truth).sum(dim=1) / peaks.sum(dim=1)).float()


def saliency_auprc(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average precision of the map as a pixel classifier of the mask (torchmetrics,
    exact thresholds). Chance level = the mask's area fraction."""
    saliency, mask = _maps_and_masks(saliency, mask)
    return torch.stack([binary_average_precision(s.flatten(), m.flatten().long()) for s, m in zip(saliency, mask)])


def mask_area_fraction(mask: torch.Tensor) -> torch.Tensor:
    """The chance level of the pointing game and of AUPRC."""
    return mask.flatten(1).float().mean(dim=1)


def localisation_after_smoothing(saliency: torch.Tensor, mask: torch.Tensor, sigma: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU at mask area (N,), pointing game (N,)) of maps (N, H, W) after one more
    Gaussian smoothing of ``sigma`` px (> 0; MONAI GaussianFilter), applied alike to every
    method so that a ranking can be checked against each method's own smoothing default.
    Raises EvaluationError for sigma <= 0."""
    if sigma <= 0:
        raise EvaluationError(f"sigma must be > 0, got {sigma}")
    smoothed = smooth_maps(saliency.float(), sigma)
    return iou_at_mask_area(smoothed, mask), pointing_game(smoothed, mask)


def boxes_to_mask(boxes: Sequence[Sequence[float]], shape: tuple[int, int], *,
                  source_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """COCO boxes [x, y, width, height] (in ``source_shape`` pixels, default
    ``shape``) -> (H, W) bool mask on a grid of ``shape`` (a squashing resize scales
    x and y independently, as the preprocessing does)."""
    rows, cols = shape
    src_rows, src_cols = source_shape or shape
    mask = torch.zeros(shape, dtype=torch.bool)
    for box in boxes:
        if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise EvaluationError(f"box must be [x, y, width, height] with positive size, got {list(box)}")
        x, y, w, h = (float(v) for v in box)
        c0, c1 = x * cols / src_cols, (x + w) * cols / src_cols
        r0, r1 = y * rows / src_rows, (y + h) * rows / src_rows
        # Pixels whose centre lies inside the box; at least one pixel per box.
        r_lo, r_hi = int(np.floor(r0 + 0.5)), max(int(np.floor(r1 + 0.5)), int(np.floor(r0 + 0.5)) + 1)
        c_lo, c_hi = int(np.floor(c0 + 0.5)), max(int(np.floor(c1 + 0.5)), int(np.floor(c0 + 0.5)) + 1)
        mask[max(r_lo, 0):min(r_hi, rows), max(c_lo, 0):min(c_hi, cols)] = True
    return mask


def box_pointing_game(saliency: torch.Tensor, boxes: Sequence[Sequence[Sequence[float]]], *,
                      source_shape: tuple[int, int] | None = None, tolerance: int = 0) -> torch.Tensor:
    """Pointing game against boxes (one list of COCO boxes per case)."""
    return pointing_game(saliency, _box_masks(saliency, boxes, source_shape), tolerance=tolerance)


def box_iou(saliency: torch.Tensor, boxes: Sequence[Sequence[Sequence[float]]], *,
            source_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """IoU at the box-area threshold against the union of a case's boxes."""
    return iou_at_mask_area(saliency, _box_masks(saliency, boxes, source_shape))


def _box_masks(saliency: torch.Tensor, boxes, source_shape) -> torch.Tensor:
    if saliency.ndim != 3 or len(boxes) != saliency.shape[0]:
        raise EvaluationError(f"need one box list per map: {len(boxes)} lists for saliency {tuple(saliency.shape)}")
    shape = tuple(saliency.shape[-2:])
    return torch.stack([boxes_to_mask(b, shape, source_shape=source_shape) for b in boxes])


# -- counterfactuals: validity, proximity, realism ----------------------------------

def validity(probability: torch.Tensor, counterfactual_probability: torch.Tensor,
             threshold: float) -> dict[str, torch.Tensor]:
    """``flipped`` (1.0 / 0.0): did the decision change; ``change``: how far P(positive)
    moved towards the other class (``explainers.validity``: the one definition)."""
    if probability.shape != counterfactual_probability.shape or probability.ndim != 1:
        raise EvaluationError(f"probabilities must both be (B,), got {tuple(probability.shape)} and "
                              f"{tuple(counterfactual_probability.shape)}")
    return {"flipped": flipped(probability, counterfactual_probability, threshold).float(),
            "change": probability_change(probability, counterfactual_probability, threshold)}


def _check_images(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 4 or a.shape != b.shape:
        raise EvaluationError(f"images must be (B, C, H, W) of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def proximity_l1(images: torch.Tensor, counterfactuals: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel change, in model-space intensity [0, 1]."""
    _check_images(images, counterfactuals)
    return _proximity_l1(images, counterfactuals)


def border_band_mask(shape: tuple[int, int], fraction: float = 0.1) -> torch.Tensor:
    """(H, W) bool: the outer band of an image, ``fraction`` of H at top and bottom and of
    W at left and right (0.1: the outer 10 %, 36 % of the area)."""
    if not 0 < fraction < 0.5:
        raise EvaluationError(f"border fraction must be in (0, 0.5), got {fraction}")
    rows, cols = shape
    r, c = max(1, round(fraction * rows)), max(1, round(fraction * cols))
    inner = torch.zeros(shape, dtype=torch.bool)
    inner[r:rows - r, c:cols - c] = True
    return ~inner


def change_location(images: torch.Tensor, counterfactuals: torch.Tensor, regions: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Where a counterfactual's change lies: for each named region mask, per image,
    ``<name>_share`` = sum of |counterfactual - input| inside the region / sum over the
    image, and ``<name>_area`` = the region's share of the image's pixels (a uniform
    change scores its area). Images (B, C, H, W) in [0, 1]; regions (B, H, W) or (H, W)
    bool. Shares are (B,) in [0, 1], NaN for an image its counterfactual leaves unchanged.
    Raises ``EvaluationError`` on mismatched shapes."""
    _check_images(images, counterfactuals)
    change = (counterfactuals.float() - images.float()).abs().sum(dim=1)  # (B, H, W)
    total = change.flatten(1).sum(1)
    out: dict[str, torch.Tensor] = {}
    for name, region in regions.items():
        if region.shape not in (change.shape, change.shape[1:]):
            raise EvaluationError(f"region {name!r} must be (H, W) or (B, H, W) of the images, got "
                                  f"{tuple(region.shape)} for images {tuple(images.shape)}")
        region = region.to(change.device).bool().expand_as(change)
        inside = (change * region).flatten(1).sum(1)
        out[f"{name}_share"] = torch.where(total > 0, inside / total.clamp_min(1e-12), torch.nan)
        out[f"{name}_area"] = region.flatten(1).float().mean(1)
    return out


def proximity_ssim(images: torch.Tensor, counterfactuals: torch.Tensor) -> torch.Tensor:
    """SSIM (torchmetrics, Gaussian 11 px window, data range 1)."""
    _check_images(images, counterfactuals)
    return structural_similarity_index_measure(counterfactuals.float(), images.float(), data_range=1.0,
                                               reduction="none")


class PenultimateFeatures:
    """The input of a classifier's last linear layer: the fixed feature network for
    the Fréchet distance (the bundle's own classifier, shipped and hashed)."""

    def __init__(self, classifier: nn.Module):
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise EvaluationError("classifier has no nn.Linear layer whose input could serve as features")
        self.classifier = classifier
        self.layer = linears[-1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0].flatten(1).float()))
        try:
            for start in range(0, len(images), batch_size):
                self.classifier(images[start:start + batch_size])
        finally:
            handle.remove()
        return torch.cat(captured).cpu()


class _GivenFeatures(nn.Module):
    """The identity, as torchmetrics' feature network: the features are computed already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets
    (N, D): torchmetrics' ``FrechetInceptionDistance`` with a custom feature network
    (nothing downloaded), on whatever features it is given (e.g. ``PenultimateFeatures``).
    Raises EvaluationError for unequal D or fewer than 2 samples in a set."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise EvaluationError(f"features must be (N, D) with equal D, got {tuple(features_a.shape)} and "
                              f"{tuple(features_b.shape)}")
    if len(features_a) < 2 or len(features_b) < 2:
        raise EvaluationError("the Fréchet distance needs at least 2 samples per set")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(int(features_a.shape[1])))
    metric.update(features_a.double().cpu(), real=True)
    metric.update(features_b.double().cpu(), real=False)
    return float(max(float(metric.compute()), 0.0))  # >= 0 in exact arithmetic; rounding can give -1e-6


# -- faithfulness -------------------------------------------------------------------

def blurred_baseline(images: torch.Tensor, window: int = 17) -> torch.Tensor:
    """What "removed" pixels become: a local mean (keeps brightness, removes detail)."""
    return F.avg_pool2d(images, kernel_size=window, stride=1, padding=window // 2, count_include_pad=False)


@dataclass
class PerturbationCurves:
    fractions: torch.Tensor  # (K + 1,) fraction of pixels perturbed, 0 .. 1
    deletion: torch.Tensor  # (B, K + 1) P(explained class) as top pixels are removed
    insertion: torch.Tensor  # (B, K + 1) P(explained class) as top pixels are restored to a blurred image
    deletion_auc: torch.Tensor = field(init=False)  # (B,) lower = more faithful
    insertion_auc: torch.Tensor = field(init=False)  # (B,) higher = more faithful

    def __post_init__(self) -> None:
        self.deletion_auc = torch.trapezoid(self.deletion, self.fractions, dim=1)
        self.insertion_auc = torch.trapezoid(self.insertion, self.fractions, dim=1)


@torch.no_grad()
def deletion_insertion(classifier: nn.Module, images: torch.Tensor, saliency: torch.Tensor, *,
                       threshold: float, steps: int = 16, baseline: torch.Tensor | None = None,
                       seed: int = 0) -> PerturbationCurves:
    """Deletion and insertion curves of the class the classifier called.

    Pixels are taken in decreasing saliency; equal values (flat regions of a sparse
    map) are ordered by a seeded random permutation, not by raster order, which
    would otherwise favour maps that are zero over the top of the image.
    """
    if images.ndim != 4 or saliency.shape != (images.shape[0], *images.shape[-2:]):
        raise EvaluationError(f"saliency {tuple(saliency.shape)} must be (B, H, W) of images {tuple(images.shape)}")
    if steps < 2:
        raise EvaluationError(f"steps must be >= 2, got {steps}")
    batch, pixels = images.shape[0], images.shape[-2] * images.shape[-1]
    baseline = blurred_baseline(images) if baseline is None else baseline
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(pixels, generator=generator).to(images.device)
    flat = saliency.float().flatten(1)[:, shuffle]
    order = shuffle[torch.argsort(flat, dim=1, descending=True, stable=True)]  # (B, P) pixel indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=images.device).expand(batch, -1))
    fractions = torch.linspace(0.0, 1.0, steps + 1)
    p = torch.sigmoid(classifier(images).reshape(-1).float())
    called = p >= threshold
    deletion, insertion = [], []
    for fraction in fractions.tolist():
        keep_top = (rank < round(fraction * pixels)).reshape(batch, 1, *images.shape[-2:])
        deleted = torch.where(keep_top, baseline, images)
        inserted = torch.where(keep_top, images, baseline)
        probs = torch.sigmoid(classifier(torch.cat([deleted, inserted])).reshape(-1).float())
        probs = torch.where(called.repeat(2), probs, 1.0 - probs)  # P(explained class)
        deletion.append(probs[:batch])
        insertion.append(probs[batch:])
    return PerturbationCurves(fractions, torch.stack(deletion, 1).cpu(), torch.stack(insertion, 1).cpu())


# -- robustness ---------------------------------------------------------------------

def map_agreement(maps_a: torch.Tensor, maps_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spearman rank correlation (torchmetrics) and SSIM between two sets of maps."""
    if maps_a.ndim != 3 or maps_a.shape != maps_b.shape:
        raise EvaluationError(f"maps must be (B, H, W) of equal shape, got {tuple(maps_a.shape)} and "
                              f"{tuple(maps_b.shape)}")
    a, b = maps_a.float(), maps_b.float()
    # Spearman is undefined for a constant map; such a pair counts as no agreement.
    spearman = torch.stack([
        spearman_corrcoef(x.flatten(), y.flatten()) if x.std() > 0 and y.std() > 0 else torch.tensor(0.0)
        for x, y in zip(a, b)])
    ssim = structural_similarity_index_measure(a[:, None], b[:, None], data_range=1.0, reduction="none")
    return {"spearman": spearman.float(), "ssim": ssim.float()}


def add_noise(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Gaussian noise of standard deviation ``sigma`` (model-space intensity), clamped."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    return (images + sigma * noise).clamp(0.0, 1.0)


# -- cost ---------------------------------------------------------------------------

@dataclass
class Cost:
    seconds: float = 0.0
    peak_bytes: int = 0  # peak memory above the level at the start of the measurement
    peak_source: str = ""


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measure(device: torch.device) -> Iterator[Cost]:
    """Wall time and peak memory of a block: CUDA peak allocation on a GPU; on the
    CPU the process's peak RSS above its level at entry (torch's allocations are
    invisible to tracemalloc), or the lifetime ru_maxrss where the peak cannot be reset."""
    cost = Cost()
    start_kib: int | None = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    else:
        resettable = _reset_peak_rss()
        start_kib = _status_kib("VmRSS") if resettable else None
    started = time.perf_counter()
    try:
        yield cost
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cost.seconds = time.perf_counter() - started
        if device.type == "cuda":
            cost.peak_bytes, cost.peak_source = torch.cuda.max_memory_allocated(device) - start_bytes, "cuda"
        elif start_kib is not None and (peak := _status_kib("VmHWM")) is not None:
            cost.peak_bytes, cost.peak_source = max(0, peak - start_kib) * 1024, "rss"
        else:
            cost.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            cost.peak_source = "ru_maxrss (process lifetime)"


# -- sanity checks (Adebayo et al. 2018, "Sanity Checks for Saliency Maps") ----------

def randomisation_blocks(network: nn.Module) -> list[str]:
    """The network's parameterised blocks, from the output layer down to the input (the
    cascading order of Adebayo et al. 2018, §4.1): top-level children, with
    ``nn.Sequential`` containers (MONAI DenseNet's ``features``, ``class_layers``) expanded
    one level."""
    blocks = []
    for name, child in network.named_children():
        parts = child.named_children() if isinstance(child, nn.Sequential) else [("", child)]
        for sub, module in parts:
            if any(True for _ in module.parameters()):
                blocks.append(f"{name}.{sub}" if sub else name)
    return blocks[::-1]


def _reinitialise(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Random affine parameters; running statistics kept, so activations stay finite.
            with torch.no_grad():
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()


def cascading_randomisation(classifier: nn.Module, explain, images: torch.Tensor, *, stages: Sequence[float] =
                            (0.0, 0.5, 1.0), seed: int = 0) -> dict[str, torch.Tensor]:
    """Model-randomisation test, cascading from the top block to the bottom.

    ``explain(images, classifier) -> (B, H, W)`` maps; ``classifier`` has a ``network``
    attribute (explainers.networks.BinaryClassifier) or is the network. The blocks of
    :func:`randomisation_blocks` are re-initialised one after the other on a copy (the
    classifier passed in is never changed); at each ``stages`` fraction of the blocks
    (0.0 = the top block only, 1.0 = all) the maps are compared with the original ones.
    Returns ``{"randomised_<fraction>": (B,) Spearman rank correlation}``: a map that
    depends on the classifier decorrelates (near 0); one that stays near 1 does not look
    at the classifier at explanation time.
    """
    import copy

    original = explain(images, classifier).detach().float().cpu()
    randomised = copy.deepcopy(classifier).eval()
    network = getattr(randomised, "network", randomised)
    blocks = randomisation_blocks(network)
    modules = dict(network.named_modules())
    checkpoints = {max(0, min(len(blocks) - 1, round(f * (len(blocks) - 1)))): f for f in stages}
    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for index, name in enumerate(blocks):
        _reinitialise(modules[name])
        if index in checkpoints:
            maps = explain(images, randomised).detach().float().cpu()
            out[f"randomised_{checkpoints[index]:g}"] = map_agreement(original, maps)["spearman"]
    return out


def edge_similarity(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each map with the Sobel gradient magnitude of its own
    input (B,): high means the map mostly shows the image's own edges, which needs no
    trained model at all (Adebayo et al. 2018, §5: maps alike to an edge detector pass
    as explanations while being independent of the model and of its training data)."""
    gray = images[:, :1].float().cpu()
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None]
    gx = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kx)
    gy = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kx.transpose(-1, -2))
    edges = (gx ** 2 + gy ** 2).sqrt()[:, 0]
    if edges.shape[-2:] != maps.shape[-2:]:
        edges = F.interpolate(edges[:, None], size=maps.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return map_agreement(edges / edges.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12), maps.float().cpu())["spearman"]
