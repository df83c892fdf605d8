"""The demo study that `make demo` builds from the shared data is valid DICOM."""
from __future__ import annotations

import subprocess
import sys

import pydicom

from dicom_io.reader import read_radiograph
from tests.conftest import PROJECT_ROOT
from tests.dicom_validation import assert_valid


def test_demo_study_is_valid_and_readable(tmp_path, kermany_dir, shared_dicom_files):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "scripts/make_demo_study.py", "--out", str(out)], cwd=PROJECT_ROOT, check=True)
    wrapped = sorted(out.glob("kermany-*.dcm"))
    assert [p.name.split("-")[-1] for p in wrapped] == ["normal.dcm", "pneumonia.dcm", "normal.dcm", "pneumonia.dcm"]
    studies = set()
    for path in wrapped:
        assert_valid(path)
        ds = pydicom.dcmread(path)
        studies.add(ds.StudyInstanceUID)
        image = read_radiograph(path)
        assert image.display.shape == (224, 224)
        assert 0.0 <= image.display.min() < image.display.max() <= 1.0
    assert len(studies) == 1  # one demo study
    assert len(list(out.glob("*.dcm"))) == len(wrapped) + len(shared_dicom_files)
    # Deterministic: building it again gives the same instances.
    again = tmp_path / "again"
    subprocess.run([sys.executable, "scripts/make_demo_study.py", "--out", str(again)], cwd=PROJECT_ROOT, check=True)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in wrapped] == \
        [pydicom.dcmread(again / p.name).SOPInstanceUID for p in wrapped]
