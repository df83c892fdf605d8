"""Generated headers: whatever an archive sends, the outputs pass dciodvfy or the image is refused with a type.

The shared DICOM files (../shared/data/dicom, made smaller so a case is cheap)
get their patient, study, series and equipment attributes deleted, blanked,
garbled, given values of the wrong form for their VR, odd character sets, 8-bit
text without a declared character set, control characters, several values where
one is allowed, extreme lengths, and extreme matrix sizes. Each mutated file is
written as bytes and read back (as a PACS would deliver it), then goes through
the product path (``tests.header_cases.run_case``: reader, rules, engine with a
tiny classifier and Grad-CAM, writers) and every output through ``dciodvfy``.

The rule asserted for every case: explained with zero dciodvfy errors, or refused
with a typed ``DicomInputError`` reason. Never an untyped failure.

Two parts: a systematic sweep (each operation applied to every attribute at
once, per base file; each UID attribute on its own; each character set) and a
hypothesis search over combinations (``MUTATION_EXAMPLES`` cases, derandomised so
CI is reproducible). ``MEDXPLAIN_MUTATION_REPORT=<file>`` appends one JSON line
per case instead of asserting (to measure another version of the code).
"""
from __future__ import annotations

import json
import os
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.uid import ImplicitVRLittleEndian

from tests.conftest import CR_16BIT, CR_JPEG
from tests.header_cases import run_case, tiny_engine

MUTATION_EXAMPLES = int(os.environ.get("MEDXPLAIN_MUTATION_EXAMPLES", "100"))
REPORT = os.environ.get("MEDXPLAIN_MUTATION_REPORT")

# What the writers copy or reference: Patient, General Study, Patient Study,
# General Series, General Equipment, General Image (PS3.3 C.7).
ATTRIBUTES = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientNames", "PatientComments", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
    "AdditionalPatientHistory", "Occupation",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "SeriesNumber", "SeriesDate", "SeriesTime", "SeriesDescription", "Modality", "BodyPartExamined",
    "Laterality", "ImageLaterality", "ViewPosition", "PatientOrientation", "PatientPosition",
    "PerformingPhysicianName", "OperatorsName", "ProtocolName",
    "Manufacturer", "InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
    "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions",
    "InstanceNumber", "ContentDate", "ContentTime", "AcquisitionDate", "AcquisitionTime", "ImageType",
    "DerivationDescription", "ImageComments", "PixelSpacing", "ImagerPixelSpacing",
]
UID_ATTRIBUTES = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
OPERATIONS = ["delete", "blank", "garble", "wrong_form", "too_long", "eight_bit", "control", "backslash",
              "several", "lowercase"]
CHARACTER_SETS = [None, "", "ISO IR 192", "ISO_IR 192", "iso_ir 100", "ISO_IR 100", "ISO-IR 6",
                  "ISO 2022 IR 87", "GB18030", "NONSENSE", "ISO_IR 100\\ISO_IR 192"]
SIZES = [(1, 1), (63, 200), (64, 64), (64, 2048), (2048, 64)]

# Wrong forms per VR: seen in real archives and toolkit bug reports.
WRONG_FORMS = {
    "DA": ["1901-02-03", "19011399", "3f2a9c1d", "1901.02.03", "0", "2026-13-45"],
    "TM": ["12:30:00", "25:61", "ab", "123060.1234567", "99"],
    "DT": ["2026-01-01T12:00", "20261399"],
    "PN": ["Doe\\John", "A^B^C^D^E^F^G", "=" * 5],
    "CS": ["0000", "male", "x" * 20, "a-b", "Ünknown"],
    "UI": ["1.2.abc", "01.2.3", "1." * 40, "1..2", " 1.2 "],
    "DS": ["abc", "1e400", "1,5", "12345678901234567890"],
    "IS": ["1.5", "99999999999999", "abc", "-"],
    "AS": ["62", "62Y", "abc", "0062Y"],
    "LO": ["a\\b", "x" * 70],
    "SH": ["a\\b", "x" * 20],
    "LT": ["\x00\x01"], "ST": ["\x00\x01"],
}


def _vr(keyword: str) -> str:
    return dictionary_VR(keyword).split(" ")[0]


def _value(keyword: str, op: str, draw_text: str = "") -> object:
    vr = _vr(keyword)
    if op == "blank":
        return None
    if op == "garble":
        return draw_text or "~#?*"
    if op == "wrong_form":
        forms = WRONG_FORMS.get(vr, ["\\\\"])
        return forms[sum(map(ord, keyword + draw_text)) % len(forms)]
    if op == "too_long":
        return "9" * 10_000
    if op == "eight_bit":
        return "Müller^Jörg" if vr == "PN" else "Ärztehaus Süd"
    if op == "control":
        return "A\x01B\x7fC"
    if op == "backslash":
        return "Doe\\John"
    if op == "several":
        return ["R", "L", "1", "X"]
    if op == "lowercase":
        return "chest pa"
    raise ValueError(op)


def _raw(tag: int, value: bytes) -> DataElement:
    """The bytes as they would arrive: the files are written in Implicit VR, so the
    reader parses them with the dictionary VR, as it would a PACS's bytes."""
    if len(value) % 2:
        value += b" "
    return DataElement(tag, "OB", value)


def mutate(ds: pydicom.Dataset, keyword: str, op: str, text: str = "") -> None:
    tag = tag_for_keyword(keyword)
    if op == "delete":
        if keyword in ds:
            del ds[keyword]
        return
    value = _value(keyword, op, text)
    if _vr(keyword) in ("US", "SS", "UL", "FL", "FD", "SQ"):
        value = None  # binary VRs: only delete or blank
    if isinstance(value, list):
        value = "\\".join(value)  # several values, whatever the VM allows
    ds[tag] = _raw(tag, (value or "").encode("latin-1"))


def set_charset(ds: pydicom.Dataset, charset: str | None) -> None:
    if charset is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        # As CS, not raw bytes: pydicom's writer reads it (and tolerates any value).
        ds[0x00080005] = DataElement(0x00080005, "CS", charset.split("\\") if "\\" in charset else charset)
    # Non-ASCII text that the character set must cover (UTF-8 bytes where it says 192).
    name = "Grüß^Jürgen".encode("utf-8" if charset and "192" in charset else "latin-1")
    ds[0x00100010] = _raw(0x00100010, name)


def resize(ds: pydicom.Dataset, rows: int, cols: int) -> None:
    pixels = ds.pixel_array
    tiled = np.resize(pixels, (rows, cols)).astype(pixels.dtype)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = tiled.tobytes()


def to_bytes(ds: pydicom.Dataset) -> bytes | None:
    """As a PACS would deliver it; None when pydicom itself cannot write this header."""
    buffer = BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=True)
    except Exception:  # noqa: BLE001  not a file anyone can send
        return None
    return buffer.getvalue()


# --------------------------------------------------------------------------- fixtures


def _small_native(path: Path, side: int) -> pydicom.Dataset:
    """The shared file, decimated to about ``side`` pixels and stored natively (cheap to write and check)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    step = max(1, min(pixels.shape) // side)
    small = np.ascontiguousarray(pixels[::step, ::step])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    if "PixelSpacing" in ds and step > 1:
        ds.PixelSpacing = [float(v) * step for v in ds.PixelSpacing]
    return ds


@pytest.fixture(scope="module")
def bases() -> dict[str, pydicom.Dataset]:
    for path in (CR_16BIT, CR_JPEG):
        if not path.exists():
            pytest.skip(f"shared DICOM file not found: {path}")
    return {"cr16": _small_native(CR_16BIT, 160), "jpeg8": _small_native(CR_JPEG, 128)}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("bundle") / "tiny-cxr")


def _check(engine, data: bytes, out: Path, label: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data))
        outcome = run_case(engine, ds, out)
    if REPORT:
        with open(REPORT, "a") as handle:
            handle.write(json.dumps({"case": label, "kind": outcome.kind, "reason": outcome.reason,
                                     "dciodvfy_errors": outcome.dciodvfy_errors}) + "\n")
        return
    assert outcome.kind in ("refused", "explained"), f"{label}: {outcome}"
    assert outcome.dciodvfy_errors == [], f"{label}: " + "\n".join(outcome.dciodvfy_errors)


def _cases_systematic() -> list[tuple[str, str, object]]:
    cases = [(base, "every attribute", op) for base in ("cr16", "jpeg8") for op in OPERATIONS]
    cases += [("jpeg8", "uid", (keyword, op)) for keyword in UID_ATTRIBUTES
              for op in ("delete", "blank", "wrong_form")]
    cases += [("cr16", "charset", charset) for charset in CHARACTER_SETS]
    cases += [("jpeg8", "size", size) for size in SIZES]
    return cases


SYSTEMATIC = _cases_systematic()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("base, what, how", SYSTEMATIC, ids=[f"{b}-{w}-{h}" for b, w, h in SYSTEMATIC])
def test_systematic_mutation(base, what, how, bases, engine, tmp_path):
    ds = pydicom.dcmread(BytesIO(to_bytes(bases[base])))  # an independent copy
    if what == "every attribute":
        for keyword in ATTRIBUTES:
            mutate(ds, keyword, how, text="x\u00e9\\\x07" if how == "garble" else "")
    elif what == "uid":
        keyword, op = how
        mutate(ds, keyword, op)
    elif what == "charset":
        set_charset(ds, how)
    else:
        resize(ds, *how)
    data = to_bytes(ds)
    if data is None:
        pytest.skip("pydicom cannot write this header")
    _check(engine, data, tmp_path, f"{base} {what} {how}")


mutation = st.tuples(st.sampled_from(ATTRIBUTES), st.sampled_from(OPERATIONS),
                     st.text(alphabet=st.characters(codec="latin-1"), max_size=80))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@settings(max_examples=MUTATION_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(base=st.sampled_from(["cr16", "jpeg8"]), mutations=st.lists(mutation, min_size=1, max_size=6),
       charset=st.one_of(st.just("keep"), st.sampled_from(CHARACTER_SETS)),
       size=st.one_of(st.just(None), st.sampled_from(SIZES)))
def test_generated_mutations(base, mutations, charset, size, bases, engine, tmp_path_factory):
    ds = pydicom.dcmread(BytesIO(to_bytes(bases[base])))
    if charset != "keep":
        set_charset(ds, charset)
    for keyword, op, text in mutations:
        mutate(ds, keyword, op, text)
    if size is not None:
        resize(ds, *size)
    data = to_bytes(ds)
    if data is None:
        return  # pydicom cannot write it: not a file a PACS can send
    _check(engine, data, tmp_path_factory.mktemp("case"), f"{base} {charset} {size} {mutations}")
