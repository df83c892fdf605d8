"""The audit trail: a Comprehensive SR holding a TID 1500 Measurement Report.

Document layout (``dsrdump`` shows it in this order)::

    Imaging Measurement Report (TID 1500)
      Language, Observer = DEVICE medxplain <version>, Procedure reported = from the source header
      (procedure_code: plain chest X-ray, mammography or radiographic imaging)
      Imaging Measurements
        Measurement Group "classifier on the whole image" (TID 1410)
          Tracking identifier + UID; Finding = <finding> (e.g. SCT 233604007 "Pneumonia")
          Algorithm: medxplain <version>, parameters: bundle ..., settings key, explainers
          Image Region = SCOORD POLYLINE around the whole source image
          Classifier probability (%), decision threshold (%), total processing time (ms)
          Domain guard score and threshold (when the bundle has a guard)
          <finding> = Present | Absent; Image within the classifier's domain = Yes | No;
          Decision (text); Caution (text, one per caution: "out of domain: ...",
          "low confidence (near threshold): ...", "research override: ...")
        Measurement Group "<method> salient region" per explainer (TID 1410)
          Tracking identifier + UID (the SEG segment's TrackingUID when there is one)
          Finding; Algorithm: <method> <version>, one "Algorithm Parameters" item per
                   parameter, plus bundle name/version/sha256 and settings key
          Image Region = SCOORD POLYLINE: the bounding box of the salient region on
                   the source image (the exact region is the SEG)
          Classifier probability, decision threshold, counterfactual probability (%),
          processing time (ms), numeric checks; rounded (probabilities to 0.1 %,
          times to 1 ms, checks to 4 significant digits)
          <finding> = Present | Absent; counterfactual decision flipped = Yes | No;
          boolean checks; Decision (text); Counterfactual result (text: "counterfactual
          flipped the decision" | "counterfactual did not flip"), text checks
          labelled references: "Saliency overlay", "Counterfactual image, step k of T"
          (last: "full counterfactual"), "Segmentation of the most salient region"

Every CONTAINER is ``SEPARATE`` (PS3.3 C.17.3.2.3: its items are separate
statements), so renderers such as dsr2html list each item on its own line.

Why every group has an image region: OHIF's SR viewport (3.13,
extensions/cornerstone-dicom-sr) turns every measurement group into a
"measurement" and places it on the image its first SCOORD references
(``coords[0].ReferencedSOPSequence``); a group without one crashes the
viewport. The classifier's result concerns the whole image, so its group
outlines the whole image.

Every object passed in ``records[*].derived`` and the source image are listed
in CurrentRequestedProcedureEvidenceSequence (all lie in the source study). The
SR references only objects that are passed in: the pipeline writes it last.

Concepts with no standard code use the private coding scheme ``99MEDXPLAIN``
(declared in CodingSchemeIdentificationSequence): classifier probability,
decision threshold, counterfactual probability, counterfactual flipped,
processing time, decision, and one concept per check name.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.output import (
    OutputContext,
    check_context,
    check_probability,
    check_series_number,
    check_source,
    check_text,
    contributing_equipment,
    finalize_output,
    header_only,
    is_medxplain_output,
    series_description,
    source_label,
)
from dicom_io.patient_study import writer_reference
from dicom_io.source import SourceImage
from dicom_io.uids import derived_uid, instance_uid, series_uid

__all__ = [
    "ExplainerRecord",
    "DomainAssessment",
    "audit_sr",
    "SR_KIND",
    "PRIVATE_SCHEME",
    "finding_code",
    "procedure_code",
]

SR_KIND = "sr"
PRIVATE_SCHEME = "99MEDXPLAIN"

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: Procedure reported (TID 1500 row 4, CID 100 "Quantitative Diagnostic Imaging
#: Procedures" admits any SNOMED CT procedure), chosen from the source's header.
_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
_MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
_RADIOGRAPHY = Code("363680008", "SCT", "Radiographic imaging procedure")

_KNOWN_FINDINGS = {
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
}

_PROBABILITY_UNIT = Code("%", "UCUM", "percent")
_NO_UNITS = Code("1", "UCUM", "no units")
_MILLISECOND = Code("ms", "UCUM", "millisecond")
_PRESENT = codes.SCT.Present  # (52101004, SCT, "Present")
_ABSENT = codes.SCT.Absent  # (272519000, SCT, "Absent")
_YES = codes.SCT.Yes
_NO = codes.SCT.No
_VISUAL_EXPLANATION = codes.DCM.VisualExplanation  # (130401, DCM, "Visual explanation")
_SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement

_CLASSIFIER_PROBABILITY = Code("CLFPROB", PRIVATE_SCHEME, "Classifier probability of finding")
_DECISION_THRESHOLD = Code("DECTHR", PRIVATE_SCHEME, "Classifier decision threshold")
_CF_PROBABILITY = Code("CFPROB", PRIVATE_SCHEME, "Classifier probability of counterfactual")
_CF_FLIPPED = Code("CFFLIP", PRIVATE_SCHEME, "Counterfactual decision flipped")
_PROCESSING_TIME = Code("PROCMS", PRIVATE_SCHEME, "Processing time")
_TOTAL_PROCESSING_TIME = Code("TOTALMS", PRIVATE_SCHEME, "Total processing time")
_DECISION = Code("DECISION", PRIVATE_SCHEME, "Classifier decision")
_DOMAIN_SCORE = Code("DOMSCORE", PRIVATE_SCHEME, "Domain guard score")
_DOMAIN_THRESHOLD = Code("DOMTHR", PRIVATE_SCHEME, "Domain guard threshold")
_IN_DOMAIN = Code("INDOMAIN", PRIVATE_SCHEME, "Image within the classifier's domain")
_CAUTION = Code("CAUTION", PRIVATE_SCHEME, "Caution")
_CF_RESULT = Code("CFRESULT", PRIVATE_SCHEME, "Counterfactual result")
_OVERLAY_REFERENCE = Code("OVERLAY", PRIVATE_SCHEME, "Saliency overlay")
_SEGMENTATION_REFERENCE = Code("SEGMENTATION", PRIVATE_SCHEME, "Segmentation of the most salient region")


def _counterfactual_reference(step: int, total: int) -> Code:
    """Concept naming one step of a counterfactual path (the last is the full counterfactual)."""
    meaning = f"Counterfactual image, step {step} of {total}"
    if step == total:
        meaning += " (full counterfactual)"
    return Code(f"CF{step}OF{total}"[:16], PRIVATE_SCHEME, meaning[:64])


def _percent(probability: float) -> float:
    """A probability as a percentage rounded to 0.1 %."""
    return round(100.0 * float(probability), 1)


def _significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (0 stays 0)."""
    value = float(value)
    if value == 0.0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def finding_code(name: str) -> Code:
    """Code of a finding name: SNOMED CT where known (Pneumonia), else private."""
    known = _KNOWN_FINDINGS.get(name.strip().lower())
    if known is not None:
        return known
    value = "F-" + hashlib.sha256(name.strip().lower().encode()).hexdigest()[:10].upper()
    return Code(value, PRIVATE_SCHEME, name.strip()[:64])


def _check_code(key: str) -> Code:
    value = "CHK-" + hashlib.sha256(key.encode()).hexdigest()[:10].upper()
    return Code(value, PRIVATE_SCHEME, f"check: {key}"[:64])


@dataclass(frozen=True)
class ExplainerRecord:
    """What one explainer did on one source image (one measurement group of the SR).

    All fields are required (pass None / {} / [] explicitly): an audit record
    must not silently default a result. ``probability`` is the classifier's
    probability of the finding and ``threshold`` its decision threshold (the
    finding is recorded Present when ``probability >= threshold``);
    ``decision`` is the label the pipeline reported; ``checks`` are the
    explainer's self-checks (numbers, booleans or short texts);
    ``processing_ms`` the explainer's own time; ``derived`` the datasets
    written for it (overlay SC, counterfactual SCs, at most one SEG), exactly
    as they go to the PACS. ``salient_region`` is the explainer's most salient
    region, a bool array (rows, cols) on the source grid, or None: then the
    SEG in ``derived`` gives it, and without a SEG the group's image region is
    the whole image.
    """

    method: str
    method_version: str
    parameters: dict[str, Any]
    probability: float
    threshold: float
    decision: str
    counterfactual_probability: float | None
    flipped: bool | None
    checks: dict[str, float | bool | str]
    processing_ms: float
    derived: list[Dataset]
    salient_region: Any = None


@dataclass(frozen=True)
class DomainAssessment:
    """The bundle's domain guard on the source: ``score`` (>= 0, larger = less like the
    classifier's training data), the ``threshold`` above which an image is out of domain,
    and ``in_domain`` (score <= threshold)."""

    score: float
    threshold: float
    in_domain: bool


def _check_ms(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f'Argument "{name}" must be a number of milliseconds, got a bool.')
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'Argument "{name}" must be a number of milliseconds, got {value!r}.') from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f'Argument "{name}" must be a finite, non-negative number of milliseconds.')
    return number


def _references_source(derived: Dataset, source_uid: str) -> bool | None:
    """True/False when ``derived`` says which image it came from, None when it does not."""
    uids: list[str] = []
    for item in derived.get("SourceImageSequence", []) or []:
        uids.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for series in derived.get("ReferencedSeriesSequence", []) or []:
        for item in series.get("ReferencedInstanceSequence", []) or []:
            uids.append(str(item.get("ReferencedSOPInstanceUID", "")))
    if not uids:
        return None
    return source_uid in uids


def _validate_record(i: int, record: Any, source: SourceImage) -> ExplainerRecord:
    name = f"records[{i}]"
    if not isinstance(record, ExplainerRecord):
        raise ValueError(f'Argument "{name}" must be an ExplainerRecord, got {type(record).__name__}.')
    check_text(f"{name}.method", record.method)
    check_text(f"{name}.method_version", record.method_version)
    if not isinstance(record.parameters, Mapping):
        raise ValueError(f'Argument "{name}.parameters" must be a dict.')
    check_probability(f"{name}.probability", record.probability)
    check_probability(f"{name}.threshold", record.threshold)
    check_text(f"{name}.decision", record.decision)
    check_probability(f"{name}.counterfactual_probability", record.counterfactual_probability, optional=True)
    if record.flipped is not None and not isinstance(record.flipped, bool):
        raise ValueError(f'Argument "{name}.flipped" must be True, False or None.')
    if not isinstance(record.checks, Mapping):
        raise ValueError(f'Argument "{name}.checks" must be a dict.')
    for key, value in record.checks.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f'Argument "{name}.checks" keys must be non-empty strings.')
        if isinstance(value, bool) or isinstance(value, str):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ValueError(
                f'Argument "{name}.checks[{key!r}]" must be a finite number, a bool or a str, got {value!r}.'
            )
    _check_ms(f"{name}.processing_ms", record.processing_ms)
    if record.salient_region is not None:
        import numpy as np

        region = record.salient_region
        if not isinstance(region, np.ndarray) or region.shape != (source.rows, source.columns):
            raise ValueError(
                f'Argument "{name}.salient_region" must be None or an array of shape '
                f"{(source.rows, source.columns)} (the source pixel grid)."
            )
    if isinstance(record.derived, (Dataset, str, bytes)) or not isinstance(record.derived, Sequence):
        raise ValueError(f'Argument "{name}.derived" must be a list of pydicom Datasets.')
    src = source.dataset
    segs = 0
    for j, ds in enumerate(record.derived):
        label = f"{name}.derived[{j}]"
        if not isinstance(ds, Dataset):
            raise ValueError(f'Argument "{label}" must be a pydicom Dataset.')
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f'Argument "{label}" has no {keyword}.')
        if ds.StudyInstanceUID != src.StudyInstanceUID:
            raise ValueError(f'Argument "{label}" belongs to another study than the source.')
        if not is_medxplain_output(ds):
            raise ValueError(f'Argument "{label}" is not medxplain output (no medxplain marker).')
        if _references_source(ds, str(src.SOPInstanceUID)) is False:
            raise ValueError(f'Argument "{label}" was derived from another image than the source.')
        if ds.SOPClassUID == SEGMENTATION_STORAGE:
            segs += 1
    if segs > 1:
        raise ValueError(f'Argument "{name}.derived" contains more than one SEG.')
    return record


def _settings_digest(methods: Sequence[tuple[str, str, Mapping[str, Any]]]) -> str:
    payload = [[m, v, json.dumps(dict(p), sort_keys=True, default=str)] for m, v, p in methods]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def report_uid(
    *, source_sop_instance_uid: str, context: OutputContext,
    methods: Sequence[tuple[str, str, Mapping[str, Any]]],
) -> str:
    """SOP Instance UID that :func:`audit_sr` gives the report of this source with
    these (method, version, parameters): known before any work, so a PACS worker
    can look it up and skip an image that is already explained."""
    return instance_uid(
        source_sop_instance_uid=source_sop_instance_uid,
        bundle_sha256=context.bundle_sha256,
        settings_key=f"{context.settings_key}:{_settings_digest(methods)}",
        kind=SR_KIND,
    )


def _parameters(record: ExplainerRecord, context: OutputContext) -> list[str]:
    params = []
    for key in sorted(record.parameters):
        value = record.parameters[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        params.append(f"{key}={text}")
    params.append(f"bundle={context.bundle_description}")
    params.append(f"settings_key={context.settings_key}")
    return params


def _kind(ds: Dataset) -> str:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "COUNTERFACTUAL" in image_type:
        return "counterfactual"
    if "OVERLAY" in image_type:
        return "overlay"
    return "other"


def _region(mask: Any, rows: int, cols: int) -> tuple[Any, bool]:
    """Closed POLYLINE (column, row) around the True pixels of ``mask``, or the
    whole image when there are none; and whether it is the whole image.

    SCOORD image coordinates: (0, 0) is the top left corner of the top left
    pixel (PS3.3 C.18.6.1.2), so a pixel box [r0, r1] x [c0, c1] is outlined by
    c0..c1 + 1 and r0..r1 + 1.
    """
    import numpy as np

    whole = True
    r0, r1, c0, c1 = 0, rows - 1, 0, cols - 1
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (rows, cols):
            raise ValueError(
                f'Argument "salient_region" must have shape {(rows, cols)} (the source grid), got {m.shape}.'
            )
        if m.any():
            ys, xs = np.nonzero(m)
            r0, r1, c0, c1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
            whole = False
    x0, x1, y0, y1 = float(c0), float(c1 + 1), float(r0), float(r1 + 1)
    points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
    return points, whole


def _seg_mask(seg: Dataset) -> Any:
    """The (single-frame, single-segment) mask of a BINARY SEG as a bool array."""
    import numpy as np

    pixels = np.asarray(seg.pixel_array)
    return pixels.reshape(int(seg.Rows), int(seg.Columns)).astype(bool)


def _image_region(points: Any, source: Dataset) -> Any:
    import highdicom as hd

    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )


def _references(record: ExplainerRecord) -> list[Any]:
    """Labelled IMAGE items: overlay, counterfactual step k of T, segmentation."""
    import highdicom as hd

    items = []
    images = [d for d in record.derived if d.SOPClassUID != SEGMENTATION_STORAGE and "Rows" in d]
    overlays = [d for d in images if _kind(d) == "overlay"]
    counterfactuals = sorted(
        (d for d in images if _kind(d) == "counterfactual"), key=lambda d: int(d.get("InstanceNumber", 0))
    )
    others = [d for d in images if _kind(d) == "other"]
    labelled = [(_OVERLAY_REFERENCE, d) for d in overlays]
    labelled += [
        (_counterfactual_reference(k + 1, len(counterfactuals)), d) for k, d in enumerate(counterfactuals)
    ]
    labelled += [(_VISUAL_EXPLANATION, d) for d in others]
    labelled += [(_SEGMENTATION_REFERENCE, d) for d in record.derived if d.SOPClassUID == SEGMENTATION_STORAGE]
    for concept, ds in labelled:
        items.append(
            hd.sr.ImageContentItem(
                name=concept,
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type="CONTAINS",
            )
        )
    return items


def _group(
    record: ExplainerRecord,
    *,
    index: int,
    source: Dataset,
    context: OutputContext,
    finding: Code,
) -> Any:
    import highdicom as hd

    segs = [d for d in record.derived if d.SOPClassUID == SEGMENTATION_STORAGE]
    images = [d for d in record.derived if d.SOPClassUID != SEGMENTATION_STORAGE and "Rows" in d]
    counterfactuals = sorted(
        (d for d in images if _kind(d) == "counterfactual"), key=lambda d: int(d.get("InstanceNumber", 0))
    )

    tracking_uid = None
    if segs and segs[0].get("SegmentSequence"):
        tracking_uid = segs[0].SegmentSequence[0].get("TrackingUID")
    if not tracking_uid:
        tracking_uid = derived_uid(
            "tracking", str(source.SOPInstanceUID), context.settings_key, SR_KIND, record.method, str(index)
        )
    mask = record.salient_region
    if mask is None and segs:
        mask = _seg_mask(segs[0])
    points, whole = _region(mask, int(source.Rows), int(source.Columns))
    label = f"{record.method} " + ("(no salient region: whole image)" if whole else "salient region")
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label[:64])
    algorithm = hd.sr.AlgorithmIdentification(
        name=record.method,
        version=record.method_version,
        parameters=_parameters(record, context),
        manufacturer=context.manufacturer,
    )
    source_ref = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
    )
    measurements = [
        hd.sr.Measurement(
            name=_CLASSIFIER_PROBABILITY,
            value=_percent(record.probability),
            unit=_PROBABILITY_UNIT,
            referenced_images=[source_ref],
        ),
        hd.sr.Measurement(name=_DECISION_THRESHOLD, value=_percent(record.threshold), unit=_PROBABILITY_UNIT),
    ]
    if record.counterfactual_probability is not None:
        refs = None
        if counterfactuals:
            last = counterfactuals[-1]
            refs = [
                hd.sr.SourceImageForMeasurement(
                    referenced_sop_class_uid=last.SOPClassUID,
                    referenced_sop_instance_uid=last.SOPInstanceUID,
                )
            ]
        measurements.append(
            hd.sr.Measurement(
                name=_CF_PROBABILITY,
                value=_percent(record.counterfactual_probability),
                unit=_PROBABILITY_UNIT,
                referenced_images=refs,
            )
        )
    measurements.append(
        hd.sr.Measurement(name=_PROCESSING_TIME, value=round(float(record.processing_ms)), unit=_MILLISECOND)
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=finding, value=_PRESENT if record.probability >= record.threshold else _ABSENT
        )
    ]
    if record.flipped is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(name=_CF_FLIPPED, value=_YES if record.flipped else _NO)
        )
    texts: list[Any] = [
        hd.sr.TextContentItem(name=_DECISION, value=record.decision, relationship_type="CONTAINS")
    ]
    if record.flipped is not None:
        texts.append(hd.sr.TextContentItem(
            name=_CF_RESULT, relationship_type="CONTAINS",
            value="counterfactual flipped the decision" if record.flipped else "counterfactual did not flip"))
    for key in sorted(record.checks):
        value = record.checks[key]
        code = _check_code(key)
        if isinstance(value, bool):
            evaluations.append(hd.sr.QualitativeEvaluation(name=code, value=_YES if value else _NO))
        elif isinstance(value, str):
            texts.append(hd.sr.TextContentItem(name=code, value=value, relationship_type="CONTAINS"))
        else:
            measurements.append(hd.sr.Measurement(name=code, value=_significant(value), unit=_NO_UNITS))

    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=_image_region(points, source),
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    content = group[0].ContentSequence
    content.extend(texts)
    content.extend(_references(record))
    return group


def _run_group(
    records: Sequence[ExplainerRecord], *, source: Dataset, context: OutputContext, finding: Code,
    total_ms: float, domain: DomainAssessment | None = None, cautions: Sequence[str] = (),
) -> Any:
    """The classifier's result on the whole image and the run's identity and time."""
    import highdicom as hd

    first = records[0]
    points, _ = _region(None, int(source.Rows), int(source.Columns))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", str(source.SOPInstanceUID), context.settings_key, SR_KIND, "run"),
            identifier="medxplain: classifier on the whole image",
        ),
        referenced_region=_image_region(points, source),
        finding_type=finding,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name="medxplain",
            version=context.software_version,
            parameters=[
                f"bundle={context.bundle_description}",
                f"settings_key={context.settings_key}",
                "explainers=" + ", ".join(f"{r.method} {r.method_version}" for r in records),
            ],
            manufacturer=context.manufacturer,
        ),
        measurements=[
            hd.sr.Measurement(
                name=_CLASSIFIER_PROBABILITY,
                value=_percent(first.probability),
                unit=_PROBABILITY_UNIT,
                referenced_images=[
                    hd.sr.SourceImageForMeasurement(
                        referenced_sop_class_uid=source.SOPClassUID,
                        referenced_sop_instance_uid=source.SOPInstanceUID,
                    )
                ],
            ),
            hd.sr.Measurement(name=_DECISION_THRESHOLD, value=_percent(first.threshold), unit=_PROBABILITY_UNIT),
            hd.sr.Measurement(name=_TOTAL_PROCESSING_TIME, value=round(total_ms), unit=_MILLISECOND),
            *([] if domain is None else [
                hd.sr.Measurement(name=_DOMAIN_SCORE, value=_significant(domain.score), unit=_NO_UNITS),
                hd.sr.Measurement(name=_DOMAIN_THRESHOLD, value=_significant(domain.threshold), unit=_NO_UNITS),
            ]),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=finding, value=_PRESENT if first.probability >= first.threshold else _ABSENT
            ),
            *([] if domain is None else [
                hd.sr.QualitativeEvaluation(name=_IN_DOMAIN, value=_YES if domain.in_domain else _NO)]),
        ],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=_DECISION, value=first.decision, relationship_type="CONTAINS")
    )
    for caution in cautions:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=_CAUTION, value=caution, relationship_type="CONTAINS"))
    return group


def _separate(items: Any) -> None:
    """Mark every CONTAINER in the content tree SEPARATE (in place)."""
    for item in items or []:
        if item.get("ValueType") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        _separate(item.get("ContentSequence"))


def procedure_code(source: SourceImage) -> Code:
    """Procedure reported for TID 1500 (row 4), from the source's Modality and Body
    Part Examined: MG -> SCT 71651007 "Mammography"; Body Part CHEST -> SCT 399208008
    "Plain chest X-ray"; anything else -> SCT 363680008 "Radiographic imaging
    procedure" (the eligibility rules admit only projection radiographs)."""
    modality = str(source.dataset.get("Modality", "") or "").strip().upper()
    body_part = str(source.dataset.get("BodyPartExamined", "") or "").strip().upper()
    if modality == "MG":
        return _MAMMOGRAPHY
    if body_part == "CHEST":
        return _CHEST_XRAY
    return _RADIOGRAPHY


def audit_sr(
    *,
    source: SourceImage,
    records: Sequence[ExplainerRecord],
    context: OutputContext,
    series_number: int,
    finding_name: str,
    total_processing_ms: float,
    instance_number: int = 1,
    domain: DomainAssessment | None = None,
    cautions: Sequence[str] = (),
) -> Dataset:
    """Comprehensive SR (TID 1500) recording what ran, on what, with which result.

    Parameters
    ----------
    source:
        the explained radiograph.
    records:
        one :class:`ExplainerRecord` per explainer (at least one); every dataset
        in their ``derived`` lists must be medxplain output of this source in
        this study, and appears in the evidence and the content tree.
    finding_name:
        the classifier's positive class, from the bundle's task ("Pneumonia" -> SCT
        233604007; an unknown finding gets a code in the private scheme).
    total_processing_ms:
        wall time of the whole job (read, classify, explain, write).
    domain:
        the bundle's domain guard on this image (score, threshold, in/out), or None
        when the bundle has no guard; recorded in the classifier's group.
    cautions:
        plain-language warnings for the reader (e.g. "out of domain: ...", "low
        confidence (near threshold)"), each a TEXT item "Caution" in that group.
    """
    import highdicom as hd

    check_source(source)
    context = check_context(context)
    series_number = check_series_number(series_number)
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f'Argument "instance_number" must be a positive integer, got {instance_number!r}.')
    finding_name = check_text("finding_name", finding_name)
    total_ms = _check_ms("total_processing_ms", total_processing_ms)
    if isinstance(records, (ExplainerRecord, str, bytes)) or not isinstance(records, Sequence):
        raise ValueError('Argument "records" must be a list of ExplainerRecord.')
    if len(records) == 0:
        raise ValueError('Argument "records" must contain at least one ExplainerRecord.')
    records = [_validate_record(i, r, source) for i, r in enumerate(records)]
    seen: set[str] = set()
    for i, record in enumerate(records):
        for ds in record.derived:
            uid = str(ds.SOPInstanceUID)
            if uid in seen:
                raise ValueError(f'Argument "records[{i}].derived" repeats instance {uid}.')
            seen.add(uid)

    src = writer_reference(source)
    finding = finding_code(finding_name)

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", context.manufacturer, context.serial_number),
        name="medxplain",
        manufacturer_name=context.manufacturer,
        model_name="medxplain",
        serial_number=context.serial_number,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )
    if domain is not None and not isinstance(domain, DomainAssessment):
        raise ValueError('Argument "domain" must be a DomainAssessment or None.')
    if isinstance(cautions, str) or any(not isinstance(c, str) or not c.strip() for c in cautions):
        raise ValueError('Argument "cautions" must be a list of non-empty texts.')
    run_group = _run_group(records, source=src, context=context, finding=finding, total_ms=total_ms,
                           domain=domain, cautions=[check_text("cautions", c, max_len=1024) for c in cautions])
    groups = [run_group] + [
        _group(r, index=i, source=src, context=context, finding=finding) for i, r in enumerate(records)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure_code(source),
        imaging_measurements=groups,
    )
    report[0].ContinuityOfContent = "SEPARATE"
    _separate(report[0].ContentSequence)
    evidence = [src] + [header_only(d) for r in records for d in r.derived]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=report[0],
            # One series per source image: OHIF 3.13 shows only the last SR of a series.
            series_instance_uid=series_uid(
                source_study_instance_uid=src.StudyInstanceUID,
                settings_key=context.settings_key,
                kind=SR_KIND,
                extra=str(src.SOPInstanceUID),
            ),
            series_number=series_number,
            sop_instance_uid=report_uid(
                source_sop_instance_uid=src.SOPInstanceUID,
                context=context,
                methods=[(r.method, r.method_version, r.parameters) for r in records],
            ),
            instance_number=instance_number,
            manufacturer=context.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=context.institution_name,
            institutional_department_name=context.institutional_department_name,
            record_evidence=True,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(context, description="explanation audit report")],
            series_description=series_description(SR_KIND, "audit", source_label(src)),
            manufacturer_model_name="medxplain",
            software_versions=context.software_version,
            coding_schemes=[
                hd.coding_schemes.CodingSchemeIdentificationItem(
                    designator=PRIVATE_SCHEME,
                    name="medxplain local concepts",
                    responsible_organization="medxplain",
                )
            ],
        )
    finalize_output(sr, source=source.dataset, context=context, kind=SR_KIND, method="audit",
                    of_source=source_label(src))
    return sr
