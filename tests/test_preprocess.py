"""Invertible preprocessing (dicom_io/preprocess.py): display image -> model grid -> source grid.

The inverse is what puts saliency and counterfactual differences on the exact
source pixels, so it is checked with a bright square whose position is known.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dicom_io.preprocess import Preprocessor

SOURCE_SHAPE = (300, 200)  # rows, cols: deliberately not square
MODEL_SIZE = (64, 64)
ASPECTS = ("squash", "pad")


def _source_with_square(top: int, left: int, side: int = 30) -> np.ndarray:
    image = np.zeros(SOURCE_SHAPE, dtype=np.float32)
    image[top:top + side, left:left + side] = 1.0
    return image


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    weights = np.clip(weights, 0, None).astype(np.float64)
    rows, cols = np.mgrid[:weights.shape[0], :weights.shape[1]]
    total = weights.sum()
    assert total > 0
    return float((weights * rows).sum() / total), float((weights * cols).sum() / total)


@pytest.mark.parametrize("aspect", ASPECTS)
def test_forward_gives_one_channel_model_grid_in_unit_range(aspect):
    rng = np.random.default_rng(0)
    display = rng.random(SOURCE_SHAPE, dtype=np.float32)
    out = Preprocessor(MODEL_SIZE, aspect)(display)
    assert isinstance(out, MetaTensor)
    assert tuple(out.shape) == (1, *MODEL_SIZE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert out.applied_operations, "the forward pass must record a MONAI trace for the inverse"


def test_pad_keeps_aspect_and_squash_does_not():
    # A uniformly bright, tall image: 'pad' adds dark columns left and right before
    # resizing; 'squash' stretches it to fill the whole grid.
    display = np.ones(SOURCE_SHAPE, dtype=np.float32)
    squash = Preprocessor(MODEL_SIZE, "squash")(display)[0]
    pad = Preprocessor(MODEL_SIZE, "pad")(display)[0]
    # (MONAI's anti-aliasing blur darkens the outermost model pixels a little; the
    # classifier is trained through the same chain, so only the interior is checked)
    assert float(squash[4:-4, 4:-4].min()) > 0.99
    # 200 of 300 columns hold the image: about 1/6 of the width on each side is padding.
    assert float(pad[:, :8].max()) < 0.05 and float(pad[:, -8:].max()) < 0.05
    assert float(pad[4:-4, 16:48].min()) > 0.95
    # rows are not padded
    assert float(pad[:, 32].min()) > 0.85


@pytest.mark.parametrize("aspect", ASPECTS)
def test_inverse_of_constant_map_is_that_constant_on_the_source_grid(aspect):
    pre = Preprocessor(MODEL_SIZE, aspect)
    model_space = pre(np.random.default_rng(1).random(SOURCE_SHAPE, dtype=np.float32))
    back = pre.to_source(model_space, torch.full(MODEL_SIZE, 0.3))
    assert isinstance(back, np.ndarray)
    assert back.shape == SOURCE_SHAPE
    np.testing.assert_allclose(back, 0.3, atol=1e-5)


@pytest.mark.parametrize("aspect", ASPECTS)
def test_multichannel_inverse_keeps_channels(aspect):
    pre = Preprocessor(MODEL_SIZE, aspect)
    model_space = pre(np.zeros(SOURCE_SHAPE, dtype=np.float32))
    values = np.stack([np.full(MODEL_SIZE, 0.25, np.float32), np.full(MODEL_SIZE, 0.75, np.float32)])
    back = pre.to_source(model_space, values)
    assert back.shape == (2, *SOURCE_SHAPE)
    np.testing.assert_allclose(back[0], 0.25, atol=1e-5)
    np.testing.assert_allclose(back[1], 0.75, atol=1e-5)


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("top,left", [(200, 40), (20, 150)])
def test_bright_square_maps_back_onto_the_same_source_pixels(aspect, top, left):
    source = _source_with_square(top, left)
    pre = Preprocessor(MODEL_SIZE, aspect)
    model_space = pre(source)
    # the square is off-centre in model space too (a centred or flipped map would fail)
    model_row, model_col = _centroid(model_space[0].numpy())
    assert abs(model_row / MODEL_SIZE[0] - (top + 15) / SOURCE_SHAPE[0]) < 0.1
    back = pre.to_source(model_space, model_space[0])
    assert back.shape == SOURCE_SHAPE
    want = _centroid(source)
    got = _centroid(back)
    assert abs(got[0] - want[0]) <= 2.0 and abs(got[1] - want[1]) <= 2.0, (want, got)
    # most of the mapped-back mass lies on the square itself (a little blur at its edge)
    inside = np.clip(back, 0, None)[top:top + 30, left:left + 30].sum()
    assert inside / np.clip(back, 0, None).sum() > 0.8


def test_pad_inverse_crops_the_padding():
    pre = Preprocessor(MODEL_SIZE, "pad")
    model_space = pre(np.ones(SOURCE_SHAPE, dtype=np.float32))
    # a map that is 1 only on the padded bands must come back as (nearly) nothing
    band = torch.zeros(MODEL_SIZE)
    band[:, :8] = 1.0
    band[:, -8:] = 1.0
    back = pre.to_source(model_space, band)
    assert back.shape == SOURCE_SHAPE
    assert float(np.abs(back[:, 10:-10]).max()) < 1e-3
    # and the image itself maps back to the whole source
    np.testing.assert_allclose(pre.to_source(model_space, model_space[0])[20:-20, 20:-20], 1.0, atol=0.05)


def test_one_preprocessor_inverts_images_of_different_shapes():
    pre = Preprocessor(MODEL_SIZE, "pad")
    tall = pre(_source_with_square(200, 40))
    wide_source = np.zeros((120, 260), dtype=np.float32)
    wide_source[10:40, 200:230] = 1.0
    wide = pre(wide_source)
    # invert the first one after the second was processed
    assert pre.to_source(tall, tall[0]).shape == SOURCE_SHAPE
    back_wide = pre.to_source(wide, wide[0])
    assert back_wide.shape == (120, 260)
    got = _centroid(back_wide)
    assert abs(got[0] - 24.5) <= 2 and abs(got[1] - 214.5) <= 2


@pytest.mark.parametrize("aspect", ASPECTS)
def test_map_of_wrong_shape_is_rejected(aspect):
    pre = Preprocessor(MODEL_SIZE, aspect)
    model_space = pre(np.zeros(SOURCE_SHAPE, dtype=np.float32))
    with pytest.raises(ValueError, match="does not match model grid"):
        pre.to_source(model_space, torch.zeros(32, 32))


def test_tensor_without_trace_is_rejected():
    pre = Preprocessor(MODEL_SIZE, "squash")
    with pytest.raises(ValueError, match="no MONAI trace"):
        pre.to_source(torch.zeros(1, *MODEL_SIZE), torch.zeros(MODEL_SIZE))
    with pytest.raises(ValueError, match="no MONAI trace"):
        pre.to_source(MetaTensor(torch.zeros(1, *MODEL_SIZE)), torch.zeros(MODEL_SIZE))


def test_bad_inputs_and_specs_are_rejected():
    pre = Preprocessor(MODEL_SIZE)
    with pytest.raises(ValueError, match="rows, cols"):
        pre(np.zeros((3, 40, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="size"):
        Preprocessor((4, 4))
    with pytest.raises(ValueError, match="aspect"):
        Preprocessor(MODEL_SIZE, "crop")  # type: ignore[arg-type]
