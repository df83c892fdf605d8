"""Private helpers the methods share (not part of the explainer interface).

- ``smooth_maps``: Gaussian smoothing of saliency maps, one image at a time;
- ``freeze`` / ``frozen``: a network in eval mode without parameter gradients (the
  classifier every method explains, or a network searched through);
- ``as_float``: uint8 (x 255) or float image tensors as float in [0, 1].
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from monai.networks.layers import GaussianFilter
from torch import nn


def smooth_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (MONAI GaussianFilter, ``sigma`` in pixels) of (B, H, W) maps,
    each image on its own; ``sigma <= 0`` returns the maps unchanged."""
    if sigma <= 0:
        return maps
    return GaussianFilter(spatial_dims=2, sigma=sigma).to(maps.device)(maps[:, None])[:, 0]


def freeze(module: nn.Module) -> Callable[[], None]:
    """Eval mode and no parameter gradients (a frozen classifier, or a network searched
    through); returns the function that restores both."""
    training, flags = module.training, [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)

    def restore() -> None:
        module.train(training)
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
    return restore


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``freeze`` for the duration of a ``with`` block."""
    restore = freeze(module)
    try:
        yield module
    finally:
        restore()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 (x 255) or float images -> float32 in [0, 1] (floats are not rescaled)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def plain_tensor(images: torch.Tensor) -> torch.Tensor:
    """The pixels of a MONAI MetaTensor (what MONAI transforms return) as a plain tensor."""
    return images.as_tensor() if hasattr(images, "as_tensor") else images


def to_working(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, C, H, W) area-resampled to (size, size), a network's working size; unchanged
    when ``size`` is None or already the images' size."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="area")


def working_size(requested: int | None, input_side: int, multiple: int) -> int | None:
    """The side a generative network works at for a bundle: ``requested``, or None (the
    input's own size) when that is not smaller than the input and the input side is a
    multiple of what the network's poolings need."""
    if requested is not None and requested >= input_side and input_side % multiple == 0:
        return None
    return requested
