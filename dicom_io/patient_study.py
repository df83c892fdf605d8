"""Normalise the patient, study, equipment and series attributes that writers copy.

Every object medxplain writes (SC, SEG, SR) copies the Patient, General Study,
Patient Study, Clinical Trial and General Equipment modules of its source (via
highdicom), and Body Part Examined, Laterality and Patient Orientation. Archives
are full of values that break those copies: Type 2 attributes absent after
de-identification, dates of the wrong form (``1901-02-03``, ``19011399``, a hash),
Patient's Sex ``0000``, a person name with a backslash, a misspelled Specific
Character Set (``ISO IR 192``), 8-bit characters with no character set declared.
This module is the one place that decides what the writers copy:

- absent Type 2 attributes (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study) are
  written empty (zero length), as the standard asks when the value is unknown;
- an invalid value is **corrected** only where the intent is unambiguous
  (``1901-02-03`` / ``1901.02.03`` -> ``19010203``; ``12:30:00`` -> ``123000``;
  ``62Y`` -> ``062Y``; lower-case code strings upper-cased; Patient's Sex
  ``male``/``female``/``other`` -> ``M``/``F``/``O``; ``ISO IR 192`` -> ``ISO_IR 192``);
  otherwise it is **blanked** (Type 2: empty) or **left out** (Type 3, 1C, 2C);
  a sequence with any invalid element inside is left out whole;
- 8-bit text the declared character set does not cover (or none is declared) is
  blanked: the source's real encoding is unknowable, so any re-encoding is a guess;
- every change logs one warning that names the attribute and the rule, never the
  value (values are patient data), and is returned so callers can record it.

Value forms follow PS3.5 6.2 (VR definitions); Laterality follows PS3.3 C.7.3.1
(General Series, Type 2C: required, possibly empty, when Body Part Examined is
absent or a paired structure and no Image Laterality applies).

The Study, Series and SOP Instance UIDs are not repaired here: without them
there is no study to write into, and the reader refuses such a file
(``dicom_io.reader.check_header``, reason ``missing_uid`` / ``invalid_uid``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
from typing import TYPE_CHECKING, Any

from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

if TYPE_CHECKING:  # pragma: no cover
    from dicom_io.source import SourceImage

__all__ = [
    "COPIED_MODULES",
    "normalised_reference",
    "writer_reference",
    "copy_series_attributes",
    "valid_value",
    "normalise_character_set",
]

logger = logging.getLogger(__name__)

# (module, optional as a whole): root attributes of these modules are copied into
# every output (highdicom's copy_patient_and_study_information, and
# ContributingEquipment.for_image_acquisition for the equipment). Types from
# PS3.3 via highdicom's tables. An "optional" module (clinical trial) with an
# invalid or missing Type 1 attribute is left out whole.
COPIED_MODULES: tuple[tuple[str, bool], ...] = (
    ("patient", False),
    ("general-study", False),
    ("patient-study", False),
    ("general-equipment", False),
    ("clinical-trial-subject", True),
    ("clinical-trial-study", True),
)
# Not ours to copy: pixel-module attributes that the equipment module lists.
_NOT_COPIED = frozenset({"PixelPaddingValue", "StudyInstanceUID"})

_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

# Defined terms of unpaired structures and regions (PS3.16 Annex L, CID 4031 subset):
# for these Laterality is not required. Any other value (unknown, misspelled,
# "CHEST PA") may be paired, so Laterality is written (empty when unknown), as
# dciodvfy requires.
UNPAIRED_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "AORTA", "APPENDIX", "BLADDER", "BRAIN", "CERVIX", "CHEST", "CHESTABDOMEN",
    "CHESTABDPELVIS", "COCCYX", "COLON", "CSPINE", "DUODENUM", "ESOPHAGUS", "GALLBLADDER", "HEAD", "HEADNECK",
    "HEART", "IVC", "JAW", "LARYNX", "LIVER", "LSPINE", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST",
    "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE", "PANCREAS", "PELVIS", "PENIS", "PROSTATE", "RECTUM",
    "SACRUM", "SKULL", "SPINE", "SPLEEN", "SSPINE", "STERNUM", "STOMACH", "THYROID", "TONGUE", "TRACHEA",
    "TSPINE", "UTERUS", "VAGINA", "WHOLEBODY",
})

# ------------------------------------------------------------------ value forms (PS3.5 6.2)

_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
            "SH": 16, "ST": 1024, "TM": 14, "UI": 64, "UC": 2**32 - 2, "UT": 2**32 - 2, "UR": 2**32 - 2}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})
# Character repertoire extended by Specific Character Set (PS3.5 6.1.2.3).
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_MULTI_LINE_VRS = frozenset({"LT", "ST", "UT"})  # CR, LF, FF, TAB allowed
_CS_RE = re.compile(r"^[A-Z0-9 _]*$")
_UI_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DS_RE = re.compile(r"^ *[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)? *$")
_IS_RE = re.compile(r"^ *[+-]?\d+ *$")
_AS_RE = re.compile(r"^\d{3}[DWMY]$")
_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


def _valid_date(text: str) -> bool:
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _valid_time(text: str) -> bool:
    match = _TM_RE.match(text.rstrip())
    if match is None:
        return False
    hh, mm, ss = (int(g) if g else 0 for g in match.groups()[:3])
    if match.group(3) is None and match.group(4):  # a fraction needs seconds
        return False
    return hh < 24 and mm < 60 and ss < 61


def _valid_datetime(text: str) -> bool:
    match = _DT_RE.match(text.rstrip())
    if match is None:
        return False
    year, month, day, hh, mm, ss = (g for g in match.groups()[:6])
    if month and not 1 <= int(month) <= 12:
        return False
    if day and not _valid_date(f"{year}{month}{day}"):
        return False
    return (not hh or int(hh) < 24) and (not mm or int(mm) < 60) and (not ss or int(ss) < 61)


def _fix_date(text: str) -> str | None:
    """YYYY-MM-DD or YYYY.MM.DD (ISO 8601 / ACR-NEMA forms) -> YYYYMMDD, if a real date."""
    match = re.fullmatch(r"(\d{4})[-./](\d{2})[-./](\d{2})", text.strip())
    if match is not None and _valid_date("".join(match.groups())):
        return "".join(match.groups())
    return None


def _fix_time(text: str) -> str | None:
    """HH:MM[:SS[.F]] (ACR-NEMA form) -> HHMM[SS[.F]], if a real time."""
    match = re.fullmatch(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?", text.strip())
    if match is None:
        return None
    fixed = "".join(g for g in match.groups() if g)
    return fixed if _valid_time(fixed) else None


def _fix_age(text: str) -> str | None:
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text.strip().upper())
    return f"{int(match.group(1)):03d}{match.group(2)}" if match is not None else None


def _has_control(text: str, vr: str) -> bool:
    allowed = "\x1b\r\n\x0c\t" if vr in _MULTI_LINE_VRS else "\x1b"
    # C0 controls (but the allowed ones), DEL, and the C1 controls U+0080-U+009F that
    # no DICOM character repertoire includes (0x80-0x9F in ISO 8859 text).
    return any((ord(c) < 32 and c not in allowed) or 127 <= ord(c) <= 159 for c in text)


def _check_text(value: str, vr: str, keyword: str, eight_bit_ok: bool) -> tuple[str | None, str | None]:
    """(value to keep or None, problem or None) for one value of a text VR."""
    if not eight_bit_ok and any(ord(c) > 126 for c in value):
        return None, "8-bit characters not covered by the declared Specific Character Set"
    if vr == "PN":
        return _check_pn(value)
    if _has_control(value, vr) or (vr not in _MULTI_LINE_VRS and "\\" in value):
        return None, "control characters or backslash"
    stripped = value.strip(" \x00") if vr not in _MULTI_LINE_VRS else value.rstrip(" \x00")
    if vr == "DA":
        if _valid_date(stripped):
            return stripped, None
        fixed = _fix_date(stripped)
        return (fixed, "corrected to YYYYMMDD") if fixed else (None, "not a valid DA date")
    if vr == "TM":
        if _valid_time(stripped):
            return stripped, None
        fixed = _fix_time(stripped)
        return (fixed, "corrected to HHMMSS") if fixed else (None, "not a valid TM time")
    if vr == "DT":
        return (stripped, None) if _valid_datetime(stripped) else (None, "not a valid DT date-time")
    if vr == "AS":
        if _AS_RE.match(stripped):
            return stripped, None
        fixed = _fix_age(stripped)
        return (fixed, "corrected to nnnY form") if fixed else (None, "not a valid AS age")
    if vr == "CS":
        if keyword == "PatientSex":
            sex = _SEX.get(stripped.upper())
            if sex is None:
                return None, "not M, F or O"
            return sex, (None if sex == stripped else "corrected to M, F or O")
        if len(stripped) <= 16 and _CS_RE.match(stripped):
            return stripped, None
        upper = stripped.upper()
        if len(upper) <= 16 and _CS_RE.match(upper):
            return upper, "corrected to upper case"
        return None, "not a valid CS code string"
    if vr == "UI":
        text = stripped
        return (text, None) if len(text) <= 64 and _UI_RE.match(text) else (None, "not a valid UID")
    if vr == "DS":
        return (stripped, None) if len(stripped) <= 16 and _DS_RE.match(stripped) else (None, "not a valid DS number")
    if vr == "IS":
        ok = len(stripped) <= 12 and _IS_RE.match(stripped) and -(2**31) <= int(stripped) < 2**31
        return (stripped, None) if ok else (None, "not a valid IS integer")
    limit = _MAX_LEN.get(vr)
    if limit is not None and len(value) > limit:
        return None, f"longer than the {limit} characters of {vr}"
    return value, None


def _check_pn(value: str) -> tuple[str | None, str | None]:
    if "\\" in value:
        return None, "backslash in a person name (several values where one is allowed)"
    if _has_control(value, "PN"):
        return None, "control characters in a person name"
    groups = value.split("=")
    if len(groups) > 3 or any(len(g) > 64 for g in groups) or any(g.count("^") > 4 for g in groups):
        return None, "not a valid PN form"
    return value, None


# ------------------------------------------------------------------ character set


def normalise_character_set(value: Any) -> tuple[list[str] | None, str | None]:
    """(defined terms of Specific Character Set, problem) for a source's (0008,0005).

    ``None`` terms mean the default repertoire (ASCII). Spelling slips whose
    intent is unambiguous are corrected (``ISO IR 192``, ``iso_ir 100``,
    ``ISO-IR 6`` -> ``ISO_IR ...``; ``ISO 2022-IR 87`` -> ``ISO 2022 IR 87``);
    an unrecognised term drops the whole value (problem says so).
    """
    from pydicom.charset import python_encoding

    if value is None or value == "":
        return None, None
    terms = [str(v) for v in value] if isinstance(value, (MultiValue, list, tuple)) else [str(value)]
    fixed: list[str] = []
    changed = False
    for term in terms:
        text = term.strip()
        if text == "" and not fixed:
            fixed.append("")  # an empty first value: ISO 2022 with the default repertoire (PS3.3 C.12.1.1.2)
            continue
        candidate = text.upper()
        match = re.fullmatch(r"ISO[ _-]*(2022)?[ _-]*IR[ _-]*(\d+)", candidate)
        if match is not None:
            candidate = f"ISO 2022 IR {match.group(2)}" if match.group(1) else f"ISO_IR {match.group(2)}"
        if candidate not in python_encoding:
            return None, "Specific Character Set not recognised; text restricted to ASCII"
        changed |= candidate != text
        fixed.append(candidate)
    if len(fixed) == 1 and fixed[0].startswith("ISO 2022 IR "):
        # One value cannot use code extensions (PS3.3 C.12.1.1.2): its single-byte twin, if any.
        twin = fixed[0].replace("ISO 2022 IR ", "ISO_IR ")
        if twin not in python_encoding:
            return None, "Specific Character Set not usable as a single value; text restricted to ASCII"
        fixed, changed = [twin], True
    elif len(fixed) > 1:
        # Several values all use code extensions; a term without an ISO 2022 form cannot take part.
        # An empty first value means the default repertoire, spelled ISO 2022 IR 6 (PS3.3 C.12.1.1.2).
        extended = ["ISO 2022 IR 6" if t == "" else t if t.startswith("ISO 2022 IR ")
                    else t.replace("ISO_IR ", "ISO 2022 IR ") for t in fixed]
        if any(t not in python_encoding for t in extended):
            return None, "Specific Character Set values cannot be combined; text restricted to ASCII"
        changed |= extended != fixed
        fixed = extended
    if fixed in ([], [""], ["ISO_IR 6"]):
        return None, None
    try:
        from highdicom.valuerep import _check_specific_character_set

        _check_specific_character_set(fixed[0] if len(fixed) == 1 else fixed)
    except (ValueError, TypeError):
        return None, "Specific Character Set not usable for writing; text restricted to ASCII"
    return fixed, ("corrected the spelling of Specific Character Set" if changed else None)


# ------------------------------------------------------------------ the reference header


def _module_attributes() -> list[tuple[str, str, str, bool]]:
    """(module, keyword, type, module is optional) of every copied root attribute."""
    from highdicom._standard_utils import get_module_attribute_map

    table = get_module_attribute_map()
    out = []
    for module, optional in COPIED_MODULES:
        for item in table[module]:
            if not item["path"] and item["keyword"] not in _NOT_COPIED:
                out.append((module, str(item["keyword"]), str(item["type"]), optional))
    return out


_ATTRIBUTES: list[tuple[str, str, str, bool]] | None = None


def _attributes() -> list[tuple[str, str, str, bool]]:
    global _ATTRIBUTES
    if _ATTRIBUTES is None:
        _ATTRIBUTES = _module_attributes()
    return _ATTRIBUTES


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _standard_vr(element: DataElement) -> str:
    """The dictionary VR of a standard text attribute, else the element's own VR."""
    try:
        standard = dictionary_VR(element.tag)
    except KeyError:
        return element.VR
    return standard if standard in _TEXT_VRS and element.VR in _TEXT_VRS else element.VR


def _check_element(element: DataElement, keyword: str, eight_bit_ok: bool) -> tuple[Any, str | None, bool]:
    """(new value, note, keep) for one element. ``keep`` False: value unusable.

    Text values are checked against the VR of the data dictionary (``_standard_vr``):
    an element that arrived with another VR is judged, and rewritten, as the
    standard defines it.
    """
    vr = _standard_vr(element)
    if vr == "SQ":
        for item in element.value:
            for sub in item:
                try:
                    _, note, keep = _check_element(sub, sub.keyword, eight_bit_ok)
                    if keep and sub.VR == "UI" and not _values(sub.value):
                        # UIDs in items reference something: Type 1 in every macro that has them.
                        keep, note = False, "empty UID"
                except Exception:  # noqa: BLE001  an unreadable nested element makes the sequence unusable
                    keep, note = False, "unreadable"
                if not keep:
                    return None, f"item attribute {sub.keyword or sub.tag}: {note}", False
        return element.value, None, True
    if vr not in _TEXT_VRS:
        return element.value, None, True
    values = _values(element.value)
    if not values:
        return element.value, None, True
    vm = dictionary_VM(element.tag) if keyword else "1-n"
    if vm == "1" and len(values) > 1:
        return None, "several values where one is allowed", False
    out, notes = [], []
    for value in values:
        kept, note = _check_text(str(value), vr, keyword, eight_bit_ok and vr in _CHARSET_VRS)
        if kept is None:
            return None, note, False
        if note:
            notes.append(note)
        out.append(kept)
    new = out[0] if len(out) == 1 else out
    return new, ("; ".join(sorted(set(notes))) or None), True


def normalised_reference(ds: Dataset, *, where: str | None = None, log: bool = True,
                         drop_invalid_pixel_spacing: bool = False) -> tuple[Dataset, list[str]]:
    """A header-only copy of ``ds`` whose copied attributes are valid; and the changes made.

    Returns ``(reference, notes)``; ``notes`` are ``"Keyword: what was done"``
    (never a value), each also logged (``log``) as a warning prefixed with ``where``.
    ``ds`` is not modified. Raises nothing for bad values: every value is kept,
    corrected, blanked or left out.
    """
    from dicom_io.output import header_only

    ref = _own_copy(header_only(ds, drop_invalid_pixel_spacing=drop_invalid_pixel_spacing))
    notes: list[str] = []

    def note(keyword: str, text: str) -> None:
        notes.append(f"{keyword}: {text}")

    terms, problem = normalise_character_set(ref.get("SpecificCharacterSet"))
    if problem:
        note("SpecificCharacterSet", problem)
    if terms is None:
        if "SpecificCharacterSet" in ref:
            del ref.SpecificCharacterSet
    else:
        ref.SpecificCharacterSet = terms[0] if len(terms) == 1 else terms
    eight_bit_ok = terms is not None

    dropped_modules: set[str] = set()
    present = {m: [] for m, _ in COPIED_MODULES}
    missing_required: set[str] = set()
    for module, keyword, type_, optional in _attributes():
        if keyword not in ref:
            if type_ == "2" and not optional:
                ref[keyword] = DataElement(tag_for_keyword(keyword), dictionary_VR(keyword).split(" ")[0], None)
                if keyword != "Manufacturer":
                    note(keyword, "absent Type 2 attribute written empty")
            elif optional and type_ == "1":
                missing_required.add(module)
            continue
        try:
            element = ref[keyword]
            value, problem, keep = _check_element(element, keyword, eight_bit_ok)
        except Exception as exc:  # noqa: BLE001  an unparseable source value is dropped like an invalid one
            value, problem, keep = None, f"unreadable ({type(exc).__name__})", False
        if keep:
            vr = _standard_vr(element)
            if vr != element.VR:
                problem = "; ".join(p for p in (problem, f"VR {element.VR} rewritten as {vr}") if p)
            if problem:  # a new element: the copy shares its elements with the source
                ref[keyword] = DataElement(element.tag, vr, value)
                note(keyword, problem)
            present[module].append(keyword)
            continue
        if optional:
            dropped_modules.add(module)
            note(keyword, f"{problem}; the {module} module is left out")
        elif type_ == "2":
            ref[keyword] = DataElement(tag_for_keyword(keyword), dictionary_VR(keyword).split(" ")[0], None)
            note(keyword, f"{problem}; written empty")
        else:
            del ref[keyword]
            note(keyword, f"{problem}; left out")
    for module, optional in COPIED_MODULES:
        if optional and present[module] and (module in missing_required or module in dropped_modules):
            if module not in dropped_modules:
                note(module, "a Type 1 attribute is missing; the module is left out")
            for _, keyword, _, _ in (a for a in _attributes() if a[0] == module):
                if keyword in ref:
                    del ref[keyword]
    _normalise_lossy_compression(ds, ref, note)
    for text in notes if log else ():
        logger.warning("%s: %s", where or "source", text)
    return ref, notes


def _normalise_lossy_compression(ds: Dataset, ref: Dataset, note) -> None:
    """Lossy Image Compression (General Image, copied into SEG by highdicom): ``00`` or ``01``.

    Empty or invalid: ``01`` when the source's transfer syntax is lossy (that much
    is certain), else left out (highdicom then writes ``00``).
    """
    if "LossyImageCompression" not in ref:
        return
    value = str(ref.get("LossyImageCompression") or "").strip()
    if value in ("00", "01"):
        return
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "get", lambda k: None)("TransferSyntaxUID")
    lossy = transfer_syntax is not None and getattr(transfer_syntax, "is_compressed", False) \
        and not getattr(transfer_syntax, "is_lossless", True)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in ref:
            del ref[keyword]
    if lossy:
        ref.LossyImageCompression = "01"
        note("LossyImageCompression", "not 00 or 01; set to 01 (the transfer syntax is lossy)")
    else:
        note("LossyImageCompression", "not 00 or 01; left out")


def valid_value(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` in ``ds`` if valid for its VR (corrected where unambiguous), else None.

    For writers that put a source value into their own text (e.g. "CR series 3
    image 1" in a description): an invalid one is left out, never copied.
    """
    try:
        element = ds[keyword] if keyword in ds else None
        if element is None:
            return None
        terms, _ = normalise_character_set(ds.get("SpecificCharacterSet"))
        value, _, keep = _check_element(element, keyword, terms is not None)
    except Exception:  # noqa: BLE001  unreadable: as invalid
        return None
    return value if keep and value not in (None, "") else None


def writer_reference(source: "SourceImage", *, drop_invalid_pixel_spacing: bool = False) -> Dataset:
    """The normalised header of ``source`` that writers copy from (computed once per source).

    Every writer (``dicom_io.sc``, ``dicom_io.seg``, ``dicom_io.sr``) hands this,
    not ``source.dataset``, to highdicom. The notes are logged on the first call
    for a source and kept in ``source.cache["reference_notes"]``.
    """
    cache = source.cache
    key = ("reference", drop_invalid_pixel_spacing)
    if key not in cache:
        first = "reference_notes" not in cache
        where = source.path.name if source.path is not None else f"SOP Instance {source.sop_instance_uid}"
        cache[key], notes = normalised_reference(source.dataset, where=where, log=first,
                                                 drop_invalid_pixel_spacing=drop_invalid_pixel_spacing)
        cache.setdefault("reference_notes", notes)
    return _own_copy(cache[key])


def _own_copy(ds: Dataset) -> Dataset:
    """A copy whose elements are its own: a writer may set attributes on it
    (e.g. the SEG geometry) without touching the cached reference or the source."""
    import copy

    out = Dataset()
    for element in ds:
        out.add(copy.copy(element))
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


# ------------------------------------------------------------------ series-level attributes

_ORIENTATION_CODES = re.compile(r"^[APRLHF]+$")


def _valid_patient_orientation(value: Any) -> list[str] | None:
    values = [str(v).strip().upper() for v in _values(value)]
    if len(values) != 2 or not all(_ORIENTATION_CODES.match(v) for v in values):
        return None
    return values


def _code_string(value: Any) -> str | None:
    """A single valid CS value (upper-cased), or None."""
    values = _values(value)
    if len(values) != 1:
        return None
    text = str(values[0]).strip().upper()
    return text if text and len(text) <= 16 and _CS_RE.match(text) else None


def copy_series_attributes(target: Dataset, source: Dataset) -> None:
    """Write PatientOrientation, Laterality and BodyPartExamined of an image ``target``.

    - PatientOrientation (Type 2C, General Image): the source's two valid codes,
      else empty (the outputs lie on the source pixel grid; never invented).
    - BodyPartExamined (Type 3): copied when it is a valid code string.
    - Laterality (General Series, Type 2C): required when Body Part Examined is
      absent or a paired structure (PS3.3 C.7.3.1); dciodvfy requires it for any
      value that is not a known unpaired term, and so do we.
      SC outputs carry the source's Laterality (R/L); for such a body part its
      Image Laterality (R/L) when Laterality is absent; else an empty value
      (unknown), so the condition holds. Never on SEG:
      dciodvfy rejects series Laterality in the SEG IOD.
    Not for SR (these attributes are not part of the SR IODs).
    """
    # Some highdicom versions copy the retired Other Patient IDs (0010,1000).
    if (0x0010, 0x1000) in target:
        del target[(0x0010, 0x1000)]
    if "PixelData" not in target or str(target.get("SOPClassUID", "")).startswith(_SR_PREFIX):
        return
    orientation = _valid_patient_orientation(source.get("PatientOrientation"))
    target.PatientOrientation = orientation
    body_part = _code_string(source.get("BodyPartExamined"))
    if body_part is not None:
        target.BodyPartExamined = body_part
    elif "BodyPartExamined" in target:
        del target.BodyPartExamined
    if "Laterality" in target:
        del target.Laterality
    if target.get("SOPClassUID") == _SEGMENTATION_STORAGE:
        return
    paired_or_unknown = body_part not in UNPAIRED_BODY_PARTS
    laterality = _code_string(source.get("Laterality"))
    if laterality not in ("R", "L") and paired_or_unknown:
        image_laterality = _code_string(source.get("ImageLaterality"))
        laterality = image_laterality if image_laterality in ("R", "L") else None
    if laterality in ("R", "L"):
        target.Laterality = laterality
    elif paired_or_unknown:
        target.Laterality = None  # Type 2C: present, empty = unknown
