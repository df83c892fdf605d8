"""Render the overlay picture: grey source + colour saliency + legend + burned-in text.

Pure numpy + Pillow (no matplotlib, no torch). The picture is the source image
at its own resolution with a black text band added above and a warning band
added below, so that the text never hides anatomy and no viewer overlay (OHIF's
cine bar at the top centre, Orthanc Web Viewer's notice at the bottom centre)
hides what matters (text is left-aligned; the legend sits at the right):

    +---------------------------------------------------------------+
    | medxplain | <method>                   NOT FOR DIAGNOSTIC USE   |
    | P(PNEUMONIA)=0.93 -> PNEUMONIA           saliency [low....high] |
    | counterfactual P=0.12: flipped the decision                     |
    +---------------------------------------------------------------+
    |                                                               |
    |            source (grey) + saliency (colour, alpha)           |
    |                                                               |
    +---------------------------------------------------------------+
    | NOT FOR DIAGNOSTIC USE | out of domain: ... (cautions, orange)  |
    +---------------------------------------------------------------+

Font size scales with the image (about 1/38 of its shorter side), so the text
stays legible when a viewer fits a 1000-2000 px radiograph to the screen.
"""
from __future__ import annotations

from functools import lru_cache

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colormap", "saliency_alpha", "render_overlay", "overlay_bands", "NOT_FOR_DIAGNOSTIC_USE"]

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

_BAND_COLOUR = (12, 12, 12)
_TEXT_COLOUR = (255, 255, 255)
_WARN_COLOUR = (255, 70, 70)
_OK_COLOUR = (120, 230, 120)
_CAUTION_COLOUR = (255, 170, 40)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to RGB uint8 of shape ``values.shape + (3,)`` with
    matplotlib's "jet" (blue -> cyan -> yellow -> red, the colour map saliency papers use)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.round(255.0 * matplotlib.colormaps["jet"](v)[..., :3]).astype(np.uint8)


def saliency_alpha(values: np.ndarray, *, threshold: float, max_alpha: float) -> np.ndarray:
    """Opacity of the colour layer: 0 up to ``threshold``, rising linearly to ``max_alpha`` at 1."""
    v = np.asarray(values, dtype=np.float32)
    ramp = np.clip((v - threshold) / max(1e-6, 1.0 - threshold), 0.0, 1.0)
    return (max_alpha * ramp).astype(np.float32)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):  # pragma: no cover - old Pillow / no FreeType
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, stroke: int) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    return int(right - left)


def _fit(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: int) -> tuple[str, int]:
    """Shrink the font (down to 60 %) and then truncate until ``text`` fits ``max_width``."""
    min_size = max(10, int(size * 0.6))
    while size > min_size and _text_width(draw, text, _font(size), _stroke(size)) > max_width:
        size -= 1
    while len(text) > 4 and _text_width(draw, text, _font(size), _stroke(size)) > max_width:
        text = text.rstrip("\u2026")[:-1] + "\u2026"
    return text, size


def _stroke(size: int) -> int:
    return max(1, size // 28)


MIN_OVERLAY_WIDTH = 640


def _enlarge(values: np.ndarray, factor: int) -> np.ndarray:
    image = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    size = (values.shape[1] * factor, values.shape[0] * factor)
    return np.clip(np.asarray(image.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)


def _blend(gray_rgb: np.ndarray, saliency: np.ndarray, *, threshold: float, max_alpha: float) -> np.ndarray:
    alpha = saliency_alpha(saliency, threshold=threshold, max_alpha=max_alpha)[..., None]
    colour = colormap(saliency).astype(np.float32)
    out = gray_rgb.astype(np.float32) * (1.0 - alpha) + colour * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _metrics(rows: int, cols: int) -> tuple[int, int, int]:
    """Font size, padding and line height (pixels) for a picture of rows x cols."""
    size = max(12, int(round(min(rows, cols) / 38)))
    return size, max(6, size // 2), int(round(size * 1.35))


def overlay_bands(rows: int, cols: int) -> tuple[int, int]:
    """Heights (pixels) of the text band above and the warning band below an image
    of ``rows`` x ``cols`` (after the enlargement of small sources)."""
    _, pad, line_h = _metrics(rows, cols)
    return 2 * pad + 3 * line_h, 2 * pad + line_h


def render_overlay(
    *,
    display: np.ndarray,
    saliency: np.ndarray,
    method: str,
    positive_label: str,
    probability: float,
    decision: str,
    counterfactual_probability: float | None = None,
    flipped: bool | None = None,
    threshold: float = 0.2,
    max_alpha: float = 0.6,
    cautions: tuple[str, ...] = (),
) -> np.ndarray:
    """Return the overlay picture as RGB uint8, shape ``(band + rows + bottom band, cols, 3)``.

    The image rows are exactly the blended source; all text lies in the two
    bands added above and below it (:func:`overlay_bands` gives their heights).

    ``display`` and ``saliency`` are float arrays in [0, 1] of the same shape
    (already validated by the caller). Saliency below ``threshold`` is fully
    transparent; above it, colour opacity rises linearly to ``max_alpha``.
    ``cautions`` (plain words, e.g. "out of domain", "low confidence (near
    threshold)") follow the warning in the bottom band, in orange.
    """
    if display.shape[1] < MIN_OVERLAY_WIDTH:
        # Small sources (e.g. 224 px) are enlarged so that the burned-in text, above
        # all "NOT FOR DIAGNOSTIC USE", is never truncated. The overlay is a
        # Secondary Capture: it claims no pixel correspondence with the source.
        factor = int(np.ceil(MIN_OVERLAY_WIDTH / display.shape[1]))
        display, saliency = (_enlarge(a, factor) for a in (display, saliency))
    rows, cols = display.shape
    gray = np.round(np.clip(display, 0.0, 1.0) * 255.0).astype(np.uint8)
    gray_rgb = np.repeat(gray[..., None], 3, axis=2)
    picture = _blend(gray_rgb, saliency, threshold=threshold, max_alpha=max_alpha)

    size, pad, line_h = _metrics(rows, cols)
    band_h, bottom_h = overlay_bands(rows, cols)

    canvas = Image.new("RGB", (cols, band_h + rows + bottom_h), _BAND_COLOUR)
    canvas.paste(Image.fromarray(picture, mode="RGB"), (0, band_h))
    draw = ImageDraw.Draw(canvas)

    # Right column: warning (line 1) and legend (lines 2-3).
    legend_w = max(80, int(cols * 0.28))
    right_x = cols - pad - legend_w
    left_w = right_x - 2 * pad

    # Line 1: method (left), NOT FOR DIAGNOSTIC USE (right, red).
    warn, warn_size = _fit(draw, NOT_FOR_DIAGNOSTIC_USE, size, int(cols * 0.45))
    warn_w = _text_width(draw, warn, _font(warn_size), _stroke(warn_size))
    draw.text(
        (cols - pad - warn_w, pad),
        warn,
        font=_font(warn_size),
        fill=_WARN_COLOUR,
        stroke_width=_stroke(warn_size),
        stroke_fill=_WARN_COLOUR,
    )
    title, title_size = _fit(draw, f"medxplain | {method}", size, cols - warn_w - 3 * pad)
    draw.text((pad, pad), title, font=_font(title_size), fill=_TEXT_COLOUR,
              stroke_width=_stroke(title_size), stroke_fill=_TEXT_COLOUR)

    # Line 2: classifier probability and decision.
    line2 = f"P({positive_label})={probability:.2f} -> {decision}"
    line2, size2 = _fit(draw, line2, size, left_w)
    draw.text((pad, pad + line_h), line2, font=_font(size2), fill=_TEXT_COLOUR,
              stroke_width=_stroke(size2), stroke_fill=_TEXT_COLOUR)

    # Line 3: counterfactual result, if any.
    parts: list[str] = []
    colour = _TEXT_COLOUR
    if counterfactual_probability is not None:
        parts.append(f"counterfactual P={counterfactual_probability:.2f}")
    if flipped is True:
        parts.append("flipped the decision")
        colour = _OK_COLOUR
    elif flipped is False:
        parts.append("did not flip")
        colour = _CAUTION_COLOUR
    if parts:
        line3 = ": ".join(parts) if counterfactual_probability is not None else "counterfactual " + parts[-1]
        line3, size3 = _fit(draw, line3, size, left_w)
        draw.text((pad, pad + 2 * line_h), line3, font=_font(size3), fill=colour,
                  stroke_width=_stroke(size3), stroke_fill=colour)

    # Legend: "saliency" caption, colour bar as it is blended over mid grey, low/high.
    small = max(10, int(size * 0.8))
    caption_y = pad + line_h
    bar_top = caption_y + int(line_h * 0.95)
    bar_h = max(6, int(line_h * 0.55))
    low_w = _text_width(draw, "low", _font(small), 0)
    high_w = _text_width(draw, "high", _font(small), 0)
    bar_x0 = right_x + low_w + pad // 2
    bar_x1 = cols - pad - high_w - pad // 2
    draw.text(((bar_x0 + bar_x1) // 2, caption_y), "saliency", font=_font(small), fill=_TEXT_COLOUR,
              anchor="ma")
    if bar_x1 - bar_x0 >= 16:
        xs = np.linspace(0.0, 1.0, bar_x1 - bar_x0, dtype=np.float32)
        strip = _blend(np.full((1, xs.size, 3), 128, np.uint8), xs[None, :],
                       threshold=threshold, max_alpha=1.0)
        # full opacity in the legend so that the colours read clearly; the
        # transparent part below the threshold shows as grey.
        strip = np.repeat(strip, bar_h, axis=0)
        canvas.paste(Image.fromarray(strip, mode="RGB"), (bar_x0, bar_top))
        draw.rectangle([bar_x0 - 1, bar_top - 1, bar_x1, bar_top + bar_h], outline=_TEXT_COLOUR)
        text_y = bar_top + bar_h // 2
        draw.text((right_x, text_y), "low", font=_font(small), fill=_TEXT_COLOUR, anchor="lm")
        draw.text((cols - pad, text_y), "high", font=_font(small), fill=_TEXT_COLOUR, anchor="rm")

    # Bottom band: the warning again, left-aligned (bottom-centre is where
    # Orthanc's viewer puts its own notice), so that it stays visible when a
    # viewer zooms to the top of the picture. Nothing is drawn on the image.
    wm_size = max(10, int(size * 0.8))
    draw.text((pad, band_h + rows + bottom_h // 2), NOT_FOR_DIAGNOSTIC_USE, font=_font(wm_size),
              fill=_WARN_COLOUR, anchor="lm", stroke_width=_stroke(wm_size), stroke_fill=_WARN_COLOUR)
    if cautions:
        x = 2 * pad + _text_width(draw, NOT_FOR_DIAGNOSTIC_USE, _font(wm_size), _stroke(wm_size))
        text, caution_size = _fit(draw, "| " + "; ".join(cautions), wm_size, cols - x - pad)
        draw.text((x, band_h + rows + bottom_h // 2), text, font=_font(caution_size), fill=_CAUTION_COLOUR,
                  anchor="lm", stroke_width=_stroke(caution_size), stroke_fill=_CAUTION_COLOUR)

    return np.asarray(canvas, dtype=np.uint8)
