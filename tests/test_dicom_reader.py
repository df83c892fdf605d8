"""The DICOM reader on real radiographs and on files derived from them (tests/derived_dicom.py).

Good variants must decode to the same display as their uncompressed reference
(bit-exact for lossless encodings and header-only edits, within a stated
tolerance for lossy ones, and equal to the PS3.3 C.11 formulas computed here
independently with numpy); bad variants must raise their specific error class
with its reason code and a message free of patient identifiers.
"""
from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid as uids
import pytest
from derived_dicom import (  # noqa: F401  (derived is a fixture)
    CR8_CENTER,
    CR8_SHIFT,
    CR8_WIDTH,
    CR12_CENTER,
    CR12_SHIFT,
    CR12_WIDTH,
    MODALITY_LUT_CENTER,
    MODALITY_LUT_WIDTH,
    RESCALE_INTERCEPT,
    RESCALE_SLOPE,
    RG1_CENTER,
    RG1_WIDTH,
    VARIANTS,
    VOI_LUT_BITS,
    DerivedDicom,
    derived,
    modality_lut_table,
    voi_lut_8bit_table,
    voi_lut_table,
)
from pydicom.pixels import pixel_array

from dicom_io.errors import (
    BadDimensionsError,
    ColourImageError,
    CorruptPixelDataError,
    DicomInputError,
    InvalidHeaderError,
    MissingPixelDataError,
    MultiFrameError,
    NotAnImageError,
    TruncatedPixelDataError,
    UnreadableFileError,
    UnsupportedTransferSyntaxError,
)
from dicom_io.reader import check_header, read_radiograph
from dicom_io.source import SourceImage

RG1_SHAPE = (1955, 1841)
SIIM_SHAPE = (1024, 1024)
# Patient identifiers of the two shared files; no error message may contain them.
PATIENT_IDENTIFIERS = ("CompressedSamples", "9RG1", "26210", "16d7f894")


# --------------------------------------------------------------------------- helpers


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window to [0, 1], in float64."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def read_valid(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read, and check what every good decode must satisfy."""
    image = read_radiograph(path)
    display = image.display
    assert isinstance(image, SourceImage)
    assert display.dtype == np.float32
    assert display.shape == shape
    assert np.isfinite(display).all()
    assert display.min() >= 0.0 and display.max() <= 1.0
    assert display.max() - display.min() > 0.5, "display should use most of [0, 1]"
    return display


@pytest.fixture(scope="module")
def rg1_stored(cr_16bit: Path) -> np.ndarray:
    return pixel_array(cr_16bit).astype(np.float64)


@pytest.fixture(scope="module")
def reference(derived: DerivedDicom):
    """Displays of the uncompressed references, decoded once per module."""
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = read_radiograph(derived.path(name)).display
        return cache[name]

    return get


# --------------------------------------------------------------------------- the shared files


def test_shared_files_decode(shared_dicom_files: list[Path]) -> None:
    shapes = {"RG1_UNCR.dcm": RG1_SHAPE, "siim_cr_chest_jpeg_baseline.dcm": SIIM_SHAPE}
    for path in shared_dicom_files:
        image = read_radiograph(path)
        read_valid(path, shapes[path.name])
        assert image.path == path
        assert (image.rows, image.columns) == shapes[path.name]
        assert image.sop_instance_uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def test_rg1_follows_the_standard_window_and_is_inverted(cr_16bit: Path, rg1_stored: np.ndarray) -> None:
    # RG1 is MONOCHROME1 with window 15000/30000: display = 1 - LINEAR window.
    display = read_radiograph(cr_16bit).display
    np.testing.assert_allclose(display, 1.0 - linear_window(rg1_stored, RG1_CENTER, RG1_WIDTH), atol=1e-6)


@pytest.mark.parametrize(("mono1", "mono2"), [("cr16", "cr16_mono2"), ("jpeg8_mono1", "jpeg8")])
def test_monochrome1_is_inverted(derived: DerivedDicom, mono1: str, mono2: str) -> None:
    # Same pixels, only PhotometricInterpretation differs: the displays are complements.
    a = read_radiograph(derived.path(mono1)).display
    b = read_radiograph(derived.path(mono2)).display
    np.testing.assert_allclose(a, 1.0 - b, atol=1e-6)


def test_reading_a_dataset_gives_the_file_result_and_leaves_it_unchanged(cr_16bit: Path) -> None:
    ds = pydicom.dcmread(cr_16bit)
    before = (bytes(ds.PixelData), ds.PhotometricInterpretation, ds.WindowCenter, len(ds))
    image = read_radiograph(ds)
    assert image.path is None and image.dataset is ds
    assert (bytes(ds.PixelData), ds.PhotometricInterpretation, ds.WindowCenter, len(ds)) == before
    np.testing.assert_array_equal(image.display, read_radiograph(cr_16bit).display)


def test_rg1_decodes_fast(cr_16bit: Path) -> None:
    read_radiograph(cr_16bit)  # warm the page cache and imports
    best = min(_timed(lambda: read_radiograph(cr_16bit)) for _ in range(3))
    assert best < 0.5, f"RG1 read + LUT took {best:.3f} s"


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- transfer syntaxes, lossless

LOSSLESS = [  # (variant, its transfer syntax, reference it must equal bit for bit, shape)
    ("cr16_jpeg_lossless_sv1", uids.JPEGLosslessSV1, "cr16", RG1_SHAPE),
    ("cr16_jpeg_lossless_p14", uids.JPEGLossless, "cr16", RG1_SHAPE),
    ("cr16_jpegls_lossless", uids.JPEGLSLossless, "cr16", RG1_SHAPE),
    ("cr16_rle", uids.RLELossless, "cr16", RG1_SHAPE),
    ("cr16_j2k_lossless", uids.JPEG2000Lossless, "cr16", RG1_SHAPE),
    ("cr16_implicit", uids.ImplicitVRLittleEndian, "cr16", RG1_SHAPE),
    ("cr16_big_endian", uids.ExplicitVRBigEndian, "cr16", RG1_SHAPE),
    ("cr16_deflated", uids.DeflatedExplicitVRLittleEndian, "cr16", RG1_SHAPE),
    ("cr12_jpeg_lossless_sv1", uids.JPEGLosslessSV1, "cr12_native", RG1_SHAPE),
    ("cr16_signed", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE),
    ("cr16_signed_jpegls", uids.JPEGLSLossless, "cr16", RG1_SHAPE),
    ("cr16_signed_j2k_lossless", uids.JPEG2000Lossless, "cr16", RG1_SHAPE),
    ("cr16_signed_rle", uids.RLELossless, "cr16", RG1_SHAPE),
    ("jpeg8_rle", uids.RLELossless, "jpeg8_native", SIIM_SHAPE),
    ("jpeg8_j2k_lossless", uids.JPEG2000Lossless, "jpeg8_native", SIIM_SHAPE),
    ("jpeg8_jpegls_lossless", uids.JPEGLSLossless, "jpeg8_native", SIIM_SHAPE),
    # Header-only edits that must not change the display.
    ("cr16_two_windows", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE),
    ("dx_for_presentation", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE),
    ("mg_for_presentation", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE),
    ("sc_grayscale", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE),
]


@pytest.mark.parametrize(("name", "transfer_syntax", "ref", "shape"), LOSSLESS, ids=[v[0] for v in LOSSLESS])
def test_lossless_variant_equals_reference(derived, reference, name, transfer_syntax, ref, shape) -> None:
    path = derived.path(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    np.testing.assert_array_equal(read_valid(path, shape), reference(ref))


# --------------------------------------------------------------------------- transfer syntaxes, lossy

LOSSY = [  # (variant, transfer syntax, reference, shape, max |diff|, mean |diff|)
    ("cr16_jpegls_near", uids.JPEGLSNearLossless, "cr16", RG1_SHAPE, 1e-4, 1e-4),  # NEAR=2 of 30000
    ("cr16_j2k_lossy", uids.JPEG2000, "cr16", RG1_SHAPE, 0.05, 0.005),
    ("cr8_jpeg_baseline", uids.JPEGBaseline8Bit, "cr8_native", RG1_SHAPE, 0.15, 0.006),
    ("cr12_jpeg_extended", uids.JPEGExtended12Bit, "cr12_native", RG1_SHAPE, 0.02, 0.002),
    # The shared JPEG against dcmdjpeg's decode of it: IDCTs differ by 1 grey level.
    ("jpeg8", uids.JPEGBaseline8Bit, "jpeg8_native", SIIM_SHAPE, 0.02, 0.005),
    # Fewer stored bits or a rescale: the same image up to quantisation.
    ("cr12_native", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE, 1e-3, 2e-4),
    ("cr8_native", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE, 0.01, 0.003),
    ("cr16_rescaled", uids.ExplicitVRLittleEndian, "cr16", RG1_SHAPE, 1e-4, 1e-4),
]


@pytest.mark.parametrize(("name", "transfer_syntax", "ref", "shape", "max_diff", "mean_diff"), LOSSY,
                         ids=[v[0] for v in LOSSY])
def test_lossy_variant_is_close_to_reference(derived, reference, name, transfer_syntax, ref, shape,
                                             max_diff, mean_diff) -> None:
    path = derived.path(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    diff = np.abs(read_valid(path, shape).astype(np.float64) - reference(ref))
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


# --------------------------------------------------------------------------- LUTs and windows, against the formulas


def test_bit_depth_variants_follow_their_windows(derived, rg1_stored) -> None:
    stored12 = np.floor(rg1_stored / 2**CR12_SHIFT)
    stored8 = np.floor(rg1_stored / 2**CR8_SHIFT)
    np.testing.assert_allclose(read_valid(derived.path("cr12_native"), RG1_SHAPE),
                               1.0 - linear_window(stored12, CR12_CENTER, CR12_WIDTH), atol=1e-6)
    np.testing.assert_allclose(read_valid(derived.path("cr8_native"), RG1_SHAPE),
                               1.0 - linear_window(stored8, CR8_CENTER, CR8_WIDTH), atol=1e-6)


def test_rescale_is_applied_before_the_window(derived, rg1_stored) -> None:
    modality = rg1_stored * RESCALE_SLOPE + RESCALE_INTERCEPT
    center, width = RG1_CENTER * RESCALE_SLOPE + RESCALE_INTERCEPT, RG1_WIDTH * RESCALE_SLOPE
    np.testing.assert_allclose(read_valid(derived.path("cr16_rescaled"), RG1_SHAPE),
                               1.0 - linear_window(modality, center, width), atol=1e-6)


def test_modality_lut_sequence(derived, rg1_stored) -> None:
    modality = modality_lut_table()[rg1_stored.astype(np.int64)].astype(np.float64)
    np.testing.assert_allclose(read_valid(derived.path("cr16_modality_lut"), RG1_SHAPE),
                               1.0 - linear_window(modality, MODALITY_LUT_CENTER, MODALITY_LUT_WIDTH), atol=1e-6)


def test_voi_lut_sequence_is_preferred_to_the_window(derived, rg1_stored) -> None:
    expected = 1.0 - voi_lut_table()[rg1_stored.astype(np.int64)] / (2**VOI_LUT_BITS - 1)
    np.testing.assert_allclose(read_valid(derived.path("cr16_voi_lut"), RG1_SHAPE), expected, atol=1e-6)


def test_8bit_voi_luts_with_more_than_256_entries(derived, rg1_stored) -> None:
    # pydicom 3.0.2's apply_voi wraps inputs above 255 for these; the reader must not.
    expected = 1.0 - voi_lut_8bit_table(2**15)[rg1_stored.astype(np.int64)] / 255.0
    np.testing.assert_allclose(read_valid(derived.path("cr16_voi_lut_8bit"), RG1_SHAPE), expected, atol=1e-6)
    stored12 = (rg1_stored.astype(np.int64) >> CR12_SHIFT)
    expected = 1.0 - voi_lut_8bit_table(2**12)[stored12] / 255.0
    np.testing.assert_allclose(read_valid(derived.path("cr12_voi_lut_8bit_us"), RG1_SHAPE), expected, atol=1e-6)


def test_sigmoid_window(derived, rg1_stored) -> None:
    expected = 1.0 - 1.0 / (1.0 + np.exp(-4.0 * (rg1_stored - RG1_CENTER) / RG1_WIDTH))
    np.testing.assert_allclose(read_valid(derived.path("cr16_sigmoid"), RG1_SHAPE), expected, atol=1e-6)


def test_no_window_uses_the_robust_percentile_range(derived, rg1_stored) -> None:
    low, high = np.percentile(rg1_stored, [0.5, 99.5])
    expected = 1.0 - np.clip((rg1_stored - low) / (high - low), 0.0, 1.0)
    display = read_valid(derived.path("cr16_no_window"), RG1_SHAPE)
    np.testing.assert_allclose(display, expected, atol=1e-5)
    # About 0.5 % of pixels saturate at each end, by construction.
    assert 0.002 < np.mean(display <= 0.0) < 0.01 and 0.002 < np.mean(display >= 1.0) < 0.01


def test_invalid_window_falls_back_to_robust_range_with_a_warning(derived, reference, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dicom_io.reader"):
        display = read_valid(derived.path("cr16_bad_window"), RG1_SHAPE)
    np.testing.assert_array_equal(display, reference("cr16_no_window"))
    assert any("WindowWidth" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------- bad input

BAD = [  # (variant, exact error class, reason code)
    ("sr", NotAnImageError, "not_an_image"),
    ("presentation_state", NotAnImageError, "not_an_image"),
    ("encapsulated_pdf", NotAnImageError, "not_an_image"),
    ("seg_like", NotAnImageError, "not_an_image"),
    ("rgb", ColourImageError, "colour_image"),
    ("palette_color", ColourImageError, "colour_image"),
    ("multiframe", MultiFrameError, "multi_frame"),
    ("ct_slice", MultiFrameError, "not_projection_radiograph"),
    ("truncated_native", TruncatedPixelDataError, "truncated_pixel_data"),
    ("truncated_jpeg_lossless", TruncatedPixelDataError, "truncated_pixel_data"),
    ("corrupt_jpeg_lossless", CorruptPixelDataError, "corrupt_pixel_data"),
    ("missing_pixel_data", MissingPixelDataError, "missing_pixel_data"),
    ("zero_rows", BadDimensionsError, "zero_dimensions"),
    ("absurd_rows", BadDimensionsError, "too_large"),
    ("over_pixel_budget", BadDimensionsError, "too_large"),
    ("bits_allocated_32", BadDimensionsError, "bad_bit_depth"),
    ("bits_stored_17", BadDimensionsError, "bad_bit_depth"),
    ("missing_photometric", InvalidHeaderError, "missing_attribute"),
    ("intercept_without_slope", InvalidHeaderError, "invalid_attribute"),
    ("unsupported_ts", UnsupportedTransferSyntaxError, "unsupported_transfer_syntax"),
    ("no_dicm_prefix", UnreadableFileError, "not_dicom"),
    ("text_file", UnreadableFileError, "not_dicom"),
    ("empty_file", UnreadableFileError, "empty_file"),
]
# Detectable from a header read with stop_before_pixels (what a pre-check sees).
NEEDS_PIXELS_OR_FILE = {"truncated_native", "truncated_jpeg_lossless", "corrupt_jpeg_lossless",
                        "missing_pixel_data", "no_dicm_prefix", "text_file", "empty_file"}


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize(("name", "error", "reason"), BAD, ids=[v[0] for v in BAD])
def test_bad_input_raises_its_typed_error(derived, name, error, reason) -> None:
    path = derived.path(name)
    with pytest.raises(DicomInputError) as caught:
        read_radiograph(path)
    assert type(caught.value) is error, f"{name}: {type(caught.value).__name__}: {caught.value}"
    assert caught.value.reason == reason
    message = str(caught.value)
    assert path.name in message
    assert not any(identifier in message for identifier in PATIENT_IDENTIFIERS), message


@pytest.mark.parametrize(("name", "error", "reason"), [v for v in BAD if v[0] not in NEEDS_PIXELS_OR_FILE],
                         ids=[v[0] for v in BAD if v[0] not in NEEDS_PIXELS_OR_FILE])
def test_check_header_rejects_from_the_header_alone(derived, name, error, reason) -> None:
    header = pydicom.dcmread(derived.path(name), stop_before_pixels=True)
    with pytest.raises(error) as caught:
        check_header(header, require_pixel_data=False)
    assert caught.value.reason == reason


@pytest.mark.parametrize("name", ["truncated_native", "missing_pixel_data"])
def test_check_header_checks_pixel_data_when_present(derived, name) -> None:
    ds = pydicom.dcmread(derived.path(name))
    with pytest.raises((TruncatedPixelDataError, MissingPixelDataError)):
        check_header(ds)


@pytest.mark.parametrize("name", [v[0] for v in LOSSLESS + LOSSY] + ["cr16", "cr16_voi_lut", "cr16_modality_lut",
                                                                     "cr12_voi_lut_8bit_us"])
def test_check_header_accepts_good_headers(derived, name) -> None:
    check_header(pydicom.dcmread(derived.path(name), stop_before_pixels=True), require_pixel_data=False)
    check_header(pydicom.dcmread(derived.path(name)))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError) as caught:
        read_radiograph(tmp_path / "absent.dcm")
    assert caught.value.reason == "file_not_found"
    with pytest.raises(UnreadableFileError) as caught:
        read_radiograph(tmp_path)
    assert caught.value.reason == "io_error"


def test_dataset_without_transfer_syntax(cr_16bit: Path) -> None:
    ds = pydicom.dcmread(cr_16bit)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(UnsupportedTransferSyntaxError) as caught:
        read_radiograph(ds)
    assert caught.value.reason == "missing_transfer_syntax"
    assert "SOP Instance" in str(caught.value)


def test_decoder_errors_are_chained(derived) -> None:
    with pytest.raises(CorruptPixelDataError) as caught:
        read_radiograph(derived.path("corrupt_jpeg_lossless"))
    assert caught.value.__cause__ is not None


def test_errors_pickle_with_reason_and_source() -> None:
    error = MultiFrameError("Modality CT", source="x.dcm", reason="not_projection_radiograph")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MultiFrameError
    assert (copy.reason, copy.source, str(copy)) == ("not_projection_radiograph", "x.dcm", "x.dcm: Modality CT")
    with pytest.raises(ValueError):
        MultiFrameError("x", reason="not_a_code")


def test_every_variant_is_exercised() -> None:
    used = {v[0] for v in LOSSLESS + LOSSY + BAD} | {v[2] for v in LOSSLESS + LOSSY}
    used |= {"cr16_mono2", "jpeg8_mono1", "cr16_voi_lut", "cr16_voi_lut_8bit", "cr12_voi_lut_8bit_us",
             "cr16_modality_lut", "cr16_sigmoid",
             "cr16_no_window", "cr16_bad_window"}
    assert set(VARIANTS) == used


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value it meets
def test_corrupted_headers_raise_only_typed_errors(derived, tmp_path: Path) -> None:
    """Random byte edits in real headers: the reader returns an image or a DicomInputError, nothing else."""
    rng = np.random.default_rng(20240826)
    sources = [derived.path("jpeg8").read_bytes(), derived.path("cr12_voi_lut_8bit_us").read_bytes()[:400_000],
               derived.path("sr").read_bytes()]
    target = tmp_path / "mutated.dcm"
    outcomes: dict[str, int] = {}
    for _ in range(200):
        data = bytearray(sources[rng.integers(len(sources))])
        for _ in range(rng.integers(1, 5)):
            position = int(rng.integers(128, min(len(data), 2_500)))  # past the preamble, inside the header
            data[position] = int(rng.integers(256))
        target.write_bytes(bytes(data))
        try:
            read_radiograph(target)
            outcome = "ok"
        except DicomInputError as error:
            outcome = error.reason
            assert not any(identifier in str(error) for identifier in PATIENT_IDENTIFIERS), str(error)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert len(outcomes) > 3, outcomes  # the edits did reach different checks


def test_a_damaged_uid_that_swallowed_the_patient_name_is_not_printed(derived, tmp_path: Path) -> None:
    """A broken length field can make SOPInstanceUID hold the following elements; the message must not echo them."""
    ds = pydicom.dcmread(derived.path("sr"))
    ds.SOPInstanceUID = "1.2.3" + "\x00PN CompressedSamples^RG1 9RG1"
    target = tmp_path / "damaged.dcm"
    ds.save_as(target)
    with pytest.raises(NotAnImageError) as caught:
        read_radiograph(target)
    message = str(caught.value)
    assert "damaged.dcm" in message and "<damaged UID>" in message
    assert not any(identifier in message for identifier in PATIENT_IDENTIFIERS), message


def test_invalid_header_values_are_never_echoed_into_logs(tmp_path: Path, caplog, recwarn) -> None:
    """pydicom's own validation would log "Invalid value for VR DA: '<value>'": patient data in the log."""
    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "siim_cr_chest_jpeg_baseline.dcm"
    if not source.exists():
        pytest.skip("shared DICOM files not present")
    ds = pydicom.dcmread(source)
    secret = "SECRETVALUE7"
    ds.PatientBirthDate = secret  # wrong DA form, as a de-identifier that writes a hash leaves it
    ds.StudyTime = secret
    target = tmp_path / "bad_values.dcm"
    ds.save_as(target)
    with caplog.at_level(logging.DEBUG):
        image = read_radiograph(target)
    assert image.display.size > 0
    assert not any(secret in record.getMessage() for record in caplog.records)
    assert not any(secret in str(warning.message) for warning in recwarn)
