"""dicom_io.patient_study: the one place that decides what the writers copy; and the reader's header rules."""
from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_io.errors import BadDimensionsError, InvalidHeaderError
from dicom_io.patient_study import copy_series_attributes, normalise_character_set, normalised_reference
from dicom_io.reader import read_radiograph


def _image(rows: int = 96, cols: int = 80, **attributes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) % 4000) + 50
    ds.PixelData = ramp.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("value, expected", [
    ("ISO IR 192", ["ISO_IR 192"]), ("iso_ir 100", ["ISO_IR 100"]), ("ISO_IR 100", ["ISO_IR 100"]),
    ("ISO-IR 6", None), ("", None), (None, None), ("NONSENSE", None), ("ISO 2022 IR 100", ["ISO_IR 100"]),
    (["ISO_IR 100", "ISO_IR 192"], None), (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
])
def test_specific_character_set_spelling_is_corrected_only_where_unambiguous(value, expected):
    assert normalise_character_set(value)[0] == expected


def test_invalid_and_absent_patient_study_values(caplog):
    ds = _image(PatientName="Doe\\John", PatientBirthDate="1901-02-03", PatientSex="male", StudyDate="19011399",
                StudyTime="12:30:00", PatientAge="62Y", StudyDescription="x" * 80)
    ds[0x00101020] = pydicom.DataElement(0x00101020, "LO", "1,80")  # Patient's Size (DS) of the wrong form
    with caplog.at_level(logging.WARNING, logger="dicom_io.patient_study"):
        ref, notes = normalised_reference(ds, where="test")
    assert ref.PatientBirthDate == "19010203" and ref.PatientSex == "M" and ref.StudyTime == "123000"
    assert ref.PatientAge == "062Y"
    assert ref.PatientName in (None, "") and ref.StudyDate in (None, "")  # ambiguous: blanked (Type 2)
    assert "PatientSize" not in ref and "StudyDescription" not in ref  # Type 3: left out
    for keyword in ("PatientID", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        assert keyword in ref and ref[keyword].value in (None, "")  # absent Type 2: written empty
    assert len(ds.PatientName) == 2 and ds.PatientBirthDate == "1901-02-03"  # the source is untouched
    named = {n.split(":")[0] for n in notes}
    assert {"PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyID"} <= named
    ours = " ".join(r.getMessage() for r in caplog.records if r.name == "dicom_io.patient_study")
    assert "PatientBirthDate" in ours
    assert "Doe" not in ours and "1901" not in ours and "1,80" not in ours  # never a value


def test_undeclared_8_bit_text_is_blanked():
    ds = _image(PatientName="Müller^Jörg", InstitutionName="Süd")
    ref, notes = normalised_reference(ds)
    assert ref.PatientName in (None, "") and "InstitutionName" not in ref
    ds.SpecificCharacterSet = "ISO_IR 100"
    ref, _ = normalised_reference(ds)
    assert ref.PatientName == "Müller^Jörg"


@pytest.mark.parametrize("body_part, laterality, image_laterality, expected", [
    (None, None, None, ""),          # no body part: Type 2C, present and empty
    ("KNEE", None, "L", "L"),        # paired: Image Laterality as series Laterality
    ("CHEST", None, "L", None),      # unpaired: not required, not written
    ("CHEST PA", None, None, ""),    # not a known term: may be paired, written empty
    ("chest", "R", None, "R"),       # copied where the source has it (body part upper-cased)
])
def test_laterality_on_secondary_capture(body_part, laterality, image_laterality, expected):
    source = _image()
    for keyword, value in (("BodyPartExamined", body_part), ("Laterality", laterality),
                           ("ImageLaterality", image_laterality)):
        if value is not None:
            setattr(source, keyword, value)
    target = _image()
    copy_series_attributes(target, source)
    if expected is None:
        assert "Laterality" not in target
    else:
        assert "Laterality" in target and (target.Laterality or "") == expected


def test_missing_or_invalid_uids_and_tiny_images_are_refused():
    ds = _image()
    del ds.StudyInstanceUID
    with pytest.raises(InvalidHeaderError) as caught:
        read_radiograph(ds)
    assert caught.value.reason == "missing_uid"
    with pytest.raises(InvalidHeaderError) as caught:
        read_radiograph(_image(SeriesInstanceUID="1.2.abc"))
    assert caught.value.reason == "invalid_uid"
    with pytest.raises(BadDimensionsError) as caught:
        read_radiograph(_image(rows=1, cols=1))
    assert caught.value.reason == "too_small"


def test_pixel_padding_range_and_presentation_lut_rules():
    ds = _image(PixelPaddingValue=50, PixelPaddingRangeLimit=99)
    image = read_radiograph(ds)
    padding = ds.pixel_array <= 99
    assert padding.any() and float(image.display[padding].max()) == 0.0
    assert float(image.display[~padding].min()) < 0.05 and float(image.display[~padding].max()) > 0.95
    plain = read_radiograph(_image()).display
    inverse = read_radiograph(_image(PresentationLUTShape="INVERSE"))
    assert np.allclose(inverse.display, 1.0 - plain) and inverse.warnings[0].startswith("presentation_lut_inverse")
    conflict = read_radiograph(_image(PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="IDENTITY"))
    assert np.allclose(conflict.display, 1.0 - plain)  # the photometric wins, noted
    assert conflict.warnings[0].startswith("presentation_lut_conflict")


def test_an_unparseable_patient_attribute_is_left_out_not_refused(tmp_path):
    ds = _image()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds[0x00200011] = pydicom.DataElement(0x00200011, "OB", b"9" * 10_000)  # Series Number (IS): 10,000 digits
    path = tmp_path / "weight.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = read_radiograph(path)
    assert "SeriesNumber" not in image.dataset
    assert image.warnings[0].startswith("unparseable_left_out")
