"""`medxplain benchmark`: every explainer a bundle can run, on the same test images,
scored with explainers.evaluation, cached per method (a finished method is never
re-run), then written up by pipeline.evaluation.benchmark_report.

Cases: the bundle's test split. With ground-truth masks (a lesion data set) the cases
are the positives that carry a mask; otherwise a class-balanced seeded sample.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from config.schema import PROJECT_ROOT
from dicom_io.preprocess import Preprocessor
from explainers import evaluation as ev
from explainers.base import available, explainer_class
from explainers.bundle import Bundle, BundleError
from explainers.lesions import lung_field_masks
from pipeline.training.datasets import DatasetError, read_images, read_manifest

SHARED_DATA = Path(os.environ.get("MEDXPLAIN_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
BASELINES = ("gradcam", "ig", "occlusion")
NOISE_LEVELS = (0.02, 0.05)  # model-space intensity std: mild and clearly visible noise
CACHE_SCHEMA = "medxplain-benchmark/1"
FIGURE_CASES = 4
# Model randomisation: maps compared after the top block, half the blocks and all of them.
SANITY_STAGES = (0.0, 0.5, 1.0)
# Extra Gaussian smoothing (px on the model grid) applied alike to every method's map
# before localisation is scored again: each method ships its own smoothing default, and a
# ranking that only holds at those defaults says more about the defaults than the method.
SMOOTHING_CHECK = (4.0, 8.0)
# Spearman to the original map with every block randomised: at or above the first the map
# does not depend on the classifier at explanation time; between the two it depends on it
# only partly (e.g. integrated gradients, which keeps the input's own structure).
CLASSIFIER_INDEPENDENT, CLASSIFIER_PARTLY = 0.9, 0.5


def depends_on_classifier(spearman_all_randomised: float) -> str:
    """The report's verdict from the Spearman after full cascading randomisation."""
    if spearman_all_randomised >= CLASSIFIER_INDEPENDENT:
        return "no"
    return "partly" if spearman_all_randomised >= CLASSIFIER_PARTLY else "yes"


class BenchmarkError(Exception):
    """The benchmark cannot run: no data, unknown methods, bad options."""


@dataclass
class Cases:
    images: torch.Tensor  # (N, 1, H, W) model space [0, 1]
    labels: torch.Tensor  # (N,)
    paths: list[str]
    masks: torch.Tensor | None  # (N, H, W) bool, model grid
    reference: dict[int, torch.Tensor]  # class -> real test images not among the cases (FID reference)
    figure: list[int]  # indices of the cases shown in the figure grid


@dataclass
class MethodRun:
    """Everything the report needs about one method (what the cache holds)."""

    name: str
    summary: dict[str, Any]  # scalar results and settings (JSON)
    arrays: dict[str, torch.Tensor]  # per-case arrays and maps (safetensors)


@dataclass
class BenchmarkResult:
    out: Path
    bundle: Bundle
    cases: Cases
    runs: list[MethodRun]
    skipped: dict[str, str]  # method -> reason
    reference: MethodRun  # random maps: the chance level
    inputs_fid: float | None
    forward_ms: float
    environment: dict[str, str]
    wall_s: float
    cached: list[str] = field(default_factory=list)


# -- data -----------------------------------------------------------------------------

def default_data_dir(bundle: Bundle) -> Path:
    """The folder the bundle was trained on: the project's data/ or the shared data."""
    name = str(bundle.spec.data.get("source") or "")
    for root in (PROJECT_ROOT / "data", SHARED_DATA):
        if name and (root / name / "manifest.csv").is_file():
            return root / name
    raise BenchmarkError(f"cannot find the data set {name!r} of bundle {bundle.root} under "
                         f"{PROJECT_ROOT / 'data'} or {SHARED_DATA}; pass --data")


def _read_rows(root: Path, rows: list[dict[str, str]], preprocessor: Preprocessor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float images (N, 1, H, W) in [0, 1] as at training, and masks (N, H, W) or None."""
    try:
        images, masks = read_images(root, rows, preprocessor)
    except DatasetError as exc:
        raise BenchmarkError(str(exc)) from exc
    return torch.from_numpy(images).float() / 255.0, (torch.from_numpy(masks) if masks is not None else None)


def select_cases(data: Path, bundle: Bundle, *, n: int, seed: int, reference_n: int = 100) -> Cases:
    if n < 2:
        raise BenchmarkError(f"--n must be >= 2, got {n}")
    try:
        rows = [r for r in read_manifest(data) if r["split"] == "test"]
    except DatasetError as exc:
        raise BenchmarkError(str(exc)) from exc
    if not rows:
        raise BenchmarkError(f"{data}: manifest has no test split")
    rng = np.random.default_rng(seed)
    with_masks = [r for r in rows if r.get("mask")]
    if with_masks:
        picked = [with_masks[i] for i in sorted(rng.permutation(len(with_masks))[:n].tolist())]
    else:
        picked = []
        for label, count in (("1", (n + 1) // 2), ("0", n // 2)):
            pool = [r for r in rows if r["label"] == label]
            picked += [pool[i] for i in sorted(rng.permutation(len(pool))[:count].tolist())]
    preprocessor = Preprocessor(bundle.spec.input.size, bundle.spec.input.aspect)
    images, masks = _read_rows(data, picked, preprocessor)
    chosen = {r["path"] for r in picked}
    reference = {}
    for label in (0, 1):
        pool = [r for r in rows if r["label"] == str(label) and r["path"] not in chosen]
        if len(pool) < 2:  # every test image of this class is a case: compare with them
            pool = [r for r in rows if r["label"] == str(label)]
        if len(pool) >= 2:
            pool = [pool[i] for i in sorted(rng.permutation(len(pool))[:reference_n].tolist())]
            reference[label] = _read_rows(data, [{"path": r["path"]} for r in pool], preprocessor)[0]
    labels = torch.tensor([int(r["label"]) for r in picked])
    return Cases(images=images, labels=labels, paths=[r["path"] for r in picked], masks=masks,
                 reference=reference, figure=_figure_cases(picked, labels))


def _figure_cases(rows: list[dict[str, str]], labels: torch.Tensor) -> list[int]:
    """Varied cases: taken in turn from each lesion kind where there are kinds, else
    from each class."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("lesion_kind") or row["label"], []).append(i)
    chosen: list[int] = []
    for turn in range(max(len(g) for g in groups.values())):
        chosen += [g[turn] for g in groups.values() if turn < len(g)]
    return sorted(chosen[:FIGURE_CASES])


# -- methods ------------------------------------------------------------------------

def runnable_methods(bundle: Bundle, requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Methods to run (baselines first) and skipped ones with the reason."""
    registered = available()
    if requested:
        unknown = sorted(set(requested) - set(registered))
        if unknown:
            raise BenchmarkError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    names = requested or registered
    names = [m for m in BASELINES if m in names] + sorted(m for m in names if m not in BASELINES)
    runnable, skipped = [], {}
    for name in names:
        try:
            explainer_class(name).from_bundle(bundle)
        except BundleError as exc:
            skipped[name] = str(exc)
            continue
        runnable.append(name)
    return runnable, skipped


def _fingerprint(bundle: Bundle, explainer, cases: Cases, options: dict[str, Any]) -> str:
    """What a method's results depend on: the classifier, the method's own weights and
    settings, the cases and the options. Not the whole bundle.yaml, so training
    another method into the bundle does not invalidate the finished ones."""
    spec = bundle.spec
    method_spec = spec.explainers.get(explainer.bundle_section or explainer.name)
    payload = json.dumps({
        "schema": CACHE_SCHEMA, "classifier": spec.classifier.weights.sha256, "threshold": spec.task.threshold,
        "input": spec.input.model_dump(mode="json"), "method": explainer.name, "version": explainer.version,
        "parameters": explainer.parameters,
        "weights": {k: v.sha256 for k, v in method_spec.weights.items()} if method_spec else {},
        "cases": cases.paths, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _cache_paths(out: Path, name: str) -> tuple[Path, Path]:
    folder = out / ".cache"
    folder.mkdir(parents=True, exist_ok=True)
    # The cache is for resuming, not for the repository.
    (folder / ".gitignore").write_text("*\n")
    return folder / f"{name}.json", folder / f"{name}.safetensors"


def load_cached(out: Path, name: str, fingerprint: str) -> MethodRun | None:
    summary_path, arrays_path = _cache_paths(out, name)
    if not (summary_path.is_file() and arrays_path.is_file()):
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("fingerprint") != fingerprint:
        return None
    return MethodRun(name, summary, load_file(str(arrays_path)))


def save_cached(out: Path, run: MethodRun) -> None:
    summary_path, arrays_path = _cache_paths(out, run.name)
    save_file({k: v.contiguous() for k, v in run.arrays.items()}, str(arrays_path))
    # Written last: a method counts as finished only once its summary exists.
    summary_path.write_text(json.dumps(run.summary, indent=1))


def measure_forward(classifier: torch.nn.Module, images: torch.Tensor, device: torch.device,
                    repeats: int = 5) -> float:
    """Median ms per image of one batched classifier forward pass."""
    times = []
    with torch.no_grad():
        classifier(images)  # warm-up
        for _ in range(repeats):
            with ev.measure(device) as cost:
                classifier(images)
            times.append(cost.seconds * 1000.0 / len(images))
    return statistics.median(times)


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean())


def run_method(name: str, bundle: Bundle, classifier: torch.nn.Module, cases: Cases, device: torch.device, *,
               batch_size: int, robustness_n: int, steps: int, seed: int, fingerprint: str,
               on_progress: Callable[[float], None], sanity_n: int = 0) -> MethodRun:
    """Explain every case (timed), then score. ``on_progress`` gets fractions of the work."""
    started = time.perf_counter()
    explainer = explainer_class(name).from_bundle(bundle)
    threshold = bundle.spec.task.threshold
    images = cases.images.to(device)
    total = len(images)
    sanity_n = min(sanity_n, total)
    work = total + robustness_n * len(NOISE_LEVELS) + sanity_n * len(SANITY_STAGES)
    done = 0

    def explain(batch: torch.Tensor):
        return explainer.explain(batch, classifier)

    explain(images[:1])  # warm-up: first-call allocations are not part of the cost
    forward_ms = measure_forward(classifier, images[:batch_size], device)
    saliency, probability, counterfactuals, path_probability, figure_paths = [], [], [], [], {}
    seconds, peak = 0.0, 0
    peak_source = ""
    for start in range(0, total, batch_size):
        batch = images[start:start + batch_size]
        with ev.measure(device) as cost:
            explanation = explain(batch)
        seconds += cost.seconds
        peak, peak_source = max(peak, cost.peak_bytes), cost.peak_source
        saliency.append(explanation.saliency.detach().float().cpu())
        probability.append(explanation.probability.detach().float().cpu())
        if explanation.counterfactuals is not None:
            counterfactuals.append(explanation.counterfactuals[:, -1].detach().float().cpu())
            path_probability.append(explanation.path_probability[:, -1].detach().float().cpu())
            for i in range(len(batch)):
                if start + i in cases.figure:
                    figure_paths[start + i] = explanation.counterfactuals[i].detach().float().cpu()
        done += len(batch)
        on_progress(done / work)
    maps = torch.cat(saliency)
    arrays: dict[str, torch.Tensor] = {"saliency": maps.half(), "probability": torch.cat(probability)}
    summary: dict[str, Any] = {
        "method": name, "version": explainer.version, "parameters": explainer.parameters,
        "fingerprint": fingerprint, "n": total, "batch_size": batch_size,
        "ms_per_image": seconds * 1000.0 / total, "forward_ms_per_image": forward_ms,
        "ratio_to_forward": seconds * 1000.0 / total / forward_ms,
        "peak_memory_mib": peak / 2 ** 20, "peak_memory_source": peak_source,
    }

    # Robustness: the same method on noisy copies of the first cases (none: --robustness-n 0).
    for level_index, sigma in enumerate(NOISE_LEVELS if robustness_n else ()):
        noisy_maps = []
        for start in range(0, robustness_n, batch_size):
            batch = images[start:min(start + batch_size, robustness_n)]
            noisy = ev.add_noise(batch, sigma, seed=seed + 1000 * level_index + start)
            noisy_maps.append(explain(noisy).saliency.detach().float().cpu())
            done += len(batch)
            on_progress(done / work)
        agreement = ev.map_agreement(maps[:robustness_n], torch.cat(noisy_maps))
        for metric, values in agreement.items():
            arrays[f"robust_{metric}_{sigma}"] = values
            summary[f"robust_{metric}_{sigma}"] = _mean(values)

    # Sanity checks (Adebayo et al. 2018): cascading model randomisation on the first
    # cases, and how much each map is its input's own edges.
    if sanity_n:
        randomised = ev.cascading_randomisation(
            classifier, lambda x, c: explainer.explain(x, c).saliency, images[:sanity_n], stages=SANITY_STAGES,
            seed=seed)
        for key, values in randomised.items():
            arrays[key], summary[key] = values, _mean(values)
        done += sanity_n * len(SANITY_STAGES)
        on_progress(done / work)
    arrays["edge_similarity"] = ev.edge_similarity(cases.images, maps)
    summary["edge_similarity"] = _mean(arrays["edge_similarity"])

    summary.update(score_maps(classifier, cases, maps, threshold, device, steps=steps, seed=seed, arrays=arrays,
                              batch_size=batch_size))
    if counterfactuals:
        cf = torch.cat(counterfactuals)
        cf_prob = torch.cat(path_probability)
        arrays["counterfactual"] = cf.half()
        arrays["counterfactual_probability"] = cf_prob
        for index, path in figure_paths.items():
            arrays[f"figure_path_{index}"] = path.half()
        summary.update(score_counterfactuals(classifier, cases, arrays["probability"], cf, cf_prob, threshold,
                                             device, arrays))
    summary["wall_s"] = time.perf_counter() - started  # explain + noise re-runs + scoring
    return MethodRun(name, summary, arrays)


def score_maps(classifier, cases: Cases, maps: torch.Tensor, threshold: float, device: torch.device, *,
               steps: int, seed: int, arrays: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Localisation (with masks) and deletion / insertion of a set of maps."""
    out: dict[str, float] = {}
    if cases.masks is not None:
        for key, metric in (("iou", ev.iou_at_mask_area), ("pointing_game", ev.pointing_game),
                            ("auprc", ev.saliency_auprc)):
            values = metric(maps, cases.masks)
            arrays[key] = values
            out[key] = _mean(values)
    deletion, insertion = [], []
    for start in range(0, len(maps), batch_size):
        curves = ev.deletion_insertion(classifier, cases.images[start:start + batch_size].to(device),
                                       maps[start:start + batch_size].to(device), threshold=threshold, steps=steps,
                                       seed=seed)
        deletion.append(curves.deletion)
        insertion.append(curves.insertion)
    arrays["deletion_curve"], arrays["insertion_curve"] = torch.cat(deletion), torch.cat(insertion)
    fractions = curves.fractions
    arrays["deletion_auc"] = torch.trapezoid(arrays["deletion_curve"], fractions, dim=1)
    arrays["insertion_auc"] = torch.trapezoid(arrays["insertion_curve"], fractions, dim=1)
    out["deletion_auc"], out["insertion_auc"] = _mean(arrays["deletion_auc"]), _mean(arrays["insertion_auc"])
    return out


def score_smoothing_check(run: MethodRun, cases: Cases) -> None:
    """Adds ``iou_smoothed_S`` and ``pointing_smoothed_S`` (N,) for each S in
    ``SMOOTHING_CHECK`` to ``run.arrays``, from its saved maps (so cached runs get them
    too); nothing without masks."""
    if cases.masks is None:
        return
    for sigma in SMOOTHING_CHECK:
        iou, pointing = ev.localisation_after_smoothing(run.arrays["saliency"], cases.masks, sigma)
        run.arrays[f"iou_smoothed_{sigma:g}"], run.arrays[f"pointing_smoothed_{sigma:g}"] = iou, pointing


def score_counterfactuals(classifier, cases: Cases, probability: torch.Tensor, cf: torch.Tensor,
                          cf_prob: torch.Tensor, threshold: float, device: torch.device,
                          arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    valid = ev.validity(probability, cf_prob, threshold)
    arrays["flipped"], arrays["probability_change"] = valid["flipped"], valid["change"]
    arrays["l1"] = ev.proximity_l1(cases.images, cf)
    arrays["ssim"] = ev.proximity_ssim(cases.images, cf)
    out = {"flip_rate": _mean(valid["flipped"]), "probability_change": _mean(valid["change"]),
           "l1": _mean(arrays["l1"]), "ssim": _mean(arrays["ssim"])}
    target = (probability < threshold).long()  # the class each counterfactual aims at
    out.update(score_change_location(cases.images, cf, target, arrays))
    fid = realism_fid(classifier, cf, target, cases.reference, device)
    if fid is not None:
        out["fid"] = fid
    return out


def score_change_location(images: torch.Tensor, cf: torch.Tensor, target: torch.Tensor,
                          arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of |counterfactual - input| inside the lung fields (``explainers.lesions.lung_field_masks``
    of each input, as ``explainers.validity.evaluate_explainer`` finds them) and inside the
    outer 10 % border band, next to their area shares; the lung share also for the
    counterfactuals towards the negative class (target 0) alone."""
    lungs = lung_field_masks(images, side=images.shape[-1])[:, 0].bool()
    border = ev.border_band_mask(tuple(images.shape[-2:]), 0.1)
    where = ev.change_location(images, cf, {"lung": lungs, "border": border})
    arrays.update(where)
    out = {key: float(torch.nanmean(values)) for key, values in where.items()}
    to_negative = where["lung_share"][target == 0]
    out["lung_share_to_negative"] = float(torch.nanmean(to_negative)) if len(to_negative) else float("nan")
    return out


def realism_fid(classifier, images: torch.Tensor, target: torch.Tensor, reference: dict[int, torch.Tensor],
                device: torch.device) -> float | None:
    """Fréchet distance between ``images`` and real test images of each one's target
    class (the reference mixed in the same proportions), on the bundle classifier's
    penultimate features."""
    features = ev.PenultimateFeatures(classifier)
    parts = []
    for label in (0, 1):
        count = int((target == label).sum())
        if count == 0:
            continue
        pool = reference.get(label)
        if pool is None:
            return None
        share = max(2, round(len(pool) * count / len(target)))
        parts.append(pool[:share])
    if len(images) < 2:
        return None
    return ev.frechet_distance(features(images.to(device)), features(torch.cat(parts).to(device)))


def random_reference(classifier, cases: Cases, threshold: float, device: torch.device, *, steps: int, seed: int,
                     batch_size: int) -> MethodRun:
    """Uniform-noise maps: the chance level of every map metric."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(cases.images.shape[0], *cases.images.shape[-2:], generator=generator)
    arrays: dict[str, torch.Tensor] = {}
    summary = score_maps(classifier, cases, maps, threshold, device, steps=steps, seed=seed, arrays=arrays,
                         batch_size=batch_size)
    return MethodRun("random", {"method": "random", **summary}, arrays)


def environment() -> dict[str, str]:
    from importlib.metadata import version

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    commit = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(), "torch": torch.__version__, "monai": version("monai"),
        "captum": version("captum"), "torchmetrics": version("torchmetrics"),
        "medxplain": version("medxplain"),
        "commit": commit + (" (working tree modified)" if dirty and dirty != "unknown" else ""),
        "threads": str(torch.get_num_threads()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        # Timings are only comparable on a quiet machine: say how busy it was.
        "load": "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*os.getloadavg()),
    }


def run_benchmark(*, bundle_path: Path, out: Path, methods: list[str] | None = None, n: int = 100,
                  data: Path | None = None, device: str = "auto", batch_size: int = 16, robustness_n: int = 32,
                  steps: int = 16, seed: int = 0, sanity_n: int = 8,
                  on_method: Callable[[str, str], None] | None = None,
                  on_progress: Callable[[str, float], None] | None = None) -> BenchmarkResult:
    """Run (or resume) the benchmark; the caller writes the report."""
    from pipeline.engine import resolve_device

    started = time.perf_counter()
    if batch_size < 1 or robustness_n < 0 or steps < 2 or sanity_n < 0:
        raise BenchmarkError("need --batch-size >= 1, --robustness-n >= 0, --sanity-n >= 0 and --steps >= 2")
    try:
        bundle = Bundle.load(bundle_path)
    except BundleError as exc:
        raise BenchmarkError(str(exc)) from exc
    try:
        torch_device = resolve_device(device)
    except RuntimeError as exc:
        raise BenchmarkError(str(exc)) from exc
    data = data or default_data_dir(bundle)
    cases = select_cases(data, bundle, n=n, seed=seed)
    robustness_n = min(robustness_n, len(cases.paths))
    sanity_n = min(sanity_n, len(cases.paths))
    classifier = bundle.load_classifier(device=str(torch_device))
    names, skipped = runnable_methods(bundle, methods)
    threshold = bundle.spec.task.threshold
    options = {"batch_size": batch_size, "robustness_n": robustness_n, "steps": steps, "seed": seed,
               "sanity_n": sanity_n,
               "noise": list(NOISE_LEVELS), "device": torch_device.type}
    runs, cached = [], []
    for name in names:
        explainer = explainer_class(name).from_bundle(bundle)
        fingerprint = _fingerprint(bundle, explainer, cases, options)
        run = load_cached(out, name, fingerprint)
        if run is not None:
            cached.append(name)
            if on_method:
                on_method(name, "cached")
        else:
            if on_method:
                on_method(name, "running")
            torch.manual_seed(seed)
            run = run_method(name, bundle, classifier, cases, torch_device, batch_size=batch_size,
                             robustness_n=robustness_n, steps=steps, seed=seed, fingerprint=fingerprint,
                             sanity_n=sanity_n,
                             on_progress=lambda f, name=name: on_progress(name, f) if on_progress else None)
            save_cached(out, run)
        score_smoothing_check(run, cases)
        runs.append(run)
    reference = random_reference(classifier, cases, threshold, torch_device, steps=steps, seed=seed,
                                 batch_size=batch_size)
    inputs_fid = None
    if any("counterfactual" in r.arrays for r in runs):
        probability = runs[0].arrays["probability"]
        inputs_fid = realism_fid(classifier, cases.images, (probability < threshold).long(), cases.reference,
                                 torch_device)
    forward_ms = measure_forward(classifier, cases.images[:batch_size].to(torch_device), torch_device)
    return BenchmarkResult(out=out, bundle=bundle, cases=cases, runs=runs, skipped=skipped, reference=reference,
                           inputs_fid=inputs_fid, forward_ms=forward_ms, environment=environment(),
                           wall_s=time.perf_counter() - started, cached=cached)
