"""Invertible preprocessing from source display pixels to a model's input grid (MONAI).

Forward: (rows, cols) display image in [0, 1] -> (1, H, W) MetaTensor in model space.
Inverse: a map in model space -> the source pixel grid, replaying MONAI's recorded
trace in reverse, so saliency and counterfactual differences land on the exact
source pixels.

Intensity needs no inverse: model space *is* the display space [0, 1] (the
classifier applies its own mean/std internally), so a model-space difference is
directly a display-space difference.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirst, Resize, SpatialPad

Aspect = Literal["squash", "pad"]


class Preprocessor:
    """Builds the MONAI chain for one image and inverts maps back through it.

    ``size``: the classifier's (H, W) input grid, both sides >= 8 pixels.
    ``aspect``: 'squash' resizes without keeping the aspect ratio (how the Kermany
    training images were made); 'pad' pads to a square first (for classifiers trained
    on aspect-preserved images). A bundle's ``input`` section (explainers.bundle.InputSpec)
    holds both. Raises ValueError for any other value.
    """

    def __init__(self, size: tuple[int, int], aspect: Aspect = "squash"):
        size = tuple(int(side) for side in size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"Preprocessor size must be two sides >= 8, got {size!r}")
        if aspect not in ("squash", "pad"):
            raise ValueError(f"Preprocessor aspect must be 'squash' or 'pad', got {aspect!r}")
        self.size: tuple[int, int] = size  # type: ignore[assignment]
        self.aspect: Aspect = aspect
        # MONAI checks that an inverse is run by the very transform object that
        # recorded the trace, so chains are kept per source shape.
        self._chains: dict[tuple[int, int], Compose] = {}

    def _chain(self, shape: tuple[int, int]) -> Compose:
        if shape not in self._chains:
            self._chains[shape] = self._build_chain(shape)
        return self._chains[shape]

    def _build_chain(self, shape: tuple[int, int]) -> Compose:
        steps = [EnsureChannelFirst(channel_dim="no_channel")]
        if self.aspect == "pad":
            side = max(shape)
            steps.append(SpatialPad(spatial_size=(side, side), mode="constant", value=0.0))
        # Anti-aliased bilinear: a clean downsample, and bilinear again on the way back.
        steps.append(Resize(spatial_size=self.size, mode="bilinear", anti_aliasing=True))
        return Compose(steps)

    def __call__(self, display: np.ndarray) -> MetaTensor:
        if display.ndim != 2:
            raise ValueError(f"display must be (rows, cols), got shape {display.shape}")
        image = MetaTensor(torch.as_tensor(np.ascontiguousarray(display), dtype=torch.float32))
        out = self._chain(tuple(display.shape))(image)
        return out.clamp_(0.0, 1.0)

    def to_source(self, model_space: MetaTensor, values: torch.Tensor | np.ndarray) -> np.ndarray:
        """Map ``values`` (H, W) or (C, H, W) on the model grid to the source grid of
        the image that produced ``model_space`` (which carries the trace)."""
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
        squeeze = values.ndim == 2
        if squeeze:
            values = values[None]
        expected = tuple(model_space.shape[-2:])
        if tuple(values.shape[-2:]) != expected:
            raise ValueError(f"map shape {tuple(values.shape[-2:])} does not match model grid {expected}")
        operations = getattr(model_space, "applied_operations", None)
        if not operations:  # a plain tensor has no trace at all
            raise ValueError("model_space carries no MONAI trace: it was not made by this Preprocessor")
        traced = MetaTensor(values, applied_operations=list(operations))
        source_shape = tuple(int(v) for v in operations[0]["orig_size"])
        back = self._chain(source_shape).inverse(traced)
        array = back.as_tensor().numpy()
        return array[0] if squeeze else array
