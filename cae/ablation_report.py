"""The ablation's report: ``ablation.csv`` (one row per run), ``ablation.md`` (mean ± std per
variant beside PCA with as many components, parameter ratios, verdicts) and ``ablation.png``,
from the rows the sweep (``cae.ablate``) collects from its finished run dirs.

The variants are those of ``ablation.variants`` (:data:`cae.config.ABLATION_VARIANTS`), in that
order. The verdicts compare two of them: tied vs untied (the mirror decoder with shared or its
own kernels), and the untied mirror vs each other decoder (untied too; the tied mirror where the
sweep has no untied one). Two variants differ beyond the seed-to-seed spread when Welch's
two-sample t-test (two-sided, unequal variances) on the per-seed final values gives
p < :data:`ALPHA`.
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
from cae.config import ABLATION_VARIANTS, AblationConfig, Config, ModelConfig
from cae.experiment import psnr
from cae.files import write_atomic

__all__ = ["Comparison", "compare", "verdict", "variant_of", "render_csv", "render_markdown",
           "write_reports", "result_lines", "CSV_COLUMNS", "CSV_FILE", "MD_FILE", "PNG_FILE",
           "ALPHA"]

CSV_FILE, MD_FILE, PNG_FILE = "ablation.csv", "ablation.md", "ablation.png"
CSV_COLUMNS = ("code_size", "variant", "decoder", "tied", "seed", "num_params", "test_mse",
               "test_psnr", "pca_test_mse", "linear_probe_acc", "pca_probe_acc",
               "checkerboard_score", "pca_checkerboard_score", "wall_time_s",
               "train_images_per_sec", "run_dir")
ALPHA = 0.05  # significance level of the verdict's two-sided Welch t-test


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Variant b vs variant a on one metric (``names`` = (a, b)); ``diff`` = mean(b) - mean(a).

    ``t``, ``df``, ``p``: Welch's two-sample t-test (two-sided); NaN with fewer than 2 runs per
    variant. ``significant``: p < ALPHA, or None when it cannot be judged (n < 2).
    """

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    std_a: float  # sample std (ddof=1); NaN for n = 1
    std_b: float
    diff: float
    pooled_std: float  # sqrt of the pooled sample variance; NaN if n_a + n_b < 3
    t: float
    df: float
    p: float
    significant: bool | None
    names: tuple[str, str] = ("tied", "untied")


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else math.nan


def compare(a: Sequence[float], b: Sequence[float],
            names: tuple[str, str] = ("tied", "untied")) -> Comparison:
    """a: [S1], b: [S2] per-seed values of one metric of the variants ``names`` ->
    :class:`Comparison`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
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
    return Comparison(n1, n2, m1, m2, s1, s2, diff, pooled, t, df, p, significant, tuple(names))


def _sentence_start(name: str) -> str:
    """A variant's name opening a sentence: "Tied"; a decoder's identifier stays as it is."""
    return name[:1].upper() + name[1:] if name.isalpha() else name


def verdict(c: Comparison, metric: str = "test MSE", lower_is_better: bool = True) -> str:
    """One or two sentences stating the difference and whether it beats the seed-to-seed spread."""
    a, b = c.names
    if c.diff == 0:
        better = "Neither variant"
    else:
        b_better = (c.diff < 0) == lower_is_better
        better = _sentence_start(b if b_better else a)
    rel = f" ({c.diff / abs(c.mean_a):+.1%} of {a}'s mean)" if c.mean_a else ""
    head = (f"{better} has the {'lower' if lower_is_better else 'higher'} {metric}: "
            f"{b} - {a} = {c.diff:+.3g}{rel}.")
    if c.significant is None:
        return (f"{head} With {min(c.n_a, c.n_b)} run per variant there is no "
                "seed-to-seed spread to compare it with, so whether the difference is real "
                "cannot be judged; run more seeds (ablation.seeds).")
    spread = (f"{abs(c.diff) / c.pooled_std:.1f}x the pooled seed-to-seed std "
              f"({c.pooled_std:.3g})" if c.pooled_std > 0 else "with no seed-to-seed spread")
    test = f"Welch t = {c.t:.2f}, df = {c.df:.1f}, p = {c.p:.3g}"
    if c.significant:
        return (f"{head} The difference is {spread} and exceeds the seed-to-seed spread "
                f"({test} < {ALPHA}).")
    return (f"{head} The difference is {spread}, within the seed-to-seed spread ({test} >= "
            f"{ALPHA}): no detectable difference in {metric} between {a} and {b} at "
            f"n = {c.n_a} and {c.n_b} seeds.")


# (model.decoder, model.tied) -> variant name: for rows made before the variant column
_NAME_OF = {model: name for name, model in ABLATION_VARIANTS.items()}


def variant_of(row: dict) -> str:
    """The row's variant; a row without one (a run collected before variants existed) is named
    from its decoder (the default one if it has none) and tied."""
    if row.get("variant"):
        return row["variant"]
    return _NAME_OF[(row.get("decoder") or ModelConfig().decoder, bool(row["tied"]))]


def _variants(rows: Sequence[dict], order: Sequence[str] = ()) -> list[str]:
    """The variants present in ``rows``: in ``order`` (the config's ablation.variants), any
    other after them in the order they first appear."""
    present = list(dict.fromkeys(variant_of(r) for r in rows))
    return sorted(present, key=lambda v: list(order).index(v) if v in order else len(order))


def _pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    """The verdicts' pairs (a, b): tied vs untied, and the mirror (untied, else tied) vs each
    other decoder."""
    mirror = [v for v in variants if ABLATION_VARIANTS[v][0] == ABLATION_VARIANTS["tied"][0]]
    pairs = [("tied", "untied")] if {"tied", "untied"} <= set(mirror) else []
    if mirror:
        reference = "untied" if "untied" in mirror else mirror[0]
        pairs += [(reference, v) for v in variants if v not in mirror]
    return pairs


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
        row = {**row, "variant": variant_of(row)}
        writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _by_variant(rows: Sequence[dict], key: str,
                variants: Sequence[str]) -> dict[str, np.ndarray | None]:
    """{variant: [S] values of ``key``}; None where any run of the variant lacks it."""
    out = {}
    for variant in variants:
        values = [r.get(key) for r in rows if variant_of(r) == variant]
        out[variant] = (None if any(v is None for v in values)
                        else np.asarray(values, np.float64))
    return out


def _mean_std(values: np.ndarray | None, fmt: str) -> str:
    if values is None or len(values) == 0:
        return "n/a"
    std = _std(values)
    return f"{values.mean():{fmt}} ± {'n/a' if math.isnan(std) else format(std, fmt)}"


def _and(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


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


def _parameter_ratios(params: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]]) -> str:
    """'Parameter ratio untied / tied: **1.900** (190 / 100); ...' for the compared pairs."""
    if not pairs:
        return ""
    return " Parameter ratio " + "; ".join(
        f"{b} / {a}: **{params[b].mean() / params[a].mean():.3f}** ({params[b].mean():,.0f} / "
        f"{params[a].mean():,.0f})" for a, b in pairs) + "."


def _verdicts(rows: Sequence[dict], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """For each pair, the test-MSE verdict, then the linear probe's, one paragraph each."""
    variants = list(dict.fromkeys(v for pair in pairs for v in pair))
    mse = _by_variant(rows, "test_mse", variants)
    acc = _by_variant(rows, "linear_probe_acc", variants)
    paragraphs = []
    for a, b in pairs:
        paragraphs.append(verdict(compare(mse[a], mse[b], (a, b)), "test MSE",
                                  lower_is_better=True))
        if acc[a] is not None and acc[b] is not None:
            paragraphs.append(verdict(compare(acc[a], acc[b], (a, b)), "linear-probe accuracy",
                                      lower_is_better=False))
        else:
            paragraphs.append("Linear-probe accuracy" + (f" of {a} and {b}" if len(pairs) > 1
                                                         else "")
                              + ": n/a (not in every run's summary.json).")
    paragraphs = paragraphs or ["One variant: nothing to compare it with."]
    return [line for par in paragraphs for line in ("", par)][1:]


def _variant_section(rows: Sequence[dict], heading: str, order: Sequence[str]) -> list[str]:
    """One code size: mean ± std per variant beside the PCA baseline, parameter ratios,
    verdicts."""
    variants = _variants(rows, order)
    params = _by_variant(rows, "num_params", variants)
    mse = _by_variant(rows, "test_mse", variants)
    k = int(rows[0]["code_size"])
    pca_mse, pca_acc = _pca_value(rows, "pca_test_mse"), _pca_value(rows, "pca_probe_acc")
    lines = [
        "| variant | n | parameters | " + " | ".join(title for _, title, _ in _MD_METRICS)
        + " | PCA's MSE / this MSE |",
        "|---" * (4 + len(_MD_METRICS)) + "|",
    ]
    for variant in variants:
        p = params[variant]
        p_text = f"{int(p[0]):,}" if p is not None and np.all(p == p[0]) else _mean_std(p, ",.0f")
        cells = [_mean_std(_by_variant(rows, key, [variant])[variant], fmt)
                 for key, _, fmt in _MD_METRICS]
        lines.append(f"| {variant} | {len(p)} | {p_text} | " + " | ".join(cells)
                     + f" | {_ratio(pca_mse, mse[variant])} |")
    if pca_mse is not None:
        pca_cb = _pca_value(rows, "pca_checkerboard_score")
        cells = {"test_mse": f"{pca_mse:.6f}", "test_psnr": f"{psnr(pca_mse):.2f}",
                 "linear_probe_acc": "n/a" if pca_acc is None else f"{pca_acc:.4f}",
                 "checkerboard_score": "n/a" if pca_cb is None else f"{pca_cb:.3f}"}
        lines.append(f"| PCA-{k} (linear baseline) | | {k} components | "
                     + " | ".join(cells.get(key, "") for key, _, _ in _MD_METRICS) + " | 1x |")
    lines += ["", f"Code: {k} numbers per image." + _parameter_ratios(params, _pairs(variants)),
              "" if pca_mse is not None else
              f"PCA baseline: n/a (the code of {k} numbers is not smaller than an image, or the "
              "runs predate it).", heading, ""]
    return lines + _verdicts(rows, _pairs(variants))


def _checkerboard(rows: Sequence[dict], variants: Sequence[str]) -> str:
    """PCA's checkerboard score / each variant's mean (n/a where a run has none)."""
    cb = _by_variant(rows, "checkerboard_score", variants)
    pca = _pca_value(rows, "pca_checkerboard_score")
    return " / ".join(["n/a" if pca is None else f"{pca:.3f}",
                       *("n/a" if cb[v] is None or not len(cb[v]) else f"{cb[v].mean():.3f}"
                         for v in variants)])


def _overview(rows: Sequence[dict], variants: Sequence[str]) -> list[str]:
    """Rate-distortion table: one line per code size, every variant against PCA, and for each
    compared pair the difference and Welch's p."""
    pairs = _pairs(variants)
    titles = ["code size", "PCA test MSE", *(f"{v} test MSE" for v in variants),
              *(f"PCA's MSE / {v}'s" for v in variants), "PCA probe",
              *(f"{v} probe" for v in variants)]
    for a, b in pairs:
        titles += [f"{b} - {a} (MSE)", "Welch p", "difference beyond seed spread?"]
    titles.append(f"checkerboard PCA / {' / '.join(variants)}")
    lines = ["| " + " | ".join(titles) + " |", "|---" * len(titles) + "|"]
    for k in _sizes(rows):
        sub = [r for r in rows if r["code_size"] == k]
        mse, acc = _by_variant(sub, "test_mse", variants), _by_variant(sub, "linear_probe_acc",
                                                                      variants)
        pca, pca_acc = _pca_value(sub, "pca_test_mse"), _pca_value(sub, "pca_probe_acc")
        cells = [str(k), "n/a" if pca is None else f"{pca:.6f}",
                 *(_mean_std(mse[v], ".6f") for v in variants),
                 *(_ratio(pca, mse[v]) for v in variants),
                 "n/a" if pca_acc is None else f"{pca_acc:.4f}",
                 *(_mean_std(acc[v], ".4f") for v in variants)]
        for a, b in pairs:
            c = compare(mse[a], mse[b], (a, b))
            cells += [f"{c.diff:+.3g}", "n/a" if math.isnan(c.p) else f"{c.p:.3g}",
                      {None: "cannot judge (1 seed)", True: "yes", False: "no"}[c.significant]]
        cells.append(_checkerboard(sub, variants))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _title(variants: Sequence[str]) -> str:
    """'tied vs untied', 'untied vs resize_conv vs resize_conv_deep'."""
    return " vs ".join(variants)


def render_markdown(rows: Sequence[dict], base: Config, ablation: AblationConfig) -> str:
    """The report: setup; per code size, mean ± std per variant beside PCA with as many
    components, parameter ratios and verdicts; with several sizes an overview table first."""
    m, t, d = base.model, base.train, base.data
    swept = ablation.code_sizes is not None
    variants = _variants(rows, ablation.variants)
    params = _by_variant(rows, "num_params", variants)
    what = {v: "model.decoder {}, {}".format(ABLATION_VARIANTS[v][0], "tied"
                                             if ABLATION_VARIANTS[v][1] else "untied")
            for v in variants}
    lines = [
        f"# Rate-distortion ablation: {_title(variants)} against PCA" if swept
        else f"# {_title([_sentence_start(variants[0]), *variants[1:]])} ablation", "",
        f"Base config: `{d.name}`"
        + (f" (first {d.max_train_examples} train images)" if d.max_train_examples else "")
        + f", features {m.features}, kernel {m.kernel_size}, strides {m.strides}, "
        + (f"code sizes {ablation.code_sizes} (model.code_size: a fully connected code), "
           if swept else "")
        + f"{t.epochs} epoch(s), batch {t.batch_size}, {t.optimizer} lr {t.learning_rate:g}"
        f"{' ' + t.schedule if t.schedule != 'constant' else ''}, loss {t.loss}"
        + (f", code layer's lr scaled by {t.code_lr_reference} / code size"
           if t.code_lr_reference is not None else "") + ". "
        "Variants (ablation.variants): "
        + "; ".join(f"{v} = {what[v]}" for v in variants) + ". "
        f"Seeds {ablation.seeds}: n = {_and([f'{len(params[v])} {v}' for v in variants])} runs"
        + (" in all" if swept else "") + "; one row per run in `ablation.csv`. Values are mean ± "
        "sample std over seeds (ddof = 1). PCA-k: PCA with as many components as the code has "
        "numbers, fitted on the same train split (the best linear compressor); its probe is "
        "the same linear probe on its k coefficients. Checkerboard: the share of the test "
        "error's non-DC power at the frequencies where the last decoder layer's stride aliases "
        "(docs/results.md; white noise scores 0.070 on 28x28), beside PCA's.", ""]
    if swept:
        lines += ["## Test MSE against code size", "", *_overview(rows, variants), ""]
        for k in _sizes(rows):
            lines += [f"## Code of {k} numbers", ""]
            lines += _variant_section([r for r in rows if r["code_size"] == k],
                                      f"### Verdict at {k} numbers", variants)
            lines.append("")
    else:
        lines += _variant_section(rows, "## Verdict", variants)
        lines.append("")
    lines += [f"Rule: the difference of the means exceeds the seed-to-seed spread when "
              f"Welch's two-sample t-test (two-sided, unequal variances) on the per-seed "
              f"final values gives p < {ALPHA}; the pooled sample std is shown for scale. "
              "With one seed per variant there is no spread and no verdict. Compared: tied vs "
              "untied (the mirror decoder with shared or its own kernels), and the untied "
              "mirror (the tied one when the sweep has no untied) vs each other decoder.", ""]
    lines.append(f"`ablation.png`: test MSE against code size (log-log; mean over seeds, band = "
                 f"min to max) for {', '.join(variants)} and PCA, and how many times lower than "
                 "PCA's each variant's test MSE is." if swept else
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
    variants = _variants(rows, ablation.variants)
    if ablation.code_sizes is not None:
        sizes = _sizes(rows)
        final = {v: np.array([[r["test_mse"] for r in rows if variant_of(r) == v
                               and r["code_size"] == k] for k in sizes], np.float64).T
                 for v in variants}
        pca = [_pca_value([r for r in rows if r["code_size"] == k], "pca_test_mse")
               for k in sizes]
        plots.save_figure(out_dir / PNG_FILE, plots.rate_distortion_figure(
            np.asarray(sizes), final, np.asarray([np.nan if v is None else v for v in pca]),
            title=f"{base.data.name}"
                  + (f" (first {base.data.max_train_examples} train images)"
                     if base.data.max_train_examples else "")
                  + f": test MSE vs code size, {base.train.epochs} epoch(s), "
                  f"seeds {ablation.seeds}"))
    else:
        final = _by_variant(rows, "test_mse", variants)
        params = _by_variant(rows, "num_params", variants)
        # Epoch 0 (the untrained model, ~100x the final MSE) only when there is a single epoch:
        # it would squeeze the trained epochs, where the variants differ, into a sliver.
        first = 1 if next(iter(curves.values())).shape[1] > 2 else 0
        curves = {v: curves[v][:, first:] for v in variants}
        epochs = np.arange(first, first + next(iter(curves.values())).shape[1])
        title = (f"{base.data.name}: {_title(variants)}, {base.train.epochs} epoch(s), "
                 f"seeds {ablation.seeds}")
        plots.save_figure(out_dir / PNG_FILE,
                          plots.ablation_figure(epochs, curves, final, params, title))
    write_atomic(out_dir / CSV_FILE, csv_text)
    write_atomic(out_dir / MD_FILE, md_text)


def result_lines(rows: Sequence[dict], order: Sequence[str] = ()) -> list[str]:
    """What cae.ablate says when it is done: per code size, each variant against PCA and the
    verdicts (``order``: the config's ablation.variants)."""
    lines = []
    for k in _sizes(rows):
        sub = [r for r in rows if r["code_size"] == k]
        variants = _variants(sub, order)
        mse, pca = _by_variant(sub, "test_mse", variants), _pca_value(sub, "pca_test_mse")
        against = (" test MSE " + ", ".join(f"{v} {mse[v].mean():.5f}" for v in variants) + "."
                   if pca is None else f" PCA-{k} {pca:.5f}; PCA's MSE / "
                   + ", / ".join(f"{v}'s {_ratio(pca, mse[v])}" for v in variants)
                   + " (> 1: better than PCA).")
        judged = [verdict(compare(mse[a], mse[b], (a, b))) for a, b in _pairs(variants)]
        lines.append(" ".join([f"code of {k} numbers:{against}", *judged]))
    return lines
