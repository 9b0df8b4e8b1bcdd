"""The ablation's report: ``ablation.csv`` (one row per run), ``ablation.md`` (mean ± std per
variant beside PCA with as many components, parameter ratio, verdict) and ``ablation.png``,
from the rows the sweep (``cae.ablate``) collects from its finished run dirs.

The verdict: tied vs untied differ beyond the seed-to-seed spread when Welch's two-sample t-test
(two-sided, unequal variances) on the per-seed final values gives p < :data:`ALPHA`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cae import plots
from cae.config import AblationConfig, Config
from cae.experiment import psnr
from cae.files import write_atomic

__all__ = ["Comparison", "compare", "verdict", "render_csv", "render_markdown", "write_reports",
           "result_lines", "CSV_COLUMNS", "CSV_FILE", "MD_FILE", "PNG_FILE", "ALPHA"]

CSV_FILE, MD_FILE, PNG_FILE = "ablation.csv", "ablation.md", "ablation.png"
CSV_COLUMNS = ("code_size", "decoder", "tied", "seed", "num_params", "test_mse", "test_psnr",
               "pca_test_mse", "linear_probe_acc", "pca_probe_acc", "checkerboard_score",
               "pca_checkerboard_score", "wall_time_s", "train_images_per_sec", "run_dir")
ALPHA = 0.05  # significance level of the verdict's two-sided Welch t-test


@dataclasses.dataclass(frozen=True)
class Comparison:
    """untied vs tied on one metric; ``diff`` = mean(untied) - mean(tied).

    ``t``, ``df``, ``p``: Welch's two-sample t-test (two-sided); NaN with fewer than 2 runs per
    variant. ``significant``: p < ALPHA, or None when it cannot be judged (n < 2).
    """

    n_tied: int
    n_untied: int
    mean_tied: float
    mean_untied: float
    std_tied: float  # sample std (ddof=1); NaN for n = 1
    std_untied: float
    diff: float
    pooled_std: float  # sqrt of the pooled sample variance; NaN if n_tied + n_untied < 3
    t: float
    df: float
    p: float
    significant: bool | None


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else math.nan


def compare(tied: Sequence[float], untied: Sequence[float]) -> Comparison:
    """tied: [S1], untied: [S2] per-seed values of one metric -> :class:`Comparison`."""
    a, b = np.asarray(tied, np.float64), np.asarray(untied, np.float64)
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("compare needs at least one value per variant")
    m1, m2, s1, s2 = float(a.mean()), float(b.mean()), _std(a), _std(b)
    diff = m2 - m1
    dof = n1 + n2 - 2
    pooled = (math.sqrt((np.sum((a - m1) ** 2) + np.sum((b - m2) ** 2)) / dof) if dof > 0
              else math.nan)
    t = df = p = math.nan
    significant = None
    if n1 >= 2 and n2 >= 2:
        se = math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2)
        if se == 0.0:  # every seed gave the same number: any difference is beyond the spread
            t = math.copysign(math.inf, diff) if diff else 0.0
            df, p = float(dof), (0.0 if diff else 1.0)
        else:
            from scipy import stats

            res = stats.ttest_ind(b, a, equal_var=False)
            t, df, p = float(res.statistic), float(res.df), float(res.pvalue)
        significant = p < ALPHA
    return Comparison(n1, n2, m1, m2, s1, s2, diff, pooled, t, df, p, significant)


def verdict(c: Comparison, metric: str = "test MSE", lower_is_better: bool = True) -> str:
    """One or two sentences stating the difference and whether it beats the seed-to-seed spread."""
    if c.diff == 0:
        better = "Neither variant"
    else:
        untied_better = (c.diff < 0) == lower_is_better
        better = "Untied" if untied_better else "Tied"
    rel = f" ({c.diff / abs(c.mean_tied):+.1%} of tied's mean)" if c.mean_tied else ""
    head = (f"{better} has the {'lower' if lower_is_better else 'higher'} {metric}: "
            f"untied - tied = {c.diff:+.3g}{rel}.")
    if c.significant is None:
        return (f"{head} With {min(c.n_tied, c.n_untied)} run per variant there is no "
                "seed-to-seed spread to compare it with, so whether the difference is real "
                "cannot be judged; run more seeds (ablation.seeds).")
    spread = (f"{abs(c.diff) / c.pooled_std:.1f}x the pooled seed-to-seed std "
              f"({c.pooled_std:.3g})" if c.pooled_std > 0 else "with no seed-to-seed spread")
    test = f"Welch t = {c.t:.2f}, df = {c.df:.1f}, p = {c.p:.3g}"
    if c.significant:
        return (f"{head} The difference is {spread} and exceeds the seed-to-seed spread "
                f"({test} < {ALPHA}).")
    return (f"{head} The difference is {spread}, within the seed-to-seed spread ({test} >= "
            f"{ALPHA}): no detectable difference in {metric} between tied and untied at "
            f"n = {c.n_tied} and {c.n_untied} seeds.")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def render_csv(rows: Sequence[dict]) -> str:
    """One line per run, columns :data:`CSV_COLUMNS`; full float precision, empty if missing
    (e.g. the checkerboard score of a run finished before it existed)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _by_variant(rows: Sequence[dict], key: str) -> dict[str, np.ndarray | None]:
    """{variant: [S] values of ``key``}; None where any run of the variant lacks it."""
    out = {}
    for variant, tied in (("tied", True), ("untied", False)):
        values = [r.get(key) for r in rows if r["tied"] == tied]
        out[variant] = (None if any(v is None for v in values)
                        else np.asarray(values, np.float64))
    return out


def _mean_std(values: np.ndarray | None, fmt: str) -> str:
    if values is None or len(values) == 0:
        return "n/a"
    std = _std(values)
    return f"{values.mean():{fmt}} ± {'n/a' if math.isnan(std) else format(std, fmt)}"


_MD_METRICS = (  # (row key, column title, format)
    ("test_mse", "test MSE", ".6f"), ("test_psnr", "test PSNR (dB)", ".2f"),
    ("linear_probe_acc", "linear-probe acc.", ".4f"),
    ("checkerboard_score", "checkerboard", ".3f"), ("wall_time_s", "wall time (s)", ".1f"),
    ("train_images_per_sec", "train images/s", ".0f"),
)


def _sizes(rows: Sequence[dict]) -> list[int]:
    return sorted({int(r["code_size"]) for r in rows})


def _pca_value(rows: Sequence[dict], key: str) -> float | None:
    """The PCA baseline's figure for these runs (one code size: the same in every run)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(values[0]) if values else None


def _ratio(pca: float | None, values: np.ndarray | None) -> str:
    """How many times lower than PCA's the mean test MSE is."""
    if pca is None or values is None or not len(values) or values.mean() <= 0:
        return "n/a"
    return f"{pca / values.mean():.2f}x"


def _variant_section(rows: Sequence[dict], heading: str) -> list[str]:
    """One code size: mean ± std per variant beside the PCA baseline, parameter ratio, verdicts."""
    params = _by_variant(rows, "num_params")
    mse = _by_variant(rows, "test_mse")
    k = int(rows[0]["code_size"])
    pca_mse, pca_acc = _pca_value(rows, "pca_test_mse"), _pca_value(rows, "pca_probe_acc")
    lines = [
        "| variant | n | parameters | " + " | ".join(title for _, title, _ in _MD_METRICS)
        + " | PCA's MSE / this MSE |",
        "|---" * (4 + len(_MD_METRICS)) + "|",
    ]
    for variant in ("tied", "untied"):
        p = params[variant]
        p_text = f"{int(p[0]):,}" if p is not None and np.all(p == p[0]) else _mean_std(p, ",.0f")
        cells = [_mean_std(_by_variant(rows, key)[variant], fmt) for key, _, fmt in _MD_METRICS]
        lines.append(f"| {variant} | {len(p)} | {p_text} | " + " | ".join(cells)
                     + f" | {_ratio(pca_mse, mse[variant])} |")
    if pca_mse is not None:
        pca_cb = _pca_value(rows, "pca_checkerboard_score")
        cells = {"test_mse": f"{pca_mse:.6f}", "test_psnr": f"{psnr(pca_mse):.2f}",
                 "linear_probe_acc": "n/a" if pca_acc is None else f"{pca_acc:.4f}",
                 "checkerboard_score": "n/a" if pca_cb is None else f"{pca_cb:.3f}"}
        lines.append(f"| PCA-{k} (linear baseline) | | {k} components | "
                     + " | ".join(cells.get(key, "") for key, _, _ in _MD_METRICS) + " | 1x |")
    ratio = float(params["untied"].mean() / params["tied"].mean())
    lines += ["", f"Code: {k} numbers per image. Parameter ratio untied / tied: **{ratio:.3f}** "
                  f"({params['untied'].mean():,.0f} / {params['tied'].mean():,.0f}).",
              "" if pca_mse is not None else
              f"PCA baseline: n/a (the code of {k} numbers is not smaller than an image, or the "
              "runs predate it).", heading, ""]
    lines.append(verdict(compare(mse["tied"], mse["untied"]), "test MSE", lower_is_better=True))
    acc = _by_variant(rows, "linear_probe_acc")
    if acc["tied"] is not None and acc["untied"] is not None:
        lines += ["", verdict(compare(acc["tied"], acc["untied"]), "linear-probe accuracy",
                              lower_is_better=False)]
    else:
        lines += ["", "Linear-probe accuracy: n/a (not in every run's summary.json)."]
    return lines


def _checkerboard(rows: Sequence[dict]) -> str:
    """PCA's checkerboard score / tied's mean / untied's mean (n/a where a run has none)."""
    cb = _by_variant(rows, "checkerboard_score")
    pca = _pca_value(rows, "pca_checkerboard_score")
    return " / ".join(["n/a" if pca is None else f"{pca:.3f}",
                       *("n/a" if cb[v] is None or not len(cb[v]) else f"{cb[v].mean():.3f}"
                         for v in ("tied", "untied"))])


def _overview(rows: Sequence[dict]) -> list[str]:
    """Rate-distortion table: one line per code size, tied and untied against PCA."""
    lines = ["| code size | PCA test MSE | tied test MSE | untied test MSE | PCA's MSE / tied's | "
             "PCA's MSE / untied's | PCA probe | tied probe | untied probe | untied - tied (MSE) | "
             "Welch p | difference beyond seed spread? | checkerboard PCA / tied / untied |",
             "|---" * 13 + "|"]
    for k in _sizes(rows):
        sub = [r for r in rows if r["code_size"] == k]
        mse, acc = _by_variant(sub, "test_mse"), _by_variant(sub, "linear_probe_acc")
        pca, pca_acc = _pca_value(sub, "pca_test_mse"), _pca_value(sub, "pca_probe_acc")
        c = compare(mse["tied"], mse["untied"])
        judged = {None: "cannot judge (1 seed)", True: "yes", False: "no"}[c.significant]
        lines.append(
            f"| {k} | {'n/a' if pca is None else f'{pca:.6f}'} | {_mean_std(mse['tied'], '.6f')} "
            f"| {_mean_std(mse['untied'], '.6f')} | {_ratio(pca, mse['tied'])} | "
            f"{_ratio(pca, mse['untied'])} | "
            f"{'n/a' if pca_acc is None else f'{pca_acc:.4f}'} | {_mean_std(acc['tied'], '.4f')} "
            f"| {_mean_std(acc['untied'], '.4f')} | {c.diff:+.3g} | "
            f"{'n/a' if math.isnan(c.p) else f'{c.p:.3g}'} | {judged} | {_checkerboard(sub)} |")
    return lines


def render_markdown(rows: Sequence[dict], base: Config, ablation: AblationConfig) -> str:
    """The report: setup; per code size, mean ± std per variant beside PCA with as many
    components, parameter ratio and verdict(s); with several sizes an overview table first."""
    m, t, d = base.model, base.train, base.data
    swept = ablation.code_sizes is not None
    params = _by_variant(rows, "num_params")
    n = {v: len(x) for v, x in params.items()}
    lines = [
        "# Rate-distortion ablation: tied vs untied against PCA" if swept
        else "# Tied vs untied ablation", "",
        f"Base config: `{d.name}`"
        + (f" (first {d.max_train_examples} train images)" if d.max_train_examples else "")
        + f", features {m.features}, kernel {m.kernel_size}, strides {m.strides}, "
        + (f"code sizes {ablation.code_sizes} (model.code_size: a fully connected code), "
           if swept else "")
        + f"{t.epochs} epoch(s), batch {t.batch_size}, {t.optimizer} lr {t.learning_rate:g}"
        f"{' ' + t.schedule if t.schedule != 'constant' else ''}, loss {t.loss}. "
        f"Seeds {ablation.seeds}: n = {n['tied']} tied and {n['untied']} untied runs"
        + (" in all" if swept else "") + "; one row per run in `ablation.csv`. Values are mean ± "
        "sample std over seeds (ddof = 1). PCA-k: PCA with as many components as the code has "
        "numbers, fitted on the same train split (the best linear compressor); its probe is "
        "the same linear probe on its k coefficients. Checkerboard: the share of the test "
        "error's non-DC power at the frequencies where the last decoder layer's stride aliases "
        "(docs/results.md; white noise scores 0.070 on 28x28), beside PCA's.", ""]
    if swept:
        lines += ["## Test MSE against code size", "", *_overview(rows), ""]
        for k in _sizes(rows):
            lines += [f"## Code of {k} numbers", ""]
            lines += _variant_section([r for r in rows if r["code_size"] == k],
                                      f"### Verdict at {k} numbers")
            lines.append("")
    else:
        lines += _variant_section(rows, "## Verdict")
        lines.append("")
    lines += [f"Rule: the difference of the means exceeds the seed-to-seed spread when "
              f"Welch's two-sample t-test (two-sided, unequal variances) on the per-seed "
              f"final values gives p < {ALPHA}; the pooled sample std is shown for scale. "
              "With one seed per variant there is no spread and no verdict.", ""]
    lines.append("`ablation.png`: test MSE against code size (log-log; mean over seeds, band = "
                 "min to max) for tied, untied and PCA, and how many times lower than PCA's "
                 "each variant's test MSE is." if swept else
                 "`ablation.png`: test MSE per epoch (mean over seeds, band = min to max) and "
                 "final test MSE against parameter count (one point per run).")
    lines.append("")
    return "\n".join(lines)


def write_reports(out_dir: str | os.PathLike, rows: Sequence[dict],
                  curves: dict[str, np.ndarray], base: Config, ablation: AblationConfig) -> None:
    """ablation.csv/.md/.png from the finished runs' ``rows`` and ``curves`` (the sweep's
    ``collect``), each written atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    csv_text, md_text = render_csv(rows), render_markdown(rows, base, ablation)
    if ablation.code_sizes is not None:
        sizes = _sizes(rows)
        final = {v: np.array([[r["test_mse"] for r in rows if r["tied"] == tied
                               and r["code_size"] == k] for k in sizes], np.float64).T
                 for v, tied in (("tied", True), ("untied", False))}
        pca = [_pca_value([r for r in rows if r["code_size"] == k], "pca_test_mse")
               for k in sizes]
        plots.save_figure(out_dir / PNG_FILE, plots.rate_distortion_figure(
            np.asarray(sizes), final, np.asarray([np.nan if v is None else v for v in pca]),
            title=f"{base.data.name}: test MSE vs code size, {base.train.epochs} epoch(s), "
                  f"seeds {ablation.seeds}"))
    else:
        final = _by_variant(rows, "test_mse")
        params = _by_variant(rows, "num_params")
        # Epoch 0 (the untrained model, ~100x the final MSE) only when there is a single epoch:
        # it would squeeze the trained epochs, where tied and untied differ, into a sliver.
        first = 1 if next(iter(curves.values())).shape[1] > 2 else 0
        curves = {v: c[:, first:] for v, c in curves.items()}
        epochs = np.arange(first, first + next(iter(curves.values())).shape[1])
        title = (f"{base.data.name}: tied vs untied, {base.train.epochs} epoch(s), "
                 f"seeds {ablation.seeds}")
        plots.save_figure(out_dir / PNG_FILE,
                          plots.ablation_figure(epochs, curves, final, params, title))
    write_atomic(out_dir / CSV_FILE, csv_text)
    write_atomic(out_dir / MD_FILE, md_text)


def result_lines(rows: Sequence[dict]) -> list[str]:
    """What cae.ablate says when it is done: per code size, each variant against PCA and the
    verdict."""
    lines = []
    for k in _sizes(rows):
        sub = [r for r in rows if r["code_size"] == k]
        mse, pca = _by_variant(sub, "test_mse"), _pca_value(sub, "pca_test_mse")
        against = ("" if pca is None else f" PCA-{k} {pca:.5f}; PCA's MSE / tied's "
                   f"{_ratio(pca, mse['tied'])}, / untied's {_ratio(pca, mse['untied'])} (> 1: "
                   "better than PCA).")
        judged = verdict(compare(mse["tied"], mse["untied"]))
        lines.append(f"code of {k} numbers:{against} {judged}")
    return lines
