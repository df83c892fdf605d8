"""Which instances the PACS side explains, and with which model profile.

The decision for one instance, in order:

1. our own output is never eligible (``medxplain_output``);
2. anything the reader would refuse (not an image, colour, multi-frame, CT/MR
   slice, odd header...) is skipped with the reader's reason code
   (``check_header``, the same rules ``read_radiograph`` applies);
3. raw detector data (a "For Processing" SOP Class or Presentation Intent
   Type) is skipped with ``for_processing`` unless a rule sets
   ``for_processing: true``: it is not the image a radiologist sees, and a
   classifier trained on presentation images says nothing reliable about it;
4. the first rule whose lists all match decides (empty list = any value;
   Modality and SOP Class UID exact, BodyPartExamined and ViewPosition
   case-insensitive); no rule: ``no_rule_matches (modality CT)`` and the like.

Headers may come from pydicom (possibly read with ``stop_before_pixels``) or,
for ``match_rule`` and ``series_exclusion``, from an Orthanc tags mapping
(keyword -> value). Reasons never contain patient data or UIDs: they go to the
log, the audit trail and the job's last error. No torch here.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from config.schema import MatchRule
from dicom_io.errors import DicomInputError
from dicom_io.output import is_medxplain_output
from dicom_io.reader import check_header, is_for_processing

__all__ = ["FOR_PROCESSING", "MEDXPLAIN_OUTPUT", "NO_RULE", "eligibility", "match_rule", "series_exclusion"]

MEDXPLAIN_OUTPUT = "medxplain_output"
FOR_PROCESSING = "for_processing"
NO_RULE = "no_rule_matches"

# Series-level verdicts use the reader's reason codes where the Modality alone
# tells what the reader would say, so that a series skipped without download and
# an instance skipped after download are counted under the same reason.
_NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
                                   "REG", "FID", "ECG", "HD", "AU", "PLAN", "RWV"})
_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT", "OPT", "OCT"})

# (rule field, DICOM keyword, case-insensitive, label in reasons)
_CRITERIA = (
    ("modalities", "Modality", False, "modality"),
    ("sop_class_uids", "SOPClassUID", False, "SOP class"),
    ("body_parts", "BodyPartExamined", True, "body part"),
    ("view_positions", "ViewPosition", True, "view"),
)


def _value(header: Any, keyword: str) -> str | None:
    if isinstance(header, Mapping):
        value = header.get(keyword)
    else:
        value = header.get(keyword) if hasattr(header, "get") else None
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _matches(allowed: Iterable[str], value: str | None, fold: bool) -> bool:
    allowed = list(allowed)
    if not allowed:
        return True
    if value is None:
        return False
    if fold:
        return value.upper() in {a.strip().upper() for a in allowed}
    return value in {a.strip() for a in allowed}


def match_rule(header: Any, rules: Iterable[MatchRule]) -> MatchRule | None:
    """The first rule whose modality, SOP class, body part and view lists all admit ``header``
    (for raw "For Processing" data: among the rules with ``for_processing: true``)."""
    if is_for_processing(header):
        rules = [rule for rule in rules if rule.for_processing]
    for rule in rules:
        if all(_matches(getattr(rule, field), _value(header, keyword), fold)
               for field, keyword, fold, _ in _CRITERIA):
            return rule
    return None


def _no_rule_reason(header: Any, rules: list[MatchRule]) -> str:
    """``no_rule_matches (modality CR, body part HAND)``: the values the rules look at."""
    shown = []
    for field, keyword, _, label in _CRITERIA:
        if any(getattr(rule, field) for rule in rules):
            value = _value(header, keyword)
            shown.append(f"{label} {value[:64] if value else '(none)'}")
    if not rules:
        return f"{NO_RULE} (no rules configured)"
    return f"{NO_RULE} ({', '.join(shown)})" if shown else NO_RULE


def eligibility(ds: Any, rules: Iterable[MatchRule]) -> tuple[bool, str]:
    """``(True, "rule <name>")`` or ``(False, reason)`` for one instance header.

    ``ds`` is a pydicom Dataset (pixel data not needed: it is checked at decoding).
    The reason of a refusal is a stable code: ``medxplain_output``, the reader's
    reason (``not_an_image``, ``colour_image``, ``not_projection_radiograph``...),
    ``for_processing`` or ``no_rule_matches (...)``.
    """
    rules = list(rules)
    if is_medxplain_output(ds):
        return False, MEDXPLAIN_OUTPUT
    try:
        check_header(ds, require_pixel_data=False)
    except DicomInputError as exc:
        return False, exc.reason
    if is_for_processing(ds) and not any(rule.for_processing for rule in rules):
        return False, FOR_PROCESSING
    rule = match_rule(ds, rules)
    if rule is None:
        return False, _no_rule_reason(ds, rules)
    return True, f"rule {rule.name}"


def series_exclusion(series_tags: Mapping[str, Any], rules: Iterable[MatchRule]) -> str | None:
    """Why no instance of a series can be eligible, judged from series-level tags alone.

    For Orthanc's series ``MainDicomTags``: a series of our own output, or one whose
    Modality no rule admits (every rule lists modalities), needs no download. None
    when the instances must be looked at one by one.
    """
    rules = list(rules)
    if is_medxplain_output(series_tags):
        return MEDXPLAIN_OUTPUT
    modality = _value(series_tags, "Modality")
    if rules and modality and all(rule.modalities for rule in rules) \
            and not any(_matches(rule.modalities, modality, False) for rule in rules):
        if modality.upper() in _NON_IMAGE_MODALITIES:
            return "not_an_image"
        if modality.upper() in _CROSS_SECTIONAL_MODALITIES:
            return "not_projection_radiograph"
        return f"{NO_RULE} (modality {modality[:16]})"
    return None
