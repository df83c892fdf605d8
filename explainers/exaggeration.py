"""Progressive exaggeration (Singla et al. 2021/2023, "Explaining the Black-box
Smoothly: a Counterfactual Approach").

A conditional generator G(x, c) produces the image whose classifier posterior is c,
for c in K bins of [0, 1] (paper: K = 10). Sweeping c from f(x) to the far side of
the decision threshold gives a progressive counterfactual path: one batch of T
images, each classified at (close to) the requested posterior.

Conditioning: every conv block of a small U-Net normalises each image on its own
(instance norm without affine parameters) and then applies a scale and shift
predicted from c (conditional instance normalisation / FiLM). Nothing depends on
the rest of the batch: the public code's conditional *batch* norm used batch
statistics at test time, so one image's explanation changed with its batch-mates.
(Concatenating c as constant input channels, StarGAN's way, does not survive
instance norm either: a spatially constant offset is exactly what it subtracts.)

The bin embedding is *ordinal*: e(k) = v_0 + ... + v_k, so neighbouring posteriors
get neighbouring codes (the paper's ordinal projection discriminator uses the
same idea); generator and discriminator each have their own.

As in ``explainers.sagen``, the generator predicts a residual added to the input
(last layer zero-initialised: identity at the start), computed at a working size
and upsampled, so anatomy the classifier does not care about stays bit-identical.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from explainers._helpers import smooth_maps
from explainers.base import Explainer, Explanation, normalise_maps, register
from explainers.networks import ResidualHead
from explainers.validity import counterfactual_checks

DEFAULT_BINS = 10
DEFAULT_WIDTHS = (16, 32, 64, 128)
_CHUNK = 32  # path images per generator / classifier call at prediction time


def bin_of(probability: torch.Tensor, bins: int) -> torch.Tensor:
    """Index of the posterior bin [k/K, (k+1)/K) holding each probability (1.0 -> last bin)."""
    return (probability.float() * bins).long().clamp(0, bins - 1)


def bin_centre(index: torch.Tensor, bins: int) -> torch.Tensor:
    """The posterior at the centre of bin ``index`` of ``bins``: (k + 0.5) / K."""
    return (index.float() + 0.5) / bins


class OrdinalEmbedding(nn.Module):
    """e(k) = sum_{j <= k} v_j: bins that are close in posterior get close codes."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.steps = nn.Parameter(torch.randn(bins, dim) * 0.1)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.steps.cumsum(dim=0)[index]


class _FiLMBlock(nn.Module):
    """(conv 3x3 -> instance norm -> scale/shift from c -> LeakyReLU) x 2."""

    def __init__(self, channels_in: int, channels_out: int, condition_dim: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels_in, channels_out, 3, padding=1),
                                    nn.Conv2d(channels_out, channels_out, 3, padding=1)])
        # Zero-initialised: scale 1, shift 0 until training finds a use for c.
        self.film = nn.Linear(condition_dim, 4 * channels_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        params = self.film(condition)[:, :, None, None].chunk(4, dim=1)
        for i, conv in enumerate(self.convs):
            h = F.instance_norm(conv(h))
            h = F.leaky_relu(h * (1.0 + params[2 * i]) + params[2 * i + 1], 0.1)
        return h


class ConditionalGenerator(nn.Module):
    """U-Net G(x, k) with FiLM conditioning on the posterior bin k; residual output."""

    def __init__(self, *, widths: Sequence[int] = DEFAULT_WIDTHS, bins: int = DEFAULT_BINS, size: int | None = None,
                 in_channels: int = 1, condition_dim: int = 64):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least two levels, got {widths}")
        factor = 2 ** (len(widths) - 1)
        if size is not None and (size < factor or size % factor):
            raise ValueError(f"generator size must be a multiple of {factor} ({len(widths) - 1} poolings), got {size}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.widths, self.bins, self.size = widths, int(bins), size
        self.in_channels, self.condition_dim = in_channels, condition_dim
        self.embedding = OrdinalEmbedding(bins, condition_dim)
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down.append(_FiLMBlock(previous, width, condition_dim))
            previous = width
        self.up = nn.ModuleList(_FiLMBlock(widths[i + 1] + widths[i], widths[i], condition_dim)
                                for i in reversed(range(len(widths) - 1)))
        self.head = ResidualHead(widths[0], in_channels)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in bundle.yaml."""
        return {"widths": list(self.widths), "bins": self.bins, "size": self.size,
                "in_channels": self.in_channels, "condition_dim": self.condition_dim}

    def forward(self, images: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1], bins (B,) long -> (B, C, H, W) in [0, 1]."""
        height, width = images.shape[-2:]
        factor = 2 ** (len(self.widths) - 1)
        resample = self.size is not None and (height, width) != (self.size, self.size)
        if not resample and (height % factor or width % factor):
            raise ValueError(f"image sides must be multiples of {factor} for the U-Net, got {height}x{width}")
        if bins.shape != images.shape[:1]:
            raise ValueError(f"one bin per image expected: images {tuple(images.shape)}, bins {tuple(bins.shape)}")
        condition = self.embedding(bins)
        h = F.interpolate(images, size=(self.size, self.size), mode="area") if resample else images
        h = h * 2.0 - 1.0
        skips = []
        for i, block in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h, condition)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1), condition)
        residual = self.head(h)
        if resample:
            residual = F.interpolate(residual, size=(height, width), mode="bilinear", align_corners=False)
        return (images + residual).clamp(0.0, 1.0)


class ProjectionCritic(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018) with an ordinal bin embedding:
    D(x, k) = w . phi(x) + e(k) . phi(x); spectral norm, no normalisation layers."""

    def __init__(self, *, bins: int = DEFAULT_BINS, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [spectral_norm(nn.Conv2d(previous, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(previous, 1))
        self.embedding = OrdinalEmbedding(bins, previous)

    def forward(self, images: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        phi = self.features(images * 2.0 - 1.0).sum(dim=(2, 3))
        return self.linear(phi).reshape(-1) + (self.embedding(bins) * phi).sum(dim=1)


def sweep_targets(probability: torch.Tensor, threshold: float, steps: int) -> torch.Tensor:
    """(B, T) requested posteriors from f(x) to the far side of the threshold.

    The paper sweeps c = f(x) -> 1 - f(x); with a decision threshold other than 0.5
    that endpoint can stay on the same side (f = 0.6 -> 0.4 with threshold 0.3), so
    the sweep ends at the centre of the extreme bin of the other class instead.
    """
    called = probability >= threshold
    end = torch.where(called, torch.full_like(probability, 0.05), torch.full_like(probability, 0.95))
    alphas = torch.linspace(0.0, 1.0, steps, device=probability.device, dtype=probability.dtype)
    return torch.lerp(probability[:, None], end[:, None], alphas[None, :])


@register("exaggeration")
class ExaggerationExplainer(Explainer):
    """Counterfactual path G(x, c_t) for c_t from f(x) to the other class; saliency from its endpoints."""

    version = "1"
    bundle_section = "exaggeration"
    bundle_networks = {"generator": (ConditionalGenerator, "network")}

    def __init__(self, *, generator: ConditionalGenerator, steps: int = 10, smoothing_sigma: float = 2.0,
                 threshold: float = 0.5):
        """Singla et al. 2021/2023 (method section: the conditional generator and the
        progressive sweep of the requested posterior).

        ``generator``: the trained ``ConditionalGenerator``. ``steps`` >= 2: images on
        the path from f(x) to the other class (the paper's K bins). ``smoothing_sigma``
        >= 0: pixels. ``threshold`` in [0, 1]. Raises ValueError otherwise.
        """
        if int(steps) < 2:
            raise ValueError(f"exaggeration steps must be >= 2 (start and end of the path), got {steps}")
        if smoothing_sigma < 0:
            raise ValueError(f"exaggeration smoothing_sigma must be >= 0, got {smoothing_sigma}")
        super().__init__(threshold=threshold, steps=int(steps), smoothing_sigma=float(smoothing_sigma))
        self.generator = generator.eval()
        self.steps, self.smoothing_sigma = int(steps), float(smoothing_sigma)

    def explain(self, images: torch.Tensor, classifier: nn.Module) -> Explanation:
        """Sweeps the requested posterior c_t from f(x) to the far side of the threshold
        (``sweep_targets``): counterfactuals (B, steps, C, H, W) = G(x, bin(c_t)), the last
        the full counterfactual; path_probability (B, steps); saliency (B, H, W) in [0, 1]
        = smoothed |G(x, c_T) - G(x, c_0)|; checks: flipped, counterfactual_probability,
        proximity_l1, requested_probability, reconstruction_l1, posterior_tracking_mae,
        monotone_fraction.
        images (B, C, H, W) float in [0, 1] at the bundle's input size; ``classifier``
        returns the positive-class logit (B,).
        """
        generator = self.generator.to(images.device).eval()
        batch, steps, bins = images.shape[0], self.steps, generator.bins
        with torch.no_grad():
            probability = torch.sigmoid(classifier(images).reshape(-1).float())
            requested = sweep_targets(probability, self.threshold, steps)  # (B, T)
            # B x T images: in chunks, so that memory stays bounded for any batch size.
            repeated = images.repeat_interleave(steps, dim=0)
            wanted = bin_of(requested.flatten(), bins)
            flat = torch.cat([generator(repeated[i:i + _CHUNK], wanted[i:i + _CHUNK])
                              for i in range(0, len(repeated), _CHUNK)])
            logits = torch.cat([classifier(flat[i:i + _CHUNK]).reshape(-1) for i in range(0, len(flat), _CHUNK)])
            path = flat.reshape(batch, steps, *images.shape[1:])
            path_probability = torch.sigmoid(logits.float()).reshape(batch, steps)
            start, end = path[:, 0], path[:, -1]
            saliency = normalise_maps(smooth_maps((end - start).abs().sum(dim=1), self.smoothing_sigma))
            reconstruction = (start - images).abs().flatten(1).mean(dim=1)
            tracking = (path_probability - requested).abs().mean(dim=1)
            # Does the path move monotonically towards the other class? (fraction of steps that do)
            direction = torch.sign(requested[:, -1:] - requested[:, :1])
            monotone = ((path_probability.diff(dim=1) * direction) >= -1e-3).float().mean(dim=1)
        common = counterfactual_checks(probability, path_probability[:, -1], images, end, self.threshold)
        checks = [{
            **common[i],
            "requested_probability": float(requested[i, -1]),
            "reconstruction_l1": float(reconstruction[i]),
            "posterior_tracking_mae": float(tracking[i]),
            "monotone_fraction": float(monotone[i]),
        } for i in range(batch)]
        return Explanation(probability=probability, saliency=saliency, counterfactuals=path,
                           path_probability=path_probability, checks=checks)
