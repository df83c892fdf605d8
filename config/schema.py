"""The configuration schema: every option, its default and what it does.

Loaded from YAML (config/medxplain.yaml by default) and validated here, so a typo
or a wrong type fails at start-up with the option's name, not deep in a job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputsConfig(_Strict):
    overlay: bool = Field(True, description="RGB Secondary Capture: source + colour saliency + burned-in text")
    counterfactual: bool = Field(True, description="grayscale Secondary Capture per counterfactual path step "
                                                   "(only for methods that produce counterfactuals)")
    segmentation: bool = Field(True, description="BINARY Segmentation of the most salient region")
    report: bool = Field(True, description="Comprehensive SR (TID 1500): the audit trail; written last")
    segmentation_top_fraction: float = Field(
        0.05, gt=0, lt=1, description="fraction of lung-field pixels (highest saliency) in the BINARY SEG")
    first_series_number: int = Field(9000, ge=1, description="series numbers of our output start here")


class MedxplainConfig(_Strict):
    bundle: Path = Field(Path("bundles/demo-pneumonia"),
                         description="model bundle folder (relative paths are from the project root)")
    explainers: list[str] = Field(["gradcam", "ig", "occlusion"], min_length=1,
                                  description="methods to run, by registry name, in this order")
    explainer_parameters: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method keyword parameters, e.g. {ig: {steps: 32}}")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    precision: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="autocast dtype on CUDA for classifier/explainers (CPU always float32)")
    batch_size: int = Field(8, ge=1, le=512, description="images per explainer batch")
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    trusted_torchscript: list[str] = Field(
        default_factory=list, description="sha256 of TorchScript classifier files allowed to load")
    max_pixels: int = Field(60_000_000, ge=1, description="reject images with more pixels than this")

    @field_validator("explainers")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"explainers listed twice: {value}")
        return value

    def bundle_path(self) -> Path:
        return self.bundle if self.bundle.is_absolute() else PROJECT_ROOT / self.bundle
