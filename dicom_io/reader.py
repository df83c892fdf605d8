"""Read one DICOM radiograph into a display-ready float32 image.

``read_radiograph`` accepts any single-frame 2-D grayscale image object (CR, DX,
MG, intra-oral, Secondary Capture, other grayscale images) in any transfer syntax
pydicom 3 can decode with the installed plugins (native, deflated, JPEG baseline /
extended / lossless, JPEG-LS, JPEG 2000, RLE). It applies the grayscale pipeline
of PS3.3 C.11 (Modality LUT, then VOI LUT or window, then MONOCHROME1 inversion)
and returns values in [0, 1].

Decoding is pydicom 3's ``pixel_array`` (its pixel handlers with the pylibjpeg,
pyjpegls and Pillow plugins) and a Modality LUT Sequence goes through pydicom's
``apply_modality_lut``. Rescale, windows and VOI LUT Sequences are computed here,
in float32 and straight to [0, 1]: pydicom's windowing works in float64 in the
stored-bit range (twice the memory traffic, then a second normalisation), and
its ``apply_voi`` mis-indexes 8-bit LUTs with more than 256 entries (3.0.2).

``check_header`` applies the same acceptance rules to a header without decoding
pixels, so that a cheap pre-check (e.g. on the Orthanc side) and the reader agree.

Every rejection is a typed ``DicomInputError`` (see ``dicom_io.errors``) whose
message names the file / SOP Instance UID and the attribute, never the patient.
"""
from __future__ import annotations

import logging
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pydicom.uid as uids
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from dicom_io.errors import (
    BadDimensionsError,
    BlankImageError,
    ColourImageError,
    CorruptPixelDataError,
    InvalidHeaderError,
    MissingPixelDataError,
    MultiFrameError,
    NotAnImageError,
    TruncatedPixelDataError,
    UnreadableFileError,
    UnsupportedTransferSyntaxError,
)
from dicom_io.source import SourceImage

logger = logging.getLogger(__name__)

# pydicom's read-time validation (WARN by default) logs and warns with the offending
# *value* ("Invalid value for VR DA: '...'"), which puts patient data in our logs.
# Header values are judged by dicom_io.patient_study instead, which names the
# attribute and never its value.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

# Largest accepted matrix. The biggest real projection detectors are about
# 4,300 x 5,300 (large-field mammography); 16,384 per side and 64 Mpx (256 MiB
# as float32) leave ample head-room while refusing headers that would make the
# worker allocate gigabytes for a corrupt or hostile file.
MAX_SIDE = 16_384
MAX_PIXELS = 64 * 2**20
# Smallest accepted side. Below this a "radiograph" is an icon or a thumbnail:
# nothing a chest classifier can read, and too small for the burned-in
# "NOT FOR DIAGNOSTIC USE" labels of the outputs.
MIN_SIDE = 64
# A display whose (non-padding) pixels all lie within this range shows one grey
# on an 8-bit screen: a blank image.
BLANK_RANGE = 1.0 / 256

# Robust display range used when the header carries no window and no VOI LUT.
ROBUST_PERCENTILES = (0.5, 99.5)
# Percentiles are estimated on a strided sample of about this many pixels: far
# below a grey level of error on radiographs, and cheap on 40 Mpx mammograms.
_PERCENTILE_SAMPLE = 1_000_000

# Slices of cross-sectional volumes: single-frame and grayscale, but not
# projection radiographs, so an explanation trained on radiographs means nothing.
_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT", "OPT", "OCT"})
_CROSS_SECTIONAL_SOP_CLASSES = frozenset(
    {
        uids.CTImageStorage,
        uids.EnhancedCTImageStorage,
        uids.LegacyConvertedEnhancedCTImageStorage,
        uids.DICOSCTImageStorage,
        uids.MRImageStorage,
        uids.EnhancedMRImageStorage,
        uids.EnhancedMRColorImageStorage,
        uids.LegacyConvertedEnhancedMRImageStorage,
        uids.PositronEmissionTomographyImageStorage,
        uids.EnhancedPETImageStorage,
        uids.LegacyConvertedEnhancedPETImageStorage,
        uids.BreastTomosynthesisImageStorage,
        uids.XRay3DAngiographicImageStorage,
        uids.XRay3DCraniofacialImageStorage,
        uids.OphthalmicTomographyImageStorage,
    }
)

# YBR photometrics with a single sample are luminance only: JPEG decoders return
# the Y component, which is grey in MONOCHROME2 sense (a known mislabelling of
# one-component JPEG by some converters).
_LUMINANCE_ONLY_PHOTOMETRICS = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"})
# Raw detector data (PS3.3 C.8.11.1.1.1 Presentation Intent Type): not what a
# radiologist sees; the default rules refuse it (pipeline.pacs.rules, reason for_processing).
FOR_PROCESSING_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
})

_COLOUR_PHOTOMETRICS = frozenset(
    {"RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420",
     "YBR_ICT", "YBR_RCT", "ARGB", "CMYK", "HSV"}
)
_GRAYSCALE_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})

# What pydicom and the decoder plugins raise on malformed input. Listed rather
# than caught as Exception so that a genuine bug still surfaces as itself.
_PYDICOM_ERRORS = (
    BytesLengthException,
    NotImplementedError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RuntimeError,
    EOFError,
    OverflowError,
    struct.error,
)

# Patient attributes whose values must never reach a message, even inside the
# text of a chained pydicom or decoder error.
_IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate")

_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little / big endian


# --------------------------------------------------------------------------- public API


def read_radiograph(source: str | os.PathLike[str] | Dataset) -> SourceImage:
    """Decode a single-frame grayscale radiograph into a [0, 1] float32 display image.

    ``source`` is a path to a DICOM Part 10 file or an already parsed pydicom
    ``Dataset`` (with ``file_meta.TransferSyntaxUID``). The dataset is not modified.
    Raises a subclass of ``DicomInputError`` for any input that is not usable.
    """
    if isinstance(source, Dataset):
        ds, path = source, None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        ds = _read_file(path)
    else:
        raise TypeError(f"read_radiograph expects a path or a pydicom Dataset, not {type(source).__name__}")

    check_header(ds)
    where = _describe(ds, path)
    notes: list[str] = []
    ds = _without_unparseable(ds, where, notes)
    photometric = _photometric(ds, where)
    if photometric in _LUMINANCE_ONLY_PHOTOMETRICS:
        _note(notes, where, "luminance_only", f"PhotometricInterpretation {photometric} with one sample: "
              "read as MONOCHROME2 (the decoder returns the luminance)")
    if is_for_processing(ds):
        _note(notes, where, "for_processing", "Presentation Intent FOR PROCESSING: raw detector data, "
              "not the image a viewer shows")
    raw = _decode(ds, where)
    padding = _padding_mask(raw, ds, where, notes)
    values = _apply_modality_lut(raw, ds, where, notes)
    display = _apply_voi(values, ds, where, notes, padding)
    if _inverted(ds, photometric, where, notes):
        np.subtract(np.float32(1.0), display, out=display)
    if padding is not None:
        display[padding] = 0.0  # padding is background: black, whatever the photometric
    return SourceImage(dataset=ds, display=display, path=path, warnings=tuple(notes))


def is_for_processing(ds: Dataset) -> bool:
    """True for raw detector data: a "For Processing" SOP Class or Presentation Intent Type."""
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    return intent == "FOR PROCESSING" or str(_sop_class(ds) or "") in FOR_PROCESSING_SOP_CLASSES


def _note(notes: list[str], where: str, code: str, text: str) -> None:
    """Record a reader decision on a doubtful header: logged and kept on the SourceImage."""
    logger.warning("%s: %s: %s", where, code, text)
    notes.append(f"{code}: {text}")


def _inverted(ds: Dataset, photometric: str, where: str, notes: list[str]) -> bool:
    """Whether the display is inverted: MONOCHROME1, or Presentation LUT Shape INVERSE.

    PS3.3 C.11.6: the Presentation LUT Shape applies after the VOI LUT; INVERSE
    means that the minimum output is white. DX/MG objects pair MONOCHROME1 with
    INVERSE (C.8.11.7) to describe one and the same inversion, so it is applied
    once. MONOCHROME2 with INVERSE is inverted (dcmtk and OHIF do so; a viewer
    that ignores the shape shows white lungs) and noted. MONOCHROME1 with
    IDENTITY contradicts itself: the photometric wins (as most viewers do) and
    the conflict is noted. Other values are ignored with a note.
    """
    monochrome1 = photometric == "MONOCHROME1"
    try:
        shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    except _PYDICOM_ERRORS:
        shape = "?"
    if shape in ("", "IDENTITY") and not (monochrome1 and shape == "IDENTITY"):
        return monochrome1
    if shape == "INVERSE":
        if not monochrome1:
            _note(notes, where, "presentation_lut_inverse",
                  "Presentation LUT Shape INVERSE on MONOCHROME2: the display is inverted")
        return True
    if shape == "IDENTITY":
        _note(notes, where, "presentation_lut_conflict",
              "Presentation LUT Shape IDENTITY on MONOCHROME1: inverted as MONOCHROME1 requires")
        return True
    _note(notes, where, "presentation_lut_ignored", "Presentation LUT Shape is not IDENTITY or INVERSE; ignored")
    return monochrome1


def _padding_mask(raw: np.ndarray, ds: Dataset, where: str, notes: list[str]) -> np.ndarray | None:
    """Pixels that are padding (PS3.3 C.7.5.1.1.2), in stored values; None without padding.

    Pixel Padding Value alone marks the pixels equal to it; with Pixel Padding
    Range Limit, every stored value between the two (inclusive). Padding is
    left out of the automatic window and displayed as background (black).
    """
    if ds.get("PixelPaddingValue") in (None, "", b""):
        return None
    try:
        value = int(_first_value(ds.PixelPaddingValue))
        limit = ds.get("PixelPaddingRangeLimit")
        limit = int(_first_value(limit)) if limit not in (None, "") else value
    except (*_PYDICOM_ERRORS, TypeError) as exc:
        _note(notes, where, "padding_ignored", f"unreadable PixelPaddingValue / PixelPaddingRangeLimit "
              f"({type(exc).__name__}); no padding assumed")
        return None
    low, high = min(value, limit), max(value, limit)
    mask = (raw >= low) & (raw <= high) if low != high else raw == low
    if not mask.any():
        return None
    if mask.all():
        raise BlankImageError("every pixel is padding (PixelPaddingValue / PixelPaddingRangeLimit)", source=where)
    return mask


def check_header(ds: Dataset, *, require_pixel_data: bool = True) -> None:
    """Raise the ``DicomInputError`` that ``read_radiograph`` would raise for this header.

    Decodes no pixels. With ``require_pixel_data=False`` the header may come from
    a read with ``stop_before_pixels=True``: presence and length of Pixel Data are
    then not checked (decoding can still fail later on corrupt compressed data).
    """
    where = _describe(ds, None)
    _check_parseable(ds, where)
    _check_is_image(ds, where)
    _check_projection(ds, where)
    _check_grayscale(ds, where)
    _check_single_frame(ds, where)
    _check_dimensions(ds, where)
    _rescale(ds, where)
    transfer_syntax = _check_transfer_syntax(ds, where)
    _check_identifiers(ds, where)
    if require_pixel_data:
        _check_pixel_data(ds, transfer_syntax, where)


def _check_identifiers(ds: Dataset, where: str) -> None:
    """Study, Series and SOP Instance UIDs and the SOP Class UID: present and valid (PS3.5 9.1).

    Outputs go into the source's study and reference its series and instance:
    without these UIDs there is no study to write into, and an invalid one would
    be copied into every reference. Refused here, at read time.
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        try:
            value = ds.get(keyword)
        except _PYDICOM_ERRORS:
            value = "?"
        text = str(value or "").strip().rstrip("\x00")
        if not text:
            raise InvalidHeaderError(f"no {keyword}: there is no study/series/instance to write results into",
                                     source=where, reason="missing_uid")
        if isinstance(value, (MultiValue, list, tuple)) or not _is_plain_uid(text) \
                or any(part != "0" and part.startswith("0") for part in text.split(".")):
            raise InvalidHeaderError(f"{keyword} is not a valid UID", source=where, reason="invalid_uid")


# --------------------------------------------------------------------------- reading


def _read_file(path: Path) -> Dataset:
    where = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise UnreadableFileError("file does not exist", source=where, reason="file_not_found") from exc
    except OSError as exc:
        raise UnreadableFileError(f"cannot stat file ({type(exc).__name__})", source=where, reason="io_error") from exc
    if not path.is_file():
        raise UnreadableFileError("not a regular file", source=where, reason="io_error")
    if size == 0:
        raise UnreadableFileError("file is empty (0 bytes)", source=where, reason="empty_file")

    try:
        ds = dcmread(path)
    except InvalidDicomError as exc:
        # Raw datasets without the 128-byte preamble and 'DICM' prefix are refused
        # too: PACS and DICOM nodes always deliver Part 10 files, and force-reading
        # arbitrary bytes would turn garbage into a plausible-looking dataset.
        raise UnreadableFileError(
            "not a DICOM Part 10 file (no 'DICM' prefix / File Meta Information)",
            source=where, reason="not_dicom",
        ) from exc
    except OSError as exc:
        if exc.errno is not None:
            raise UnreadableFileError(f"cannot read file ({exc.strerror})", source=where, reason="io_error") from exc
        # pydicom also raises a bare OSError for malformed data ("No tag to read at ...").
        raise UnreadableFileError("cannot parse DICOM (OSError)", source=where, reason="unparseable") from exc
    except _PYDICOM_ERRORS as exc:
        # Only the error's type: its text can quote raw header bytes, patient name included.
        raise UnreadableFileError(
            f"cannot parse DICOM ({type(exc).__name__})", source=where, reason="unparseable"
        ) from exc

    if "PixelData" not in ds:
        _raise_if_cut_inside_pixel_data(path)
    if len(ds) == 0:
        raise UnreadableFileError(
            "no data elements after the File Meta Information (truncated or corrupt file)",
            source=where, reason="unparseable",
        )
    return ds


def _raise_if_cut_inside_pixel_data(path: Path) -> None:
    """Tell a file cut inside encapsulated Pixel Data from one that has none.

    When a file ends inside an undefined-length element (encapsulated Pixel Data),
    pydicom only warns and drops the element, and with it everything read so far.
    Re-reading the header up to Pixel Data and looking at the next tag tells the
    two cases apart. Only runs on this error path, so the normal read stays single.
    """
    with path.open("rb") as fp:
        try:
            header = dcmread(fp, stop_before_pixels=True)
        except (InvalidDicomError, OSError, *_PYDICOM_ERRORS):
            return  # Not diagnosable further: the caller reports what the full read found.
        next_tag = fp.read(4)
    if next_tag in _PIXEL_DATA_TAG_BYTES:
        raise TruncatedPixelDataError(
            "file ends inside the encapsulated Pixel Data (7FE0,0010)", source=_describe(header, path)
        )


def _decode(ds: Dataset, where: str) -> np.ndarray:
    view = ds
    if _photometric(ds, where) in _LUMINANCE_ONLY_PHOTOMETRICS:
        # pydicom refuses YBR with one sample; decode a view that says what it is,
        # with its own element (the source dataset is left as it came).
        view = Dataset({tag: ds.get_item(tag) for tag in ds.keys()})
        view.file_meta = ds.file_meta
        view[0x00280004] = DataElement(0x00280004, "CS", "MONOCHROME2")
    try:
        raw = pixel_array(view)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"the decoder for {_transfer_syntax(ds).name} cannot decode this encoding ({_cause(exc, ds)})",
            source=where,
        ) from exc
    except _PYDICOM_ERRORS as exc:
        raise CorruptPixelDataError(f"cannot decode Pixel Data ({_cause(exc, ds)})", source=where) from exc

    expected = (int(ds.Rows), int(ds.Columns))
    if raw.shape != expected or raw.dtype.kind not in "iu":
        raise CorruptPixelDataError(
            f"decoded Pixel Data has shape {raw.shape} and dtype {raw.dtype}, header says {expected} integers",
            source=where,
        )
    return raw


# --------------------------------------------------------------------------- header rules


def _check_parseable(ds: Dataset, where: str) -> None:
    """Convert every element now, so that a corrupt one fails here, once, with its tag.

    pydicom converts raw elements lazily: without this, a malformed value would
    raise an untyped pydicom error at whichever later access touched it first,
    possibly in a writer long after the reader accepted the file. An unparseable
    element the image depends on (File Meta, the image pixel / LUT group 0028,
    Pixel Data, the identifying UIDs) refuses the file; any other (a patient
    weight of ``abc``) is left out of the image that ``read_radiograph``
    returns, with a note (``_without_unparseable``).
    """
    for part in (getattr(ds, "file_meta", None), ds):
        for tag, exc in _unparseable_elements(part) if part is not None else ():
            if part is ds and not _essential(tag):
                continue
            # Only the error's type: its text can quote raw bytes of the header.
            raise UnreadableFileError(
                f"element {tag} cannot be parsed ({type(exc).__name__})", source=where, reason="unparseable"
            ) from exc


_ESSENTIAL_GROUPS = frozenset({0x0002, 0x0028, 0x7FE0})
_ESSENTIAL_TAGS = frozenset({0x00080005, 0x00080016, 0x00080018, 0x00080060, 0x00080068, 0x0020000D, 0x0020000E})


def _essential(tag) -> bool:
    return tag.group in _ESSENTIAL_GROUPS or int(tag) in _ESSENTIAL_TAGS


def _unparseable_elements(dataset: Dataset) -> list[tuple[object, BaseException]]:
    """(top-level tag, error) of every element that cannot be converted, nested items included."""
    found = []
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
            items = element.value if element.VR == "SQ" else ()
            for item in items:
                nested = _unparseable_elements(item)
                if nested:
                    raise nested[0][1]
        except _PYDICOM_ERRORS as exc:
            found.append((tag, exc))
    return found


def _without_unparseable(ds: Dataset, where: str, notes: list[str]) -> Dataset:
    """``ds``, or a copy without the unparseable elements that ``_check_parseable`` let pass."""
    bad = {tag for tag, _ in _unparseable_elements(ds)}
    if not bad:
        return ds
    for tag in sorted(bad):
        keyword = keyword_for_tag(tag) or "private or unknown"
        _note(notes, where, "unparseable_left_out", f"element {tag} ({keyword}) cannot be parsed; left out")
    clean = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if tag not in bad})
    clean.file_meta = ds.file_meta
    if getattr(ds, "filename", None):
        clean.filename = ds.filename
    return clean


def _check_is_image(ds: Dataset, where: str) -> None:
    sop_class = _sop_class(ds)
    kind = _storage_kind(sop_class)
    if kind == "non-image":
        raise NotAnImageError(f"SOP Class '{sop_class.name}' ({sop_class}) is not an image", source=where)
    if "PixelData" in ds or "Rows" in ds or "Columns" in ds:
        return
    if kind == "image":
        # An image class with none of its image attributes: a damaged object
        # (pydicom stops quietly at a corrupt element length), not a non-image.
        raise MissingPixelDataError(
            f"SOP Class '{sop_class.name}' but no Pixel Data, Rows or Columns (damaged or header-only object)",
            source=where,
        )
    if sop_class is None:
        # No SOP Class anywhere and no image attributes: not a composite object
        # at all, typically garbage after a valid-looking preamble.
        raise UnreadableFileError(
            "no SOP Class UID, Pixel Data, Rows or Columns: not a usable DICOM object", source=where,
            reason="unparseable",
        )
    raise NotAnImageError("no Pixel Data and no Rows/Columns: not an image object", source=where)


def _storage_kind(sop_class: UID | None) -> str:
    """'image', 'non-image' or 'unknown', from pydicom's registry of standard SOP Class names.

    Standard storage classes that are not "... Image Storage" (SR, SEG,
    presentation states, encapsulated documents, waveforms, RT objects,
    parametric maps) are not images. Private or unknown classes are judged by
    their pixel attributes instead.
    """
    if sop_class is None or sop_class.type != "SOP Class" or "Storage" not in sop_class.name:
        return "unknown"
    return "image" if "Image Storage" in sop_class.name else "non-image"


def _check_projection(ds: Dataset, where: str) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in _CROSS_SECTIONAL_MODALITIES:
        raise MultiFrameError(
            f"Modality {modality} is not a projection radiograph (a slice of a volume)",
            source=where, reason="not_projection_radiograph",
        )
    sop_class = _sop_class(ds)
    if sop_class in _CROSS_SECTIONAL_SOP_CLASSES:
        raise MultiFrameError(
            f"SOP Class '{sop_class.name}' is not a projection radiograph",
            source=where, reason="not_projection_radiograph",
        )


def _check_grayscale(ds: Dataset, where: str) -> None:
    samples = _required_int(ds, "SamplesPerPixel", where)
    photometric = _photometric(ds, where)
    if samples == 1 and photometric in _LUMINANCE_ONLY_PHOTOMETRICS:
        return  # luminance only: grey (read_radiograph notes it)
    if samples != 1 or photometric in _COLOUR_PHOTOMETRICS:
        raise ColourImageError(
            f"SamplesPerPixel {samples}, PhotometricInterpretation {photometric}: not a grayscale image",
            source=where,
        )
    if photometric not in _GRAYSCALE_PHOTOMETRICS:
        raise InvalidHeaderError(
            f"PhotometricInterpretation '{photometric}' is not MONOCHROME1 or MONOCHROME2",
            source=where, reason="invalid_attribute",
        )


def _check_single_frame(ds: Dataset, where: str) -> None:
    frames = _optional_int(ds, "NumberOfFrames", where)
    if frames is None:
        return  # Absent or empty: a single-frame IOD.
    if frames > 1:
        raise MultiFrameError(f"NumberOfFrames is {frames}; only single-frame images are read", source=where)
    if frames < 1:
        raise InvalidHeaderError(f"NumberOfFrames is {frames}", source=where, reason="invalid_attribute")


def _check_dimensions(ds: Dataset, where: str) -> None:
    rows = _required_int(ds, "Rows", where)
    columns = _required_int(ds, "Columns", where)
    if rows < 1 or columns < 1:
        raise BadDimensionsError(f"Rows x Columns is {rows} x {columns}", source=where, reason="zero_dimensions")
    if rows < MIN_SIDE or columns < MIN_SIDE:
        raise BadDimensionsError(
            f"Rows x Columns is {rows} x {columns}; the smallest radiograph read is {MIN_SIDE} per side",
            source=where, reason="too_small",
        )
    if rows > MAX_SIDE or columns > MAX_SIDE or rows * columns > MAX_PIXELS:
        raise BadDimensionsError(
            f"Rows x Columns is {rows} x {columns}; the limit is {MAX_SIDE} per side and {MAX_PIXELS} pixels",
            source=where, reason="too_large",
        )

    if "PixelData" not in ds and ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        raise BadDimensionsError(
            "float pixel data (FloatPixelData / DoubleFloatPixelData) is not a radiograph encoding",
            source=where, reason="bad_bit_depth",
        )
    bits_allocated = _required_int(ds, "BitsAllocated", where)
    bits_stored = _required_int(ds, "BitsStored", where)
    if bits_allocated not in (8, 16):
        raise BadDimensionsError(
            f"BitsAllocated is {bits_allocated}; only 8 and 16 are read", source=where, reason="bad_bit_depth"
        )
    if not 1 <= bits_stored <= bits_allocated:
        raise BadDimensionsError(
            f"BitsStored {bits_stored} is not within 1..BitsAllocated ({bits_allocated})",
            source=where, reason="bad_bit_depth",
        )
    representation = _required_int(ds, "PixelRepresentation", where)
    if representation not in (0, 1):
        raise InvalidHeaderError(
            f"PixelRepresentation is {representation}; must be 0 or 1", source=where, reason="invalid_attribute"
        )


def _rescale(ds: Dataset, where: str) -> tuple[float, float] | None:
    """(slope, intercept) of the Modality LUT module, None if absent; both or neither (PS3.3 C.11.1)."""
    slope = _optional_float(ds, "RescaleSlope", where)
    intercept = _optional_float(ds, "RescaleIntercept", where)
    if slope is None and intercept is None:
        return None
    if slope is None or intercept is None or slope == 0:
        raise InvalidHeaderError(
            f"RescaleSlope {slope} / RescaleIntercept {intercept}: both are required and the slope must not be 0",
            source=where, reason="invalid_attribute",
        )
    return slope, intercept


def _check_transfer_syntax(ds: Dataset, where: str) -> UID:
    transfer_syntax = _transfer_syntax(ds)
    if transfer_syntax is None:
        raise UnsupportedTransferSyntaxError(
            "no (0002,0010) TransferSyntaxUID in the File Meta Information",
            source=where, reason="missing_transfer_syntax",
        )
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"no pixel decoder exists for transfer syntax '{transfer_syntax.name}' ({transfer_syntax})",
            source=where,
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin registered"
        raise UnsupportedTransferSyntaxError(
            f"no decoder plugin installed for '{transfer_syntax.name}' ({missing})",
            source=where, reason="decoder_unavailable",
        )
    return transfer_syntax


def _check_pixel_data(ds: Dataset, transfer_syntax: UID, where: str) -> None:
    if "PixelData" not in ds:
        raise MissingPixelDataError("no (7FE0,0010) Pixel Data element", source=where)
    data = ds.PixelData
    if not data:
        raise MissingPixelDataError("(7FE0,0010) Pixel Data is empty", source=where)
    if transfer_syntax.is_encapsulated:
        return  # Compressed length is unknowable without decoding; the decoder checks it.
    expected = int(ds.Rows) * int(ds.Columns) * (int(ds.BitsAllocated) // 8)
    if len(data) < expected:
        raise TruncatedPixelDataError(
            f"Pixel Data has {len(data)} bytes, Rows x Columns x BitsAllocated needs {expected}", source=where
        )


# --------------------------------------------------------------------------- grayscale pipeline


def _apply_modality_lut(raw: np.ndarray, ds: Dataset, where: str, notes: list[str]) -> np.ndarray:
    """Stored values -> modality values (PS3.3 C.11.1): integer LUT output or float32.

    One rule for every LUT (Modality and VOI alike): an unusable LUT item (empty,
    malformed, constant) is treated as absent, with a note, and the next step of
    the PS3.3 C.11 pipeline applies (here Rescale Slope/Intercept, else identity),
    as dcmtk and most viewers do.
    """
    if ds.get("ModalityLUTSequence"):
        try:
            return apply_modality_lut(raw, ds)
        except _PYDICOM_ERRORS as exc:
            _note(notes, where, "modality_lut_ignored",
                  f"unusable ModalityLUTSequence ({type(exc).__name__}); treated as absent")

    rescale = _rescale(ds, where)
    if rescale is None:
        return raw
    slope, intercept = rescale
    if slope == 1 and intercept == 0:
        return raw
    # float32 holds every 16-bit stored value exactly; pydicom's float64 path
    # would double the memory traffic of the largest array in the pipeline.
    values = raw.astype(np.float32)
    if slope != 1:
        values *= np.float32(slope)
    if intercept != 0:
        values += np.float32(intercept)
    return values


def _apply_voi(values: np.ndarray, ds: Dataset, where: str, notes: list[str],
               padding: np.ndarray | None = None) -> np.ndarray:
    """Modality values -> float32 in [0, 1] via the VOI LUT, the first window, or a robust range.

    A header VOI that shows every (non-padding) pixel as one grey is unusable
    like a malformed one: noted, and the next step applies. An image that is
    blank even in its robust range is refused (``BlankImageError``).
    """
    if ds.get("VOILUTSequence"):
        table = _voi_lut_table(ds, where, notes)
        if table is not None:
            display = _apply_lut_table(values, *table)
            if not _blank(display, padding):
                return display
            _note(notes, where, "voi_blank", "VOILUTSequence maps every pixel to one value; trying the window")
    window = _first_window(ds, where, notes)
    if window is not None:
        display = _apply_window(values, *window)
        if not _blank(display, padding):
            return display
        _note(notes, where, "voi_blank",
              "WindowCenter/WindowWidth map every pixel to one value; using the robust range")
    # No usable VOI in the header (common for Secondary Capture and some CR):
    # stretch the 0.5-99.5 percentile range of the modality values, so that a
    # few extreme pixels (collimator edges, burned-in markers) do not flatten
    # the contrast of the anatomy. Padding is left out of the range.
    display = _apply_robust_range(values, padding)
    if _blank(display, padding):
        raise BlankImageError("every pixel has the same value: nothing to display", source=where)
    return display


def _blank(display: np.ndarray, padding: np.ndarray | None) -> bool:
    shown = display if padding is None else display[~padding]
    return shown.size == 0 or float(shown.max()) - float(shown.min()) < BLANK_RANGE


def _voi_lut_table(ds: Dataset, where: str, notes: list[str]) -> tuple[np.ndarray, int] | None:
    """The first VOI LUT as a float32 table scaled to [0, 1], and its first mapped value.

    Decoded here rather than with pydicom's ``apply_voi``: pydicom 3.0.2 builds
    its index array in the LUT's output type, so an 8-bit LUT with more than 256
    entries (e.g. 4096 entries for 12-bit data) wraps every input above 255.
    """
    try:
        item = ds.VOILUTSequence[0]
        nr_entries, first_mapped, _bits = (int(v) for v in item.LUTDescriptor)
        table = _lut_data(item, ds, nr_entries or 2**16)
    except _PYDICOM_ERRORS as exc:
        _note(notes, where, "voi_lut_ignored", f"unusable VOILUTSequence ({type(exc).__name__}); trying the window")
        return None
    low, high = float(table.min()), float(table.max())
    if high <= low:
        _note(notes, where, "voi_lut_ignored", "VOILUTSequence is constant; trying the window")
        return None
    # Scaled by the LUT's own output range rather than 2**bits of its descriptor:
    # descriptors declaring 16 bits for 12-bit data are a known vendor error
    # (viewers such as Horos and Cornerstone also use the actual range); with the
    # nominal range those images would display almost black.
    scaled = (table.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return scaled, first_mapped


def _lut_data(item: Dataset, ds: Dataset, nr_entries: int) -> np.ndarray:
    """LUT Data entries: US values, or OW 16-bit words in the transfer syntax's byte order."""
    value = item["LUTData"].value
    if isinstance(value, (bytes, bytearray)):
        little_endian = _transfer_syntax(ds).is_little_endian
        entries = np.frombuffer(value, dtype="<u2" if little_endian else ">u2", count=len(value) // 2)
    else:
        entries = np.asarray(value if isinstance(value, (MultiValue, list, tuple)) else [value], dtype=np.int64)
    if entries.size < nr_entries:
        raise ValueError(f"LUTData has {entries.size} entries, LUTDescriptor declares {nr_entries}")
    return entries[:nr_entries]


def _apply_lut_table(values: np.ndarray, table: np.ndarray, first_mapped: int) -> np.ndarray:
    if values.dtype.kind == "f":
        index = np.rint(values).astype(np.int64)
    else:
        index = values.astype(np.int64)
    index -= first_mapped
    # Inputs below the first mapped value take the first entry, above the last the last.
    np.clip(index, 0, len(table) - 1, out=index)
    return table[index]


def _first_window(ds: Dataset, where: str, notes: list[str]) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window, or None if there is no usable one."""
    has_center, has_width = "WindowCenter" in ds, "WindowWidth" in ds
    if not has_center and not has_width:
        return None
    try:
        center = _first_value(ds.WindowCenter)
        width = _first_value(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    except _PYDICOM_ERRORS as exc:
        _note(notes, where, "window_ignored",
              f"unreadable WindowCenter/WindowWidth ({type(exc).__name__}); using the robust range")
        return None
    problem = None
    if center is None or width is None or not (math.isfinite(center) and math.isfinite(width)):
        problem = f"WindowCenter {center} / WindowWidth {width} are not both numbers"
    elif function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        problem = f"VOILUTFunction '{function}' is not defined by the standard"
    elif width <= 0 or (function == "LINEAR" and width < 1):
        # LINEAR needs a width >= 1 (C.11.2.1.2.1); the other functions any width > 0.
        problem = f"WindowWidth {width} is not valid for VOILUTFunction {function}"
    if problem is not None:
        # Not silent: logged with the attribute at fault. The robust range is the
        # same display the reader gives any image that has no window at all.
        _note(notes, where, "window_ignored", f"{problem}; using the robust range")
        return None
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3, computed in float32 and straight to [0, 1]."""
    out = values.astype(np.float32, copy=values.dtype != np.float32)
    if function == "SIGMOID":
        out -= np.float32(center)
        out *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):  # exp overflow -> inf -> output 0, which is right
            np.exp(out, out=out)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR" and width == 1:
        # The standard's width-1 window is a threshold at center - 0.5.
        return (out > np.float32(center - 0.5)).astype(np.float32)
    if function == "LINEAR":
        # x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear between.
        low, span = center - 0.5 - (width - 1) / 2, width - 1
    else:  # LINEAR_EXACT
        low, span = center - width / 2, width
    return _rescale_to_unit(out, low, span)


def _apply_robust_range(values: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
    step = max(1, math.isqrt(values.size // _PERCENTILE_SAMPLE))
    sample = values[::step, ::step]
    shown = values if padding is None else values[~padding]
    if padding is not None:
        sample = sample[~padding[::step, ::step]]
        if sample.size == 0:
            sample = shown
    low, high = (float(v) for v in np.percentile(sample, ROBUST_PERCENTILES))
    if high <= low:
        # More than 99% of the pixels share one value (e.g. a mostly black
        # screenshot): the full range is the only one that shows anything.
        low, high = float(shown.min()), float(shown.max())
    if high <= low:
        # A constant image has nothing to show; black rather than NaN (the caller refuses it).
        return np.zeros(values.shape, dtype=np.float32)
    out = values.astype(np.float32, copy=values.dtype != np.float32)
    return _rescale_to_unit(out, low, high - low)


def _rescale_to_unit(out: np.ndarray, low: float, span: float) -> np.ndarray:
    """In place: (out - low) / span, clipped to [0, 1]; ``out`` is float32 and owned by the caller."""
    out -= np.float32(low)
    out *= np.float32(1.0 / span)
    np.clip(out, np.float32(0.0), np.float32(1.0), out=out)
    return out


# --------------------------------------------------------------------------- attribute helpers


def _describe(ds: Dataset | None, path: Path | None) -> str:
    """File name and/or SOP Instance UID: identifies the object without identifying the patient."""
    parts = []
    filename = path.name if path is not None else None
    if filename is None and ds is not None and isinstance(getattr(ds, "filename", None), (str, os.PathLike)):
        filename = Path(ds.filename).name
    if filename:
        parts.append(filename)
    uid = None
    if ds is not None:
        try:
            uid = ds.get("SOPInstanceUID")
        except _PYDICOM_ERRORS:
            uid = None
    if uid is not None and not _is_plain_uid(str(uid)):
        # A damaged length field can make the "UID" swallow the following
        # elements (patient name included): name it damaged, never print it.
        uid = "<damaged UID>"
    if uid:
        parts.append(f"SOP Instance {uid}" if not parts else f"(SOP Instance {uid})")
    return " ".join(parts) if parts else "<dataset>"


_PLAIN_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _is_plain_uid(text: str) -> bool:
    """Digits and dots, at most 64 characters: a UID as the standard spells it (PS3.5 9.1)."""
    return len(text) <= 64 and _PLAIN_UID.fullmatch(text) is not None


def _cause(exc: BaseException, ds: Dataset | None) -> str:
    """Type and text of a chained error, with any patient identifier of ``ds`` blanked out."""
    text = f"{type(exc).__name__}: {exc}"
    if ds is not None:
        for keyword in _IDENTIFYING_KEYWORDS:
            try:
                value = ds.get(keyword)
            except _PYDICOM_ERRORS:
                continue
            values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
            for item in values:
                item = str(item or "")
                for token in {item, *item.replace("^", " ").split()}:
                    if len(token) >= 3:
                        text = text.replace(token, "<redacted>")
    return " ".join(text.split())[:300]


def _sop_class(ds: Dataset) -> UID | None:
    value = ds.get("SOPClassUID")
    if not value:
        file_meta = getattr(ds, "file_meta", None)
        value = file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    return UID(str(value)) if value else None


def _transfer_syntax(ds: Dataset) -> UID | None:
    file_meta = getattr(ds, "file_meta", None)
    value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return UID(str(value)) if value else None


def _photometric(ds: Dataset, where: str) -> str:
    value = ds.get("PhotometricInterpretation")
    if not value:
        raise InvalidHeaderError(
            "no (0028,0004) PhotometricInterpretation", source=where, reason="missing_attribute"
        )
    return str(value).strip().upper()


def _optional_int(ds: Dataset, keyword: str, where: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return int(value)
    except _PYDICOM_ERRORS as exc:
        raise InvalidHeaderError(
            f"{keyword} is not an integer ({type(exc).__name__})", source=where, reason="invalid_attribute"
        ) from exc


def _required_int(ds: Dataset, keyword: str, where: str) -> int:
    value = _optional_int(ds, keyword, where)
    if value is None:
        raise InvalidHeaderError(f"required attribute {keyword} is missing or empty", source=where,
                                 reason="missing_attribute")
    return value


def _optional_float(ds: Dataset, keyword: str, where: str) -> float | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        result = float(_first_value(value))
    except _PYDICOM_ERRORS as exc:
        raise InvalidHeaderError(
            f"{keyword} is not a number ({type(exc).__name__})", source=where, reason="invalid_attribute"
        ) from exc
    if not math.isfinite(result):
        raise InvalidHeaderError(f"{keyword} is {result}", source=where, reason="invalid_attribute")
    return result


def _first_value(value) -> float | None:
    """First value of a possibly multi-valued DS/IS element (several windows: the first is the default)."""
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        if len(value) == 0:
            return None
        value = value[0]
    return float(value)


__all__ = ["MAX_PIXELS", "MAX_SIDE", "MIN_SIDE", "ROBUST_PERCENTILES", "check_header", "is_for_processing",
           "read_radiograph"]
