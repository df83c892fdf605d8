"""Test DICOM files derived from the two shared real radiographs.

Nothing here is synthetic pixel content: every variant starts from
``RG1_UNCR.dcm`` (CR, 1955x1841, 15 of 16 bits, MONOCHROME1, windowed) or
``siim_cr_chest_jpeg_baseline.dcm`` (1024x1024, 8 bits, MONOCHROME2, JPEG
baseline) and is re-encoded with dcmtk (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``,
``dcmconv``, ``dcmdjpeg``) or pydicom 3's encoders (JPEG 2000 via
pylibjpeg-openjpeg), or has its header edited with pydicom.

Use the session fixture ``derived`` (import it into the test module):
``derived.path("cr16_rle")`` builds a variant on first use, caches it in a
session tmp dir, and returns its path. A variant whose tool is missing is
skipped with a message naming the tool. ``VARIANTS`` lists every name with a
one-line description of how it is made.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid as uids
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

# The shared RG1 window (15000/30000), the basis of the edited windows below.
RG1_CENTER, RG1_WIDTH = 15000.0, 30000.0
# The 8-bit version: stored = RG1 >> 7, window scaled to match (rounded).
CR8_SHIFT, CR8_CENTER, CR8_WIDTH = 7, 117.0, 234.0
# The 12-bit version: stored = RG1 >> 3, window scaled to match.
CR12_SHIFT, CR12_CENTER, CR12_WIDTH = 3, 1875.0, 3750.0
# The signed version: stored = RG1 - 16384 (fits 15-bit signed), intercept restores it.
SIGNED_OFFSET = 16384
# The rescaled version: modality value = stored * 0.5 - 100, window mapped through it.
RESCALE_SLOPE, RESCALE_INTERCEPT = 0.5, -100.0
# The VOI LUT: 32768 entries (every 15-bit input), 12-bit output, square-root curve.
VOI_LUT_BITS = 12
# The Modality LUT: 32768 entries, output = input // 2; window in output units.
MODALITY_LUT_CENTER, MODALITY_LUT_WIDTH = 7500.0, 15000.0
ABSURD_ROWS = 60_000

Builder = Callable[["DerivedDicom", Path], None]
VARIANTS: dict[str, str] = {}
_BUILDERS: dict[str, Builder] = {}


def variant(name: str, description: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        VARIANTS[name] = description
        _BUILDERS[name] = builder
        return builder

    return register


class DerivedDicom:
    """Builds derived files lazily into ``root`` and remembers them for the session."""

    def __init__(self, root: Path, cr_16bit: Path, cr_jpeg: Path):
        self.root = root
        self.cr_16bit = cr_16bit
        self.cr_jpeg = cr_jpeg
        self._paths: dict[str, Path] = {"cr16": cr_16bit, "jpeg8": cr_jpeg}

    def path(self, name: str) -> Path:
        if name not in self._paths:
            if name not in _BUILDERS:
                raise KeyError(f"no derived DICOM variant {name!r}; known: {sorted(VARIANTS)}")
            out = self.root / f"{name}.dcm"
            _BUILDERS[name](self, out)
            if not out.exists():
                raise AssertionError(f"builder for {name!r} wrote nothing")
            self._paths[name] = out
        return self._paths[name]


@pytest.fixture(scope="session")
def derived(tmp_path_factory: pytest.TempPathFactory, cr_16bit: Path, cr_jpeg: Path) -> DerivedDicom:
    return DerivedDicom(tmp_path_factory.mktemp("derived_dicom"), cr_16bit, cr_jpeg)


# --------------------------------------------------------------------------- tools


def _dcmtk(tool: str, *args: str | Path) -> None:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} (Debian package dcmtk) is not installed")
    result = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(map(str, args))} failed: {result.stderr.strip()}")


def _pydicom_compress(src: Path, out: Path, transfer_syntax: str, *, lossy: bool = False, **kwargs) -> None:
    encoder = get_encoder(transfer_syntax)
    if not encoder.is_available:
        pytest.skip(f"no pydicom encoder plugin for {encoder.UID.name}: {encoder.missing_dependencies}")
    ds = pydicom.dcmread(src)
    ds.compress(transfer_syntax, **kwargs)
    if lossy:
        # pydicom does not record the loss; a real lossy object says so.
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_15444_1"
    ds.save_as(out, enforce_file_format=True)


def _edit(src: Path, out: Path, edit: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(src)
    edit(ds)
    ds.save_as(out, enforce_file_format=True)


def _rg1_stored(d: DerivedDicom) -> np.ndarray:
    return pixel_array(d.cr_16bit)


def _delete(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _set_window(ds: Dataset, center, width) -> None:
    ds.WindowCenter = center
    ds.WindowWidth = width


def _set_sop_class(ds: Dataset, sop_class: str, modality: str) -> None:
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality


def _non_image(d: DerivedDicom, out: Path, sop_class: str, modality: str, fill: Callable[[Dataset], None]) -> None:
    """A non-image object of the same patient and study as RG1 (header copied, no pixels)."""
    src = pydicom.dcmread(d.cr_16bit, stop_before_pixels=True)
    ds = Dataset()
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        if keyword in src:
            setattr(ds, keyword, src.data_element(keyword).value)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    _set_sop_class(ds, sop_class, modality)
    fill(ds)
    ds.save_as(out, enforce_file_format=True)


# --------------------------------------------------------------------------- reference bases


# Served from the shared files themselves, not built.
VARIANTS["cr16"] = "the shared RG1_UNCR.dcm (Explicit VR LE, 15 of 16 bits, MONOCHROME1, window 15000/30000)"
VARIANTS["jpeg8"] = "the shared siim_cr_chest_jpeg_baseline.dcm (JPEG baseline, 8 bits, MONOCHROME2, no window)"


@variant("jpeg8_native", "siim decompressed to Explicit VR LE with dcmtk dcmdjpeg")
def _jpeg8_native(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmdjpeg", d.cr_jpeg, out)


@variant("cr12_native", "RG1 >> 3 stored in 12 of 16 bits, window 1875/3750 (pydicom set_pixel_data)")
def _cr12_native(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.set_pixel_data((_rg1_stored(d) >> CR12_SHIFT).astype(np.uint16), "MONOCHROME1", 12)
        _set_window(ds, CR12_CENTER, CR12_WIDTH)

    _edit(d.cr_16bit, out, edit)


@variant("cr8_native", "RG1 >> 7 in 8 bits, window 117/234 (pydicom set_pixel_data): input for JPEG baseline")
def _cr8_native(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.set_pixel_data((_rg1_stored(d) >> CR8_SHIFT).astype(np.uint8), "MONOCHROME1", 8)
        _set_window(ds, CR8_CENTER, CR8_WIDTH)

    _edit(d.cr_16bit, out, edit)


@variant("cr16_signed", "RG1 - 16384 as signed 15-of-16 bits, RescaleIntercept 16384, slope 1")
def _cr16_signed(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        stored = (_rg1_stored(d).astype(np.int32) - SIGNED_OFFSET).astype(np.int16)
        ds.set_pixel_data(stored, "MONOCHROME1", 15)
        ds.RescaleIntercept = SIGNED_OFFSET
        ds.RescaleSlope = 1
        ds.RescaleType = "US"

    _edit(d.cr_16bit, out, edit)


# --------------------------------------------------------------------------- transfer syntaxes


@variant("cr16_jpeg_lossless_sv1", "dcmcjpeg +e1: JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)")
def _cr16_jpeg_lossless_sv1(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpeg", "+e1", d.cr_16bit, out)


@variant("cr16_jpeg_lossless_p14", "dcmcjpeg +el +sv 6: JPEG Lossless process 14, predictor 6 (1.2.840.10008.1.2.4.57)")
def _cr16_jpeg_lossless_p14(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpeg", "+el", "+sv", "6", d.cr_16bit, out)


@variant("cr16_jpegls_lossless", "dcmcjpls +el: JPEG-LS lossless (1.2.840.10008.1.2.4.80)")
def _cr16_jpegls_lossless(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpls", "+el", d.cr_16bit, out)


@variant("cr16_jpegls_near", "dcmcjpls +en +md 2: JPEG-LS near-lossless, NEAR=2 (1.2.840.10008.1.2.4.81)")
def _cr16_jpegls_near(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpls", "+en", "+md", "2", d.cr_16bit, out)


@variant("cr16_rle", "dcmcrle: RLE Lossless (1.2.840.10008.1.2.5)")
def _cr16_rle(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcrle", d.cr_16bit, out)


@variant("cr16_j2k_lossless", "pydicom Dataset.compress + pylibjpeg-openjpeg: JPEG 2000 lossless (1.2.840.10008.1.2.4.90)")
def _cr16_j2k_lossless(d: DerivedDicom, out: Path) -> None:
    _pydicom_compress(d.cr_16bit, out, uids.JPEG2000Lossless)


@variant("cr16_j2k_lossy", "pydicom Dataset.compress + pylibjpeg-openjpeg, ratio 20: JPEG 2000 (1.2.840.10008.1.2.4.91)")
def _cr16_j2k_lossy(d: DerivedDicom, out: Path) -> None:
    _pydicom_compress(d.cr_16bit, out, uids.JPEG2000, lossy=True, j2k_cr=[20])


@variant("cr16_implicit", "dcmconv +ti: Implicit VR Little Endian (1.2.840.10008.1.2)")
def _cr16_implicit(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmconv", "+ti", d.cr_16bit, out)


@variant("cr16_big_endian", "dcmconv +tb: Explicit VR Big Endian (retired, 1.2.840.10008.1.2.2)")
def _cr16_big_endian(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmconv", "+tb", d.cr_16bit, out)


@variant("cr16_deflated", "dcmconv +td: Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99)")
def _cr16_deflated(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmconv", "+td", d.cr_16bit, out)


@variant("cr8_jpeg_baseline", "dcmcjpeg +eb on cr8_native: JPEG Baseline process 1, quality 90 (1.2.840.10008.1.2.4.50)")
def _cr8_jpeg_baseline(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpeg", "+eb", d.path("cr8_native"), out)


@variant("cr12_jpeg_extended", "dcmcjpeg +ee on cr12_native: JPEG Extended process 2/4, 12 bit (1.2.840.10008.1.2.4.51)")
def _cr12_jpeg_extended(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpeg", "+ee", d.path("cr12_native"), out)


@variant("cr12_jpeg_lossless_sv1", "dcmcjpeg +e1 on cr12_native: JPEG Lossless SV1, 12 bit")
def _cr12_jpeg_lossless_sv1(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpeg", "+e1", d.path("cr12_native"), out)


@variant("cr16_signed_jpegls", "dcmcjpls +el on cr16_signed: JPEG-LS lossless of signed data")
def _cr16_signed_jpegls(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpls", "+el", d.path("cr16_signed"), out)


@variant("cr16_signed_j2k_lossless", "pydicom compress on cr16_signed: JPEG 2000 lossless of signed data")
def _cr16_signed_j2k_lossless(d: DerivedDicom, out: Path) -> None:
    _pydicom_compress(d.path("cr16_signed"), out, uids.JPEG2000Lossless)


@variant("cr16_signed_rle", "dcmcrle on cr16_signed: RLE of signed data")
def _cr16_signed_rle(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcrle", d.path("cr16_signed"), out)


@variant("jpeg8_rle", "dcmcrle on jpeg8_native: RLE of 8-bit data")
def _jpeg8_rle(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcrle", d.path("jpeg8_native"), out)


@variant("jpeg8_j2k_lossless", "pydicom compress on jpeg8_native: JPEG 2000 lossless of 8-bit data")
def _jpeg8_j2k_lossless(d: DerivedDicom, out: Path) -> None:
    _pydicom_compress(d.path("jpeg8_native"), out, uids.JPEG2000Lossless)


@variant("jpeg8_jpegls_lossless", "dcmcjpls +el on jpeg8_native: JPEG-LS lossless of 8-bit data")
def _jpeg8_jpegls_lossless(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmcjpls", "+el", d.path("jpeg8_native"), out)


# --------------------------------------------------------------------------- header variants (good)


@variant("cr16_mono2", "RG1 with PhotometricInterpretation edited to MONOCHROME2")
def _cr16_mono2(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME2"))


@variant("jpeg8_mono1", "siim JPEG with PhotometricInterpretation edited to MONOCHROME1")
def _jpeg8_mono1(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_jpeg, out, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))


@variant("cr16_no_window", "RG1 with WindowCenter/WindowWidth removed")
def _cr16_no_window(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        del ds.WindowCenter
        del ds.WindowWidth

    _edit(d.cr_16bit, out, edit)


@variant("cr16_two_windows", "RG1 with two windows: 15000/30000 first, 8000/4000 second")
def _cr16_two_windows(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: _set_window(ds, [RG1_CENTER, 8000.0], [RG1_WIDTH, 4000.0]))


@variant("cr16_bad_window", "RG1 with WindowWidth 0 (invalid for LINEAR)")
def _cr16_bad_window(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: _set_window(ds, RG1_CENTER, 0))


@variant("cr16_sigmoid", "RG1 with VOILUTFunction SIGMOID on its window")
def _cr16_sigmoid(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: setattr(ds, "VOILUTFunction", "SIGMOID"))


@variant("cr16_rescaled", "RG1 with RescaleSlope 0.5 / RescaleIntercept -100 and the window mapped through it")
def _cr16_rescaled(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.RescaleSlope = RESCALE_SLOPE
        ds.RescaleIntercept = RESCALE_INTERCEPT
        _set_window(ds, RG1_CENTER * RESCALE_SLOPE + RESCALE_INTERCEPT, RG1_WIDTH * RESCALE_SLOPE)

    _edit(d.cr_16bit, out, edit)


def voi_lut_table() -> np.ndarray:
    """The VOI LUT of ``cr16_voi_lut``: every 15-bit input to 12-bit output, square-root curve."""
    inputs = np.arange(2**15, dtype=np.float64)
    return np.round((2**VOI_LUT_BITS - 1) * np.sqrt(inputs / inputs[-1])).astype(np.uint16)


@variant("cr16_voi_lut", "RG1 with a VOI LUT Sequence (sqrt curve, 12-bit out) kept alongside its window")
def _cr16_voi_lut(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        item = Dataset()
        table = voi_lut_table()
        item.LUTDescriptor = [len(table), 0, VOI_LUT_BITS]
        item.LUTExplanation = "sqrt test curve"
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])

    _edit(d.cr_16bit, out, edit)


def voi_lut_8bit_table(nr_entries: int) -> np.ndarray:
    """An 8-bit-output VOI LUT with more entries than 256: square-root curve over ``nr_entries`` inputs."""
    inputs = np.arange(nr_entries, dtype=np.float64)
    return np.round(255 * np.sqrt(inputs / inputs[-1])).astype(np.uint16)


@variant("cr16_voi_lut_8bit", "RG1 with an 8-bit-output VOI LUT of 32768 entries, LUT Data as OW")
def _cr16_voi_lut_8bit(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        item = Dataset()
        table = voi_lut_8bit_table(2**15)
        item.LUTDescriptor = [len(table), 0, 8]
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])

    _edit(d.cr_16bit, out, edit)


@variant("cr12_voi_lut_8bit_us", "cr12_native with an 8-bit-output VOI LUT of 4096 entries, LUT Data as US values")
def _cr12_voi_lut_8bit_us(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        item = Dataset()
        table = voi_lut_8bit_table(2**12)
        item.LUTDescriptor = [len(table), 0, 8]
        item.add_new("LUTData", "US", [int(v) for v in table])
        ds.VOILUTSequence = Sequence([item])

    _edit(d.path("cr12_native"), out, edit)


def modality_lut_table() -> np.ndarray:
    """The Modality LUT of ``cr16_modality_lut``: output = input // 2 for every 15-bit input."""
    return (np.arange(2**15) // 2).astype(np.uint16)


@variant("cr16_modality_lut", "RG1 with a Modality LUT Sequence (x // 2) and the window in its output units")
def _cr16_modality_lut(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        item = Dataset()
        table = modality_lut_table()
        item.LUTDescriptor = [len(table), 0, 16]
        item.ModalityLUTType = "US"
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
        ds.ModalityLUTSequence = Sequence([item])
        _set_window(ds, MODALITY_LUT_CENTER, MODALITY_LUT_WIDTH)

    _edit(d.cr_16bit, out, edit)


@variant("dx_for_presentation", "RG1 as Digital X-Ray Image For Presentation, Modality DX, PresentationLUTShape INVERSE")
def _dx_for_presentation(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        _set_sop_class(ds, uids.DigitalXRayImageStorageForPresentation, "DX")
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE"  # what DX requires with MONOCHROME1 (C.8.11.7)
        ds.ImageType = ["DERIVED", "PRIMARY"]

    _edit(d.cr_16bit, out, edit)


@variant("mg_for_presentation", "RG1 as Digital Mammography Image For Presentation, Modality MG")
def _mg_for_presentation(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        _set_sop_class(ds, uids.DigitalMammographyXRayImageStorageForPresentation, "MG")
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE"

    _edit(d.cr_16bit, out, edit)


@variant("sc_grayscale", "RG1 as Secondary Capture, Modality OT, ConversionType WSD")
def _sc_grayscale(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        _set_sop_class(ds, uids.SecondaryCaptureImageStorage, "OT")
        ds.ConversionType = "WSD"

    _edit(d.cr_16bit, out, edit)


# --------------------------------------------------------------------------- bad inputs


@variant("sr", "a Basic Text SR of RG1's study (no pixels)")
def _sr(d: DerivedDicom, out: Path) -> None:
    def fill(ds: Dataset) -> None:
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic report"
        ds.ConceptNameCodeSequence = Sequence([concept])
        text = Dataset()
        text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "No acute findings."
        ds.ContentSequence = Sequence([text])
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"

    _non_image(d, out, uids.BasicTextSRStorage, "SR", fill)


@variant("presentation_state", "a Grayscale Softcopy Presentation State of RG1's study (no pixels)")
def _presentation_state(d: DerivedDicom, out: Path) -> None:
    def fill(ds: Dataset) -> None:
        ds.ContentLabel = "TEST"
        ds.PresentationLUTShape = "IDENTITY"

    _non_image(d, out, uids.GrayscaleSoftcopyPresentationStateStorage, "PR", fill)


@variant("encapsulated_pdf", "an Encapsulated PDF of RG1's study")
def _encapsulated_pdf(d: DerivedDicom, out: Path) -> None:
    def fill(ds: Dataset) -> None:
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.DocumentTitle = "report"
        ds.BurnedInAnnotation = "NO"
        ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"

    _non_image(d, out, uids.EncapsulatedPDFStorage, "DOC", fill)


@variant("seg_like", "siim native with SOP Class Segmentation Storage and Modality SEG (pixels kept)")
def _seg_like(d: DerivedDicom, out: Path) -> None:
    _edit(d.path("jpeg8_native"), out, lambda ds: _set_sop_class(ds, uids.SegmentationStorage, "SEG"))


@variant("rgb", "siim native copied into R, G and B: SamplesPerPixel 3, RGB")
def _rgb(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        grey = pixel_array(ds)
        ds.set_pixel_data(np.stack([grey, grey, grey], axis=-1), "RGB", 8)

    _edit(d.path("jpeg8_native"), out, edit)


@variant("palette_color", "siim native with PhotometricInterpretation PALETTE COLOR")
def _palette_color(d: DerivedDicom, out: Path) -> None:
    _edit(d.path("jpeg8_native"), out, lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"))


@variant("multiframe", "RG1 with NumberOfFrames 2 and its Pixel Data doubled")
def _multiframe(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData + ds.PixelData

    _edit(d.cr_16bit, out, edit)


@variant("ct_slice", "RG1 relabelled as a CT Image Storage slice (Modality CT, position, orientation, HU rescale)")
def _ct_slice(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        _set_sop_class(ds, uids.CTImageStorage, "CT")
        ds.ImagePositionPatient = [0, 0, 0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelSpacing = [0.5, 0.5]

    _edit(d.cr_16bit, out, edit)


@variant("truncated_native", "RG1's first 5,000,000 bytes (file cut inside native Pixel Data)")
def _truncated_native(d: DerivedDicom, out: Path) -> None:
    out.write_bytes(d.cr_16bit.read_bytes()[:5_000_000])


@variant("truncated_jpeg_lossless", "cr16_jpeg_lossless_sv1 cut in half (file ends inside encapsulated Pixel Data)")
def _truncated_jpeg_lossless(d: DerivedDicom, out: Path) -> None:
    data = d.path("cr16_jpeg_lossless_sv1").read_bytes()
    out.write_bytes(data[: len(data) // 2])


@variant("corrupt_jpeg_lossless", "cr16_jpeg_lossless_sv1 with its JPEG stream replaced by SOI, zeros, EOI")
def _corrupt_jpeg_lossless(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(4096) + b"\xff\xd9"])

    _edit(d.path("cr16_jpeg_lossless_sv1"), out, edit)


@variant("missing_pixel_data", "RG1 with (7FE0,0010) Pixel Data deleted")
def _missing_pixel_data(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, _delete("PixelData"))


@variant("zero_rows", "RG1 with Rows 0")
def _zero_rows(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: setattr(ds, "Rows", 0))


@variant("absurd_rows", "RG1 with Rows 60000")
def _absurd_rows(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: setattr(ds, "Rows", ABSURD_ROWS))


@variant("over_pixel_budget", "RG1 with Rows and Columns 16000 (each within the side limit, 256 Mpx in all)")
def _over_pixel_budget(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.Rows = 16_000
        ds.Columns = 16_000

    _edit(d.cr_16bit, out, edit)


@variant("bits_allocated_32", "RG1 with BitsAllocated 32")
def _bits_allocated_32(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: setattr(ds, "BitsAllocated", 32))


@variant("bits_stored_17", "RG1 with BitsStored 17 (> BitsAllocated 16)")
def _bits_stored_17(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.BitsStored = 17
        ds.HighBit = 16

    _edit(d.cr_16bit, out, edit)


@variant("missing_photometric", "RG1 with PhotometricInterpretation deleted")
def _missing_photometric(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, _delete("PhotometricInterpretation"))


@variant("intercept_without_slope", "RG1 with RescaleIntercept 10 but no RescaleSlope")
def _intercept_without_slope(d: DerivedDicom, out: Path) -> None:
    _edit(d.cr_16bit, out, lambda ds: setattr(ds, "RescaleIntercept", 10))


@variant("unsupported_ts", "cr16_j2k_lossless relabelled JPEG 2000 Part 2 multi-component (1.2.840.10008.1.2.4.93)")
def _unsupported_ts(d: DerivedDicom, out: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uids.JPEG2000MC

    _edit(d.path("cr16_j2k_lossless"), out, edit)


@variant("no_dicm_prefix", "RG1 written by dcmconv -F: a raw dataset without preamble and File Meta Information")
def _no_dicm_prefix(d: DerivedDicom, out: Path) -> None:
    _dcmtk("dcmconv", "-F", "+te", d.cr_16bit, out)


@variant("text_file", "a text file named .dcm")
def _text_file(d: DerivedDicom, out: Path) -> None:
    out.write_text("This is a radiology report, not a DICOM file.\n" * 20)


@variant("empty_file", "an empty file named .dcm")
def _empty_file(d: DerivedDicom, out: Path) -> None:
    out.write_bytes(b"")
