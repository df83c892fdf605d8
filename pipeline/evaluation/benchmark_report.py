"""The benchmark's write-up: report.md and report.html with the same tables, a figure
grid (input, counterfactual path, difference, saliency, ground-truth outline per
method on the same cases) and the deletion / insertion curves (matplotlib)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from pipeline.evaluation.benchmark import (  # noqa: E402
    CLASSIFIER_INDEPENDENT,
    CLASSIFIER_PARTLY,
    NOISE_LEVELS,
    SANITY_STAGES,
    SMOOTHING_CHECK,
    BenchmarkResult,
    MethodRun,
    depends_on_classifier,
)

FIGURE_DPI = 72
PATH_STEPS_SHOWN = 3


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_ci(values: torch.Tensor, digits: int = 3) -> str:
    """mean ± 1.96 standard errors (normal approximation across cases)."""
    values = values.float()
    if len(values) < 2:
        return _fmt(float(values.mean()), digits)
    half = 1.96 * float(values.std()) / len(values) ** 0.5
    return f"{float(values.mean()):.{digits}f} ± {half:.{digits}f}"


def _nan_mean_ci(values: torch.Tensor, digits: int = 3) -> str:
    """``_mean_ci`` over the finite values (a share is NaN where nothing changed)."""
    values = values.float()
    return _mean_ci(values[torch.isfinite(values)], digits) if torch.isfinite(values).any() else "—"


def tables(result: BenchmarkResult) -> list[Table]:
    runs, ref = result.runs, result.reference
    out: list[Table] = []
    if result.cases.masks is not None:
        area = result.cases.masks.flatten(1).float().mean(dim=1)
        rows = [[r.name, _mean_ci(r.arrays["iou"]), _mean_ci(r.arrays["pointing_game"]), _mean_ci(r.arrays["auprc"])]
                for r in runs]
        rows.append(["random map (chance)", _mean_ci(ref.arrays["iou"]), _mean_ci(ref.arrays["pointing_game"]),
                     _mean_ci(ref.arrays["auprc"])])
        out.append(Table("Localisation against the inserted-lesion masks (higher is better)",
                         ["method", "IoU at mask area", "pointing game", "AUPRC"], rows,
                         f"Mean ± 95% CI over {len(area)} cases. The mask covers on average "
                         f"{100 * float(area.mean()):.1f}% of the image (the chance level of the pointing game "
                         "and AUPRC). IoU: the map's top-k pixels, k = the mask's area."))
        rows = [[r.name] + [_mean_ci(r.arrays[f"{key}_smoothed_{sigma:g}"]) for sigma in SMOOTHING_CHECK
                            for key in ("iou", "pointing")] for r in runs]
        out.append(Table("Localisation with the same extra smoothing for every map",
                         ["method"] + [f"{name} +σ {sigma:g} px" for sigma in SMOOTHING_CHECK
                                       for name in ("IoU", "pointing")], rows,
                         "The table above scores each map as its method ships it, each with its own smoothing "
                         "(Grad-CAM's coarse grid is smooth by construction). Here every map gets one more Gaussian "
                         "of σ px on the model grid before it is scored: a ranking that changes here is owed to the "
                         "smoothing defaults, not to the methods."))
    rows = [[r.name, _mean_ci(r.arrays["deletion_auc"]), _mean_ci(r.arrays["insertion_auc"])] for r in runs]
    rows.append(["random map (chance)", _mean_ci(ref.arrays["deletion_auc"]), _mean_ci(ref.arrays["insertion_auc"])])
    out.append(Table("Faithfulness: deletion (lower is better) and insertion (higher is better) AUC",
                     ["method", "deletion AUC", "insertion AUC"], rows,
                     "P(called class) as the most salient pixels are replaced by a 17 px local mean (deletion), "
                     "or restored into that blurred image (insertion), in steps of 1/16 of the pixels."))
    robust = [r for r in runs if f"robust_ssim_{NOISE_LEVELS[0]}" in r.arrays]  # none with --robustness-n 0
    if robust:
        headers = ["method"] + [f"Spearman σ={s}" for s in NOISE_LEVELS] + [f"SSIM σ={s}" for s in NOISE_LEVELS]
        rows = [[r.name] + [_mean_ci(r.arrays[f"robust_spearman_{s}"]) for s in NOISE_LEVELS]
                + [_mean_ci(r.arrays[f"robust_ssim_{s}"]) for s in NOISE_LEVELS] for r in robust]
        robust_n = len(robust[0].arrays[f"robust_ssim_{NOISE_LEVELS[0]}"])
        out.append(Table("Robustness: agreement of the map of an image and of the image plus Gaussian noise "
                         "(higher is better)", headers, rows,
                         f"First {robust_n} cases; σ in model-space intensity (images in [0, 1])."))
    sane = [r for r in runs if any(k.startswith("randomised_") for k in r.arrays)]
    if sane:
        stages = [f"randomised_{f:g}" for f in SANITY_STAGES]
        rows = [[r.name] + [_mean_ci(r.arrays[k]) if k in r.arrays else "—" for k in stages]
                + [_mean_ci(r.arrays["edge_similarity"]) if "edge_similarity" in r.arrays else "—",
                   depends_on_classifier(float(r.arrays[stages[-1]].mean()))] for r in sane]
        out.append(Table(
            "Sanity checks (Adebayo et al. 2018): does the map depend on the classifier?",
            ["method", "Spearman, top block randomised", "half the blocks", "all blocks",
             "Spearman to the input's edges", "map depends on the classifier"], rows,
            f"Cascading model randomisation on the first {len(sane[0].arrays[stages[-1]])} cases: the classifier's "
            "blocks are re-initialised from the output layer down and the maps compared with the original ones "
            "(Spearman rank correlation; near 0 = the map follows the classifier). A method at or above "
            f"{CLASSIFIER_INDEPENDENT} with every block randomised does not look at the classifier at explanation "
            f"time (an amortised generator trained against one classifier; 'partly': {CLASSIFIER_PARTLY} or more, "
            "the map keeps the input's own structure): its map is only meaningful for that "
            "classifier, which is why bundles bind each explainer to its classifier's sha256. Data independence: "
            "Spearman of each map with the Sobel edges of its own input (all cases); a high value means the map "
            "mostly shows the image's own structure. The retrained-on-permuted-labels test of the paper is not run "
            "(it needs a second classifier)."))
    cf_runs = [r for r in runs if "counterfactual" in r.arrays]
    if cf_runs:
        rows = [[r.name, _mean_ci(r.arrays["flipped"]), _mean_ci(r.arrays["probability_change"]),
                 _mean_ci(r.arrays["l1"], 4), _mean_ci(r.arrays["ssim"]), _fmt(r.summary.get("fid"), 2)]
                for r in cf_runs]
        rows.append(["inputs themselves (no change)", "—", "—", "0", "1", _fmt(result.inputs_fid, 2)])
        out.append(Table("Counterfactuals: validity, proximity, realism",
                         ["method", "flipped", "P change towards the other class", "L1 to input",
                          "SSIM to input", "FID (own features)"], rows,
                         "FID: Fréchet distance between the counterfactuals and real test images of their target "
                         "class, on the penultimate features of the bundle's own classifier (no Inception network: "
                         "nothing is downloaded). **Not comparable with published FIDs**; compare with the inputs' "
                         "own distance to the target class in the last row."))
        located = [r for r in cf_runs if "lung_share" in r.arrays]
        if located:
            rows = []
            for r in located:
                to_negative = r.arrays["lung_share"][r.arrays["probability"] >= result.bundle.spec.task.threshold]
                rows.append([r.name, _nan_mean_ci(r.arrays["lung_share"]), _nan_mean_ci(to_negative),
                             _fmt(float(r.arrays["lung_area"].mean()), 3), _nan_mean_ci(r.arrays["border_share"]),
                             _fmt(float(r.arrays["border_area"].mean()), 3)])
            task = result.bundle.spec.task
            out.append(Table(
                "Counterfactuals: where the change lies",
                ["method", "share of change in the lungs", f"… {task.positive_label}→{task.negative_label} only",
                 "lung area share", "share of change in the outer 10 % band", "band area share"], rows,
                "Share of the summed |counterfactual − input| inside each input's lung fields "
                "(explainers.lesions.lung_fields: an approximation) and inside the outer 10 % border band, next "
                "to the region's share of the image: a change spread uniformly scores its area. A method that "
                "changes the lungs scores well above the lung area and below the band area."))
    rows = [[r.name, _fmt(r.summary["ms_per_image"], 1), _fmt(r.summary["forward_ms_per_image"], 2),
             _fmt(r.summary["ratio_to_forward"], 1), _fmt(r.summary["peak_memory_mib"], 0),
             _fmt(r.summary.get("wall_s"), 0)] for r in runs]
    out.append(Table("Cost at prediction time",
                     ["method", "ms / image", "forward ms / image", "× classifier forward", "peak memory MiB",
                      "benchmark wall s"], rows,
                     f"Batches of {runs[0].summary['batch_size'] if runs else '?'} on "
                     f"{result.environment['machine']}, {result.environment['threads']} torch threads. Each method's "
                     "ratio is against one batched classifier forward pass timed just before it, in the same "
                     f"process (median of 5; at report time: {result.forward_ms:.2f} ms / image). Peak memory: peak "
                     "RSS above the level before each explain() call (CPU) or peak CUDA allocation. Benchmark wall s: "
                     "the method's whole benchmark (explain, noisy re-runs, scoring) in the run that computed it."))
    return out


# -- figures ------------------------------------------------------------------------

def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _grey(ax, image: np.ndarray, mask: np.ndarray | None) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    if mask is not None:
        outline = np.ma.masked_where(~_outline(mask), np.ones_like(image))
        ax.imshow(outline, cmap="autumn", vmin=0, vmax=1, interpolation="nearest")


def _path(run: MethodRun, index: int) -> torch.Tensor:
    """A case's counterfactual path (T, C, H, W); only its last step where the cache
    was written for another choice of figure cases."""
    return run.arrays.get(f"figure_path_{index}", run.arrays["counterfactual"][index][None])


def figure_grid(result: BenchmarkResult, path: Path) -> None:
    """Rows: the same cases. Columns: the input, then per method its saliency and,
    for counterfactual methods, the path steps and the difference (cf - input)."""
    cases = result.cases
    columns: list[tuple[str, MethodRun | None, str, int]] = [("input", None, "input", 0)]
    for run in result.runs:
        columns.append((f"{run.name}\nsaliency", run, "saliency", 0))
        if "counterfactual" in run.arrays:
            steps = _path(run, cases.figure[0]).shape[0]
            shown = sorted({int(round(x)) for x in np.linspace(0, steps - 1, min(steps, PATH_STEPS_SHOWN))})
            columns += [(f"{run.name}\npath {s + 1}/{steps}", run, "path", s) for s in shown]
            columns.append((f"{run.name}\ncf − input", run, "difference", 0))
    fig, axes = plt.subplots(len(cases.figure), len(columns), figsize=(1.7 * len(columns), 1.85 * len(cases.figure)),
                             squeeze=False)
    for row, index in enumerate(cases.figure):
        image = cases.images[index, 0].numpy()
        mask = cases.masks[index].numpy() if cases.masks is not None else None
        for col, (title, run, kind, step) in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if kind == "input":
                _grey(ax, image, mask)
                p = float(result.runs[0].arrays["probability"][index]) if result.runs else float("nan")
                ax.set_ylabel(f"label {int(cases.labels[index])}\nP={p:.2f}", fontsize=7)
            elif kind == "saliency":
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
                ax.imshow(run.arrays["saliency"][index].float().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
                if mask is not None:  # white outline: visible over the colour map
                    outline = np.ma.masked_where(~_outline(mask), np.ones_like(image))
                    ax.imshow(outline, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            elif kind == "path":
                path_images = _path(run, index)
                _grey(ax, path_images[min(step, len(path_images) - 1), 0].float().numpy(), mask)
            else:
                diff = run.arrays["counterfactual"][index, 0].float().numpy() - image
                bound = max(float(np.abs(diff).max()), 1e-3)
                ax.imshow(diff, cmap="coolwarm", vmin=-bound, vmax=bound)
                ax.set_xlabel(f"P→{float(run.arrays['counterfactual_probability'][index]):.2f}", fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)


def curves_plot(result: BenchmarkResult, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    runs = [*result.runs, result.reference]
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for run in runs:
            curve = run.arrays[f"{kind}_curve"].float()
            fractions = np.linspace(0, 1, curve.shape[1])
            style = dict(color="grey", linestyle="--") if run is result.reference else {}
            auc = float(run.arrays[f"{kind}_auc"].mean())
            ax.plot(fractions, curve.mean(dim=0).numpy(), label=f"{run.name} ({auc:.3f})", **style)
        ax.set_title(f"{kind} (mean over cases; AUC in brackets)", fontsize=9)
        ax.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "restored"), fontsize=8)
        ax.set_ylabel("P(called class)", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- documents ----------------------------------------------------------------------

def _header(result: BenchmarkResult, command: str, wall_s: float) -> list[tuple[str, str]]:
    spec = result.bundle.spec
    cases = result.cases
    kinds = "with masks (inserted lesions)" if cases.masks is not None else "class-balanced sample"
    labels = cases.labels.tolist()
    called = ""
    if result.runs:
        positive = int((result.runs[0].arrays["probability"] >= spec.task.threshold).sum())
        called = f"; the classifier calls {positive} of them {spec.task.positive_label}"
    return [
        ("bundle", f"{spec.name} {spec.version} ({spec.task.positive_label} vs {spec.task.negative_label}, "
                   f"threshold {spec.task.threshold:.4f}), bundle.yaml sha256 {result.bundle.sha256[:16]}…"),
        ("cases", f"{len(labels)} test images, {kinds}: {labels.count(1)} {spec.task.positive_label}, "
                  f"{labels.count(0)} {spec.task.negative_label}{called}. Every method explains the class the "
                  "classifier called; counterfactuals aim at the other class"),
        ("methods", ", ".join(r.name for r in result.runs)
         + (f" (from the cache of an earlier run: {', '.join(result.cached)})" if result.cached else "")),
        ("command", f"`{command}`"),
        ("versions", ", ".join(f"{k} {result.environment[k]}" for k in
                               ("python", "torch", "monai", "captum", "torchmetrics", "medxplain"))),
        ("commit", result.environment["commit"]),
        ("machine", f"{result.environment['machine']}, {result.environment['threads']} torch threads, "
                    f"{result.environment['date']}, {result.environment['load']} at the end of the run"),
        ("wall time", f"{wall_s:.0f} s for this invocation"
                      + (" (methods read from the cache cost nothing here)" if result.cached else "")),
    ]


def write_report(result: BenchmarkResult, *, command: str, wall_s: float) -> tuple[Path, Path]:
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    figure_grid(result, out / "figure_grid.png")
    curves_plot(result, out / "deletion_insertion.png")
    header = _header(result, command, wall_s)
    all_tables = tables(result)
    title = f"Explainer benchmark — {result.bundle.spec.name}"
    skipped = [f"`{m}`: {reason}" for m, reason in result.skipped.items()]

    md = [f"# {title}", "", "Not for diagnostic use: a benchmark of explanation methods.", ""]
    md += [f"- **{k}**: {v}" for k, v in header] + [""]
    if skipped:
        md += ["Methods registered but not runnable with this bundle:", ""] + [f"- {s}" for s in skipped] + [""]
    for table in all_tables:
        md += [f"## {table.title}", "", "| " + " | ".join(table.headers) + " |",
               "|" + "---|" * len(table.headers)]
        md += ["| " + " | ".join(row) + " |" for row in table.rows]
        md += ["", table.note, ""]
    md += ["## Figures", "",
           "![figure grid](figure_grid.png)", "",
           "*Rows: the same test cases. Columns: the input (ground truth outlined where known), then per method the "
           "saliency on the input and, for counterfactual methods, steps of the path towards the other class and "
           "the difference counterfactual − input (red brighter, blue darker).*", "",
           "![deletion and insertion curves](deletion_insertion.png)", ""]
    (out / "report.md").write_text("\n".join(md))

    page = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
            "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            ".note{color:#444;font-size:0.9em}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>", "<p>Not for diagnostic use: a benchmark of explanation methods.</p>",
            "<ul>"]
    page += [f"<li><b>{html.escape(k)}</b>: {html.escape(v.strip('`'))}</li>" for k, v in header]
    page.append("</ul>")
    if skipped:
        page += ["<p>Methods registered but not runnable with this bundle:</p><ul>"]
        page += [f"<li>{html.escape(s.replace('`', ''))}</li>" for s in skipped] + ["</ul>"]
    for table in all_tables:
        page += [f"<h2>{html.escape(table.title)}</h2>", "<table><tr>"
                 + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr>"]
        page += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows]
        page += ["</table>", f"<p class='note'>{html.escape(table.note.replace('**', ''))}</p>"]
    page += ["<h2>Figures</h2>", "<img src='figure_grid.png' alt='figure grid'>",
             "<p class='note'>Rows: the same test cases. Columns: the input (ground truth outlined where known), "
             "then per method the saliency and, for counterfactual methods, the path and the difference.</p>",
             "<img src='deletion_insertion.png' alt='deletion and insertion curves'>", "</body></html>"]
    (out / "report.html").write_text("\n".join(page))
    return out / "report.md", out / "report.html"
