"""The command line end to end: real shared DICOM files in, DICOM objects out,
validated with dciodvfy and dsrdump; bundle info and training."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch

from explainers.bundle import Bundle
from tests.conftest import PROJECT_ROOT, kermany_subset
from tests.dicom_validation import assert_valid

DEMO_BUNDLE = PROJECT_ROOT / "bundles" / "demo-pneumonia"
MEDXPLAIN = [sys.executable, "-m", "pipeline.cli"]


def run(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([*MEDXPLAIN, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    if check_rc is not None:
        assert done.returncode == check_rc, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def demo_bundle() -> Path:
    if not (DEMO_BUNDLE / "bundle.yaml").exists():
        pytest.fail("the demo bundle bundles/demo-pneumonia is not in the repository")
    return DEMO_BUNDLE


@pytest.mark.slow
def test_explain_writes_valid_dicom_for_every_shared_file(tmp_path, shared_dicom_files, demo_bundle):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in shared_dicom_files:
        shutil.copy(f, inputs / f.name)
    (inputs / "notes.txt").write_text("not a DICOM file")
    out = tmp_path / "out"
    done = run("explain", str(inputs), "--out", str(out), "--explainers", "gradcam,occlusion", check_rc=1)
    # The bad file fails with its reason; the good ones are still explained.
    assert "notes.txt" in done.stdout and "not_dicom" in done.stdout
    assert "1 of 3 files failed" in done.stdout
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in shared_dicom_files}
    for folder in folders:
        files = sorted(folder.glob("*.dcm"))
        datasets = [pydicom.dcmread(f) for f in files]
        modalities = sorted(ds.Modality for ds in datasets)
        # Per explainer an overlay SC (modality OT) and a SEG; one SR per image.
        assert modalities.count("SEG") == 2 and modalities.count("SR") == 1, modalities
        study = {ds.StudyInstanceUID for ds in datasets}
        assert len(study) == 1
        for path, ds in zip(files, datasets):
            assert_valid(path)
            assert ds.Manufacturer == "medxplain"
        sr_path = next(p for p, ds in zip(files, datasets) if ds.Modality == "SR")
        dump = subprocess.run(["dsrdump", "+Pu", str(sr_path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "gradcam" in dump.stdout and "occlusion" in dump.stdout
        source_uid = next(uid for uid in sources if uid in dump.stdout)
        assert pydicom.dcmread(sources[source_uid], stop_before_pixels=True).StudyInstanceUID in study


@pytest.mark.slow
def test_rerun_gives_identical_uids(tmp_path, cr_jpeg, demo_bundle):
    uids = []
    for name in ("a", "b"):
        run("explain", str(cr_jpeg), "--out", str(tmp_path / name), "--explainers", "gradcam")
        uids.append(sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                           for p in (tmp_path / name).rglob("*.dcm")))
    assert uids[0] == uids[1] and len(uids[0]) == 3


def test_explain_rejects_unknown_explainer_and_bad_config(tmp_path, cr_jpeg, demo_bundle):
    done = run("explain", str(cr_jpeg), "--out", str(tmp_path), "--explainers", "nosuch", check_rc=2)
    assert "unknown explainer 'nosuch'" in done.stdout and "gradcam" in done.stdout
    assert not any(tmp_path.iterdir())
    done = run("explain", str(cr_jpeg), "--out", str(tmp_path), "--batch-size", "0", check_rc=2)
    assert "batch_size" in done.stdout


def test_explain_with_no_inputs_fails(tmp_path, demo_bundle):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run("explain", str(empty), "--out", str(tmp_path / "out"), check_rc=2)
    assert "no input files" in done.stdout


def test_info_shows_every_shipped_bundle():
    # v2 records its shortcut sensitivity and its version history next to the split metrics.
    for bundle in sorted(p.parent for p in (PROJECT_ROOT / "bundles").glob("*/bundle.yaml")):
        done = run("info", str(bundle))
        assert "sha256 verified" in done.stdout and "test: auroc" in done.stdout, bundle
        if bundle.name == "demo-pneumonia-v2":
            assert "marker_corner median |dP| (uncertain)" in done.stdout
            assert "history: demo-pneumonia 1.0.0 test AUROC 0.9704" in done.stdout


def test_info_verifies_hashes(tmp_path, demo_bundle):
    done = run("info", str(demo_bundle))
    assert "sha256 verified" in done.stdout and "ok" in done.stdout
    assert "auroc" in done.stdout
    assert ("explainers available with this bundle: gradcam, ig, occlusion, cia, exaggeration, gvr, medxgan, "
            "medxgan_ig, sagen, sagen_ig") in done.stdout
    tampered = tmp_path / "bundle"
    shutil.copytree(demo_bundle, tampered, ignore=shutil.ignore_patterns(".checkpoints"))
    weights = tampered / "classifier.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = run("info", str(tampered), check_rc=1)
    assert "does not match" in done.stdout


@pytest.mark.slow
def test_train_classifier_writes_a_loadable_bundle(tmp_path, kermany_dir):
    # A small real subset (read in place: the manifest points into the shared folder).
    data = kermany_subset(kermany_dir, tmp_path / "data", {"train": 48, "test": 16})
    out = tmp_path / "bundle"
    run("train", "classifier", "--data", str(data), "--out", str(out), "--size", "64", "--epochs", "1",
        "--batch-size", "16")
    card = (out / "MODEL_CARD.md").read_text()
    assert "Kermany" in card and "CC BY 4.0" in card and "AUROC" in card
    assert (out / "classifier_training_log.csv").read_text().count("\n") == 2
    done = run("info", str(out))
    assert "classifier.safetensors" in done.stdout

    # Fine-tuning: --init-from starts from that classifier. At a vanishing learning rate the
    # convolution weights stay the source's (batch-norm running statistics still move).
    tuned = tmp_path / "tuned"
    run("train", "classifier", "--data", str(data), "--out", str(tuned), "--size", "64", "--epochs", "1",
        "--batch-size", "16", "--init-from", str(out), "--learning-rate", "1e-12", "--seed", "3")
    from safetensors.torch import load_file

    source, result = load_file(str(out / "classifier.safetensors")), load_file(str(tuned / "classifier.safetensors"))
    convolutions = [k for k in source if "conv" in k and k.endswith("weight")]
    assert convolutions and all(torch.allclose(source[k], result[k], atol=1e-6) for k in convolutions)
    record = Bundle.load(tuned).spec.training
    assert record["initialised_from"].startswith(f"bundle 1.0.0 sha256={Bundle.load(out).spec.classifier.weights.sha256}")
    assert "fine-tuned from the classifier of bundle 1.0.0" in (tuned / "MODEL_CARD.md").read_text()
    refused = run("train", "classifier", "--data", str(data), "--out", str(tmp_path / "other"), "--size", "96",
                  "--epochs", "1", "--init-from", str(out), check_rc=2)
    assert "cannot train the classifier" in refused.stdout and "differs" in refused.stdout
    assert not (tmp_path / "other").exists()  # refused before anything was written
