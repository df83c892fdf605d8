"""What every medxplain output object shares: context, marker, copied attributes.

Every object written back into a study (SC, SEG, SR)

- lives in the *source* study (same Study Instance UID, patient/study attributes
  copied from the source), in a *new* series with a deterministic UID;
- carries ``Manufacturer`` = ``"medxplain"``, ``SoftwareVersions``, a
  ``SeriesDescription`` that starts with ``"MEDXPLAIN"`` and a
  ``ContributingEquipmentSequence`` item for medxplain with purpose
  (DCM 109102, "Processing Equipment") from CID 7005 — medxplain *processes*
  the source into new derived objects; "Modifying" (109103) would claim that we
  altered the source instance, "De-identifying" (109104) and "Frame Extracting"
  (109105) do not apply; "Synthesizing" (109100) is for equipment that
  synthesises whole acquisitions;
- copies ``PatientOrientation``, ``Laterality`` (or ``ImageLaterality`` as
  ``Laterality``) and ``BodyPartExamined`` where the source has them; the
  patient/study attributes it copies are normalised by
  :mod:`dicom_io.patient_study` (the one place that decides what is copied).

The three marks above make our own output recognisable (see
:func:`is_medxplain_output`), so that the Orthanc plugin never explains it again
(Orthanc re-fires STABLE_STUDY each time an instance joins the study).

This module imports only the standard library at import time so that the Orthanc
plugin can use :func:`is_medxplain_output` on Orthanc's simplified tag dicts
without loading pydicom, numpy or highdicom.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from highdicom import ContributingEquipment
    from pydicom.dataset import Dataset


__all__ = [
    "MANUFACTURER",
    "MODEL_NAME",
    "SERIES_DESCRIPTION_PREFIX",
    "OutputContext",
    "is_medxplain_output",
    "contributing_equipment",
    "series_description",
    "source_label",
    "finalize_output",
    "source_pixel_spacing",
    "check_source",
    "check_unit_image",
    "check_probability",
    "check_series_number",
    "check_text",
    "check_context",
    "header_only",
    "source_image_item",
]

#: Manufacturer (0008,0070) of every object we write.
MANUFACTURER = "medxplain"
#: Manufacturer's Model Name (0008,1090) of every object we write.
MODEL_NAME = "medxplain"
#: Every SeriesDescription (0008,103E) we write starts with this word.
SERIES_DESCRIPTION_PREFIX = "MEDXPLAIN"

_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LO_MAX = 64


def _check_lo(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'Argument "{name}" must be a non-empty string.')
    if len(value) > _LO_MAX:
        raise ValueError(
            f'Argument "{name}" must be at most {_LO_MAX} characters (DICOM LO), got {len(value)}.'
        )
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f'Argument "{name}" must not contain backslashes or control characters.')


@dataclass(frozen=True)
class OutputContext:
    """Who wrote an output object, with which model and settings.

    Parameters
    ----------
    software_version:
        medxplain version (goes to SoftwareVersions and the SR device observer).
    bundle_name, bundle_version:
        name and version of the model bundle (bundle.yaml).
    bundle_sha256:
        sha256 (64 lowercase hex digits) identifying the bundle (the pipeline
        decides how: e.g. of bundle.yaml, which pins every weights file by hash).
    settings_key:
        short hash of explainer name + parameters + bundle; part of every
        derived UID, so that changed settings give new instances and unchanged
        settings give the same ones (idempotence).
    manufacturer:
        Manufacturer of the output objects; keep the default, it is part of the
        marker that :func:`is_medxplain_output` checks.
    institution_name, institutional_department_name:
        optional, where medxplain runs.
    device_serial_number:
        required by the SEG IOD (Type 1); defaults to ``"medxplain-<version>"``.
    """

    software_version: str
    bundle_name: str
    bundle_version: str
    bundle_sha256: str
    settings_key: str
    manufacturer: str = MANUFACTURER
    institution_name: str | None = None
    institutional_department_name: str | None = None
    device_serial_number: str | None = None

    def __post_init__(self) -> None:
        _check_lo("software_version", self.software_version)
        _check_lo("bundle_name", self.bundle_name)
        _check_lo("bundle_version", self.bundle_version)
        if not isinstance(self.bundle_sha256, str) or not _SHA256_RE.match(self.bundle_sha256):
            raise ValueError(
                'Argument "bundle_sha256" must be 64 lowercase hexadecimal digits (a sha256 digest).'
            )
        _check_lo("settings_key", self.settings_key)
        if "\x1f" in self.settings_key:
            raise ValueError('Argument "settings_key" must not contain control characters.')
        _check_lo("manufacturer", self.manufacturer)
        if self.institution_name is not None:
            _check_lo("institution_name", self.institution_name)
        if self.institutional_department_name is not None:
            _check_lo("institutional_department_name", self.institutional_department_name)
        if self.device_serial_number is not None:
            _check_lo("device_serial_number", self.device_serial_number)

    @property
    def serial_number(self) -> str:
        return self.device_serial_number or f"{MANUFACTURER}-{self.software_version}"[:_LO_MAX]

    @property
    def bundle_description(self) -> str:
        """``name version sha256=<hex>`` as written into SR parameters and contributions."""
        return f"{self.bundle_name} {self.bundle_version} sha256={self.bundle_sha256}"


# --------------------------------------------------------------------------- marker


def _get(ds: Any, keyword: str, default: Any = None) -> Any:
    if isinstance(ds, Mapping):
        return ds.get(keyword, default)
    return getattr(ds, "get", lambda k, d=None: d)(keyword, default)


def is_medxplain_output(ds: Any) -> bool:
    """True when ``ds`` was written by medxplain (so it must never be explained).

    ``ds`` is a pydicom Dataset, or a mapping from DICOM keyword to value such
    as Orthanc's ``/instances/{id}/simplified-tags`` (there sequences are lists
    of dicts). Any one of these marks suffices:

    - Manufacturer is ``"medxplain"``;
    - SeriesDescription starts with ``"MEDXPLAIN"``;
    - a ContributingEquipmentSequence item has Manufacturer ``"medxplain"``
      (also true for a copy of our output that another system re-wrote).
    """
    if ds is None:
        return False
    manufacturer = _get(ds, "Manufacturer")
    if manufacturer is not None and str(manufacturer).strip().lower() == MANUFACTURER:
        return True
    description = _get(ds, "SeriesDescription")
    if description is not None and str(description).strip().upper().startswith(SERIES_DESCRIPTION_PREFIX):
        return True
    equipment = _get(ds, "ContributingEquipmentSequence") or []
    try:
        items = list(equipment)
    except TypeError:
        items = []
    for item in items:
        item_manufacturer = _get(item, "Manufacturer")
        if item_manufacturer is not None and str(item_manufacturer).strip().lower() == MANUFACTURER:
            return True
    return False


def series_description(kind: str, method: str | None = None, of_source: str | None = None) -> str:
    """``"MEDXPLAIN <KIND> <method>[ of <source>]"``, truncated to the 64 characters of LO."""
    text = f"{SERIES_DESCRIPTION_PREFIX} {kind.upper()}"
    if method:
        text += f" {method}"
    if of_source:
        text += f" of {of_source}"
    return text[:_LO_MAX]


def source_label(ds: "Dataset") -> str:
    """Short human label of a source image for descriptions: ``"CR series 3 image 1"``."""
    from dicom_io.patient_study import valid_value

    modality, series, instance = (valid_value(ds, k) for k in ("Modality", "SeriesNumber", "InstanceNumber"))
    parts = [str(modality or "image")]
    if series is not None:
        parts.append(f"series {series}")
    if instance is not None:
        parts.append(f"image {instance}")
    return " ".join(parts)


def contributing_equipment(context: OutputContext, *, description: str) -> "ContributingEquipment":
    """The ContributingEquipmentSequence item that describes medxplain's part."""
    import datetime

    import highdicom as hd
    from pydicom.sr.codedict import codes

    text = (
        f"{description}; bundle {context.bundle_description}; settings {context.settings_key}"
    )[:1024]
    return hd.ContributingEquipment(
        manufacturer=context.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=context.software_version,
        device_serial_number=context.serial_number,
        institution_name=context.institution_name,
        institutional_department_name=context.institutional_department_name,
        contribution_datetime=datetime.datetime.now(),
        contribution_description=text,
    )


# --------------------------------------------------------------------------- copying

def source_pixel_spacing(source: "Dataset") -> tuple[float, float] | None:
    """The source PixelSpacing as floats, or None when absent or not positive.

    Real files carry ``0\\0`` (RG1_UNCR.dcm); copying that would make the output
    fail validation and viewers would measure nonsense.
    """
    spacing = source.get("PixelSpacing")
    if spacing is None:
        return None
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        return None
    if len(values) != 2 or not all(v > 0 and v == v and v < 1e6 for v in values):
        return None
    return values  # type: ignore[return-value]


def finalize_output(
    target: "Dataset",
    *,
    source: "Dataset",
    context: OutputContext,
    kind: str,
    method: str | None,
    of_source: str | None = None,
) -> "Dataset":
    """Set the attributes every medxplain object shares (in place); returns ``target``.

    ``of_source`` names the source in SeriesDescription, for the kinds written one
    series per source image (SEG, SR: OHIF 3.13 shows only the last instance of a
    SEG or SR series)."""
    target.Manufacturer = context.manufacturer
    target.ManufacturerModelName = MODEL_NAME
    target.SoftwareVersions = context.software_version
    target.DeviceSerialNumber = context.serial_number
    if context.institution_name is not None:
        target.InstitutionName = context.institution_name
        if context.institutional_department_name is not None:
            target.InstitutionalDepartmentName = context.institutional_department_name
    target.SeriesDescription = series_description(kind, method, of_source)
    from dicom_io.patient_study import copy_series_attributes, valid_value

    copy_series_attributes(target, source)
    if "PixelData" in target and target.get("SOPClassUID") != _SEGMENTATION_STORAGE:
        # A derived image of a lossy-compressed source stays flagged as lossy.
        if valid_value(source, "LossyImageCompression") == "01":
            target.LossyImageCompression = "01"
            for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
                value = valid_value(source, keyword)
                if value is not None:
                    setattr(target, keyword, value)
    return target


# --------------------------------------------------------------------------- validation


def check_source(source: Any, name: str = "source") -> None:
    """Eager check that ``source`` is a usable :class:`SourceImage`."""
    import numpy as np

    from dicom_io.source import SourceImage

    if not isinstance(source, SourceImage):
        raise TypeError(f'Argument "{name}" must be a dicom_io.source.SourceImage.')
    ds = source.dataset
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(keyword):
            raise ValueError(f'Argument "{name}": dataset has no {keyword}.')
    display = source.display
    if not isinstance(display, np.ndarray) or display.ndim != 2:
        raise ValueError(f'Argument "{name}": display must be a 2-D array.')
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is not None and cols is not None and display.shape != (int(rows), int(cols)):
        raise ValueError(
            f'Argument "{name}": display shape {display.shape} does not match the '
            f"dataset's Rows x Columns ({rows}, {cols})."
        )


def check_unit_image(name: str, array: Any, shape: tuple[int, int]) -> "np.ndarray":
    """Validate a float map in [0, 1] on the source grid; returns it as float32.

    Raises ValueError naming ``name`` for a wrong type, shape, NaN/inf or values
    outside [0, 1] (a tolerance of 1e-6 absorbs float round-off; values are then
    clipped).
    """
    import numpy as np

    if not isinstance(array, np.ndarray):
        raise ValueError(f'Argument "{name}" must be a numpy array, got {type(array).__name__}.')
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f'Argument "{name}" must have a numeric (float) dtype, got {array.dtype}.')
    if array.shape != tuple(shape):
        raise ValueError(
            f'Argument "{name}" must have shape {tuple(shape)} (the source pixel grid), '
            f"got {array.shape}."
        )
    values = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(values)):
        raise ValueError(f'Argument "{name}" contains NaN or infinite values.')
    lo, hi = float(values.min()), float(values.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f'Argument "{name}" must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}].')
    return np.clip(values, 0.0, 1.0)


def check_probability(name: str, value: Any, *, optional: bool = False) -> float | None:
    """Validate a probability in [0, 1] (None allowed when ``optional``)."""
    import math

    if value is None:
        if optional:
            return None
        raise ValueError(f'Argument "{name}" is required.')
    if isinstance(value, bool):
        raise ValueError(f'Argument "{name}" must be a number in [0, 1], got a bool.')
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'Argument "{name}" must be a number in [0, 1], got {value!r}.') from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f'Argument "{name}" must be a number in [0, 1], got {value!r}.')
    return number


def check_series_number(value: Any, name: str = "series_number") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ValueError(f'Argument "{name}" must be a positive integer, got {value!r}.')
    return value


def check_text(name: str, value: Any, *, max_len: int = _LO_MAX) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'Argument "{name}" must be a non-empty string.')
    if len(value) > max_len:
        raise ValueError(f'Argument "{name}" must be at most {max_len} characters, got {len(value)}.')
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f'Argument "{name}" must not contain backslashes or control characters.')
    return value


def check_context(context: Any) -> OutputContext:
    if not isinstance(context, OutputContext):
        raise TypeError('Argument "context" must be a dicom_io.output.OutputContext.')
    return context


# --------------------------------------------------------------------------- references


def header_only(ds: "Dataset", *, drop_invalid_pixel_spacing: bool = False) -> "Dataset":
    """A shallow copy of ``ds`` without pixel data (cheap to hand to highdicom).

    With ``drop_invalid_pixel_spacing`` a PixelSpacing of zero (or otherwise not
    positive) is left out, so that highdicom does not copy it into a SEG.
    """
    from pydicom.dataset import Dataset, FileMetaDataset

    copy = Dataset()
    pixel_tags = {0x7FE00010, 0x7FE00008, 0x7FE00009}
    drop_spacing = drop_invalid_pixel_spacing and source_pixel_spacing(ds) is None
    for element in ds:
        if int(element.tag) in pixel_tags:
            continue
        if drop_spacing and element.keyword == "PixelSpacing":
            continue
        copy.add(element)
    if hasattr(ds, "file_meta"):
        copy.file_meta = FileMetaDataset(ds.file_meta)
    return copy


def source_image_item(ds: "Dataset", *, spatial_locations_preserved: str | None = None) -> "Dataset":
    """An item of SourceImageSequence (0008,2112) pointing at the source image.

    Purpose of reference: (DCM 121322, "Source image for image processing operation").
    """
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    if spatial_locations_preserved is not None:
        item.SpatialLocationsPreserved = spatial_locations_preserved
    return item
