"""The lesion-insertion generator and `medxplain make-lesions` on real NORMAL images."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from dicom_io.preprocess import Preprocessor
from explainers.lesions import KINDS, LesionError, LesionSpec, insert_lesion, lung_field_mask, random_lesion
from pipeline.cli import app
from pipeline.training.datasets import load_splits
from tests.conftest import kermany_subset


@pytest.fixture(scope="module")
def normal_images(kermany_dir):
    rows = [r for r in csv.DictReader(open(kermany_dir / "manifest.csv")) if r["class_name"] == "NORMAL"]
    picked = rows[::200][:6]
    return [(r["path"], np.asarray(Image.open(kermany_dir / r["path"]).convert("L"))) for r in picked]


@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_altered_pixels(normal_images, kind):
    for key, image in normal_images:
        lesion = random_lesion(image, seed=3, key=key, kind=kind)
        assert lesion.image.dtype == np.uint8 and lesion.image.shape == image.shape
        assert np.array_equal(lesion.image[~lesion.mask], image[~lesion.mask])  # bit-identical outside
        assert (lesion.image[lesion.mask] != image[lesion.mask]).all()  # every mask pixel changed
        assert lesion.spec.kind == kind
        # One connected lesion, brighter (denser) on average, and not a hard-edged stamp:
        # the change at the border is smaller than at the core.
        assert ndimage.label(lesion.mask)[1] <= 3
        change = lesion.image.astype(float) - image.astype(float)
        border = lesion.mask & ~ndimage.binary_erosion(lesion.mask)
        assert change[lesion.mask].mean() > 2
        assert change[border].mean() < change[lesion.mask].max() / 2


def test_lesion_lies_in_the_lung_fields(normal_images):
    for key, image in normal_images:
        lungs = lung_field_mask(image)
        assert 0.08 < lungs.mean() < 0.4, "lung fields should cover a plausible part of the image"
        lesion = random_lesion(image, seed=0, key=key)
        assert lungs[lesion.spec.center]


def test_deterministic_for_a_seed_and_different_across_seeds(normal_images):
    key, image = normal_images[0]
    a = random_lesion(image, seed=7, key=key)
    b = random_lesion(image, seed=7, key=key)
    c = random_lesion(image, seed=8, key=key)
    assert a.spec == b.spec and np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.spec != c.spec


def test_noise_inside_the_lesion_matches_the_lung_around_it(normal_images):
    """Fine-scale residual std inside a large lesion is within a factor 2 of the
    original image's at the same place: neither a smooth blob nor a noisy one."""
    for key, image in normal_images[:3]:
        lesion = random_lesion(image, seed=1, key=key, kind="opacity")
        core = ndimage.binary_erosion(lesion.mask, iterations=3)
        if core.sum() < 30:
            continue

        def residual(img):
            img = img.astype(np.float32)
            return img - ndimage.gaussian_filter(img, 1.0)

        before, after = residual(image)[core].std(), residual(lesion.image)[core].std()
        assert 0.5 < after / before < 2.0


def test_bad_input_raises_typed_errors(normal_images):
    _, image = normal_images[0]
    with pytest.raises(LesionError, match="uint8"):
        random_lesion(image.astype(np.float32), seed=0, key="x")
    with pytest.raises(LesionError, match="invalid"):
        insert_lesion(image, LesionSpec("nodule", (100, 60), 5.0, contrast=0.0, obscure=0.5),
                      np.random.default_rng(0))


def test_make_lesions_writes_a_kermany_layout_that_load_splits_reads(kermany_dir, tmp_path):
    source = kermany_subset(kermany_dir, tmp_path / "src", {"train": 40, "test": 16})
    out = tmp_path / "lesions"
    result = CliRunner().invoke(app, ["make-lesions", "--data", str(source), "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    # Only the NORMAL half of the subset is used, each image once, half with a lesion.
    assert len(rows) == 20 + 8
    assert {r["class_name"] for r in rows} == {"LESION", "NORMAL"}
    for split, n in (("train", 20), ("test", 8)):
        labels = [r["label"] for r in rows if r["split"] == split]
        assert len(labels) == n and labels.count("1") == n // 2
    src = {r["path"]: r for r in csv.DictReader(open(source / "manifest.csv"))}
    for r in rows:
        image = np.asarray(Image.open(out / r["path"]))
        original = np.asarray(Image.open(source / r["source_path"]).convert("L"))
        assert r["source_patient_token"] == src[r["source_path"]]["source_patient_token"]
        if r["label"] == "1":
            mask = np.asarray(Image.open(out / r["mask"])) > 0
            assert int(r["lesion_area"]) == mask.sum() > 0
            assert np.array_equal(image != original, mask)
        else:
            assert r["mask"] == "" and np.array_equal(image, original)
    # The same seed writes the same files.
    again = CliRunner().invoke(app, ["make-lesions", "--data", str(source), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0
    assert (tmp_path / "again" / "manifest.csv").read_text() == (out / "manifest.csv").read_text()
    splits = load_splits(out, Preprocessor((64, 64)), seed=0)
    assert sum(len(s.labels) for s in splits.values()) == 28


def test_make_lesions_paired_writes_each_image_untouched_and_with_a_lesion(kermany_dir, tmp_path):
    source = kermany_subset(kermany_dir, tmp_path / "src", {"train": 12, "test": 6})
    out = tmp_path / "paired"
    result = CliRunner().invoke(app, ["make-lesions", "--data", str(source), "--out", str(out), "--paired"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 2 * (6 + 3)
    by_source: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        by_source.setdefault(r["source_path"], {})[r["label"]] = r
    assert len(by_source) == 9
    for pair in by_source.values():
        assert set(pair) == {"0", "1"}
        normal, lesion = pair["0"], pair["1"]
        # Same patient and split: a pair never straddles the validation carve or two splits.
        assert (normal["split"], normal["source_patient_token"]) == (lesion["split"], lesion["source_patient_token"])
        difference = np.asarray(Image.open(out / normal["path"])) != np.asarray(Image.open(out / lesion["path"]))
        assert np.array_equal(difference, np.asarray(Image.open(out / lesion["mask"])) > 0)
    # The folder says how it was made, for the model card of a classifier trained on it.
    from pipeline.training.datasets import read_recipe

    recipe = read_recipe(out)
    assert recipe["design"] == "paired" and recipe["seed"] == 0 and recipe["positive_fraction"] is None
    assert recipe["command"].endswith(f"--out {out} --seed 0 --paired")
    generator = Path(__file__).resolve().parents[1] / "explainers" / "lesions.py"
    assert recipe["generator_sha256"] == hashlib.sha256(generator.read_bytes()).hexdigest()
    assert read_recipe(source) is None  # a Kermany folder has none
    # The lesion is the one the split design would draw for the same image and seed.
    single = tmp_path / "single"
    assert CliRunner().invoke(app, ["make-lesions", "--data", str(source), "--out", str(single)]).exit_code == 0
    assert read_recipe(single)["design"] == "split" and "--positive-fraction 0.5" in read_recipe(single)["command"]
    for r in csv.DictReader(open(single / "manifest.csv")):
        if r["label"] == "1":
            assert hashlib.sha1((single / r["path"]).read_bytes()).hexdigest() == \
                by_source[r["source_path"]]["1"]["sha1"]


def test_make_lesions_reports_a_missing_manifest(tmp_path):
    result = CliRunner().invoke(app, ["make-lesions", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "manifest.csv" in result.output
