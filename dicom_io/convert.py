"""Wrap a plain grayscale picture (PNG/JPEG pixels) as a CR DICOM image.

Used to make demo and test studies from the shared Kermany images, which come as
JPEG; a real PACS sends DICOM, so the demo runs the same DICOM path end to end.
"""
from __future__ import annotations

import datetime as _dt

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from dicom_io.uids import derived_uid

CRImageStorage = "1.2.840.10008.5.1.4.1.1.1"


def cr_from_pixels(
    pixels: np.ndarray,
    *,
    patient_id: str,
    patient_name: str,
    study_key: str,
    instance_key: str,
    series_number: int = 1,
    instance_number: int = 1,
    study_description: str = "CHEST",
    body_part: str = "CHEST",
    view_position: str = "PA",
) -> Dataset:
    """A CR Image Storage dataset around uint8 (rows, cols) MONOCHROME2 pixels.

    UIDs derive from ``study_key`` / ``instance_key`` so the same picture always
    becomes the same instance.
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    now = _dt.datetime(2026, 1, 1, 12, 0, 0)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CRImageStorage
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = derived_uid("demo-instance", instance_key)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID = derived_uid("demo-study", study_key)
    ds.SeriesInstanceUID = derived_uid("demo-series", study_key, str(series_number))
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.Modality = "CR"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "medxplain demo"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    return ds
