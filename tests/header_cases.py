"""One input through the whole product path, with its outcome: what the real-traffic tests check.

``run_case(engine, dataset_or_path, out)`` reads the image (``read_radiograph``),
applies the default eligibility rules, explains it with the engine, writes every
output object and runs ``dciodvfy`` on each. It returns a ``CaseOutcome``:

- ``refused``: a typed ``DicomInputError`` with its stable reason code;
- ``explained``: outputs written; ``dciodvfy_errors`` lists their errors;
- ``untyped``: anything else (the product must never end here).

A tiny engine (``tiny_engine``): a small untrained DenseNet at 32 px and Grad-CAM,
written as a real bundle, so a case costs the header handling and the writers,
not the model.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config.schema import MedxplainConfig
from dicom_io.errors import DicomInputError
from dicom_io.reader import read_radiograph
from explainers.bundle import Bundle, BundleSpec, ClassifierSpec, InputSpec, TaskSpec, save_weights
from explainers.networks import build_network
from pipeline.pacs.rules import eligibility

TINY = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "init_features": 8, "growth_rate": 8,
        "block_config": [2, 2]}


def tiny_bundle(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ref = save_weights(build_network("monai.DenseNet", dict(TINY)).eval(), root / "classifier.safetensors")
    spec = BundleSpec(
        name="tiny-cxr", version="0.1", description="written by tests/header_cases.py",
        task=TaskSpec(finding="Pneumonia", positive_label="PNEUMONIA", negative_label="NORMAL", threshold=0.5),
        input=InputSpec(size=(32, 32), aspect="squash"),
        classifier=ClassifierSpec(architecture="monai.DenseNet", parameters=dict(TINY), weights=ref),
    )
    Bundle(root, spec, sha256="").save_spec()
    return root


def tiny_engine(root: Path):
    from pipeline.engine import Engine

    cfg = MedxplainConfig.model_validate({"bundle": str(tiny_bundle(root)), "explainers": ["gradcam"],
                                          "device": "cpu", "batch_size": 1})
    return Engine(cfg)


@dataclass
class CaseOutcome:
    kind: str  # refused | explained | untyped
    reason: str = ""
    eligibility: str = ""
    warnings: tuple[str, ...] = ()
    written: list[Path] = field(default_factory=list)
    dciodvfy_errors: list[str] = field(default_factory=list)
    source: object = None
    result: object = None

    def __str__(self) -> str:
        if self.kind == "explained":
            return f"explained ({len(self.written)} objects, {len(self.dciodvfy_errors)} dciodvfy errors)"
        return f"{self.kind}: {self.reason}"


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    return [f"{path.name}: {line.strip()}" for line in (proc.stderr + proc.stdout).splitlines()
            if line.strip().startswith(("Error", "Abort"))]


def run_case(engine, source, out: Path, rules=None) -> CaseOutcome:
    from pipeline.runner import write_result

    try:
        image = read_radiograph(source)
    except DicomInputError as exc:
        return CaseOutcome("refused", exc.reason)
    except Exception as exc:  # noqa: BLE001  what the test counts as an untyped failure
        return CaseOutcome("untyped", f"read: {type(exc).__name__}: {exc}"[:300])
    outcome = CaseOutcome("explained", warnings=getattr(image, "warnings", ()), source=image)
    try:
        outcome.eligibility = eligibility(image.dataset, rules if rules is not None else engine.config.rules)[1]
        [result] = engine.run([image])
        outcome.result = result
        outcome.written = write_result(result, out)
    except DicomInputError as exc:
        return CaseOutcome("refused", exc.reason, warnings=outcome.warnings)
    except Exception as exc:  # noqa: BLE001
        return CaseOutcome("untyped", f"explain/write: {type(exc).__name__}: {exc}"[:300], warnings=outcome.warnings)
    for path in outcome.written:
        outcome.dciodvfy_errors += dciodvfy_errors(path)
    return outcome
