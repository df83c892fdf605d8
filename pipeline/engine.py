"""The work of one job: source radiographs -> classifier -> explainers -> DICOM objects.

Loaded once (bundle, classifier, explainers kept warm), then called per batch of
images. Delivery (a folder, Orthanc, C-STORE) is the caller's business: the engine
returns pydicom datasets, the SR of each image last.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from importlib.metadata import version as package_version

import numpy as np
import torch
from pydicom.dataset import Dataset
from scipy import ndimage

from config.schema import MedxplainConfig
from dicom_io.output import OutputContext, is_medxplain_output
from dicom_io.preprocess import Preprocessor
from dicom_io.sc import counterfactual_sc, overlay_sc
from dicom_io.seg import saliency_seg
from dicom_io.source import SourceImage
from dicom_io.sr import DomainAssessment, ExplainerRecord, audit_sr, report_uid
from explainers.base import Explainer, explainer_class
from explainers.bundle import Bundle
from explainers.domain import DomainGuard

SOFTWARE_VERSION = package_version("medxplain")
# Counterfactual SCs store round(value * 65535) (dicom_io.sc.counterfactual_sc): the
# engine classifies exactly those values.
COUNTERFACTUAL_LEVELS = 65535.0


@dataclass
class MethodResult:
    method: str
    milliseconds: float
    checks: dict[str, float | bool | str]
    counterfactual_probability: float | None = None
    flipped: bool | None = None
    datasets: list[Dataset] = field(default_factory=list)
    salient_region: np.ndarray | None = None


@dataclass
class ImageResult:
    source: SourceImage
    probability: float
    decision: str
    methods: list[MethodResult]
    report: Dataset | None
    milliseconds: float
    domain: DomainAssessment | None = None
    cautions: list[str] = field(default_factory=list)
    skipped: str | None = None  # "out_of_domain: ..." when the image was not explained (no outputs)

    def datasets(self) -> list[Dataset]:
        """Every object to deliver, the SR last (it references all the others)."""
        out = [ds for m in self.methods for ds in m.datasets]
        return out + ([self.report] if self.report is not None else [])


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device (use --device auto or cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def build_explainer(name: str, bundle: Bundle, parameters: dict) -> Explainer:
    """The method for this bundle; networks trained against another classifier are refused
    (ClassifierMismatchError) unless the bundle was loaded with ``classifier_override``."""
    cls = explainer_class(name)
    if cls.bundle_section is not None:
        bundle.check_classifier_binding(cls.bundle_section)
    return cls.from_bundle(bundle, **parameters)


class Engine:
    def __init__(self, config: MedxplainConfig):
        self.config = config
        self.bundle = Bundle.load(config.bundle_path(),
                                  classifier_override=config.trust.explainer_classifier_override)
        self.device = resolve_device(config.device)
        self.classifier = self.bundle.load_classifier(
            trusted_torchscript=tuple(config.trusted_torchscript), device=str(self.device))
        spec = self.bundle.spec
        self.preprocessor = Preprocessor(spec.input.size, spec.input.aspect)
        # Before the explainers: a guard made for another classifier is refused here.
        self.domain_guard = DomainGuard.from_bundle(self.bundle, self.classifier)
        self.explainers = [build_explainer(name, self.bundle, config.explainer_parameters.get(name, {}))
                           for name in config.explainers]

    # -- model side ---------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.config.precision != "float32":
            return torch.autocast("cuda", dtype=getattr(torch, self.config.precision))
        return contextlib.nullcontext()

    def preprocess(self, sources: list[SourceImage]) -> list:
        return [self.preprocessor(s.display) for s in sources]

    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return torch.sigmoid(self.classifier(batch.to(self.device)).float()).cpu()

    def classify_display(self, displays: list[np.ndarray]) -> list[float]:
        """P(positive) of display-space images (rows, cols) in [0, 1] at any size, through
        the same preprocessing as a source image."""
        batch = torch.stack([self.preprocessor(d).as_tensor() for d in displays])
        return self.classify(batch).tolist()

    def context(self, settings_key: str) -> OutputContext:
        spec = self.bundle.spec
        return OutputContext(software_version=SOFTWARE_VERSION, bundle_name=spec.name,
                             bundle_version=spec.version, bundle_sha256=self.bundle.sha256,
                             settings_key=settings_key)

    def report_context(self) -> OutputContext:
        keys = "+".join(e.settings_key(self.bundle.sha256) for e in self.explainers)
        return self.context(hashlib.sha256(keys.encode()).hexdigest()[:16])

    def report_uid(self, source_sop_instance_uid: str) -> str:
        """The SR UID this engine will give the source: present in the PACS = already explained."""
        return report_uid(source_sop_instance_uid=source_sop_instance_uid, context=self.report_context(),
                          methods=[(e.name, e.version, e.parameters) for e in self.explainers])

    def decision(self, probability: float) -> str:
        task = self.bundle.spec.task
        return task.positive_label if probability >= task.threshold else task.negative_label

    # -- the job --------------------------------------------------------------
    def run(self, sources: list[SourceImage]) -> list[ImageResult]:
        """Explain images in batches of ``config.batch_size``."""
        for source in sources:
            if is_medxplain_output(source.dataset):
                raise ValueError(f"{source.sop_instance_uid}: is medxplain output; it is never explained again")
        results: list[ImageResult] = []
        size = self.config.batch_size
        positions = source_positions(sources)
        for start in range(0, len(sources), size):
            results.extend(self._run_batch(sources[start:start + size], positions[start:start + size]))
        return results

    def _run_batch(self, sources: list[SourceImage], positions: list[int]) -> list[ImageResult]:
        """Each image's time is its own (preprocessing, writing its objects and SR)
        plus an equal share of the batched model work (classifier, explainers)."""
        own = [0.0] * len(sources)
        model_inputs = []
        for i, source in enumerate(sources):
            t0 = time.perf_counter()
            model_inputs.append(self.preprocessor(source.display))
            own[i] += (time.perf_counter() - t0) * 1000.0
        t0 = time.perf_counter()
        batch = torch.stack([m.as_tensor() for m in model_inputs]).to(self.device)
        probability = self.classify(batch)
        domains = self.assess_domain(batch)
        shared = (time.perf_counter() - t0) * 1000.0 / len(sources)
        # Unset means skip: the worker's (PACS) default; `medxplain explain` sets warn.
        skipped = [None if d is None or d.in_domain or self.config.trust.out_of_domain == "warn" else
                   f"out_of_domain: domain score {d.score:.1f} > threshold {d.threshold:.1f} (the image is unlike "
                   "the classifier's training data)" for d in domains]
        keep = [i for i, reason in enumerate(skipped) if reason is None]
        results: list[ImageResult | None] = [
            None if reason is None else ImageResult(
                source=sources[i], probability=float(probability[i]), decision=self.decision(float(probability[i])),
                methods=[], report=None, milliseconds=own[i] + shared, domain=domains[i],
                cautions=self.cautions(float(probability[i]), domains[i]), skipped=reason)
            for i, reason in enumerate(skipped)]
        if keep:
            explained = self._explain_batch([sources[i] for i in keep], [positions[i] for i in keep],
                                            [model_inputs[i] for i in keep], batch[keep], probability[keep],
                                            [domains[i] for i in keep], [own[i] for i in keep], shared)
            for i, result in zip(keep, explained):
                results[i] = result
        return results  # type: ignore[return-value]

    def assess_domain(self, batch: torch.Tensor) -> list[DomainAssessment | None]:
        """The bundle's domain guard on a model-space batch; None per image without a guard."""
        if self.domain_guard is None:
            return [None] * batch.shape[0]
        with torch.no_grad():
            result = self.domain_guard(batch)
        return [DomainAssessment(score=float(s), threshold=result.threshold, in_domain=bool(ok))
                for s, ok in zip(result.score, result.in_domain)]

    def cautions(self, probability: float, domain: DomainAssessment | None) -> list[str]:
        """Plain-language warnings for the overlay and the SR."""
        out = []
        if domain is not None and not domain.in_domain:
            out.append(f"out of domain: unlike the classifier's training data (score {domain.score:.1f} > "
                       f"{domain.threshold:.1f}); the result may not apply")
        threshold = self.bundle.spec.task.threshold
        if abs(probability - threshold) < self.config.trust.low_confidence_margin:
            out.append(f"low confidence (near threshold): P={probability:.2f}, threshold {threshold:.2f}")
        for method, trained in sorted(self.bundle.binding_overrides.items()):
            out.append(f"research override: {method} was trained against another classifier "
                       f"(sha256 {trained[:12]})")
        return out

    def _explain_batch(self, sources: list[SourceImage], positions: list[int], model_inputs: list,
                       batch: torch.Tensor, probability: torch.Tensor, domains: list[DomainAssessment | None],
                       own: list[float], shared: float) -> list[ImageResult]:
        per_image: list[list[MethodResult]] = [[] for _ in sources]
        records: list[list[ExplainerRecord]] = [[] for _ in sources]
        cautions = [self.cautions(float(probability[i]), domains[i]) for i in range(len(sources))]
        outputs = self.config.outputs
        for index, explainer in enumerate(self.explainers):
            t0 = time.perf_counter()
            with self._autocast():
                explanation = explainer.explain(batch, self.classifier)
            ms_each = (time.perf_counter() - t0) * 1000.0 / len(sources)
            shared += ms_each
            context = self.context(explainer.settings_key(self.bundle.sha256))
            series = outputs.first_series_number + 10 * (index + 1)
            for i, source in enumerate(sources):
                t0 = time.perf_counter()
                result = self._write_method(source, model_inputs[i], explainer, explanation, i,
                                            float(probability[i]), context, series, ms_each, positions[i],
                                            cautions[i])
                written = (time.perf_counter() - t0) * 1000.0
                result.milliseconds += written
                own[i] += written
                per_image[i].append(result)
                records[i].append(ExplainerRecord(
                    method=explainer.name, method_version=explainer.version, parameters=explainer.parameters,
                    probability=float(probability[i]), threshold=explainer.threshold,
                    decision=self.decision(float(probability[i])),
                    counterfactual_probability=result.counterfactual_probability, flipped=result.flipped,
                    checks=result.checks, processing_ms=result.milliseconds, derived=result.datasets,
                    salient_region=result.salient_region))
        results = []
        for i, source in enumerate(sources):
            report = None
            t0 = time.perf_counter()
            if outputs.report:
                report = audit_sr(source=source, records=records[i], context=self.report_context(),
                                  series_number=outputs.first_series_number,
                                  finding_name=self.bundle.spec.task.finding,
                                  total_processing_ms=own[i] + shared, instance_number=positions[i],
                                  domain=domains[i], cautions=cautions[i])
            own[i] += (time.perf_counter() - t0) * 1000.0
            results.append(ImageResult(source=source, probability=float(probability[i]),
                                       decision=self.decision(float(probability[i])), methods=per_image[i],
                                       report=report, milliseconds=own[i] + shared, domain=domains[i],
                                       cautions=cautions[i]))
        return results

    def _write_method(self, source: SourceImage, model_input, explainer: Explainer, explanation, i: int,
                      probability: float, context: OutputContext, series: int, ms_each: float,
                      position: int, cautions: list[str]) -> MethodResult:
        outputs = self.config.outputs
        task = self.bundle.spec.task
        checks = dict(explanation.checks[i])
        saliency = np.clip(self.preprocessor.to_source(model_input, explanation.saliency[i].float().cpu()), 0, 1)
        result = MethodResult(method=explainer.name, milliseconds=ms_each, checks=checks)
        section = explainer.bundle_section
        if section in self.bundle.binding_overrides:
            checks["classifier_binding"] = (
                f"research override: trained against classifier sha256 {self.bundle.binding_overrides[section]}, "
                f"used with {self.bundle.spec.classifier.weights.sha256}")
        if explanation.counterfactuals is not None:
            # Residual trick: the source plus the upsampled model-space change, so the
            # generator's resolution never blurs the patient's image.
            steps = explanation.counterfactuals[i, :, 0].float().cpu()
            differences = self.preprocessor.to_source(model_input, steps - model_input.as_tensor().cpu())
            images = [np.round(np.clip(source.display + d, 0.0, 1.0) * COUNTERFACTUAL_LEVELS)
                      / COUNTERFACTUAL_LEVELS for d in differences]
            # What is reported is the classifier on the images as written (the SC's stored
            # values, mapped back to model space), so that `medxplain verify` re-derives it;
            # the generator's own model-space result is kept as a check.
            path_prob = self.classify_display(images)
            checks["model_space_counterfactual_probability"] = float(explanation.path_probability[i, -1])
            result.counterfactual_probability = float(path_prob[-1])
            result.flipped = (path_prob[-1] >= task.threshold) != (probability >= task.threshold)
            checks["flipped"] = result.flipped
            if outputs.counterfactual:
                result.datasets += counterfactual_sc(
                    source=source, images=images, path_probability=path_prob, method=explainer.name,
                    context=context, series_number=series + 2, positive_label=task.positive_label,
                    first_instance_number=(position - 1) * len(images) + 1)
        if outputs.overlay:
            result.datasets.append(overlay_sc(
                source=source, saliency=saliency, method=explainer.name, probability=probability,
                decision=self.decision(probability), counterfactual_probability=result.counterfactual_probability,
                flipped=result.flipped, context=context, series_number=series + 1,
                positive_label=task.positive_label, instance_number=position, cautions=tuple(cautions)))
        mask = most_salient_region(saliency, outputs.segmentation_top_fraction)
        result.salient_region = mask if mask.any() else None
        if outputs.segmentation:
            if mask.any():
                result.datasets.append(saliency_seg(
                    source=source, mask=mask, method=explainer.name, context=context, series_number=series + 3,
                    method_version=explainer.version, parameters=explainer.parameters, instance_number=position))
            else:
                checks["segmentation"] = "saliency map is empty: no SEG written"
        return result


def source_positions(sources: list[SourceImage]) -> list[int]:
    """1-based position of each source in source order (SeriesNumber, InstanceNumber,
    then as given): the InstanceNumber of its outputs in the run's output series, so
    that a viewer lists them in the order of the images they explain."""

    def number(value) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            return 0

    order = sorted(range(len(sources)), key=lambda i: (
        number(sources[i].dataset.get("SeriesNumber")), number(sources[i].dataset.get("InstanceNumber")), i))
    positions = [0] * len(sources)
    for rank, i in enumerate(order):
        positions[i] = rank + 1
    return positions


def most_salient_region(saliency: np.ndarray, top_fraction: float) -> np.ndarray:
    """The connected region, among the top ``top_fraction`` of pixels, that holds the peak."""
    if not np.any(saliency > 0):
        return np.zeros(saliency.shape, dtype=bool)
    cut = np.quantile(saliency, 1.0 - top_fraction)
    candidate = saliency >= max(cut, np.finfo(np.float32).tiny)
    labels, _ = ndimage.label(candidate)
    peak = np.unravel_index(int(np.argmax(np.where(candidate, saliency, -1))), saliency.shape)
    return labels == labels[peak]
