"""`medxplain benchmark` end to end on the demo bundle: report, tables, figures,
resuming from the per-method cache, skipped methods with their reason."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from explainers.bundle import Bundle
from pipeline.cli import app
from pipeline.evaluation import benchmark
from pipeline.evaluation.benchmark import BenchmarkError, runnable_methods, select_cases
from tests.conftest import PROJECT_ROOT, kermany_subset

DEMO = PROJECT_ROOT / "bundles" / "demo-pneumonia"


@pytest.fixture(scope="module")
def lesion_data(kermany_dir, tmp_path_factory):
    """A small lesion data set (4 test cases with masks) built from real NORMAL images."""
    root = tmp_path_factory.mktemp("lesion-data")
    source = kermany_subset(kermany_dir, root / "src", {"train": 8, "test": 16})
    result = CliRunner().invoke(app, ["make-lesions", "--data", str(source), "--out", str(root / "lesions")])
    assert result.exit_code == 0, result.output
    return root / "lesions"


def test_lesion_benchmark_report_with_localisation_and_resume(lesion_data, tmp_path, monkeypatch):
    out = tmp_path / "report"
    args = ["benchmark", "--bundle", str(DEMO), "--data", str(lesion_data), "--out", str(out), "--n", "4",
            "--methods", "gradcam", "--robustness-n", "2", "--steps", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for needle in ("## Localisation against the inserted-lesion masks", "IoU at mask area", "pointing game",
                   "AUPRC", "deletion AUC", "Spearman σ=0.02", "ms / image", "× classifier forward",
                   "random map (chance)", "`medxplain benchmark --bundle", "torch 2.", "commit",
                   "## Localisation with the same extra smoothing for every map", "IoU +σ 4 px", "pointing +σ 8 px"):
        assert needle in report, needle
    assert "4 test images, with masks" in report
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    for png in ("figure_grid.png", "deletion_insertion.png"):
        assert 0 < (out / png).stat().st_size < 1_000_000
    summary = json.loads((out / ".cache" / "gradcam.json").read_text())
    for key in ("iou", "pointing_game", "auprc", "deletion_auc", "insertion_auc", "ms_per_image",
                "ratio_to_forward", "peak_memory_mib"):
        assert summary[key] >= 0, key
    assert 0 <= summary["iou"] <= 1 and summary["n"] == 4

    # Resumable: a finished method is read back, never run again.
    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached method was run again")

    monkeypatch.setattr(benchmark, "run_method", refuse)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "finished in an earlier run" in again.output
    assert "from the cache of an earlier run: gradcam" in (out / "report.md").read_text()


def test_robustness_can_be_left_out(lesion_data, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["benchmark", "--bundle", str(DEMO), "--data", str(lesion_data), "--out", str(out),
                                      "--n", "2", "--methods", "gradcam", "--robustness-n", "0", "--sanity-n", "0",
                                      "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "Spearman σ=" not in report and "deletion AUC" in report
    summary = json.loads((out / ".cache" / "gradcam.json").read_text())
    assert not any(key.startswith("robust_") for key in summary) and summary["n"] == 2


def test_cases_with_masks_are_the_positives(lesion_data):
    cases = select_cases(lesion_data, Bundle.load(DEMO), n=10, seed=0)
    assert len(cases.paths) == 4 and cases.labels.tolist() == [1, 1, 1, 1]
    assert cases.masks is not None and cases.masks.shape == (4, 128, 128)
    assert cases.masks.flatten(1).any(dim=1).all()
    assert cases.images.shape == (4, 1, 128, 128) and 0 <= cases.images.min() <= cases.images.max() <= 1
    assert set(cases.reference) == {0, 1}


def test_methods_without_weights_are_skipped_with_the_reason(tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle_dir, ignore=shutil.ignore_patterns(".checkpoints"))
    spec = yaml.safe_load((bundle_dir / "bundle.yaml").read_text())
    spec["explainers"] = {}  # whatever was trained for the demo bundle: none here
    (bundle_dir / "bundle.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    runnable, skipped = runnable_methods(Bundle.load(bundle_dir), None)
    assert runnable[:3] == ["gradcam", "ig", "occlusion"]
    assert "sagen" in skipped and "medxplain train sagen" in skipped["sagen"]
    with pytest.raises(BenchmarkError, match="unknown method"):
        runnable_methods(Bundle.load(bundle_dir), ["gradcam", "no-such-method"])


def test_bad_options_are_reported_not_raised(tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "--bundle", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "cannot benchmark" in result.output
    result = CliRunner().invoke(app, ["benchmark", "--bundle", str(DEMO), "--out", str(tmp_path / "o"),
                                      "--data", str(tmp_path), "--methods", "gradcam"])
    assert result.exit_code == 2 and "manifest.csv" in result.output


@pytest.mark.slow
def test_baselines_end_to_end_on_kermany(kermany_dir, tmp_path):
    """--n 4 with the three baselines on real pneumonia / normal test images."""
    data = kermany_subset(kermany_dir, tmp_path / "data", {"train": 2, "test": 16})
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["benchmark", "--bundle", str(DEMO), "--data", str(data), "--out", str(out),
                                      "--n", "4", "--methods", "gradcam,ig,occlusion", "--robustness-n", "2",
                                      "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "2 PNEUMONIA, 2 NORMAL" in report
    assert "Localisation" not in report  # no masks in Kermany
    assert "Sanity checks (Adebayo et al. 2018)" in report
    for method in ("gradcam", "occlusion"):  # their maps follow the classifier
        summary = json.loads((out / ".cache" / f"{method}.json").read_text())
        assert summary["randomised_1"] < 0.5 and -1 <= summary["edge_similarity"] <= 1
    for method in ("gradcam", "ig", "occlusion"):
        assert f"| {method} |" in report
        summary = json.loads((out / ".cache" / f"{method}.json").read_text())
        assert summary["ms_per_image"] > 0 and summary["ratio_to_forward"] > 0
    # Occlusion runs many forward passes per image: it costs more than Grad-CAM's one backward pass.
    cost = {m: json.loads((out / ".cache" / f"{m}.json").read_text())["ratio_to_forward"]
            for m in ("gradcam", "occlusion")}
    assert cost["occlusion"] > cost["gradcam"]


class _FadeExplainer:
    """A stand-in generative method: its path darkens the image's upper half in 3
    steps; saliency = the change. Exercises the counterfactual columns of the report."""

    name, version, parameters = "fade", "1", {"steps": 3}
    bundle_section = None  # needs no trained networks of its own

    @classmethod
    def from_bundle(cls, bundle):
        return cls()

    def explain(self, images, classifier):
        import torch

        from explainers.base import Explanation

        factors = torch.tensor([0.9, 0.7, 0.5]).reshape(1, 3, 1, 1, 1)
        path = images[:, None].repeat(1, 3, 1, 1, 1)
        path[..., : images.shape[-2] // 2, :] *= factors
        with torch.no_grad():
            probability = torch.sigmoid(classifier(images))
            path_probability = torch.sigmoid(classifier(path.flatten(0, 1))).reshape(len(images), 3)
        saliency = (path[:, -1, 0] - images[:, 0]).abs()
        return Explanation(probability=probability, saliency=saliency / saliency.amax(dim=(1, 2), keepdim=True),
                           counterfactuals=path, path_probability=path_probability,
                           checks=[{} for _ in range(len(images))])


def test_counterfactual_method_gets_validity_proximity_realism_and_figure_columns(lesion_data, tmp_path,
                                                                                  monkeypatch):
    from pipeline.evaluation.benchmark_report import write_report

    monkeypatch.setattr(benchmark, "explainer_class", lambda name: _FadeExplainer)
    monkeypatch.setattr(benchmark, "runnable_methods", lambda bundle, requested: (["fade"], {}))
    result = benchmark.run_benchmark(bundle_path=DEMO, out=tmp_path, data=lesion_data, n=4, device="cpu",
                                     batch_size=2, robustness_n=2, steps=4)
    run = result.runs[0]
    for key in ("flip_rate", "probability_change", "l1", "ssim", "fid", "lung_share", "lung_area", "border_share",
                "border_area", "lung_share_to_negative"):
        assert key in run.summary, key
    assert 0 < run.summary["lung_area"] < 1 and 0 <= run.summary["border_share"] <= 1
    assert run.summary["l1"] > 0 and run.summary["ssim"] < 1
    assert result.inputs_fid is not None and result.inputs_fid >= 0
    assert {f"figure_path_{i}" for i in result.cases.figure} <= set(run.arrays)
    report_md, _ = write_report(result, command="medxplain benchmark (test)", wall_s=1.0)
    text = report_md.read_text()
    assert "## Counterfactuals: validity, proximity, realism" in text
    assert "| fade |" in text and "inputs themselves (no change)" in text
    assert "Not comparable with published FIDs" in text
    assert "## Counterfactuals: where the change lies" in text
