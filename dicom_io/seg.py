"""BINARY Segmentation of the most salient region, referencing the source image.

Codes (one segment):

- Segmented Property Category: (SCT 309825002, "Spatial and Relational
  Concept") from CID 7150. A salient region is where the *classifier* looked,
  not a finding; "Morphologically Abnormal Structure" would claim an
  abnormality that nobody has established.
- Segmented Property Type: from CID 217 "Visual Explanation": (DCM 130404,
  "Saliency"), or (DCM 130403, "Gradient-weighted class activation") when the
  method is Grad-CAM.
- Segment Algorithm Type AUTOMATIC, with the Segmentation Algorithm
  Identification (name = method, family = (DCM 123110, "Artificial
  Intelligence"), version, source "medxplain", parameters incl. bundle sha256
  and settings key).

Empty mask: **ValueError**. A SEG without any segmented pixel shows nothing in a
viewer yet looks like a result; the pipeline skips the SEG for such a case and
the SR, which lists only objects that exist, then has no segment reference for
that explainer.

Source images without usable spacing (RG1_UNCR.dcm has PixelSpacing 0\\0):
highdicom copies the source PixelSpacing into the SEG's Pixel Measures; a zero
spacing is invalid, so it is dropped before the source is handed to highdicom
(Pixel Measures is then absent, which the SEG IOD allows without a Frame of
Reference).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.output import (
    OutputContext,
    check_context,
    check_series_number,
    check_source,
    check_text,
    contributing_equipment,
    finalize_output,
    series_description,
)
from dicom_io.patient_study import writer_reference
from dicom_io.source import SourceImage
from dicom_io.uids import derived_uid, instance_uid, series_uid

__all__ = ["saliency_seg", "SEG_KIND", "SEGMENT_LABEL", "SALIENCY_CATEGORY", "saliency_property_type"]

SEG_KIND = "seg"
SEGMENT_LABEL = "most salient region"
SALIENCY_CATEGORY = Code("309825002", "SCT", "Spatial and Relational Concept")
_SALIENCY = codes.DCM.Saliency  # (130404, DCM, "Saliency")
_GRAD_CAM = codes.DCM.GradientWeightedClassActivation  # (130403, DCM, "Gradient-weighted class activation")
_AI_FAMILY = codes.DCM.ArtificialIntelligence  # (123110, DCM, "Artificial Intelligence")


def saliency_property_type(method: str) -> Code:
    """CID 217 code for the kind of visual explanation a method produces."""
    key = method.lower().replace("-", "").replace("_", "")
    return _GRAD_CAM if key.startswith("gradcam") else _SALIENCY


def _parameters_text(parameters: Mapping[str, Any] | None, context: OutputContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in sorted(parameters or {}):
        value = (parameters or {})[key]
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    out["bundle"] = context.bundle_description
    out["settings_key"] = context.settings_key
    return out


def _check_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise ValueError(f'Argument "mask" must be a numpy array, got {type(mask).__name__}.')
    if mask.shape != tuple(shape):
        raise ValueError(
            f'Argument "mask" must have shape {tuple(shape)} (the source pixel grid), got {mask.shape}.'
        )
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f'Argument "mask" must be a boolean array, got dtype {mask.dtype}.')
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError('Argument "mask" must be boolean (or contain only 0 and 1).')
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(
            'Argument "mask" is empty (no pixel is set): there is no salient region to write; '
            "skip the SEG for this case."
        )
    return mask


def saliency_seg(
    *,
    source: SourceImage,
    mask: np.ndarray,
    method: str,
    context: OutputContext,
    series_number: int,
    method_version: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    instance_number: int = 1,
) -> Dataset:
    """BINARY SEG with one segment, "most salient region", on the source grid.

    Parameters
    ----------
    source:
        the source radiograph; referenced in ReferencedSeriesSequence,
        SourceImageSequence and the per-frame DerivationImageSequence.
    mask:
        bool (rows, cols) on the source pixel grid; must not be empty.
    method, method_version, parameters:
        the explainer (version defaults to medxplain's ``software_version``);
        recorded in the Segmentation Algorithm Identification.
    """
    import highdicom as hd

    check_source(source)
    context = check_context(context)
    method = check_text("method", method)
    series_number = check_series_number(series_number)
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f'Argument "instance_number" must be a positive integer, got {instance_number!r}.')
    if method_version is None:
        method_version = context.software_version
    version = check_text("method_version", method_version)
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ValueError('Argument "parameters" must be a mapping (dict) or None.')
    m = _check_mask(mask, (source.rows, source.columns))

    ds = source.dataset
    algorithm = hd.AlgorithmIdentificationSequence(
        name=method,
        family=_AI_FAMILY,
        version=version,
        source=context.manufacturer,
        parameters=_parameters_text(parameters, context),
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=SALIENCY_CATEGORY,
        segmented_property_type=saliency_property_type(method),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=derived_uid("tracking", str(ds.SOPInstanceUID), context.settings_key, SEG_KIND),
        tracking_id=f"{method} most salient region"[:64],
        display_color=hd.color.CIELabColor.from_rgb(255, 64, 0),
    )
    ref = writer_reference(source, drop_invalid_pixel_spacing=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        seg = hd.seg.Segmentation(
            source_images=[ref],
            pixel_array=m,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=series_uid(
                source_study_instance_uid=ds.StudyInstanceUID,
                settings_key=context.settings_key,
                kind=SEG_KIND,
            ),
            series_number=series_number,
            sop_instance_uid=instance_uid(
                source_sop_instance_uid=ds.SOPInstanceUID,
                bundle_sha256=context.bundle_sha256,
                settings_key=context.settings_key,
                kind=SEG_KIND,
            ),
            instance_number=instance_number,
            manufacturer=context.manufacturer,
            manufacturer_model_name="medxplain",
            software_versions=context.software_version,
            device_serial_number=context.serial_number,
            content_label="SALIENCY",
            content_description=f"medxplain {method}: {SEGMENT_LABEL}"[:64],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            omit_empty_frames=False,
            contributing_equipment=[
                contributing_equipment(context, description=f"saliency segmentation ({method})")
            ],
            series_description=series_description(SEG_KIND, method),
        )
    finalize_output(seg, source=ds, context=context, kind=SEG_KIND, method=method)
    return seg
