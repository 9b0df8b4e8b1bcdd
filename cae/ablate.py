"""Tied vs untied ablation over seeds: ``python -m cae.ablate --config <ablation config>``.

Example: ``python -m cae.ablate --config configs/ablation_tied_vs_untied.yaml``.

The config is an ordinary training config plus an ``ablation`` section (``seeds: [0, 1, 2]``).
Every seed is trained twice, with ``model.tied`` true and false, by
:func:`cae.train.train_and_evaluate`; each run is an ordinary run dir
``<output.dir>/{tied,untied}_seed<k>``.
The sweep sets ``model.tied`` and ``train.seed`` itself: in the file they are ignored with a
note (so a training config can serve as the base), with ``--set`` they are an error.

A finished run with the same config is reused without training, an unfinished one resumes from
its last checkpoint, so an interrupted sweep is finished by running the same command again.
Every run dir is checked before anything is trained. When all runs are done, ``ablation.csv``
(one row per run), ``ablation.md`` (mean ± std per variant, parameter ratio, verdict) and
``ablation.png`` are recomputed from the run dirs and written atomically into ``output.dir``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cae import cli, cluster, plots, rundir, train
from cae import config as config_lib
from cae.config import Config, ConfigError

__all__ = ["AblationConfig", "Run", "Comparison", "load_ablation_config", "plan_runs",
           "check_run_dirs", "run_sweep", "collect", "compare", "verdict", "render_csv",
           "render_markdown", "write_reports", "main", "CSV_COLUMNS", "ALPHA"]

CSV_FILE, MD_FILE, PNG_FILE = "ablation.csv", "ablation.md", "ablation.png"
CSV_COLUMNS = ("code_size", "tied", "seed", "num_params", "test_mse", "test_psnr",
               "pca_test_mse", "linear_probe_acc", "pca_probe_acc", "wall_time_s",
               "train_images_per_sec", "run_dir")
ALPHA = 0.05  # significance level of the verdict's two-sided Welch t-test

# Keys the sweep sets for every run; the user sets seeds through ablation.seeds instead.
SWEPT = {
    ("model", "tied"): "set by the sweep (every seed runs tied and untied)",
    ("train", "seed"): "set by the sweep; list the seeds in ablation.seeds",
}


# With ablation.code_sizes the sweep also sets model.code_size for every run.
SWEPT_CODE_SIZE = ("model", "code_size"), "set by the sweep; list the sizes in ablation.code_sizes"


@dataclasses.dataclass
class AblationConfig:
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # Rate-distortion: every size is trained tied and untied for every seed (model.code_size: a
    # fully connected code of that many numbers). null: the base config's code only.
    code_sizes: list[int] | None = None


SECTIONS = {**config_lib.SECTIONS, "ablation": AblationConfig}  # what the file and --set hold


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep; ``cfg`` is its full config (output.dir = its run dir).
    ``code_size``: the swept model.code_size, None when the sweep does not set it."""

    tied: bool
    seed: int
    cfg: Config
    code_size: int | None = None

    @property
    def variant(self) -> str:
        return "tied" if self.tied else "untied"

    @property
    def name(self) -> str:
        prefix = "" if self.code_size is None else f"code{self.code_size}_"
        return f"{prefix}{self.variant}_seed{self.seed}"

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output.dir)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _ablation_from_dict(values) -> AblationConfig:
    # The same checks and messages as the training sections.
    ablation = config_lib.build_section("ablation", AblationConfig, values)
    seeds = ablation.seeds
    if not seeds:
        raise ConfigError("ablation.seeds=[]: need at least one seed, e.g. [0, 1, 2]")
    for i, s in enumerate(seeds):
        if s < 0:
            raise ConfigError(f"ablation.seeds[{i}]={s!r}: must be >= 0")
    for s in seeds:
        if seeds.count(s) > 1:
            raise ConfigError(f"ablation.seeds={seeds!r}: seed {s} appears twice; list each "
                              "seed once")
    sizes = ablation.code_sizes
    if sizes is not None:
        if not sizes:
            raise ConfigError("ablation.code_sizes=[]: list at least one size, e.g. [16, 32, "
                              "64], or null for the base config's code only")
        for i, k in enumerate(sizes):
            if k < 1:
                raise ConfigError(f"ablation.code_sizes[{i}]={k!r}: must be >= 1 (numbers per "
                                  "image in the code)")
            if sizes.count(k) > 1:
                raise ConfigError(f"ablation.code_sizes={sizes!r}: size {k} appears twice; "
                                  "list each size once")
    return ablation


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_ablation_config(path: str | os.PathLike, overrides: Sequence[str] = (),
                         note: Callable[[str], None] = _stderr) -> tuple[Config, AblationConfig]:
    """Read an ablation YAML and ``--set`` overrides -> (base training config, sweep).

    One ``--set`` parser for all five sections (``config.parse_overrides``); ``ablation.*``
    goes to the sweep, the rest to the training config.
    ``model.tied`` / ``train.seed`` in the file (e.g. a training config used as is) are dropped
    with a ``note``; asked for with ``--set`` they are an error. Raises :class:`ConfigError`
    (one line) for any mistake, before anything is written.
    """
    raw = dict(config_lib.read_yaml_file(path))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}: allowed are {sorted(SECTIONS)}")
    asked = config_lib.parse_overrides(list(overrides), SECTIONS)
    raw = config_lib.apply_overrides(raw, asked)
    ablation_raw = raw.pop("ablation", None)
    swept = dict(SWEPT)
    if isinstance(ablation_raw, dict) and ablation_raw.get("code_sizes") is not None:
        swept[SWEPT_CODE_SIZE[0]] = SWEPT_CODE_SIZE[1]
    for key in asked:
        if key in swept:
            raise ConfigError(f"--set {'.'.join(key)}: {swept[key]}")
    notes = []
    for (section, key), why in swept.items():  # in the file: not asked for with --set
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            # A training config used as the base: say that its value is not used, and go on.
            notes.append(f"note: {section}.{key}={values[key]!r} in {path} is not used: {why}")
            raw[section] = {k: v for k, v in values.items() if k != key}
    base = config_lib.from_dict(raw)
    ablation = _ablation_from_dict(ablation_raw)
    for line in notes:  # only for a valid config: an error stays the only line
        note(line)
    return base, ablation


def plan_runs(base: Config, ablation: AblationConfig) -> list[Run]:
    """Seed-major order (for seed 0: every code size, tied then untied; then seed 1, ...): a
    sweep cut short still has both variants of every size for its first seeds."""
    runs = []
    swept_sizes = ablation.code_sizes is not None
    for seed in ablation.seeds:
        for code_size in (ablation.code_sizes if swept_sizes else [base.model.code_size]):
            for tied in (True, False):
                run = Run(tied, seed, base, code_size if swept_sizes else None)
                cfg = dataclasses.replace(
                    base,
                    model=dataclasses.replace(base.model, tied=tied, code_size=code_size),
                    train=dataclasses.replace(base.train, seed=seed),
                    output=dataclasses.replace(base.output,
                                               dir=str(Path(base.output.dir) / run.name)))
                runs.append(dataclasses.replace(
                    run, cfg=config_lib.from_dict(config_lib.to_dict(cfg))))
    return runs


# ----------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------


def check_run_dirs(base: Config, runs: Sequence[Run]) -> list[str]:
    """What each run will do with its run dir (:func:`rundir.plan_run_dir`, a finished run with
    the same config reused); raises RunDirError before any training."""
    out = Path(base.output.dir)
    if out.exists() and not out.is_dir():
        raise rundir.RunDirError(f"output.dir={str(out)!r} exists and is not a directory")
    if (out / rundir.CONFIG_FILE).exists() or (out / rundir.SUMMARY_FILE).exists():
        raise rundir.RunDirError(f"output.dir={str(out)!r} is a cae.train run directory; an "
                                 "ablation needs a folder of its own, choose another output.dir")
    return [rundir.plan_run_dir(run.dir, config_lib.to_dict(run.cfg), run.cfg.output.overwrite,
                                reuse_finished=True, label=str(run.dir)) for run in runs]


_DOING = {"new": "training", "restart": "training (restarting an unfinished first epoch)",
          "resume": "resuming from its last checkpoint",
          "replace": "retraining (output.overwrite=true, the saved config differs)"}


def run_sweep(base: Config, ablation: AblationConfig,
              log: Callable[[str], None] = print) -> list[Run]:
    """Train (or reuse) every run of the sweep; returns the runs, all finished."""
    runs = plan_runs(base, ablation)
    statuses = check_run_dirs(base, runs)
    n = len(runs)
    dataset = None  # every run trains on base.data: loaded once, when the first run needs it
    for i, (run, status) in enumerate(zip(runs, statuses), 1):
        where = f"[{i}/{n}] {run.name}"
        if status == "reuse":
            log(f"{where}: finished earlier, reusing {run.dir}")
            continue
        log(f"{where}: {_DOING[status]} in {run.dir}")
        t0 = time.perf_counter()
        dataset = train.load_data(base) if dataset is None else dataset
        summary = train.train_and_evaluate(run.cfg, run.dir, dataset)
        log(f"{where}: done in {time.perf_counter() - t0:.1f} s, test_mse "
            f"{summary['test_mse']:.5f}, {summary['num_params']} params")
    return runs


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def collect(runs: Sequence[Run]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Read every finished run dir -> (rows, curves).

    rows: one dict per run with the CSV columns (``linear_probe_acc`` None if the summary has
    none). curves: {variant: [S, E + 1]} test MSE per seed before training (column 0) and after
    each epoch, from the runs' metrics.jsonl.
    """
    rows, curves = [], {}
    for run in runs:
        summary = json.loads((run.dir / rundir.SUMMARY_FILE).read_text())
        metrics = [json.loads(line) for line in
                   (run.dir / rundir.METRICS_FILE).read_text().splitlines() if line.strip()]
        rows.append({
            "code_size": _code_size(run, summary),
            "tied": run.tied, "seed": run.seed, "num_params": int(summary["num_params"]),
            "test_mse": float(summary["test_mse"]), "test_psnr": float(summary["test_psnr"]),
            "pca_test_mse": _optional(summary, "pca_test_mse"),
            "linear_probe_acc": _optional(summary, "linear_probe_acc"),
            "pca_probe_acc": _optional(summary, "pca_probe_acc"),
            "wall_time_s": float(summary["wall_time_s"]),
            "train_images_per_sec": float(summary["train_images_per_sec"]),
            "run_dir": run.name,
        })
        curve = [metrics[0]["initial_test_mse"], *(m["test_mse"] for m in metrics)]
        curves.setdefault(run.variant, []).append(curve)
    return rows, {v: np.asarray(c, dtype=np.float64) for v, c in curves.items()}


def _optional(summary: dict, key: str) -> float | None:
    return None if summary.get(key) is None else float(summary[key])


def _code_size(run: Run, summary: dict) -> int:
    """summary.json's code_size; for a run finished before that key existed, from its config."""
    if summary.get("code_size") is not None:
        return int(summary["code_size"])
    return int(np.prod(train.code_shape(run.cfg, summary["image_shape"])))


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
    """One line per run, columns :data:`CSV_COLUMNS`; full float precision, empty if missing."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def _by_variant(rows: Sequence[dict], key: str) -> dict[str, np.ndarray | None]:
    """{variant: [S] values of ``key``}; None where any run of the variant lacks it."""
    out = {}
    for variant, tied in (("tied", True), ("untied", False)):
        values = [r[key] for r in rows if r["tied"] == tied]
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
    ("linear_probe_acc", "linear-probe acc.", ".4f"), ("wall_time_s", "wall time (s)", ".1f"),
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
        cells = {"test_mse": f"{pca_mse:.6f}", "test_psnr": f"{10 * math.log10(1 / pca_mse):.2f}",
                 "linear_probe_acc": "n/a" if pca_acc is None else f"{pca_acc:.4f}"}
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


def _overview(rows: Sequence[dict]) -> list[str]:
    """Rate-distortion table: one line per code size, tied and untied against PCA."""
    lines = ["| code size | PCA test MSE | tied test MSE | untied test MSE | PCA's MSE / tied's | "
             "PCA's MSE / untied's | PCA probe | tied probe | untied probe | untied - tied (MSE) | "
             "Welch p | difference beyond seed spread? |", "|---" * 12 + "|"]
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
            f"{'n/a' if math.isnan(c.p) else f'{c.p:.3g}'} | {judged} |")
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
        "the same linear probe on its k coefficients.", ""]
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


def write_reports(out_dir: str | os.PathLike, runs: Sequence[Run], base: Config,
                  ablation: AblationConfig) -> list[dict]:
    """Recompute ablation.csv/.md/.png from the finished run dirs; each written atomically."""
    out_dir = Path(out_dir)
    rows, curves = collect(runs)
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
        plots.save_ablation(out_dir / PNG_FILE, epochs, curves, final, params, title=title)
    rundir.write_atomic(out_dir / CSV_FILE, csv_text)
    rundir.write_atomic(out_dir / MD_FILE, md_text)
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = cli.CommandLineParser(prog="python -m cae.ablate",
                                   description=__doc__.splitlines()[0])
    cli.add_config_flags(parser, config_help="ablation YAML (a training config plus an "
                         "'ablation' section)", set_help="override a key, e.g. --set "
                         "train.epochs=1 or --set ablation.seeds=[0,1] (repeatable)")
    args = parser.parse_args(argv)

    def run():
        if cluster.launched_as_several_processes():
            raise ConfigError("cae.ablate runs as one process (it trains one run after the "
                              "other); start it without a multi-process launcher, or run "
                              "cae.train once per run for several processes")
        base, ablation = load_ablation_config(args.config, args.set)
        runs = run_sweep(base, ablation, log=lambda s: print(s, flush=True))
        return base, write_reports(base.output.dir, runs, base, ablation)

    code, result = cli.run_command(
        run, "interrupted: run the same command again to resume the sweep (finished runs are "
             "reused, the interrupted one resumes from its last checkpoint)")
    if code:
        return code
    base, rows = result
    out = Path(base.output.dir)
    print(f"done: {out / CSV_FILE}, {out / MD_FILE}, {out / PNG_FILE}")
    for k in _sizes(rows):
        sub = [r for r in rows if r["code_size"] == k]
        mse, pca = _by_variant(sub, "test_mse"), _pca_value(sub, "pca_test_mse")
        against = ("" if pca is None else f" PCA-{k} {pca:.5f}; PCA's MSE / tied's "
                   f"{_ratio(pca, mse['tied'])}, / untied's {_ratio(pca, mse['untied'])} (> 1: "
                   "better than PCA).")
        print(f"code of {k} numbers:{against} {verdict(compare(mse['tied'], mse['untied']))}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
