"""The real-traffic cases of ../shared/data/dicom-cases/ (see its README), each with its right outcome.

Read in place; skipped when the folder is absent. Each file goes through the
product path (reader, default rules, engine, writers) and every output through
dciodvfy: explained with zero errors, or refused with the stated typed reason.
"""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import CR_JPEG, SHARED_DATA
from tests.header_cases import dciodvfy_errors, run_case, tiny_engine

CASES_DIR = SHARED_DATA / "dicom-cases"

# file -> (outcome, reason code or reader note expected, default-rules verdict)
EXPECTED = {
    "cr_charset_ir192_misspelled.dcm": ("explained", None, "rule chest radiographs"),
    "cr_jpeg_one_sample_labelled_ybr.dcm": ("explained", "luminance_only", "rule chest radiographs"),
    "cr_mono2_presentation_lut_inverse.dcm": ("explained", "presentation_lut_inverse", "rule chest radiographs"),
    "cr_type2_attributes_absent.dcm": ("explained", None, "rule chest radiographs"),
    "dx_frame_of_reference_pixel_spacing.dcm": ("explained", None, "rule chest radiographs"),
    "mg_pixel_padding_no_window.dcm": ("explained", None, "no_rule_matches (modality MG)"),
    "ot_minimal_header_no_dates.dcm": ("explained", None, "no_rule_matches (modality OT)"),
    "ot_voi_lut_sequence_no_body_part.dcm": ("explained", None, "no_rule_matches (modality OT)"),
    "sc_deflated_no_body_part.dcm": ("explained", None, "no_rule_matches (modality OT)"),
    # Its Study/Series/SOP Instance UIDs are empty: no study to write into. Its LUT
    # rule is checked with UIDs filled in (test_empty_modality_lut_item_is_treated_as_absent).
    "sc_empty_modality_lut_item.dcm": ("refused", "missing_uid", None),
    "sc_jpegls_signed_no_study_uid.dcm": ("refused", "missing_uid", None),
}


@pytest.fixture(scope="module")
def cases_dir():
    if not CASES_DIR.is_dir():
        pytest.skip(f"dicom-cases not found at {CASES_DIR} (set MEDXPLAIN_SHARED_DATA)")
    return CASES_DIR


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("bundle") / "tiny-cxr")


def test_every_case_file_has_an_expected_outcome(cases_dir):
    assert sorted(p.name for p in cases_dir.glob("*.dcm")) == sorted(EXPECTED)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_case(name, cases_dir, engine, tmp_path):
    kind, code, verdict = EXPECTED[name]
    outcome = run_case(engine, cases_dir / name, tmp_path)
    assert outcome.kind == kind, str(outcome)
    if kind == "refused":
        assert outcome.reason == code
        return
    assert outcome.eligibility == verdict
    if code is not None:
        assert any(w.startswith(code + ":") for w in outcome.warnings), outcome.warnings
    assert len(outcome.written) >= 3  # overlay SC, SEG, SR (Grad-CAM has no counterfactual)
    assert outcome.dciodvfy_errors == []
    overlay = next(pydicom.dcmread(p) for p in outcome.written if p.name.startswith(("OT-", "CR-", "DX-", "MG-"))
                   and pydicom.dcmread(p, stop_before_pixels=True).SamplesPerPixel == 3)
    if not overlay.get("BodyPartExamined"):
        assert "Laterality" in overlay  # Type 2C: present (empty = unknown) without a body part
    viewer = _viewer_display(cases_dir / name, tmp_path)
    if viewer is not None:
        # The overlay's grey (where no saliency colour lies over it) is what a viewer shows.
        from dicom_io.overlay import MIN_OVERLAY_WIDTH, overlay_bands

        rows, cols = viewer.shape
        factor = -(-MIN_OVERLAY_WIDTH // cols) if cols < MIN_OVERLAY_WIDTH else 1  # small sources are enlarged
        top, _ = overlay_bands(rows * factor, cols * factor)
        picture = overlay.pixel_array[top:top + rows * factor:factor, ::factor].astype(np.float32) / 255.0
        grey = (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])
        assert grey.sum() > 1000  # enough uncoloured pixels to compare (Grad-CAM colours much of it)
        assert _correlation(picture[..., 0][grey], viewer[grey]) > 0.9


def _viewer_display(path, tmp_path) -> np.ndarray | None:
    """The source as dcmtk's renderer (dcmj2pnm, as used by dcmtk-based viewers) shows it:
    the header's first VOI LUT or window, else min-max; Presentation LUT Shape applied."""
    import shutil
    import subprocess

    from PIL import Image

    if shutil.which("dcmj2pnm") is None:
        return None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    voi = ["+Wl", "1"] if "VOILUTSequence" in ds else ["+Wi", "1"] if "WindowCenter" in ds else ["+Wm"]
    png = tmp_path / "viewer.png"
    proc = subprocess.run(["dcmj2pnm", "+on", *voi, str(path), str(png)], capture_output=True, timeout=120)
    if proc.returncode != 0 or not png.exists():
        return None  # dcmtk cannot render it (e.g. the one-sample YBR JPEG): nothing to compare with
    return np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def reference_display():
    if not CR_JPEG.exists():
        pytest.skip("shared DICOM files not found")
    from dicom_io.reader import read_radiograph

    return read_radiograph(CR_JPEG).display


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_presentation_lut_inverse_displays_like_the_source_it_was_made_from(cases_dir, reference_display):
    """Stored values inverted + Presentation LUT Shape INVERSE = the original display."""
    from dicom_io.reader import read_radiograph

    image = read_radiograph(cases_dir / "cr_mono2_presentation_lut_inverse.dcm")
    rows, cols = image.display.shape
    factor = reference_display.shape[0] // rows  # the case file was made at a lower resolution
    reference = reference_display.reshape(rows, factor, cols, factor).mean(axis=(1, 3))
    assert _correlation(image.display, reference) > 0.95


def test_pixel_padding_is_background_and_out_of_the_window(cases_dir):
    from dicom_io.reader import read_radiograph

    image = read_radiograph(cases_dir / "mg_pixel_padding_no_window.dcm")
    padding = image.dataset.pixel_array == int(image.dataset.PixelPaddingValue)
    assert padding.mean() > 0.5
    assert float(image.display[padding].max()) == 0.0  # shown as background
    anatomy = image.display[~padding]
    low, high = np.percentile(anatomy, [1, 99])
    assert low < 0.1 and high > 0.9  # the anatomy uses the whole display range (was 0.61-1.0)


def test_empty_modality_lut_item_is_treated_as_absent(cases_dir, engine, tmp_path):
    """One rule for every LUT: an unusable item is treated as absent, with a note."""
    ds = pydicom.dcmread(cases_dir / "sc_empty_modality_lut_item.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    outcome = run_case(engine, ds, tmp_path)
    assert outcome.kind == "explained", str(outcome)
    assert any(w.startswith("modality_lut_ignored:") for w in outcome.warnings)
    assert outcome.dciodvfy_errors == []


def test_a_header_window_that_blanks_the_image_falls_back_and_a_blank_image_is_refused(tmp_path):
    from dicom_io.errors import BlankImageError
    from dicom_io.reader import read_radiograph

    if not CR_JPEG.exists():
        pytest.skip("shared DICOM files not found")
    ds = pydicom.dcmread(CR_JPEG)
    ds.WindowCenter, ds.WindowWidth = 5000, 2  # every pixel below the window: one black
    image = read_radiograph(ds)
    assert any(w.startswith("voi_blank:") for w in image.warnings)
    assert float(image.display.max() - image.display.min()) > 0.5
    flat = pydicom.dcmread(CR_JPEG)
    flat.decompress()
    flat.PixelData = bytes(len(flat.PixelData))
    with pytest.raises(BlankImageError) as caught:
        read_radiograph(flat)
    assert caught.value.reason == "blank_image"


def test_for_processing_is_refused_by_the_default_rules(cases_dir):
    from config import load_config
    from pipeline.pacs.rules import eligibility

    ds = pydicom.dcmread(cases_dir / "dx_frame_of_reference_pixel_spacing.dcm", stop_before_pixels=True)
    rules = load_config(None).rules
    assert eligibility(ds, rules)[0]
    ds.PresentationIntentType = "FOR PROCESSING"
    assert eligibility(ds, rules) == (False, "for_processing")
    allowing = [rule.model_copy(update={"for_processing": True}) for rule in rules]
    assert eligibility(ds, allowing)[0]


def test_dciodvfy_helper_sees_errors(cases_dir, tmp_path):
    """The check itself works: a source with a known error is reported."""
    ds = pydicom.dcmread(cases_dir / "cr_type2_attributes_absent.dcm")
    path = tmp_path / "src.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path)  # absent Type 2 attributes are errors in the source itself
