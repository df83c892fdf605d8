"""Synthetic shortcut cues of chest radiographs: burned-in text, side markers, border
bands and collimation edges, drawn deterministically from explicit parameters.

Two users:

- classifier training (``explainers.train_classifier``, ``augmentation: shortcut_robust``):
  the ``Rand*`` MONAI ``RandomizableTransform`` s draw these cues with random
  parameters on both classes alike, so that text, markers, border bands, collimation
  edges and global brightness carry no label information (DeGrave et al., "AI for
  radiographic COVID-19 detection selects shortcuts over signal", Nat Mach Intell 3,
  2021: laterality markers and text were what COVID classifiers read);
- the shortcut-sensitivity benchmark (``benchmarks/bench_shortcut.py``): the same
  drawing functions with fixed parameters (``burn_in_text``, ``side_marker``).

Images are (C, H, W) float tensors in [0, 1] (MONAI's channel-first layout); every
function returns a new tensor of the same shape and leaves its input alone. Text is
rendered with Pillow's bundled default font (``ImageFont.load_default``; nothing is
downloaded).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from monai.transforms import RandomizableTransform
from PIL import Image, ImageDraw, ImageFont

#: Characters of synthetic burned-in annotations (patient ids, dates, "PORTABLE", "AP ERECT").
TEXT_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:/.- "
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@lru_cache(maxsize=4096)
def _glyph_mask(text: str) -> np.ndarray:
    """(h, w) float mask in [0, 1] of ``text`` in Pillow's default font, cropped to its ink."""
    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    canvas = Image.new("L", (max(right - left, 1) + 2, max(bottom - top, 1) + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, fill=255, font=font)
    mask = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.nonzero(mask > 0)
    if len(rows) == 0:  # only spaces: an empty mask one line high
        return np.zeros((max(bottom - top, 1), max(right - left, 1)), np.float32)
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _scaled_mask(text: str, height: int, max_width: int) -> torch.Tensor:
    """The text's mask resized to ``height`` rows (aspect kept, at most ``max_width`` columns)."""
    mask = _glyph_mask(text)
    h, w = mask.shape
    width = max(1, min(max_width, round(w * height / h)))
    image = Image.fromarray((mask * 255).astype(np.uint8)).resize((width, max(height, 1)), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _paint(image: torch.Tensor, mask: torch.Tensor, top: int, left: int, value: float) -> torch.Tensor:
    """``image`` with ``mask`` (h, w) blended towards ``value`` at (top, left), clipped to the image."""
    out = image.clone()
    _, height, width = out.shape
    h = min(mask.shape[0], height - top)
    w = min(mask.shape[1], width - left)
    if h <= 0 or w <= 0:
        return out
    m = mask[:h, :w].to(out)
    region = out[:, top:top + h, left:left + w]
    out[:, top:top + h, left:left + w] = region * (1 - m) + value * m
    return out


def burn_in_text(image: torch.Tensor, text: str, *, top_fraction: float, height_fraction: float,
                 left_fraction: float = 0.02, value: float = 1.0, background: float | None = None) -> torch.Tensor:
    """``image`` (C, H, W) in [0, 1] with ``text`` burned in: glyphs ``height_fraction`` x H
    rows high (at least 3 px) with their top at ``top_fraction`` x H, starting at
    ``left_fraction`` x W, of intensity ``value``; ``background`` fills the strip behind
    the text (full width, as modality annotations often are) when given."""
    _, height, width = image.shape
    rows = max(3, round(height_fraction * height))
    top = min(max(0, round(top_fraction * height)), height - rows)
    left = min(max(0, round(left_fraction * width)), width - 1)
    out = image
    if background is not None:
        out = out.clone()
        out[:, top:top + rows, :] = background
    return _paint(out, _scaled_mask(text, rows, width - left), top, left, value)


def side_marker(image: torch.Tensor, letter: str, corner: str, *, size_fraction: float = 0.08,
                margin_fraction: float = 0.03, value: float = 1.0, boxed: bool = False) -> torch.Tensor:
    """``image`` (C, H, W) with a laterality marker (``letter``, e.g. "L" or "R") of height
    ``size_fraction`` x H in ``corner`` (one of ``CORNERS``), ``margin_fraction`` from the
    edges; ``boxed`` draws it inside a one-pixel frame, as lead markers often appear."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, not {corner!r}")
    _, height, width = image.shape
    rows = max(3, round(size_fraction * height))
    mask = _scaled_mask(letter, rows, width)
    if boxed:
        framed = torch.zeros(mask.shape[0] + 4, mask.shape[1] + 4)
        framed[0, :] = framed[-1, :] = framed[:, 0] = framed[:, -1] = 1.0
        framed[2:-2, 2:-2] = mask
        mask = framed
    margin_y, margin_x = round(margin_fraction * height), round(margin_fraction * width)
    top = margin_y if corner.startswith("top") else height - margin_y - mask.shape[0]
    left = margin_x if corner.endswith("left") else width - margin_x - mask.shape[1]
    return _paint(image, mask, max(top, 0), max(left, 0), value)


def border_band(image: torch.Tensor, side: str, width_fraction: float, value: float) -> torch.Tensor:
    """``image`` (C, H, W) with a constant band of ``width_fraction`` of the image along ``side``
    (top, bottom, left, right), as a detector's unexposed edge or a scanner's frame gives."""
    out = image.clone()
    _, height, width = out.shape
    n = max(1, round(width_fraction * (height if side in ("top", "bottom") else width)))
    if side == "top":
        out[:, :n, :] = value
    elif side == "bottom":
        out[:, -n:, :] = value
    elif side == "left":
        out[:, :, :n] = value
    elif side == "right":
        out[:, :, -n:] = value
    else:
        raise ValueError(f"side must be top, bottom, left or right, not {side!r}")
    return out


def collimate(image: torch.Tensor, margins: tuple[float, float, float, float], value: float,
              softness: float = 0.0) -> torch.Tensor:
    """``image`` (C, H, W) outside a collimated field (margins top, bottom, left, right as
    fractions of the side) set towards ``value``; ``softness`` (pixels) ramps the edge."""
    out = image.clone()
    _, height, width = out.shape
    y = torch.arange(height, dtype=out.dtype)[:, None]
    x = torch.arange(width, dtype=out.dtype)[None, :]
    top, bottom = margins[0] * height, height - 1 - margins[1] * height
    left, right = margins[2] * width, width - 1 - margins[3] * width
    distance = torch.minimum(torch.minimum(y - top, bottom - y), torch.minimum(x - left, right - x))  # > 0 inside
    inside = (distance / softness + 0.5).clamp(0, 1) if softness > 0 else (distance >= 0).to(out.dtype)
    return out * inside + value * (1 - inside)


class RandBurnedInText(RandomizableTransform):
    """Random burned-in text: 1-3 strips of random characters, 2-6 % of H high, near the
    top or bottom edge (sometimes anywhere), bright or dark, sometimes on a full-width band."""

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return image
        for _ in range(self.R.randint(1, 4)):
            length = self.R.randint(3, 18)
            text = "".join(self.R.choice(list(TEXT_CHARACTERS), size=length))
            place = self.R.rand()
            height = self.R.uniform(0.02, 0.06)
            top = (self.R.uniform(0.0, 0.08) if place < 0.4 else
                   self.R.uniform(0.90, 0.98) if place < 0.8 else self.R.uniform(0.1, 0.85))
            value = self.R.uniform(0.85, 1.0) if self.R.rand() < 0.8 else self.R.uniform(0.0, 0.15)
            background = (1.0 - value) if self.R.rand() < 0.25 else None
            image = burn_in_text(image, text.strip() or "X", top_fraction=top, height_fraction=height,
                                 left_fraction=self.R.uniform(0.0, 0.6), value=value, background=background)
        return image


class RandSideMarker(RandomizableTransform):
    """A random "L"/"R" laterality marker (4-12 % of H, sometimes boxed) in a random corner."""

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return image
        return side_marker(image, "LR"[self.R.randint(2)], CORNERS[self.R.randint(4)],
                           size_fraction=self.R.uniform(0.04, 0.12), margin_fraction=self.R.uniform(0.0, 0.12),
                           value=self.R.uniform(0.8, 1.0) if self.R.rand() < 0.85 else self.R.uniform(0.0, 0.1),
                           boxed=bool(self.R.rand() < 0.3))


class RandBorderBands(RandomizableTransform):
    """Constant bands (1-10 % of the side, black or white) along 1-2 random edges."""

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return image
        sides = ("top", "bottom", "left", "right")
        for index in self.R.choice(4, size=self.R.randint(1, 3), replace=False):
            value = self.R.uniform(0.0, 0.1) if self.R.rand() < 0.6 else self.R.uniform(0.9, 1.0)
            image = border_band(image, sides[index], self.R.uniform(0.01, 0.10), value)
        return image


class RandCollimation(RandomizableTransform):
    """A random collimated field: margins of 0-12 % per side set to a dark or grey value, hard or soft edge."""

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return image
        margins = tuple(float(m) for m in self.R.uniform(0.0, 0.12, size=4))
        value = self.R.uniform(0.0, 0.35) if self.R.rand() < 0.7 else self.R.uniform(0.7, 1.0)
        return collimate(image, margins, value, softness=float(self.R.uniform(0.0, 3.0)))
