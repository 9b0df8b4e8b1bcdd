"""Ablation of decoders over seeds: ``python -m cae.ablate --config <ablation config>``.

Example: ``python -m cae.ablate --config configs/ablation_tied_vs_untied.yaml``.

The config is an ordinary training config plus an ``ablation`` section (``seeds: [0, 1, 2]``,
``variants: [tied, untied]``, the default). Every seed (and every size in ``code_sizes``) is
trained once per variant by :func:`cae.train.train_and_evaluate`: ``tied`` and ``untied`` are the
mirror decoder with ``model.tied`` true and false, any other name in
:data:`cae.config.ABLATION_VARIANTS` is that ``model.decoder``, untied. Each run is an ordinary
run dir ``<output.dir>/[code<K>_]<variant>_seed<k>``.
The sweep sets ``model.tied``, ``model.decoder`` and ``train.seed`` itself: in the file they are
ignored with a note (so a training config can serve as the base), with ``--set`` they are an
error.

A finished run with the same config is reused without training, an unfinished one resumes from
its last checkpoint, so an interrupted sweep is finished by running the same command again.
Every run dir is checked before anything is trained. When all runs are done, ``ablation.csv``
(one row per run), ``ablation.md`` (mean ± std per variant, parameter ratio, verdict) and
``ablation.png`` are recomputed from the run dirs (:func:`collect`) and written atomically into
``output.dir`` by :mod:`cae.ablation_report`.

It runs as one process: several processes would each train every run one after the other, with
nothing to split between them; ``cae.train`` is the multi-process command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from cae import ablation_report, baselines, cli, cluster, experiment, rundir, train
from cae import config as config_lib
from cae.config import AblationConfig, Config, ConfigError

__all__ = ["Run", "load_ablation_config", "plan_runs", "check_run_dirs", "run_sweep", "collect",
           "main", "SECTIONS"]

# Keys the sweep sets for every run; the user sets seeds through ablation.seeds instead.
SWEPT = {
    ("model", "tied"): "set by the sweep; list variants in ablation.variants (tied, untied)",
    ("model", "decoder"): "set by the sweep; list decoders in ablation.variants",
    ("train", "seed"): "set by the sweep; list the seeds in ablation.seeds",
}


# With ablation.code_sizes the sweep also sets model.code_size for every run.
SWEPT_CODE_SIZE = ("model", "code_size"), "set by the sweep; list the sizes in ablation.code_sizes"


SECTIONS = {**config_lib.SECTIONS, "ablation": AblationConfig}  # what the file and --set hold


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep; ``cfg`` is its full config (output.dir = its run dir).
    ``variant``: a name of :data:`cae.config.ABLATION_VARIANTS`. ``code_size``: the swept
    model.code_size, None when the sweep does not set it."""

    variant: str
    seed: int
    cfg: Config
    code_size: int | None = None

    @property
    def tied(self) -> bool:
        return self.cfg.model.tied

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
    # (Each variant's name is checked against ABLATION_VARIANTS by its Literal type.)
    ablation = config_lib.build_section("ablation", AblationConfig, values)
    _check_list(ablation.seeds, "ablation.seeds", "seed", empty="need at least one seed, e.g. "
                "[0, 1, 2]", minimum=0, too_small="must be >= 0")
    if ablation.code_sizes is not None:
        _check_list(ablation.code_sizes, "ablation.code_sizes", "size", empty="list at least "
                    "one size, e.g. [16, 32, 64], or null for the base config's code only",
                    minimum=1, too_small="must be >= 1 (numbers per image in the code)")
    _check_list(ablation.variants, "ablation.variants", "variant", empty="list at least one "
                f"of {' | '.join(config_lib.ABLATION_VARIANTS)}, e.g. [tied, untied]")
    return ablation


def _check_list(values: list, key: str, what: str, *, empty: str, minimum: int | None = None,
                too_small: str = "") -> None:
    """Not empty, every value >= ``minimum`` (if given), each listed once; ConfigError naming
    the entry."""
    if not values:
        raise ConfigError(f"{key}=[]: {empty}")
    for i, v in enumerate(values):
        if minimum is not None and v < minimum:
            raise ConfigError(f"{key}[{i}]={v!r}: {too_small}")
    for v in values:
        if values.count(v) > 1:
            raise ConfigError(f"{key}={values!r}: {what} {v} appears twice; list each {what} "
                              "once")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_ablation_config(path: str | os.PathLike, overrides: Sequence[str] = (),
                         note: Callable[[str], None] = _stderr) -> tuple[Config, AblationConfig]:
    """Read an ablation YAML and ``--set`` overrides -> (base training config, sweep).

    One ``--set`` parser for all five sections (``config.parse_overrides``); ``ablation.*``
    goes to the sweep, the rest to the training config.
    ``model.tied`` / ``model.decoder`` / ``train.seed`` in the file (e.g. a training config used
    as is) are dropped with a ``note``; asked for with ``--set`` they are an error. Raises
    :class:`ConfigError` (one line) for any mistake, before anything is written.
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
            shown = config_lib.shown_value(values[key])
            notes.append(f"note: {section}.{key}={shown} in {path} is not used: {why}")
            raw[section] = {k: v for k, v in values.items() if k != key}
    ablation = _ablation_from_dict(ablation_raw)
    model = raw.get("model")
    if ablation.code_sizes is not None and (model is None or isinstance(model, dict)):
        # Checked with a code size the sweep sets (the first), as every run is: keys that need
        # model.code_size (train.code_lr_reference) are valid in the base of a code-size sweep.
        raw["model"] = {**(model or {}), "code_size": ablation.code_sizes[0]}
    base = config_lib.from_dict(raw)
    for line in notes:  # only for a valid config: an error stays the only line
        note(line)
    return base, ablation


def plan_runs(base: Config, ablation: AblationConfig) -> list[Run]:
    """Seed-major order (for seed 0: every code size, each with the variants in the listed
    order; then seed 1, ...): a sweep cut short still has every variant of every size for its
    first seeds."""
    runs = []
    swept_sizes = ablation.code_sizes is not None
    for seed in ablation.seeds:
        for code_size in (ablation.code_sizes if swept_sizes else [base.model.code_size]):
            for variant in ablation.variants:
                decoder, tied = config_lib.ABLATION_VARIANTS[variant]
                run = Run(variant, seed, base, code_size if swept_sizes else None)
                cfg = dataclasses.replace(
                    base,
                    model=dataclasses.replace(base.model, tied=tied, decoder=decoder,
                                              code_size=code_size),
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
        dataset = experiment.load_data(base) if dataset is None else dataset
        summary = train.train_and_evaluate(run.cfg, run.dir, dataset)
        log(f"{where}: done in {time.perf_counter() - t0:.1f} s, test_mse "
            f"{summary['test_mse']:.5f}, {summary['num_params']} params")
    return runs


# ----------------------------------------------------------------------------------------------
# Results: read back from the run dirs (the report is cae.ablation_report's)
# ----------------------------------------------------------------------------------------------


def collect(runs: Sequence[Run]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Read every finished run dir -> (rows, curves).

    rows: one dict per run with the CSV columns (``linear_probe_acc`` None if the summary has
    none). curves: {variant name: [S, E + 1]} test MSE per seed before training (column 0) and
    after each epoch, from the runs' metrics.jsonl.
    """
    rows, curves = [], {}
    for run in runs:
        summary = json.loads((run.dir / rundir.SUMMARY_FILE).read_text())
        metrics = [json.loads(line) for line in
                   (run.dir / rundir.METRICS_FILE).read_text().splitlines() if line.strip()]
        rows.append({
            "code_size": _code_size(run, summary), "variant": run.variant,
            "tied": run.tied, "seed": run.seed, "num_params": int(summary["num_params"]),
            "test_mse": float(summary["test_mse"]), "test_psnr": float(summary["test_psnr"]),
            "pca_test_mse": _optional(summary, "pca_test_mse"),
            "linear_probe_acc": _optional(summary, "linear_probe_acc"),
            "pca_probe_acc": _optional(summary, "pca_probe_acc"),
            "decoder": summary.get("decoder", run.cfg.model.decoder),
            "checkerboard_score": _optional(summary, "checkerboard_score"),
            "pca_checkerboard_score": _optional(summary, "pca_checkerboard_score"),
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
    return int(np.prod(experiment.model_code_shape(run.cfg, summary["image_shape"])))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _cache_compiled_programs() -> None:
    """Keep XLA's compiled programs in ``<cache_dir>/jax`` (JAX's persistent compilation cache):
    runs of one variant and code size differ only in their seed, so every seed after the first
    loads its programs instead of compiling them again (6-11 s a run on 2 CPU cores). The same
    program gives the same numbers either way. A cache that cannot be created is skipped."""
    folder = baselines.cache_dir() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
        _cache_compiled_programs()
        base, ablation = load_ablation_config(args.config, args.set)
        runs = run_sweep(base, ablation, log=lambda s: print(s, flush=True))
        rows, curves = collect(runs)
        ablation_report.write_reports(base.output.dir, rows, curves, base, ablation)
        return base, ablation, rows

    code, result = cli.run_command(
        run, "interrupted: run the same command again to resume the sweep (finished runs are "
             "reused, the interrupted one resumes from its last checkpoint)")
    if code:
        return code
    base, ablation, rows = result
    out = Path(base.output.dir)
    r = ablation_report
    print(f"done: {out / r.CSV_FILE}, {out / r.MD_FILE}, {out / r.PNG_FILE}")
    for line in r.result_lines(rows, ablation.variants):
        print(line)
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
