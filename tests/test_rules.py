"""Eligibility rules (pipeline/pacs/rules.py) on real headers from the shared files and
edited copies of them: CT, SR, colour, our own output, body part and view rules."""
from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, DigitalXRayImageStorageForPresentation

from config.schema import MatchRule, MedxplainConfig
from pipeline.pacs.rules import eligibility, match_rule, series_exclusion

DEFAULT_RULES = MedxplainConfig().rules  # one rule: "chest radiographs", modalities CR and DX


@pytest.fixture(scope="module")
def cr(cr_16bit):
    return pydicom.dcmread(cr_16bit, stop_before_pixels=True)


@pytest.fixture(scope="module")
def sc_cr(cr_jpeg):
    return pydicom.dcmread(cr_jpeg, stop_before_pixels=True)


def edited(ds, **changes):
    out = copy.deepcopy(ds)
    for keyword, value in changes.items():
        if value is None:
            delattr(out, keyword)
        else:
            setattr(out, keyword, value)
    return out


def test_real_chest_radiographs_are_eligible_under_the_default_rule(cr, sc_cr):
    # RG1_UNCR: CR Image Storage; the SIIM file: Secondary Capture with Modality CR (JPEG baseline).
    assert eligibility(cr, DEFAULT_RULES) == (True, "rule chest radiographs")
    assert eligibility(sc_cr, DEFAULT_RULES) == (True, "rule chest radiographs")
    assert match_rule(cr, DEFAULT_RULES).name == "chest radiographs"


def test_full_dataset_with_pixels_is_eligible_too(cr_jpeg):
    assert eligibility(pydicom.dcmread(cr_jpeg), DEFAULT_RULES)[0]


def test_ct_slice_is_refused_by_the_reader_rules(cr):
    ct = edited(cr, Modality="CT", SOPClassUID=CTImageStorage)
    assert eligibility(ct, DEFAULT_RULES) == (False, "not_projection_radiograph")


def test_structured_report_is_not_an_image(cr):
    sr = edited(cr, Modality="SR", SOPClassUID=ComprehensiveSRStorage)
    assert eligibility(sr, DEFAULT_RULES) == (False, "not_an_image")


def test_colour_image_is_refused(sc_cr):
    rgb = edited(sc_cr, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    assert eligibility(rgb, DEFAULT_RULES) == (False, "colour_image")


def test_multi_frame_is_refused(cr):
    assert eligibility(edited(cr, NumberOfFrames=4), DEFAULT_RULES) == (False, "multi_frame")


@pytest.mark.parametrize("mark", [
    {"Manufacturer": "medxplain"},
    {"Manufacturer": "MEDXPLAIN "},
    {"SeriesDescription": "MEDXPLAIN OVERLAY gradcam"},
])
def test_our_own_output_is_never_eligible(cr, mark):
    assert eligibility(edited(cr, **mark), DEFAULT_RULES) == (False, "medxplain_output")


def test_our_own_output_wins_over_other_reasons(cr):
    # An SR we wrote says "ours", not "not an image": the loop guard is the first rule.
    ours = edited(cr, Modality="SR", SOPClassUID=ComprehensiveSRStorage, Manufacturer="medxplain")
    assert eligibility(ours, DEFAULT_RULES) == (False, "medxplain_output")


def test_modality_no_rule_admits_names_it(cr):
    mg = edited(cr, Modality="MG")
    assert eligibility(mg, DEFAULT_RULES) == (False, "no_rule_matches (modality MG)")
    assert match_rule(mg, DEFAULT_RULES) is None


def test_body_part_and_view_are_case_insensitive(cr):
    rules = [MatchRule(name="pa chest", modalities=["CR"], body_parts=["chest"], view_positions=["pa"])]
    assert eligibility(cr, rules) == (True, "rule pa chest")  # header says CHEST / PA


def test_body_part_mismatch_names_the_values_the_rules_look_at(cr):
    rules = [MatchRule(name="chest", modalities=["CR", "DX"], body_parts=["CHEST"])]
    hand = edited(cr, BodyPartExamined="HAND")
    assert eligibility(hand, rules) == (False, "no_rule_matches (modality CR, body part HAND)")
    missing = edited(cr, BodyPartExamined=None)
    assert eligibility(missing, rules) == (False, "no_rule_matches (modality CR, body part (none))")


def test_first_matching_rule_decides_its_profile(cr, sc_cr):
    rules = [
        MatchRule(name="lateral", modalities=["CR"], view_positions=["LL", "RL"], explainers=["occlusion"]),
        MatchRule(name="secondary capture", modalities=[], sop_class_uids=[str(sc_cr.SOPClassUID)],
                  explainers=["ig"]),
        MatchRule(name="any radiograph", modalities=["CR", "DX"], explainers=["gradcam"]),
    ]
    assert match_rule(sc_cr, rules).name == "secondary capture"
    assert match_rule(cr, rules).name == "any radiograph"
    assert match_rule(edited(cr, ViewPosition="LL"), rules).name == "lateral"
    dx = edited(cr, Modality="DX", SOPClassUID=DigitalXRayImageStorageForPresentation)
    assert match_rule(dx, rules).name == "any radiograph"


def test_no_rules_configured_refuses_everything(cr):
    assert eligibility(cr, []) == (False, "no_rule_matches (no rules configured)")


def test_reasons_carry_no_patient_data(cr):
    text = " ".join(eligibility(edited(cr, **change), DEFAULT_RULES)[1] for change in (
        {"Modality": "MG"}, {"Modality": "SR", "SOPClassUID": ComprehensiveSRStorage}, {"NumberOfFrames": 3}))
    for keyword in ("PatientName", "PatientID", "SOPInstanceUID", "StudyInstanceUID"):
        assert str(cr.get(keyword)) not in text


def test_match_rule_reads_orthanc_tag_mappings():
    tags = {"Modality": "DX", "BodyPartExamined": "Chest", "ViewPosition": "AP", "SOPClassUID": "1.2.3"}
    rules = [MatchRule(name="ap", body_parts=["CHEST"], view_positions=["AP"])]
    assert match_rule(tags, rules).name == "ap"
    assert match_rule({**tags, "ViewPosition": "PA"}, rules) is None


def test_series_exclusion_from_series_tags_alone():
    rules = DEFAULT_RULES
    assert series_exclusion({"Modality": "OT", "SeriesDescription": "MEDXPLAIN OVERLAY gradcam"},
                            rules) == "medxplain_output"
    assert series_exclusion({"Modality": "SR", "Manufacturer": "medxplain"}, rules) == "medxplain_output"
    assert series_exclusion({"Modality": "CT"}, rules) == "not_projection_radiograph"
    assert series_exclusion({"Modality": "SR"}, rules) == "not_an_image"
    assert series_exclusion({"Modality": "XA"}, rules) == "no_rule_matches (modality XA)"
    assert series_exclusion({"Modality": "CR"}, rules) is None
    # A rule that admits any modality: every instance must be looked at.
    assert series_exclusion({"Modality": "CT"}, [MatchRule(name="any", modalities=[])]) is None
    assert series_exclusion({}, rules) is None
