"""DICOM writers (SC overlay, SC counterfactual path, SEG, SR) on the real shared files.

Every object is written to disk and checked with dciodvfy (zero errors; the
warnings are printed: run with ``-s`` to see them), the SR also with dsrdump.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_validation import assert_valid, dcentvfy, dciodvfy, dsrdump
from PIL import Image

from dicom_io.output import OutputContext, is_medxplain_output
from dicom_io.sc import counterfactual_sc, overlay_sc
from dicom_io.seg import saliency_seg
from dicom_io.source import SourceImage
from dicom_io.sr import ExplainerRecord, audit_sr
from dicom_io.uids import derived_uid

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OVERLAY_PNG = PROJECT_ROOT / "docs" / "img" / "overlay_example.png"
SHA = "3f" * 32
SHA_OTHER = "0a" * 32
METHOD = "gradcam"
PROCESSING_EQUIPMENT = "109102"


# --------------------------------------------------------------------------- helpers


def _read(path: Path) -> SourceImage:
    try:
        from dicom_io.reader import read_radiograph
    except ImportError:  # the reader is written by another engineer
        read_radiograph = None
    if read_radiograph is not None:
        return read_radiograph(path)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    if "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    display = (arr - lo) / max(hi - lo, 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        display = 1.0 - display
    return SourceImage(dataset=ds, display=display.astype(np.float32), path=path)


def _context(settings_key: str = "gradcam-3f2a", sha: str = SHA) -> OutputContext:
    return OutputContext(
        software_version="0.1.0",
        bundle_name="kermany-demo",
        bundle_version="1.0",
        bundle_sha256=sha,
        settings_key=settings_key,
    )


def _blob(rows: int, cols: int, cy: float = 0.45, cx: float = 0.33, sigma: float = 0.09) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    d2 = ((yy - cy * rows) / (sigma * rows)) ** 2 + ((xx - cx * cols) / (sigma * cols)) ** 2
    return np.exp(-0.5 * d2).astype(np.float32)


def _darkened_path(display: np.ndarray, steps: int = 3) -> list[np.ndarray]:
    rows, cols = display.shape
    yy, xx = np.mgrid[:rows, :cols]
    disc = ((yy - rows * 0.45) ** 2 + (xx - cols * 0.35) ** 2) < (0.1 * min(rows, cols)) ** 2
    out = []
    for k in range(1, steps + 1):
        img = display.copy()
        img[disc] *= 1.0 - 0.25 * k
        out.append(img.astype(np.float32))
    return out


def _build(source: SourceImage, context: OutputContext) -> dict:
    sal = _blob(source.rows, source.columns)
    mask = sal > 0.6
    path = _darkened_path(source.display)
    overlay = overlay_sc(
        source=source, saliency=sal, method=METHOD, probability=0.93, decision="PNEUMONIA",
        counterfactual_probability=0.18, flipped=True, context=context, series_number=901,
        positive_label="PNEUMONIA",
    )
    cfs = counterfactual_sc(
        source=source, images=path, path_probability=[0.81, 0.47, 0.18], method=METHOD,
        context=context, series_number=902, positive_label="PNEUMONIA",
    )
    seg = saliency_seg(
        source=source, mask=mask, method=METHOD, context=context, series_number=903,
        method_version="1.2", parameters={"target_layer": "features.norm5", "relu": True},
    )
    records = [
        ExplainerRecord(
            method=METHOD, method_version="1.2", parameters={"target_layer": "features.norm5"},
            probability=0.93, threshold=0.5, decision="PNEUMONIA", counterfactual_probability=0.18,
            flipped=True, checks={"proximity_l1": 0.031, "ssim": 0.94, "decision_flipped": True,
                                  "note": "path monotone"},
            processing_ms=812.5, derived=[overlay, *cfs, seg],
        ),
        ExplainerRecord(
            method="occlusion", method_version="0.1", parameters={"window": 16}, probability=0.93,
            threshold=0.5, decision="PNEUMONIA", counterfactual_probability=None, flipped=None,
            checks={}, processing_ms=55.0, derived=[],
        ),
    ]
    sr = audit_sr(source=source, records=records, context=context, series_number=904,
                  finding_name="Pneumonia", total_processing_ms=1234.0)
    return {"overlay": overlay, "counterfactual": cfs, "seg": seg, "sr": sr, "mask": mask, "path": path}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["cr_16bit", "cr_jpeg"])
def source(request) -> SourceImage:
    return _read(request.getfixturevalue(request.param))


@pytest.fixture(scope="module")
def built(source) -> dict:
    return _build(source, _context())


def _objects(built: dict) -> list[tuple[str, pydicom.Dataset]]:
    steps = [(f"counterfactual{i + 1}", d) for i, d in enumerate(built["counterfactual"])]
    return [("overlay", built["overlay"]), *steps, ("seg", built["seg"]), ("sr", built["sr"])]


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("kind", ["overlay", "counterfactual", "seg", "sr"])
def test_dciodvfy_zero_errors(built, source, kind, tmp_path):
    objects = built[kind] if kind == "counterfactual" else [built[kind]]
    for i, ds in enumerate(objects):
        path = tmp_path / f"{kind}{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy(path)
        name = Path(source.path).name
        print(f"\n[dciodvfy] {name} {kind}[{i}]: {len(errors)} errors, {len(warnings)} warnings")
        for line in sorted(set(warnings)):
            print(f"    {warnings.count(line)}x {line}")
        assert errors == [], "\n".join(errors)
        # and it reads back with pydicom, pixels included
        back = pydicom.dcmread(path)
        if kind != "sr":
            assert back.pixel_array.shape[:2] == (back.Rows, back.Columns)


def test_dcentvfy_study_consistent(built, source, tmp_path):
    """Source and all outputs agree on patient/study attributes (dicom3tools dcentvfy)."""
    paths = [Path(source.path)]
    for name, ds in _objects(built):
        paths.append(tmp_path / f"{name}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    errors, warnings = dcentvfy(paths)
    print(f"\n[dcentvfy] {Path(source.path).name}: {len(errors)} errors, {len(warnings)} warnings")
    for line in sorted(set(warnings)):
        print(f"    {line}")
    assert errors == [], "\n".join(errors)


def test_assert_valid_helper(built):
    warnings = assert_valid(built["overlay"])
    assert isinstance(warnings, list)


def test_dsrdump_parses_sr(built, tmp_path):
    path = tmp_path / "sr.dcm"
    built["sr"].save_as(path, enforce_file_format=True)
    proc = dsrdump(path, "+Pl", "+Pu")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert METHOD in text and "occlusion" in text
    assert SHA in text  # bundle sha256 in full
    assert "Pneumonia" in text and "Present" in text
    assert "Saliency overlay" in text and "Segmentation of the most salient region" in text
    assert "Counterfactual image, step 3 of 3 (full counterfactual)" in text
    for ds in [built["overlay"], *built["counterfactual"], built["seg"]]:
        assert ds.SOPInstanceUID in text  # each derived object is referenced in the content tree


# --------------------------------------------------------------------------- identity


def test_uids_idempotent_and_settings_dependent(source):
    a = _build(source, _context())
    b = _build(source, _context())
    c = _build(source, _context(settings_key="gradcam-other"))
    d = _build(source, _context(sha=SHA_OTHER))
    for (name, x), (_, y), (_, z), (_, w) in zip(_objects(a), _objects(b), _objects(c), _objects(d)):
        assert x.SOPInstanceUID == y.SOPInstanceUID, name
        assert x.SeriesInstanceUID == y.SeriesInstanceUID, name
        assert x.SOPInstanceUID != z.SOPInstanceUID, name
        assert x.SeriesInstanceUID != z.SeriesInstanceUID, name
        assert x.SOPInstanceUID != w.SOPInstanceUID, name  # other bundle -> other instance
        assert len(x.SOPInstanceUID) <= 64 and x.SOPInstanceUID.startswith("2.25.")
    uids = [ds.SOPInstanceUID for _, ds in _objects(a)]
    assert len(set(uids)) == len(uids)
    series = {ds.SeriesInstanceUID for _, ds in _objects(a)}
    assert len(series) == 4  # overlay, counterfactual path, seg, sr
    assert source.dataset.SeriesInstanceUID not in series


def test_derived_uid_unit():
    assert derived_uid("a", "b") == derived_uid("a", "b")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    uid = derived_uid("x" * 500)
    assert uid.is_valid and len(uid) <= 64
    with pytest.raises(ValueError, match='"parts"'):
        derived_uid()


def test_study_patient_equipment_copied(built, source):
    src = source.dataset
    for name, ds in _objects(built):
        assert ds.StudyInstanceUID == src.StudyInstanceUID, name
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID, name
        assert ds.PatientID == src.PatientID, name
        assert ds.PatientName == src.PatientName, name
        assert ds.Manufacturer == "medxplain" and ds.SoftwareVersions == "0.1.0", name
        assert ds.SeriesDescription.startswith("MEDXPLAIN"), name
        ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "medxplain"]
        assert len(ours) == 1, name
        assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_EQUIPMENT
        assert SHA in ours[0].ContributionDescription
        assert "PatientAge" not in ds or len(str(ds.PatientAge)) == 4, name


def test_orientation_and_spacing(built, source):
    src = source.dataset
    images = [built["overlay"], *built["counterfactual"], built["seg"]]
    valid_orientation = list(src.get("PatientOrientation") or []) == ["L", "F"]
    for ds in images:
        assert "PatientOrientation" in ds
        if valid_orientation:
            assert list(ds.PatientOrientation) == ["L", "F"]
        else:
            assert not ds.PatientOrientation  # empty Type 2, never invented
        assert ds.get("BodyPartExamined") == src.get("BodyPartExamined")
    assert "PatientOrientation" not in built["sr"]
    spacing = [float(v) for v in src.PixelSpacing]
    seg_measures = built["seg"].SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if all(v > 0 for v in spacing):
        assert [float(v) for v in built["counterfactual"][0].PixelSpacing] == pytest.approx(spacing)
        assert [float(v) for v in seg_measures[0].PixelSpacing] == pytest.approx(spacing)
    else:  # RG1: 0\0 is not copied anywhere; the SEG states the synthesised 1\1
        assert "PixelSpacing" not in built["counterfactual"][0]
        assert "PixelSpacing" not in built["overlay"]
        assert [float(v) for v in seg_measures[0].PixelSpacing] == [1.0, 1.0]


def test_laterality(source):
    ds = copy.deepcopy(source.dataset)
    ds.ImageLaterality = "L"
    ds.BodyPartExamined = "BREAST"  # a paired part: SC gets series Laterality from ImageLaterality
    src = SourceImage(dataset=ds, display=source.display, path=None)
    sal = _blob(src.rows, src.columns)
    ov = overlay_sc(source=src, saliency=sal, method=METHOD, probability=0.5, decision="NORMAL",
                    context=_context(), series_number=5, positive_label="PNEUMONIA")
    assert ov.Laterality == "L" and "ImageLaterality" not in ov
    assert_valid(ov)
    seg = saliency_seg(source=src, mask=sal > 0.5, method=METHOD, context=_context(), series_number=6)
    assert "Laterality" not in seg  # not allowed in the SEG's General Series (dciodvfy)
    assert_valid(seg)
    ds.BodyPartExamined = "CHEST"  # unpaired: no Laterality
    chest = SourceImage(dataset=ds, display=source.display, path=None)
    ov = overlay_sc(source=chest, saliency=sal, method=METHOD, probability=0.5, decision="NORMAL",
                    context=_context(), series_number=5, positive_label="PNEUMONIA")
    assert "Laterality" not in ov
    assert_valid(ov)


def test_is_medxplain_output(built, source, tmp_path):
    assert not is_medxplain_output(source.dataset)
    assert not is_medxplain_output(pydicom.dcmread(source.path, stop_before_pixels=True))
    for name, ds in _objects(built):
        assert is_medxplain_output(ds), name
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert is_medxplain_output(pydicom.dcmread(path, stop_before_pixels=True)), name
    # Orthanc's simplified tags (what the plugin sees)
    assert is_medxplain_output({"Manufacturer": "medxplain", "Modality": "OT"})
    assert is_medxplain_output({"SeriesDescription": "MEDXPLAIN OVERLAY gradcam"})
    assert is_medxplain_output({"ContributingEquipmentSequence": [{"Manufacturer": "medxplain"}]})
    assert not is_medxplain_output({"Manufacturer": "Philips Medical Systems", "SeriesDescription": "PA"})


def test_output_module_is_light_and_dicom_io_has_no_torch():
    code = (
        "import sys\n"
        "import dicom_io.output\n"
        "assert 'highdicom' not in sys.modules and 'torch' not in sys.modules, 'output.py must stay light'\n"
        "import dicom_io.uids, dicom_io.overlay, dicom_io.sc, dicom_io.seg, dicom_io.sr\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- content


def test_seg_references_source_and_round_trips(built, source, tmp_path):
    seg = built["seg"]
    src_uid = source.dataset.SOPInstanceUID
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src_uid
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == src_uid
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == src_uid
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "most salient region"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == METHOD
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "130403"  # Grad-CAM
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    np.testing.assert_array_equal(back.pixel_array.astype(bool), built["mask"])


def test_sr_evidence_lists_every_derived_object(built, source):
    sr = built["sr"]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence} == {
        source.dataset.StudyInstanceUID
    }
    expected = {source.dataset.SOPInstanceUID, built["overlay"].SOPInstanceUID, built["seg"].SOPInstanceUID}
    expected |= {d.SOPInstanceUID for d in built["counterfactual"]}
    assert evidence == expected
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_counterfactual_path_pixels(built, source, tmp_path):
    """The stored pixels are exactly the counterfactual: no burned-in text, no VOI LUT Function."""
    cfs, path = built["counterfactual"], built["path"]
    assert [int(d.InstanceNumber) for d in cfs] == [1, 2, 3]
    assert len({d.SeriesInstanceUID for d in cfs}) == 1
    assert "step 2/3, P=0.47" in cfs[1].ImageComments and "SYNTHETIC" in cfs[1].ImageComments
    rows, cols = source.rows, source.columns
    for ds, img in zip(cfs, path):
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.BitsStored == 16 and ds.PixelRepresentation == 0
        assert (ds.Rows, ds.Columns) == (rows, cols)
        assert ds.BurnedInAnnotation == "NO"
        assert "VOILUTFunction" not in ds  # OHIF 3.13 mis-reads an explicit LINEAR
        assert float(ds.WindowCenter) - float(ds.WindowWidth) / 2 <= 0
        assert float(ds.WindowCenter) + float(ds.WindowWidth) / 2 >= 65535
        p = tmp_path / f"cf{ds.InstanceNumber}.dcm"
        ds.save_as(p, enforce_file_format=True)
        np.testing.assert_array_equal(pydicom.dcmread(p).pixel_array, np.round(img * 65535).astype(np.uint16))
    # the disc darkens step by step
    cy, cx = int(rows * 0.45), int(cols * 0.35)
    centre = [int(pydicom.dcmread(tmp_path / f"cf{i}.dcm").pixel_array[cy, cx]) for i in (1, 2, 3)]
    assert centre[0] > centre[1] > centre[2]


def test_counterfactual_paths_of_several_images_share_one_series(source):
    """One series per explainer and object kind; image p's steps are numbered (p-1)*T+1..p*T."""
    path = _darkened_path(source.display, steps=2)
    first = counterfactual_sc(source=source, images=path, method=METHOD, context=_context(), series_number=7,
                              positive_label="PNEUMONIA")
    second = counterfactual_sc(source=source, images=path, method=METHOD, context=_context(), series_number=7,
                              positive_label="PNEUMONIA",
                               first_instance_number=3)
    assert [int(d.InstanceNumber) for d in first + second] == [1, 2, 3, 4]
    assert len({d.SeriesInstanceUID for d in first + second}) == 1
    with pytest.raises(ValueError, match="first_instance_number"):
        counterfactual_sc(source=source, images=path, method=METHOD, context=_context(), series_number=7,
                              positive_label="PNEUMONIA",
                          first_instance_number=0)


def test_overlay_pixels(built, source):
    """Text only in the bands added above and below: the image rows are the blended source."""
    from dicom_io.overlay import overlay_bands

    ov = built["overlay"]
    assert ov.PhotometricInterpretation == "RGB" and ov.BurnedInAnnotation == "YES"
    assert ov.SamplesPerPixel == 3 and ov.Columns == source.columns
    band, bottom = overlay_bands(source.rows, source.columns)
    assert ov.Rows == band + source.rows + bottom
    rgb = ov.pixel_array
    image = rgb[band:band + source.rows]
    assert rgb[band + source.rows:].max() == 255  # the warning in the bottom band (red)
    grey = image[..., 0] == image[..., 1]
    corner = grey[-source.rows // 10:, -source.columns // 3:]  # where the old watermark sat
    assert corner.all()
    cy, cx = int(source.rows * 0.45), int(source.columns * 0.33)
    r, g, b = (int(v) for v in image[cy, cx])
    assert r > g + 40 and r > b + 40  # blob centre is red
    far = image[int(source.rows * 0.9), int(source.columns * 0.9)]
    assert far[0] == far[1] == far[2]  # no saliency -> grey
    assert rgb[:band].max() == 255  # text in the band
    assert "NOT FOR DIAGNOSTIC USE" in ov.ImageComments


def test_overlay_example_png(cr_16bit, tmp_path):
    source = _read(cr_16bit)
    ds = overlay_sc(
        source=source, saliency=_blob(source.rows, source.columns), method="gradcam",
        probability=0.93, decision="PNEUMONIA", counterfactual_probability=0.62, flipped=False,
        context=_context(), series_number=901, positive_label="PNEUMONIA",
        # RG1 (adult) is outside the demo bundle's domain: the engine adds this caution.
        cautions=("out of domain: unlike the classifier's training data (score 20.8 > 14.7); "
                  "the result may not apply",),
    )
    assert "out of domain" in ds.ImageComments and "counterfactual did not flip" in ds.ImageComments
    # The README's docs/img/overlay_example.png is this picture; set MEDXPLAIN_RENDER_DOCS=1
    # to re-render it (a plain test run leaves the tree untouched).
    png_path = OVERLAY_PNG if os.environ.get("MEDXPLAIN_RENDER_DOCS") == "1" else tmp_path / OVERLAY_PNG.name
    # half resolution keeps the docs light (about as large as a browser shows it);
    # the text scales with the picture and stays legible
    half = (ds.Columns // 2, ds.Rows // 2)
    Image.fromarray(ds.pixel_array).resize(half, Image.Resampling.LANCZOS).save(png_path, optimize=True)
    with Image.open(png_path) as png:
        assert png.size == half and png.mode == "RGB"


# --------------------------------------------------------------------------- bad input


def test_overlay_bad_input(source):
    ctx = _context()
    good = _blob(source.rows, source.columns)
    kw = dict(source=source, method=METHOD, probability=0.9, decision="PNEUMONIA", context=ctx,
              series_number=1, positive_label="PNEUMONIA")
    with pytest.raises(ValueError, match='"saliency".*shape'):
        overlay_sc(saliency=good[:-1], **kw)
    with pytest.raises(ValueError, match='"saliency".*\\[0, 1\\]'):
        overlay_sc(saliency=good * 2.0, **kw)
    with pytest.raises(ValueError, match='"saliency".*\\[0, 1\\]'):
        overlay_sc(saliency=good - 0.5, **kw)
    bad = good.copy()
    bad[5, 5] = np.nan
    with pytest.raises(ValueError, match='"saliency".*NaN'):
        overlay_sc(saliency=bad, **kw)
    with pytest.raises(ValueError, match='"saliency"'):
        overlay_sc(saliency=good.tolist(), **kw)
    with pytest.raises(ValueError, match='"probability"'):
        overlay_sc(saliency=good, **{**kw, "probability": 1.5})
    with pytest.raises(ValueError, match='"counterfactual_probability"'):
        overlay_sc(saliency=good, counterfactual_probability=float("nan"), **kw)
    with pytest.raises(ValueError, match='"series_number"'):
        overlay_sc(saliency=good, **{**kw, "series_number": 0})


def test_counterfactual_bad_input(source):
    ctx = _context()
    img = source.display
    kw = dict(source=source, method=METHOD, context=ctx, series_number=1, positive_label="PNEUMONIA")
    with pytest.raises(ValueError, match='"images"'):
        counterfactual_sc(images=[], **kw)
    with pytest.raises(ValueError, match='"images\\[1\\]".*shape'):
        counterfactual_sc(images=[img, img[:, :-2]], **kw)
    with pytest.raises(ValueError, match='"images\\[0\\]".*NaN'):
        counterfactual_sc(images=[np.full_like(img, np.nan)], **kw)
    with pytest.raises(ValueError, match='"images\\[0\\]".*\\[0, 1\\]'):
        counterfactual_sc(images=[img + 1.0], **kw)
    with pytest.raises(ValueError, match='"path_probability"'):
        counterfactual_sc(images=[img, img], path_probability=[0.5], **kw)
    with pytest.raises(ValueError, match='"path_probability\\[0\\]"'):
        counterfactual_sc(images=[img], path_probability=[-0.1], **kw)


def test_seg_bad_input(source):
    ctx = _context()
    kw = dict(source=source, method=METHOD, context=ctx, series_number=1)
    mask = np.zeros((source.rows, source.columns), bool)
    with pytest.raises(ValueError, match='"mask" is empty'):
        saliency_seg(mask=mask, **kw)
    mask[0, 0] = True
    with pytest.raises(ValueError, match='"mask".*shape'):
        saliency_seg(mask=mask[:-1], **kw)
    with pytest.raises(ValueError, match='"mask".*boolean'):
        saliency_seg(mask=mask.astype(np.float32), **kw)
    with pytest.raises(ValueError, match='"mask".*boolean'):
        saliency_seg(mask=mask.astype(np.uint8) * 2, **kw)


def test_sr_bad_input(built, source):
    ctx = _context()
    kw = dict(source=source, context=ctx, series_number=1, total_processing_ms=1.0, finding_name="Pneumonia")
    with pytest.raises(ValueError, match='"records"'):
        audit_sr(records=[], **kw)
    rec = ExplainerRecord(method=METHOD, method_version="1", parameters={}, probability=0.5,
                          threshold=0.5, decision="NORMAL", counterfactual_probability=None,
                          flipped=None, checks={}, processing_ms=1.0, derived=[])
    with pytest.raises(ValueError, match='"records\\[0\\].probability"'):
        audit_sr(records=[ExplainerRecord(**{**rec.__dict__, "probability": float("nan")})], **kw)
    with pytest.raises(ValueError, match='"records\\[0\\].checks'):
        audit_sr(records=[ExplainerRecord(**{**rec.__dict__, "checks": {"l1": float("inf")}})], **kw)
    with pytest.raises(ValueError, match='"total_processing_ms"'):
        audit_sr(records=[rec], **{**kw, "total_processing_ms": -1})
    foreign = copy.deepcopy(built["overlay"])
    foreign.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match='"records\\[0\\].derived\\[0\\]".*another study'):
        audit_sr(records=[ExplainerRecord(**{**rec.__dict__, "derived": [foreign]})], **kw)
    with pytest.raises(ValueError, match='"records\\[0\\].derived\\[0\\]".*not medxplain'):
        audit_sr(records=[ExplainerRecord(**{**rec.__dict__, "derived": [source.dataset]})], **kw)


def test_context_bad_input():
    with pytest.raises(ValueError, match='"bundle_sha256"'):
        _context(sha="abc")
    with pytest.raises(ValueError, match='"settings_key"'):
        _context(settings_key="")


def test_small_source_overlay_is_enlarged_so_the_warning_is_never_truncated():
    from dicom_io.overlay import MIN_OVERLAY_WIDTH, render_overlay

    display = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    picture = render_overlay(display=display, saliency=display, method="gradcam", positive_label="PNEUMONIA",
                             probability=0.97, decision="PNEUMONIA")
    assert picture.shape[1] >= MIN_OVERLAY_WIDTH and picture.shape[2] == 3
    # The image area keeps the source aspect ratio (square here): band + width rows.
    assert picture.shape[0] > picture.shape[1]


# --------------------------------------------------------------------------- what viewers need


def _walk(items):
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def test_seg_geometry_for_viewers(built, source):
    """Plane Orientation/Position and Pixel Measures with SliceThickness and SpacingBetweenSlices
    (OHIF's SEG loader reads them; dciodvfy wants SliceThickness, Type 1C, with a frame of reference)."""
    seg = built["seg"]
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    measures = shared.PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 1.0 and float(measures.SpacingBetweenSlices) == 1.0
    position = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == [0, 0, 0]
    assert seg.FrameOfReferenceUID  # synthesised: these CR sources have none
    assert seg.FrameOfReferenceUID != source.dataset.get("FrameOfReferenceUID")


def test_seg_on_a_dx_with_frame_of_reference(tmp_path):
    """issue 11 kind 3: the DX case's SEG lacked SliceThickness (Type 1C) -> dciodvfy error."""
    from conftest import SHARED_DATA

    path = SHARED_DATA / "dicom-cases" / "dx_frame_of_reference_pixel_spacing.dcm"
    if not path.exists():
        pytest.skip(f"{path} not found")
    source = _read(path)
    seg = saliency_seg(source=source, mask=_blob(source.rows, source.columns) > 0.6, method=METHOD,
                       context=_context(), series_number=903)
    assert seg.FrameOfReferenceUID == source.dataset.FrameOfReferenceUID
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.336, 0.336]
    out = tmp_path / "seg.dcm"
    seg.save_as(out, enforce_file_format=True)
    errors, _ = dciodvfy(out)
    assert errors == [], "\n".join(errors)


def test_sr_for_viewers(built, source):
    """SEPARATE containers; every measurement group outlines a region on the source (OHIF's SR
    viewport places each group by its SCOORD); probabilities in % to 0.1, times to 1 ms."""
    sr = built["sr"]
    items = list(_walk(sr.ContentSequence))
    containers = [sr, *(i for i in items if i.ValueType == "CONTAINER")]
    assert all(c.ContinuityOfContent == "SEPARATE" for c in containers)
    measurements = [i for i in sr.ContentSequence[-1].ContentSequence if i.ValueType == "CONTAINER"]
    assert len(measurements) == 3  # classifier on the whole image, gradcam, occlusion
    for group in measurements:
        scoords = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        assert len(scoords) == 1 and scoords[0].GraphicType == "POLYLINE"
        ref = scoords[0].ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.dataset.SOPInstanceUID
    # gradcam: the box around the written mask (SCOORD: column\row, pixel corners)
    ys, xs = np.nonzero(built["mask"])
    gradcam = [i for i in measurements[1].ContentSequence if i.ValueType == "SCOORD"][0]
    assert [float(v) for v in gradcam.GraphicData][:4] == [xs.min(), ys.min(), xs.max() + 1, ys.min()]
    numbers = {i.ConceptNameCodeSequence[0].CodeMeaning: i.MeasuredValueSequence[0]
               for i in _walk(measurements[1].ContentSequence) if i.ValueType == "NUM"}
    assert float(numbers["Classifier probability of finding"].NumericValue) == 93.0
    assert numbers["Classifier probability of finding"].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert float(numbers["Processing time"].NumericValue) == 812.0  # 812.5 rounded to whole ms
    labels = [i.ConceptNameCodeSequence[0].CodeMeaning for i in measurements[1].ContentSequence
              if i.ValueType == "IMAGE"]
    assert labels == ["Saliency overlay", "Counterfactual image, step 1 of 3",
                      "Counterfactual image, step 2 of 3", "Counterfactual image, step 3 of 3 (full counterfactual)",
                      "Segmentation of the most salient region"]


def test_procedure_reported_follows_the_source_header(source):
    """TID 1500 row 4 names what was imaged, not a constant: chest, mammography, or radiography."""
    from dicom_io.sr import procedure_code
    chest, mammogram, knee = (copy.deepcopy(source) for _ in range(3))
    chest.dataset.BodyPartExamined = "CHEST"
    mammogram.dataset.Modality = "MG"
    knee.dataset.BodyPartExamined = "KNEE"
    assert [procedure_code(s).value for s in (chest, mammogram, knee)] == ["399208008", "71651007", "363680008"]
