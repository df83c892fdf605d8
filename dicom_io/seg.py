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

Geometry (what OHIF's SEG loader, Cornerstone3D, needs; PS3.3 A.51 and
C.7.6.16.2): every SEG carries a Frame of Reference, the Plane Orientation and
Plane Position functional groups and Pixel Measures (PixelSpacing,
SliceThickness, SpacingBetweenSlices). A projection radiograph (CR/DX) usually
has no patient coordinate system, so each value comes from the source where it
has one and is otherwise synthesised, as :func:`seg_geometry` documents:

- ImageOrientationPatient: the source's; else ``1\\0\\0\\0\\1\\0`` (rows along
  +x, columns along +y), the orientation Cornerstone3D itself assumes for an
  image without one, so the SEG lies "in plane" with its source there. The
  source's PatientOrientation (e.g. ``L\\F``), which states the anatomical
  directions of rows and columns, is copied unchanged and is not turned into
  direction cosines: a viewer that compared such cosines with its own default
  for the source would call the SEG oblique and refuse it.
- ImagePositionPatient: the source's; else ``0\\0\\0``.
- PixelSpacing: the source's PixelSpacing when valid (RG1_UNCR.dcm has
  ``0\\0``), else ImagerPixelSpacing, else ``1\\1`` (Cornerstone's default).
- SliceThickness and SpacingBetweenSlices: the source's SliceThickness, else 1
  mm. A projection has no slice; one frame on one plane makes both values
  inert (there is no second frame to space), and OHIF needs them present.
- FrameOfReferenceUID: the source's; else one derived from the source's SOP
  Instance UID, shared with nothing else (PositionReferenceIndicator empty).

For a 2-D image none of the synthesised values places the mask anywhere but
on the source's own pixel grid, which the per-frame DerivationImageSequence
references explicitly; viewers match the SEG to its source by that reference.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
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
    source_label,
    source_pixel_spacing,
)
from dicom_io.patient_study import writer_reference
from dicom_io.source import SourceImage
from dicom_io.uids import derived_uid, instance_uid, series_uid

__all__ = [
    "saliency_seg", "seg_geometry", "SegGeometry", "SEG_KIND", "SEGMENT_LABEL", "SALIENCY_CATEGORY",
    "saliency_property_type",
]

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


@dataclass(frozen=True)
class SegGeometry:
    """Geometry written into a SEG of a 2-D source (see the module docstring).

    ``synthesised`` names the values not taken from the source.
    """

    frame_of_reference_uid: str
    image_orientation: tuple[float, float, float, float, float, float]
    image_position: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    synthesised: tuple[str, ...]


def _numbers(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def seg_geometry(ds: Dataset) -> SegGeometry:
    """Frame of reference, orientation, position, spacing and thickness for a SEG of ``ds``."""
    synthesised: list[str] = []
    orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
    if orientation is None or not any(orientation[:3]) or not any(orientation[3:]):
        orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        synthesised.append("ImageOrientationPatient")
    position = _numbers(ds.get("ImagePositionPatient"), 3)
    if position is None:
        position = (0.0, 0.0, 0.0)
        synthesised.append("ImagePositionPatient")
    spacing = source_pixel_spacing(ds)
    if spacing is None:
        imager = _numbers(ds.get("ImagerPixelSpacing"), 2)
        if imager is not None and all(0 < v < 1e6 for v in imager):
            spacing = imager  # type: ignore[assignment]
            synthesised.append("PixelSpacing (from ImagerPixelSpacing)")
        else:
            spacing = (1.0, 1.0)
            synthesised.append("PixelSpacing")
    thickness = _numbers([ds.get("SliceThickness")] if ds.get("SliceThickness") not in (None, "") else None, 1)
    if thickness is None or thickness[0] <= 0:
        thickness = (1.0,)
        synthesised.append("SliceThickness")
    frame_of_reference = str(ds.get("FrameOfReferenceUID") or "")
    if not frame_of_reference:
        frame_of_reference = derived_uid("frame-of-reference", str(ds.SOPInstanceUID))
        synthesised.append("FrameOfReferenceUID")
    return SegGeometry(
        frame_of_reference_uid=frame_of_reference,
        image_orientation=orientation,  # type: ignore[arg-type]
        image_position=position,  # type: ignore[arg-type]
        pixel_spacing=tuple(spacing),  # type: ignore[arg-type]
        slice_thickness=thickness[0],
        synthesised=tuple(synthesised),
    )


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
    geometry = seg_geometry(ds)
    # highdicom takes the PATIENT coordinate system (and writes the Frame of
    # Reference module and plane functional groups) only for a source with a
    # frame of reference and a position: hand it a header with the geometry.
    ref = writer_reference(source, drop_invalid_pixel_spacing=True)
    ref.FrameOfReferenceUID = geometry.frame_of_reference_uid
    ref.ImageOrientationPatient = list(geometry.image_orientation)
    ref.ImagePositionPatient = list(geometry.image_position)
    ref.PixelSpacing = list(geometry.pixel_spacing)
    ref.SliceThickness = geometry.slice_thickness
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        seg = hd.seg.Segmentation(
            source_images=[ref],
            pixel_array=m,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            # One series per source image: OHIF 3.13 shows only the last SEG of a series.
            series_instance_uid=series_uid(
                source_study_instance_uid=ds.StudyInstanceUID,
                settings_key=context.settings_key,
                kind=SEG_KIND,
                extra=str(ds.SOPInstanceUID),
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
            series_description=series_description(SEG_KIND, method, source_label(ds)),
            pixel_measures=hd.PixelMeasuresSequence(
                pixel_spacing=geometry.pixel_spacing,
                slice_thickness=geometry.slice_thickness,
                spacing_between_slices=geometry.slice_thickness,
            ),
        )
    if "PositionReferenceIndicator" not in seg:
        seg.PositionReferenceIndicator = None  # Type 2 (Frame of Reference module)
    finalize_output(seg, source=ds, context=context, kind=SEG_KIND, method=method, of_source=source_label(ds))
    return seg
