"""`medxplain verify`: every counterfactual SC as written re-classifies to what its SR
reports (issue 13). Real files: the two shared CRs and two Kermany test radiographs
wrapped as CR, explained by the real engine with the shipped bundle (sagen and
exaggeration: both write counterfactual paths), read back from disk.
"""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from config.schema import MedxplainConfig
from dicom_io.convert import cr_from_pixels
from explainers.bundle import Bundle
from pipeline.cli import app
from pipeline.engine import Engine
from pipeline.runner import explain_paths
from pipeline.verify import verify_outputs
from tests.conftest import PROJECT_ROOT
from tests.generator_helpers import DEMO_BUNDLE

METHODS = ["sagen", "exaggeration"]


@pytest.fixture(scope="module")
def explained(tmp_path_factory, kermany_dir, shared_dicom_files):
    root = tmp_path_factory.mktemp("verify")
    inputs = root / "in"
    inputs.mkdir()
    rows = [r for r in csv.DictReader(open(kermany_dir / "manifest.csv")) if r["split"] == "test"]
    for number, row in enumerate([rows[0], rows[-1]], start=1):  # one NORMAL, one PNEUMONIA
        pixels = np.asarray(Image.open(kermany_dir / row["path"]).convert("L"), dtype=np.uint8)
        cr_from_pixels(pixels, patient_id="MXVERIFY", patient_name="Verify^Kermany", study_key="verify",
                       instance_key=row["path"], instance_number=number).save_as(
            inputs / f"kermany-{number}.dcm", enforce_file_format=True)
    files = sorted(inputs.glob("*.dcm")) + list(shared_dicom_files)
    # The adult CRs are out of the demo bundle's domain: explained here with the warning.
    config = MedxplainConfig(bundle=DEMO_BUNDLE, explainers=METHODS, device="cpu",
                             outputs={"overlay": False, "segmentation": False},
                             trust={"out_of_domain": "warn"})
    outcomes = explain_paths(Engine(config), files, root / "out")
    assert all(o.ok and not o.skipped for o in outcomes), [o.error for o in outcomes]
    return root / "out", len(files)


def test_every_written_counterfactual_reclassifies_to_what_its_sr_says(explained):
    out, n_images = explained
    checks = verify_outputs([out], Bundle.load(DEMO_BUNDLE))
    assert len(checks) == n_images * len(METHODS)
    bad = [(c.report.parent.name, c.method, c.sr_counterfactual_probability, c.reclassified, c.sr_flipped, c.flipped)
           for c in checks if not c.agrees(0.02)]
    assert not bad


def test_verify_command_says_so_and_fails_on_a_counterfactual_that_is_not_what_the_sr_claims(explained, tmp_path):
    out, _ = explained
    result = CliRunner().invoke(app, ["verify", str(out), "--bundle", str(DEMO_BUNDLE)])
    assert result.exit_code == 0, result.output
    assert "counterfactuals agree with their SR" in result.output
    # Replace one flipped full counterfactual of a Kermany input by that untouched source.
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in (out.parent / "in").glob("*.dcm")}
    checks = verify_outputs([out], Bundle.load(DEMO_BUNDLE))
    picked = [(c, pydicom.dcmread(c.counterfactual)) for c in checks if c.sr_flipped]
    picked = [(c, sc) for c, sc in picked if sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources]
    assert picked, "no flipped counterfactual of a Kermany input to tamper with"
    check, sc = picked[0]
    tampered = tmp_path / "out"
    shutil.copytree(out, tampered)
    original = pydicom.dcmread(sources[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]).pixel_array
    sc.PixelData = np.round(original.astype(np.float64) / 255.0 * 65535).astype(np.uint16).tobytes()
    sc.save_as(tampered / check.counterfactual.relative_to(out))
    result = CliRunner().invoke(app, ["verify", str(tampered), "--bundle", str(DEMO_BUNDLE)])
    assert result.exit_code == 1 and "NO" in result.output


def test_verify_names_the_bundle_to_use_when_given_another_one(explained):
    """Outputs of v1 checked against v2's classifier would disagree for no fault of the
    files: each claim says which bundle made it instead of being re-classified."""
    out, _ = explained
    other = Bundle.load(PROJECT_ROOT / "bundles" / "demo-pneumonia-v2")
    checks = verify_outputs([out], other)
    made_with = Bundle.load(DEMO_BUNDLE).spec
    assert checks and all(c.reclassified is None and not c.agrees(0.02) for c in checks)
    assert all(c.reason.startswith(f"made with bundle {made_with.name} {made_with.version} sha256=")
               and "--bundle" in c.reason for c in checks)
    # The command (default bundle: v2) fails rather than reporting false disagreements as agreements.
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 1
