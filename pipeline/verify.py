"""`medxplain verify`: re-derive every counterfactual result an SR reports from the
written counterfactual Secondary Capture.

For each measurement group of a medxplain SR that reports a counterfactual probability
(private concept CFPROB, which references the last counterfactual SC): the SC is read
back through the product's own DICOM input path (dicom_io.reader), mapped to model space
with the bundle's preprocessing, and classified. It agrees when the probability is
within ``tolerance`` of the SR's and the decision flip (against the SR's classifier
probability and threshold) is the same as the SR's "Counterfactual decision flipped".

The SR's Algorithm Parameters name the bundle that made it ("bundle=<name> <version>
sha256=<hex>"); a claim made with a bundle of another name or version than the one
given is not re-classified (another classifier would disagree for no fault of the
files): its reason says which bundle to verify with. The same name and version with
another sha256 is still verified: bundle.yaml changes when an explainer is added,
the classifier does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch
from pydicom.errors import InvalidDicomError

from dicom_io.preprocess import Preprocessor
from dicom_io.reader import read_radiograph
from explainers.bundle import Bundle

MEASUREMENT_GROUP = "125007"  # DCM "Measurement Group"
ALGORITHM_NAME = "111001"  # DCM "Algorithm Name"
ALGORITHM_PARAMETERS = "111002"  # DCM "Algorithm Parameters"


class VerifyError(Exception):
    """Nothing to verify, or an SR references a counterfactual that is not among the files."""


@dataclass
class CounterfactualCheck:
    report: Path
    method: str
    counterfactual: Path | None
    sr_probability: float  # the classifier on the source, as the SR states it
    threshold: float
    sr_counterfactual_probability: float
    sr_flipped: bool | None
    reclassified: float | None  # the classifier on the SC as read back
    reason: str | None = None  # why it could not be re-classified

    @property
    def flipped(self) -> bool | None:
        if self.reclassified is None:
            return None
        return (self.reclassified >= self.threshold) != (self.sr_probability >= self.threshold)

    def agrees(self, tolerance: float) -> bool:
        return (self.reclassified is not None and abs(self.reclassified - self.sr_counterfactual_probability)
                <= tolerance and self.flipped == self.sr_flipped)


def _code(item) -> str | None:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else None


def _number(item) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _groups(items):
    for item in items or []:
        if item.get("ValueType") == "CONTAINER" and _code(item) == MEASUREMENT_GROUP:
            yield item
        else:
            yield from _groups(item.get("ContentSequence"))


def counterfactual_claims(report: pydicom.Dataset) -> list[dict]:
    """Per group that reports a counterfactual: method, probabilities (0-1), flip, SC UID."""
    claims = []
    for group in _groups(report.get("ContentSequence")):
        items = {(_code(i), i.get("ValueType")): i for i in group.get("ContentSequence", [])}
        cf = items.get(("CFPROB", "NUM"))
        if cf is None:
            continue
        refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in cf.get("ContentSequence", [])
                if i.get("ValueType") == "IMAGE"]
        flip = items.get(("CFFLIP", "CODE"))
        name = items.get((ALGORITHM_NAME, "TEXT"))
        # Several Algorithm Parameters items: ``items`` keeps only one, so read them all.
        bundles = [str(i.TextValue)[len("bundle="):] for i in group.get("ContentSequence", [])
                   if _code(i) == ALGORITHM_PARAMETERS and str(i.get("TextValue", "")).startswith("bundle=")]
        claims.append({
            "method": str(name.TextValue) if name is not None else "?",
            "probability": _number(items[("CLFPROB", "NUM")]) / 100.0,
            "threshold": _number(items[("DECTHR", "NUM")]) / 100.0,
            "counterfactual_probability": _number(cf) / 100.0,
            "flipped": None if flip is None else flip.ConceptCodeSequence[0].CodeMeaning == "Yes",
            "sc_uid": refs[0] if refs else None,
            "bundle": bundles[0] if bundles else None,
        })
    return claims


def _dicom_files(paths: list[Path]) -> dict[str, tuple[Path, pydicom.Dataset]]:
    out = {}
    for path in paths:
        for file in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
            try:
                header = pydicom.dcmread(file, stop_before_pixels=True)
            except (InvalidDicomError, OSError):
                continue
            if "SOPInstanceUID" in header:
                out[str(header.SOPInstanceUID)] = (file, header)
    return out


def verify_outputs(paths: list[Path], bundle: Bundle, *, device: str = "cpu") -> list[CounterfactualCheck]:
    """Every counterfactual claim of every medxplain SR under ``paths``, re-classified.

    Raises VerifyError when there is no SR with a counterfactual under ``paths``.
    """
    files = _dicom_files(paths)
    expected = f"{bundle.spec.name} {bundle.spec.version}"
    classifier = bundle.load_classifier(device=device)
    preprocess = Preprocessor(bundle.spec.input.size, bundle.spec.input.aspect)
    checks = []
    for path, header in files.values():
        if header.get("Modality") != "SR":
            continue
        for claim in counterfactual_claims(pydicom.dcmread(path)):
            check = CounterfactualCheck(
                report=path, method=claim["method"], counterfactual=None, sr_probability=claim["probability"],
                threshold=claim["threshold"], sr_counterfactual_probability=claim["counterfactual_probability"],
                sr_flipped=claim["flipped"], reclassified=None)
            found = files.get(claim["sc_uid"]) if claim["sc_uid"] else None
            if claim["bundle"] and claim["bundle"].rsplit(" sha256=", 1)[0] != expected:
                check.reason = (f"made with bundle {claim['bundle']}, not {expected}: "
                                f"verify with that bundle (--bundle)")
            elif found is None:
                check.reason = f"counterfactual SC {claim['sc_uid']} is not among the files"
            else:
                check.counterfactual = found[0]
                display = read_radiograph(found[0]).display
                with torch.no_grad():
                    batch = preprocess(display).as_tensor()[None].to(device)
                    check.reclassified = float(torch.sigmoid(classifier(batch)).item())
            checks.append(check)
    if not checks:
        raise VerifyError(f"no medxplain SR with a counterfactual under {', '.join(map(str, paths))}")
    return checks
