"""Evaluation metrics against hand-computed cases, and the box metrics on the real
TBX11K sample boxes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from explainers.evaluation import (
    EvaluationError,
    PenultimateFeatures,
    add_noise,
    box_iou,
    box_pointing_game,
    boxes_to_mask,
    deletion_insertion,
    frechet_distance,
    iou_at_mask_area,
    localisation_after_smoothing,
    map_agreement,
    mask_area_fraction,
    measure,
    pointing_game,
    proximity_l1,
    proximity_ssim,
    saliency_auprc,
    validity,
)
from tests.conftest import SHARED_DATA

TBX = SHARED_DATA / "tbx11k-sample"


def square_masks(batch: int = 4, size: int = 64) -> torch.Tensor:
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    for i in range(batch):
        r, c = 6 + (10 * i) % 40, 30 - (5 * i) % 24
        masks[i, r:r + 12, c:c + 16] = True
    return masks


# -- localisation --------------------------------------------------------------------

def test_perfect_map_scores_one_everywhere():
    masks = square_masks()
    perfect = masks.float()
    assert torch.allclose(iou_at_mask_area(perfect, masks), torch.ones(4))
    assert torch.allclose(pointing_game(perfect, masks), torch.ones(4))
    assert torch.allclose(saliency_auprc(perfect, masks), torch.ones(4))


def test_inverted_map_scores_zero():
    masks = square_masks()
    inverted = (~masks).float()
    assert torch.allclose(iou_at_mask_area(inverted, masks), torch.zeros(4))
    assert torch.allclose(pointing_game(inverted, masks), torch.zeros(4))


def test_iou_hand_computed_half_overlap():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0:4, 0:4] = True  # 16 pixels
    saliency = torch.zeros(1, 8, 8)
    saliency[0, 2:6, 0:4] = 1.0  # top 16: rows 2-5, overlap rows 2-3 = 8 pixels
    # IoU = 8 / (16 + 16 - 8) = 1/3
    assert iou_at_mask_area(saliency, mask).item() == pytest.approx(1 / 3)


def test_common_smoothing_rescores_a_map_whose_peak_is_a_lone_pixel():
    # A broad response over the lesion and one brighter stray pixel elsewhere: scored raw the
    # peak misses; after the shared extra smoothing the broad response wins.
    mask = torch.zeros(1, 48, 48, dtype=torch.bool)
    mask[0, 10:22, 10:22] = True
    saliency = torch.zeros(1, 48, 48)
    saliency[0, 10:22, 10:22] = 0.5
    saliency[0, 40, 40] = 1.0
    assert pointing_game(saliency, mask).item() == 0.0
    iou, pointing = localisation_after_smoothing(saliency, mask, 4.0)
    assert pointing.item() == 1.0
    assert 0.5 < iou.item() < 1.0  # the blur spills over the mask's edge
    with pytest.raises(EvaluationError):
        localisation_after_smoothing(saliency, mask, 0.0)


def test_noise_map_scores_chance():
    torch.manual_seed(0)
    masks = square_masks(batch=64)
    noise = torch.rand(masks.shape)
    chance = mask_area_fraction(masks).mean().item()  # 192 / 4096 = 0.047
    assert iou_at_mask_area(noise, masks).mean().item() == pytest.approx(chance / (2 - chance), abs=0.02)
    assert saliency_auprc(noise, masks).mean().item() == pytest.approx(chance, abs=0.02)
    assert pointing_game(noise, masks).mean().item() < 0.2


def test_flat_map_pointing_game_is_chance_and_tolerance_grows_mask():
    masks = square_masks(batch=1)
    flat = torch.ones(masks.shape)
    assert pointing_game(flat, masks).item() == pytest.approx(mask_area_fraction(masks).item())
    near = torch.zeros(masks.shape)
    near[0, 6 + 12 + 2, 30] = 1.0  # 3 rows below the mask's bottom edge (row 17)
    assert pointing_game(near, masks).item() == 0.0
    assert pointing_game(near, masks, tolerance=3).item() == 1.0


def test_empty_mask_and_bad_shapes_raise():
    with pytest.raises(EvaluationError, match="empty"):
        iou_at_mask_area(torch.rand(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(EvaluationError, match="does not match"):
        pointing_game(torch.rand(2, 8, 8), torch.ones(2, 8, 9, dtype=torch.bool))
    with pytest.raises(EvaluationError, match="positive size"):
        boxes_to_mask([[1, 1, 0, 3]], (8, 8))


def test_boxes_to_mask_scales_like_a_squash():
    mask = boxes_to_mask([[100, 50, 200, 100]], (128, 128), source_shape=(256, 512))
    rows, cols = mask.nonzero(as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (25, 74)  # y 50..150 of 256 rows -> 25..75
    assert (cols.min().item(), cols.max().item()) == (25, 74)  # x 100..300 of 512 cols -> 25..75


def _tbx_cases():
    if not TBX.is_dir():
        pytest.skip(f"shared data not found at {TBX} (set MEDXPLAIN_SHARED_DATA)")
    coco = json.loads((TBX / "annotations" / "json" / "TBX11K_train.json").read_text())
    boxes = {image["id"]: (image, []) for image in coco["images"]}
    for annotation in coco["annotations"]:
        boxes[annotation["image_id"]][1].append(annotation["bbox"])
    return [(TBX / "imgs" / image["file_name"], image, b) for image, b in boxes.values()]


def test_box_metrics_on_tbx11k_sample():
    """Maps built from the real annotated boxes: a Gaussian on a box centre points
    into the boxes; the box itself as a map scores IoU 1; a map on the mirrored
    side of the chest misses."""
    cases = [c for c in _tbx_cases() if c[2]]
    assert len(cases) == 2 and sum(len(b) for _, _, b in cases) == 3  # tb0005 (1 box), tb0007 (2 boxes)
    size = 128
    for path, image, boxes in cases:
        with Image.open(path) as img:
            assert img.size == (image["width"], image["height"])
        source = (image["height"], image["width"])
        x, y, w, h = boxes[0]
        rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        cr, cc = (y + h / 2) * size / source[0], (x + w / 2) * size / source[1]
        centred = torch.exp(-((rows - cr) ** 2 + (cols - cc) ** 2) / 50.0)[None]
        mirrored = torch.exp(-((rows - cr) ** 2 + (cols - (size - 1 - cc)) ** 2) / 50.0)[None]
        box_map = boxes_to_mask(boxes, (size, size), source_shape=source).float()[None]
        assert box_pointing_game(centred, [boxes], source_shape=source).item() == 1.0
        assert box_iou(box_map, [boxes], source_shape=source).item() == pytest.approx(1.0)
        assert box_iou(centred, [boxes], source_shape=source).item() > 0.2
        if len(boxes) == 1:  # tb0007's two boxes sit in both lungs: the mirror would hit
            assert box_pointing_game(mirrored, [boxes], source_shape=source).item() == 0.0
            assert box_iou(mirrored, [boxes], source_shape=source).item() == 0.0


def test_box_metrics_refuse_a_healthy_image_without_boxes():
    healthy = [c for c in _tbx_cases() if not c[2]]
    assert len(healthy) == 1
    with pytest.raises(EvaluationError, match="empty"):
        box_pointing_game(torch.rand(1, 64, 64), [healthy[0][2]], source_shape=(512, 512))


# -- counterfactuals ---------------------------------------------------------------

def test_validity_hand_computed():
    p = torch.tensor([0.9, 0.9, 0.2, 0.2])
    cf = torch.tensor([0.1, 0.6, 0.7, 0.1])
    out = validity(p, cf, threshold=0.5)
    assert out["flipped"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out["change"].tolist() == pytest.approx([0.8, 0.3, 0.5, -0.1])


def test_proximity_identity_and_shift():
    images = torch.rand(3, 1, 32, 32)
    assert proximity_l1(images, images).tolist() == [0.0, 0.0, 0.0]
    assert proximity_ssim(images, images).tolist() == pytest.approx([1.0, 1.0, 1.0])
    shifted = (images + 0.1).clamp(0, 1)
    assert proximity_l1(images, shifted).mean().item() == pytest.approx((shifted - images).abs().mean().item())
    assert proximity_ssim(images, torch.rand(3, 1, 32, 32)).max().item() < 0.2
    with pytest.raises(EvaluationError):
        proximity_l1(images, images[:, :, :16])


def test_frechet_distance_of_shifted_gaussians():
    """Same covariance, means 1 apart in each of 4 dimensions: distance ~ 4."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g)
    b = torch.randn(4000, 4, generator=g) + 1.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.15)
    # Fewer samples than dimensions (singular covariance) still gives a finite number.
    assert np.isfinite(frechet_distance(torch.randn(5, 16, generator=g), torch.randn(6, 16, generator=g)))
    with pytest.raises(EvaluationError):
        frechet_distance(a, b[:, :3])


def test_penultimate_features_are_the_last_linear_input():
    network = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    features = PenultimateFeatures(network)(torch.rand(5, 1, 4, 4), batch_size=2)
    assert features.shape == (5, 8) and (features >= 0).all()
    with pytest.raises(EvaluationError):
        PenultimateFeatures(nn.Sequential(nn.ReLU()))


# -- faithfulness ------------------------------------------------------------------

class BoxClassifier(nn.Module):
    """logit = 40 * (mean of the lesion box - 0.5): only the box matters."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 40.0 * (images[:, 0, 8:24, 8:24].mean(dim=(1, 2)) - 0.5)


def test_deletion_of_a_perfect_map_beats_a_random_map():
    images = torch.full((4, 1, 48, 48), 0.3)
    images[:, :, 8:24, 8:24] = 0.9
    images += 0.05 * torch.rand(images.shape, generator=torch.Generator().manual_seed(1))
    perfect = torch.zeros(4, 48, 48)
    perfect[:, 8:24, 8:24] = 1.0
    random_map = torch.rand(4, 48, 48, generator=torch.Generator().manual_seed(2))
    # This classifier reads the box's mean, which a blur keeps: "removed" = the image mean.
    baseline = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    good = deletion_insertion(BoxClassifier(), images, perfect, threshold=0.5, steps=12, baseline=baseline)
    bad = deletion_insertion(BoxClassifier(), images, random_map, threshold=0.5, steps=12, baseline=baseline)
    assert good.fractions[0] == 0 and good.fractions[-1] == 1
    assert good.deletion[:, 0].min() > 0.99  # the untouched image is called positive
    assert (good.deletion_auc < bad.deletion_auc - 0.3).all()
    assert (good.insertion_auc > bad.insertion_auc + 0.1).all()
    # The perfect map removes the box within its first 16*16/48/48 = 11% of pixels.
    assert good.deletion[:, 2].max() < 0.5


def test_deletion_explains_the_called_class():
    """A case called negative: its explained class is NORMAL, so the curve starts at P(negative)."""
    images = torch.full((1, 1, 48, 48), 0.2)
    curves = deletion_insertion(BoxClassifier(), images, torch.rand(1, 48, 48), threshold=0.5, steps=4)
    assert curves.deletion[0, 0].item() > 0.99


# -- robustness --------------------------------------------------------------------

def test_map_agreement_identity_and_independence():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 32, 32, generator=g)
    same = map_agreement(maps, maps)
    assert same["spearman"].tolist() == pytest.approx([1.0] * 3)
    assert same["ssim"].tolist() == pytest.approx([1.0] * 3)
    other = map_agreement(maps, torch.rand(3, 32, 32, generator=g))
    assert other["spearman"].abs().max().item() < 0.1
    # A constant map has no ranking: counted as no agreement, never NaN.
    assert map_agreement(torch.zeros(1, 8, 8), torch.rand(1, 8, 8))["spearman"].item() == 0.0


def test_add_noise_is_seeded_and_clamped():
    images = torch.rand(2, 1, 16, 16)
    a, b = add_noise(images, 0.05, seed=3), add_noise(images, 0.05, seed=3)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert (a - images).std().item() == pytest.approx(0.05, rel=0.3)


def test_measure_reports_time_and_memory():
    with measure(torch.device("cpu")) as cost:
        block = torch.ones(64, 1024, 1024)  # 256 MiB
        block += 1
    assert cost.seconds > 0
    assert cost.peak_source in ("rss", "ru_maxrss (process lifetime)")
    assert cost.peak_bytes >= 200 * 2 ** 20
