"""``python -m cae.ablate``: tied vs untied over seeds.

Quick tests: the statistics and the verdict on hand-made numbers (checked against hand formulas
and Student-t table values), the report's rendering, the figure's data, and every user mistake
(one line, exit 2, nothing created). Slow test: a real small sweep on MNIST that is extended,
rerun (reuse), resumed and refused with another config.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from cae import ablate, ablation_report, config, models, plots

ABLATION = REPO / "configs" / "ablation_tied_vs_untied.yaml"

# ----------------------------------------------------------------------------------------------
# Statistics and verdict on hand-made numbers
# ----------------------------------------------------------------------------------------------

# Two-sided 5 % and 1 % critical values of Student's t with 4 degrees of freedom (printed tables).
T_975_DF4, T_995_DF4 = 2.7764, 4.6041


def test_compare_equal_spread_matches_hand_formulas():
    c = ablation_report.compare([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert (c.n_a, c.n_b, c.mean_a, c.mean_b) == (3, 3, 2.0, 5.0)
    assert c.std_a == pytest.approx(1.0) and c.std_b == pytest.approx(1.0)  # ddof=1
    assert c.names == ("tied", "untied")  # the default: compare(tied, untied)
    assert c.diff == 3.0 and c.pooled_std == pytest.approx(1.0)
    assert c.t == pytest.approx(3.0 / math.sqrt(2.0 / 3.0))  # 3.674
    assert c.df == pytest.approx(4.0)  # equal n and variance: Welch's df = 2n - 2
    # 2.776 < t < 4.604 with 4 df  =>  0.01 < p < 0.05 (table values, not the code's library)
    assert 0.01 < c.p < 0.05 and c.significant is True


@pytest.mark.parametrize("t_crit, p_expected", [(T_975_DF4, 0.05), (T_995_DF4, 0.01)])
def test_compare_p_value_at_table_critical_values(t_crit, p_expected):
    d = t_crit * math.sqrt(2.0 / 3.0)  # samples with s = 1, n = 3: t = d / sqrt(2/3)
    c = ablation_report.compare([0.0, 1.0, 2.0], [d, d + 1.0, d + 2.0])
    assert c.t == pytest.approx(t_crit) and c.p == pytest.approx(p_expected, rel=2e-3)


def test_compare_unequal_spread_uses_welch_df_and_is_not_significant():
    c = ablation_report.compare([1.0, 2.0, 3.0], [2.0, 6.0, 10.0])  # variances 1 and 16
    assert c.diff == 4.0
    assert c.t == pytest.approx(4.0 / math.sqrt(17.0 / 3.0))  # 1.680
    assert c.df == pytest.approx(578.0 / 257.0)  # Welch-Satterthwaite by hand: 2.249
    assert c.pooled_std == pytest.approx(math.sqrt(8.5))
    # t < 3.182, the 5 % critical value for 3 df (and df < 3 only raises it): p > 0.05
    assert c.p > 0.05 and c.significant is False
    text = ablation_report.verdict(c)
    assert text.startswith("Tied has the lower test MSE: untied - tied = +4")
    assert "within the seed-to-seed spread" in text and "exceeds" not in text


def test_verdict_names_the_better_variant_for_both_directions():
    c = ablation_report.compare([0.0030, 0.0031, 0.0032], [0.0020, 0.0021, 0.0022])
    assert c.diff == pytest.approx(-0.001) and c.significant is True
    mse = ablation_report.verdict(c, "test MSE", lower_is_better=True)
    assert mse.startswith("Untied has the lower test MSE") and "exceeds the seed-to-seed" in mse
    assert f"p = {c.p:.3g} < 0.05" in mse
    acc = ablation_report.verdict(c, "accuracy", lower_is_better=False)
    assert acc.startswith("Tied has the higher accuracy")


def test_one_seed_has_no_spread_and_no_verdict():
    c = ablation_report.compare([0.003], [0.002])
    assert math.isnan(c.std_a) and math.isnan(c.p) and c.significant is None
    assert c.diff == pytest.approx(-0.001)
    assert "cannot be judged" in ablation_report.verdict(c)


def test_zero_spread():
    assert ablation_report.compare([1.0, 1.0], [2.0, 2.0]).significant is True
    same = ablation_report.compare([1.0, 1.0], [1.0, 1.0])
    assert same.significant is False and same.diff == 0.0
    assert ablation_report.verdict(same).startswith("Neither variant")


def _rows(tied_mse, untied_mse, acc=None, code_size=256, pca=None):
    rows = []
    for tied, values in ((True, tied_mse), (False, untied_mse)):
        for seed, v in enumerate(values):
            rows.append({"code_size": code_size, "tied": tied, "seed": seed,
                         "num_params": 100 if tied else 190,
                         "test_mse": v, "test_psnr": 10 * math.log10(1 / v),
                         "pca_test_mse": None if pca is None else pca[0],
                         "pca_probe_acc": None if pca is None else pca[1],
                         "linear_probe_acc": None if acc is None else acc[tied][seed],
                         "wall_time_s": 10.0 + seed, "train_images_per_sec": 1000.0 * (seed + 1),
                         "run_dir": f"{'tied' if tied else 'untied'}_seed{seed}"})
    return rows


def test_csv_and_markdown_from_hand_made_rows():
    tied, untied = [0.0030, 0.0034, 0.0029], [0.0025, 0.0027, 0.0024]
    rows = _rows(tied, untied)
    base = config.from_dict({})
    md = ablation_report.render_markdown(rows, base, config.AblationConfig(seeds=[0, 1, 2]))
    # mean ± sample std recomputed here; the parameter ratio 190 / 100
    for values in (tied, untied):
        assert f"{np.mean(values):.6f} ± {np.std(values, ddof=1):.6f}" in md
    assert "untied / tied: **1.900**" in md and "n = 3 tied and 3 untied" in md
    assert "| tied | 3 | 100 |" in md and "| untied | 3 | 190 |" in md
    assert "Untied has the lower test MSE" in md and "Linear-probe accuracy: n/a" in md
    parsed = list(csv.DictReader(io.StringIO(ablation_report.render_csv(rows))))
    assert [(r["tied"], r["seed"]) for r in parsed] == [
        ("true", "0"), ("true", "1"), ("true", "2"), ("false", "0"), ("false", "1"),
        ("false", "2")]
    assert [float(r["test_mse"]) for r in parsed] == tied + untied  # full precision
    assert all(r["linear_probe_acc"] == "" for r in parsed)


def test_markdown_with_probe_accuracy_and_with_one_seed():
    acc = {True: [0.90, 0.91], False: [0.80, 0.81]}
    md = ablation_report.render_markdown(_rows([0.003, 0.0031], [0.002, 0.0021], acc),
                                config.from_dict({}), config.AblationConfig(seeds=[0, 1]))
    assert "Tied has the higher linear-probe accuracy" in md
    assert f"{0.905:.4f} ± {np.std([0.90, 0.91], ddof=1):.4f}" in md
    one = ablation_report.render_markdown(_rows([0.003], [0.002]), config.from_dict({}),
                                 config.AblationConfig(seeds=[0]))
    assert "0.003000 ± n/a" in one and "cannot be judged" in one
    assert one.startswith("# Tied vs untied ablation\n")  # the default variants' title


VARIANT_MSE = {"tied": [0.0030, 0.0034, 0.0029], "untied": [0.0025, 0.0027, 0.0024],
               "resize_conv": [0.0060, 0.0063, 0.0058],
               "resize_conv_deep": [0.0026, 0.0029, 0.0023]}
VARIANT_PARAMS = {"tied": 100, "untied": 190, "resize_conv": 190, "resize_conv_deep": 250}


def _variant_rows(code_sizes=(16, 32)):
    """Seed-major rows as cae.ablate.collect makes them; the MSE halves with each doubling."""
    rows = []
    for seed in range(3):
        for k in code_sizes:
            for v, mse in VARIANT_MSE.items():
                decoder, tied = config.ABLATION_VARIANTS[v]
                rows.append({"code_size": k, "variant": v, "decoder": decoder, "tied": tied,
                             "seed": seed, "num_params": VARIANT_PARAMS[v] + k,
                             "test_mse": mse[seed] * 16 / k, "test_psnr": 25.0,
                             "pca_test_mse": 0.3 / k, "pca_probe_acc": None,
                             "linear_probe_acc": None, "checkerboard_score": 0.01 * (1 + seed),
                             "pca_checkerboard_score": 0.02, "wall_time_s": 1.0,
                             "train_images_per_sec": 1.0, "run_dir": f"code{k}_{v}_seed{seed}"})
    return rows


def test_report_with_four_variants_has_a_row_and_a_verdict_for_each():
    rows = _variant_rows()
    variants = list(VARIANT_MSE)
    sweep = config.AblationConfig(seeds=[0, 1, 2], code_sizes=[16, 32], variants=variants)
    parsed = list(csv.DictReader(io.StringIO(ablation_report.render_csv(rows))))
    assert list(parsed[0])[:3] == ["code_size", "variant", "decoder"]
    assert [(r["variant"], r["decoder"], r["tied"]) for r in parsed[:4]] == [
        ("tied", "mirror", "true"), ("untied", "mirror", "false"),
        ("resize_conv", "resize_conv", "false"), ("resize_conv_deep", "resize_conv_deep", "false")]

    md = ablation_report.render_markdown(rows, config.from_dict({}), sweep)
    assert md.startswith("# Rate-distortion ablation: tied vs untied vs resize_conv vs "
                         "resize_conv_deep against PCA")
    assert "n = 6 tied, 6 untied, 6 resize_conv and 6 resize_conv_deep runs in all" in md
    overview = md.split("## Test MSE against code size", 1)[1].split("\n## ", 1)[0]
    for k in (16, 32):
        means = {v: np.asarray(m) * 16 / k for v, m in VARIANT_MSE.items()}
        cells = " | ".join(f"{m.mean():.6f} ± {np.std(m, ddof=1):.6f}" for m in means.values())
        ratios = " | ".join(f"{0.3 / k / m.mean():.2f}x" for m in means.values())
        assert f"| {k} | {0.3 / k:.6f} | {cells} | {ratios} |" in overview
        assert overview.count(f"| 0.020 / {0.02:.3f} / {0.02:.3f} / {0.02:.3f} / {0.02:.3f} |") == 2
        section = md.split(f"## Code of {k} numbers\n", 1)[1].split("\n## ", 1)[0]
        for v, m in means.items():
            assert (f"| {v} | 3 | {VARIANT_PARAMS[v] + k} | {m.mean():.6f} ± "
                    f"{np.std(m, ddof=1):.6f} |") in section
        assert f"| PCA-{k} (linear baseline) | | {k} components | {0.3 / k:.6f} |" in section
        ratio = (VARIANT_PARAMS["untied"] + k) / (VARIANT_PARAMS["tied"] + k)
        assert f"untied / tied: **{ratio:.3f}**" in section
        assert "resize_conv / untied: **1.000**" in section
        verdicts = section.split(f"### Verdict at {k} numbers\n\n", 1)[1].split("\n\n")
        # tied vs untied in today's words, then the untied mirror against each other decoder
        assert verdicts[0].startswith("Untied has the lower test MSE: untied - tied = ")
        assert verdicts[2].startswith("Untied has the lower test MSE: resize_conv - untied = ")
        assert "exceeds the seed-to-seed spread" in verdicts[2]  # 2.4x the MSE, tight seeds
        assert verdicts[4].startswith("Untied has the lower test MSE: resize_conv_deep - untied")
        assert "no detectable difference in test MSE between untied and resize_conv_deep" \
            in verdicts[4]
        c = ablation_report.compare(means["untied"], means["resize_conv"],
                                    ("untied", "resize_conv"))
        assert f"p = {c.p:.3g} < 0.05" in verdicts[2]

    lines = ablation_report.result_lines(rows, variants)
    assert len(lines) == 2 and lines[0].startswith(f"code of 16 numbers: PCA-16 {0.3 / 16:.5f}; ")
    for v in variants:
        assert f"/ {v}'s " in lines[0]
    assert "untied - tied" in lines[0] and "resize_conv - untied" in lines[0]
    assert "resize_conv_deep - untied" in lines[0]


def test_variants_follow_the_configs_order_and_old_rows_read_as_tied_and_untied():
    rows = [r for r in _variant_rows((16,)) if r["variant"] in ("untied", "resize_conv")]
    sweep = config.AblationConfig(seeds=[0, 1, 2], code_sizes=[16],
                                  variants=["resize_conv", "untied"])
    md = ablation_report.render_markdown(rows, config.from_dict({}), sweep)
    assert "| code size | PCA test MSE | resize_conv test MSE | untied test MSE |" in md
    assert md.index("| resize_conv | 3 |") < md.index("| untied | 3 |")
    assert "resize_conv - untied" in md and "untied - tied" not in md  # no tied: no such verdict
    # Without an untied mirror, the tied one is the reference.
    tied = [r for r in _variant_rows((16,)) if r["variant"] in ("tied", "resize_conv")]
    assert "resize_conv - tied = " in ablation_report.result_lines(tied)[0]
    # Rows from before the variant column: named from decoder and tied.
    old = [{k: v for k, v in r.items() if k not in ("variant", "decoder")}
           for r in _variant_rows((16,)) if r["variant"] in ("tied", "untied")]
    parsed = list(csv.DictReader(io.StringIO(ablation_report.render_csv(old))))
    assert [r["variant"] for r in parsed] == ["tied", "untied"] * 3


def test_ablation_figure_draws_mean_band_and_points():
    curves = {"tied": np.array([[0.2, 0.010, 0.004], [0.2, 0.012, 0.006]]),
              "untied": np.array([[0.2, 0.009, 0.003], [0.3, 0.011, 0.005]])}
    final = {v: c[:, -1] for v, c in curves.items()}
    params = {"tied": np.array([100, 100]), "untied": np.array([190, 190])}
    fig = plots.ablation_figure(np.arange(3), curves, final, params, title="t")
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[0].get_ydata(), [0.2, 0.011, 0.005])
    np.testing.assert_allclose(left.lines[1].get_ydata(), [0.25, 0.010, 0.004])
    band = left.collections[0].get_paths()[0].vertices  # tied: min..max over seeds
    assert band[:, 1].min() == pytest.approx(0.004) and band[:, 1].max() == pytest.approx(0.2)
    points = right.collections[0].get_offsets()
    np.testing.assert_allclose(points, [[100, 0.004], [100, 0.006]])
    assert left.get_yscale() == "log" and right.get_xlabel() == "parameters"


# ----------------------------------------------------------------------------------------------
# User mistakes: one line, exit 2, nothing created
# ----------------------------------------------------------------------------------------------


def _main(capsys, *args):
    code = ablate.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


BAD_SETS = [
    (["ablation.foo=1"], r"--set ablation\.foo: unknown key; allowed in ablation are "
                         r"\['code_sizes', 'seeds', 'variants'\]"),
    (["ablation.code_sizes=[]"], r"ablation\.code_sizes=\[\]: list at least one size"),
    (["ablation.code_sizes=[8,0]"], r"ablation\.code_sizes\[1\]=0: must be >= 1"),
    (["ablation.code_sizes=[8,16,8]"], r"ablation\.code_sizes=\[8, 16, 8\]: size 8 appears twice"),
    (["model.code_size=8"], r"--set model\.code_size: set by the sweep; list the sizes in "
                            r"ablation\.code_sizes"),
    (["ablation.seeds=abc"], r"ablation\.seeds='abc': expected list of \(int\)"),
    (["ablation.seeds=[]"], r"ablation\.seeds=\[\]: need at least one seed"),
    (["ablation.seeds=[0,2,0]"], r"ablation\.seeds=\[0, 2, 0\]: seed 0 appears twice"),
    (["ablation.seeds=[1,-1]"], r"ablation\.seeds\[1\]=-1: must be >= 0"),
    (["ablation.seeds=[true]"], r"ablation\.seeds\[0\]=true: expected int"),
    (["model.tied=false"], r"--set model\.tied: set by the sweep"),
    (["model.decoder=resize_conv"], r"--set model\.decoder: set by the sweep; list decoders in "
                                    r"ablation\.variants$"),
    (["ablation.variants=[untied,transpose]"],
     r"ablation\.variants\[1\]='transpose': allowed are 'tied' \| 'untied' \| 'resize_conv' \| "
     r"'resize_conv_deep'$"),
    (["ablation.variants=[]"], r"ablation\.variants=\[\]: list at least one of tied \| untied \| "
                               r"resize_conv \| resize_conv_deep"),
    (["ablation.variants=[tied,resize_conv,tied]"],
     r"ablation\.variants=\['tied', 'resize_conv', 'tied'\]: variant tied appears twice; list "
     r"each variant once$"),
    (["ablation.variants=resize_conv"], r"ablation\.variants='resize_conv': expected list of "
                                        r"\('tied' \| 'untied'"),
    (["train.seed=3"], r"--set train\.seed: set by the sweep; list the seeds in ablation\.seeds"),
    (["nope.x=1"], r"--set nope\.x: expected section\.key with section one of \['ablation'"),
    (["train.nope=1"], r"--set train\.nope: unknown key; allowed in train are"),
    (["train.epochs=0"], r"train\.epochs=0: must be >= 1"),
]


@pytest.mark.parametrize("sets, message", BAD_SETS, ids=[s[0] for s, _ in BAD_SETS])
def test_bad_overrides_exit_2_with_one_line_and_nothing_created(capsys, tmp_path, sets,
                                                                message):
    out = tmp_path / "sweep"
    args = ["--config", str(ABLATION), "--set", f"output.dir={out}"]
    for s in sets:
        args += ["--set", s]
    code, stdout, err = _main(capsys, *args)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not out.exists()


BAD_FILES = [
    ("ablation: {seeds: [0], repeats: 2}\n", r"unknown key ablation\.repeats: allowed in "
                                             r"ablation are \['code_sizes', 'seeds', 'variants'\]"),
    ("ablation: [0, 1]\n", r"ablation: expected a mapping of keys, got \[0, 1\]"),
    ("ablation: {seeds: 3}\n", r"ablation\.seeds=3: expected list of \(int\)"),
    ("sweep: {seeds: [0]}\n", r"unknown section 'sweep': allowed are \['ablation', 'data'"),
    ("model: {nope: 1}\n", r"unknown key model\.nope"),
    ("ablation: {variants: [mirror]}\n", r"ablation\.variants\[0\]='mirror': allowed are 'tied' "
                                         r"\| 'untied' \| 'resize_conv' \| 'resize_conv_deep'$"),
]


@pytest.mark.parametrize("text, message", BAD_FILES, ids=[m[:20] for _, m in BAD_FILES])
def test_bad_files_exit_2_with_one_line_and_nothing_created(capsys, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + f"output: {{dir: {tmp_path / 'sweep'}}}\n")
    code, stdout, err = _main(capsys, "--config", str(path))
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("sets, message", [
    (["data.name=not_a_dataset"], r"data\.name='not_a_dataset': not a TFDS dataset"),
    (["data.max_train_examples=100"], r"train\.batch_size=128: larger than the 100 training"),
])
def test_data_and_geometry_mistakes_leave_no_output_dir(capsys, mnist_dirs, tmp_path, sets,
                                                        message):
    out = tmp_path / "sweep"
    args = ["--config", str(ABLATION), "--set", f"output.dir={out}",
            "--set", f"data.data_dir={mnist_dirs['data_dir']}"]
    for s in sets:
        args += ["--set", s]
    code, _, err = _main(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_tied_and_seed_in_the_file_are_dropped_with_a_note(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("model: {tied: false, features: [8]}\ntrain: {seed: 7, epochs: 1}\n"
                    "ablation: {seeds: [3, 4]}\n")
    notes = []
    base, sweep = ablate.load_ablation_config(path, ["ablation.seeds=[4,5]"], note=notes.append)
    assert sweep.seeds == [4, 5] and base.model.features == [8] and base.train.epochs == 1
    assert len(notes) == 2 and "model.tied=false" in notes[0] and "train.seed=7" in notes[1]
    runs = ablate.plan_runs(base, sweep)
    assert [(r.name, r.cfg.model.tied, r.cfg.train.seed) for r in runs] == [
        ("tied_seed4", True, 4), ("untied_seed4", False, 4),
        ("tied_seed5", True, 5), ("untied_seed5", False, 5)]
    assert all(r.dir == Path(base.output.dir) / r.name for r in runs)
    with pytest.raises(config.ConfigError, match=r"^train\.epochs=0: must be >= 1$"):
        ablate.load_ablation_config(path, ["train.epochs=0"], note=notes.append)
    assert len(notes) == 2  # a mistake is reported alone, without the notes


def test_variants_are_the_mirror_tied_and_untied_and_every_other_decoder():
    """ablation.variants' names come from cae.models: a decoder added there is a variant."""
    mirror, = models.TIEABLE_DECODERS
    assert config.ABLATION_VARIANTS == {
        "tied": (mirror, True), "untied": (mirror, False),
        **{d: (d, False) for d in models.DECODERS if d != mirror}}
    assert set(config.ABLATION_VARIANTS) >= {"resize_conv", "resize_conv_deep"}
    assert config.AblationConfig().variants == ["tied", "untied"]  # today's sweep, unchanged


def test_decoder_in_the_file_is_dropped_with_a_note_and_variants_plan_the_runs(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("model: {decoder: resize_conv, tied: false, features: [8]}\n"
                    "ablation: {seeds: [3, 4], code_sizes: [8, 16], "
                    "variants: [resize_conv_deep, untied, resize_conv]}\n")
    notes = []
    base, sweep = ablate.load_ablation_config(path, note=notes.append)
    assert sweep.variants == ["resize_conv_deep", "untied", "resize_conv"]
    assert len(notes) == 2 and "model.tied=false" in notes[0]
    assert notes[1] == (f"note: model.decoder='resize_conv' in {path} is not used: set by the "
                        "sweep; list decoders in ablation.variants")
    runs = ablate.plan_runs(base, sweep)
    # Seed-major, then code size, then the variants in the listed order.
    assert [(r.name, r.variant, r.cfg.model.decoder, r.cfg.model.tied, r.tied,
             r.cfg.model.code_size, r.cfg.train.seed) for r in runs] == [
        (f"code{k}_{v}_seed{seed}", v, "mirror" if v == "untied" else v, False, False, k, seed)
        for seed in (3, 4) for k in (8, 16) for v in ("resize_conv_deep", "untied", "resize_conv")]
    assert all(r.dir == Path(base.output.dir) / r.name for r in runs)
    assert all(r.cfg.model.features == [8] for r in runs)

    # Without code_sizes: <variant>_seed<k>; tied sets model.tied and the mirror.
    one = ablate.plan_runs(base, config.AblationConfig(seeds=[0], variants=["tied", "resize_conv"]))
    assert [(r.name, r.cfg.model.decoder, r.tied) for r in one] == [
        ("tied_seed0", "mirror", True), ("resize_conv_seed0", "resize_conv", False)]


def test_the_decoder_sweep_config_plans_every_variant_at_every_size():
    """configs/ablation_decoders.yaml: 6 sizes x 2 seeds x 4 variants, the code layer's learning
    rate scaled (train.code_lr_reference needs model.code_size: the sweep sets it for every run,
    so the base is valid; without code_sizes it is the usual error)."""
    path = REPO / "configs" / "ablation_decoders.yaml"
    base, sweep = ablate.load_ablation_config(path, note=lambda s: pytest.fail(s))
    runs = ablate.plan_runs(base, sweep)
    variants = ["tied", "untied", "resize_conv", "resize_conv_deep"]
    sizes = [8, 16, 32, 64, 128, 256]
    assert [r.name for r in runs] == [f"code{k}_{v}_seed{seed}" for seed in (0, 1)
                                      for k in sizes for v in variants]
    assert {(r.cfg.train.epochs, r.cfg.train.linear_probe, r.cfg.train.code_lr_reference,
             tuple(r.cfg.model.features)) for r in runs} == {(1, False, 32, (32, 64, 128))}
    with pytest.raises(config.ConfigError, match=r"^train\.code_lr_reference=32: .* it needs "
                                                 r"model\.code_size \(now null\)"):
        ablate.load_ablation_config(path, ["ablation.code_sizes=null"], note=lambda s: None)


def test_the_long_decoder_sweep_is_the_default_recipe_for_every_decoder():
    """configs/ablation_decoders_long.yaml trains exactly configs/mnist_tied.yaml's recipe (its
    train and model sections, the whole train split) at the bar's sizes; the sweep sets only
    the decoder, tying, code size and seed."""
    path = REPO / "configs" / "ablation_decoders_long.yaml"
    base, sweep = ablate.load_ablation_config(path, note=lambda s: pytest.fail(s))
    default = config.load_config(REPO / "configs" / "mnist_tied.yaml")
    runs = ablate.plan_runs(base, sweep)
    assert [r.name for r in runs] == [f"code{k}_{v}_seed0" for k in (8, 64, 256) for v in
                                      ("tied", "untied", "resize_conv", "resize_conv_deep")]
    for r in runs:
        assert dataclasses.replace(r.cfg.train, linear_probe=True) == default.train
        assert r.cfg.data == default.data and r.cfg.data.max_train_examples is None
        assert dataclasses.replace(r.cfg.model, code_size=32, tied=True,
                                   decoder="mirror") == default.model


def test_unusable_output_dirs_are_refused_before_training(capsys, tmp_path):
    run_dir = tmp_path / "a_train_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    code, _, err = _main(capsys, "--config", str(ABLATION), "--set", f"output.dir={run_dir}")
    assert code == 2 and "is a cae.train run directory" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
    foreign = tmp_path / "foreign"
    (foreign / "code32_untied_seed1").mkdir(parents=True)
    (foreign / "code32_untied_seed1" / "notes.txt").write_text("mine")
    code, _, err = _main(capsys, "--config", str(ABLATION), "--set", f"output.dir={foreign}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "code32_untied_seed1 is not empty and is not a cae run directory" in err
    assert sorted(p.name for p in foreign.rglob("*")) == ["code32_untied_seed1", "notes.txt"]


def test_cli_in_a_child_process_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "cae.ablate", "--config", str(ABLATION),
                           "--set", "ablation.seeds=[0,0]", "--set",
                           f"output.dir={tmp_path / 'x'}"],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: ablation.seeds=[0, 0]: seed 0 appears twice; list each seed once"]


# ----------------------------------------------------------------------------------------------
# A real sweep (small): results, reuse, extension, resume, another config
# ----------------------------------------------------------------------------------------------

SMALL = ["model.features=[8,16]", "train.epochs=1", "train.batch_size=64",
         "train.learning_rate=3e-3", "data.max_train_examples=2048", "output.progress=off",
         "ablation.code_sizes=[4,8]"]
NAMES = ["code4_tied_seed0", "code4_untied_seed0", "code8_tied_seed0", "code8_untied_seed0"]


def _sweep(capsys, mnist_dirs, out, *sets):
    args = ["--config", str(ABLATION), "--set", f"output.dir={out}",
            "--set", f"data.data_dir={mnist_dirs['data_dir']}"]
    if mnist_dirs["manual_dir"]:
        args += ["--set", f"data.manual_dir={mnist_dirs['manual_dir']}"]
    for s in [*SMALL, *sets]:
        args += ["--set", s]
    return _main(capsys, *args)


def _summary_mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(out.glob("*/summary.json"))}


def _pca_mse(train_images, test_images, k):
    """Independent reference for the PCA column: NumPy's SVD of the centred train split."""
    a = train_images.reshape(len(train_images), -1) / 255.0
    t = test_images.reshape(len(test_images), -1) / 255.0
    v = np.linalg.svd(a - a.mean(0), full_matrices=False)[2][:k].T
    return float(np.mean((np.clip(a.mean(0) + (t - a.mean(0)) @ v @ v.T, 0, 1) - t) ** 2))


@pytest.mark.slow
def test_small_sweep_end_to_end(capsys, mnist_dirs, mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("CAE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    # 1. One seed first (the sweep "interrupted" after its first seed) ...
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0]")
    assert code == 0, err
    assert "cannot be judged" in (out / "ablation.md").read_text()
    first = _summary_mtimes(out)
    assert sorted(first) == sorted(NAMES)

    # 2. ... then two: seed 0 is reused untouched, seed 1 trained.
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0,1]")
    assert code == 0, err
    for i, name in enumerate(NAMES, 1):
        assert f"[{i}/8] {name}: finished earlier, reusing" in stdout
    assert "[5/8] code4_tied_seed1: training" in stdout
    assert "[8/8] code8_untied_seed1: done" in stdout
    mtimes = _summary_mtimes(out)
    assert {k: mtimes[k] for k in first} == first

    rows = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    assert [(r["code_size"], r["tied"], r["seed"], r["run_dir"]) for r in rows] == [
        (name[4], "true" if "_tied" in name else "false", seed, f"{name[:-1]}{seed}")
        for seed in "01" for name in NAMES]
    pca = {k: _pca_mse(mnist.train[:2048], mnist.test, k) for k in (4, 8)}
    for r in rows:
        run = out / r["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        saved = config.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        assert saved.model.tied == (r["tied"] == "true") and saved.train.seed == int(r["seed"])
        assert saved.model.code_size == int(r["code_size"]) == summary["code_size"]
        for key in ("num_params", "test_mse", "test_psnr", "pca_test_mse", "wall_time_s",
                    "train_images_per_sec"):
            assert float(r[key]) == summary[key], key
        for key in ("linear_probe_acc", "pca_probe_acc"):
            assert r[key] == repr(summary[key]) and 0.1 < summary[key] <= 1, key
        assert summary["pca_test_mse"] == pytest.approx(pca[summary["code_size"]], rel=1e-9)
        assert summary["mse_ratio_to_pca"] == summary["pca_test_mse"] / summary["test_mse"]
        assert summary["test_mse"] < 0.2  # trained: well below an untrained model's
    # Parameter count by hand: the convs' kernels (3x3x1x8 + 3x3x8x16) and the fully connected
    # code's W (7x7x16 x k); untied has every kernel twice. Biases: 8 + 16 + k and 16 + 8 + 1.
    for k in (4, 8):
        kernels = 3 * 3 * 1 * 8 + 3 * 3 * 8 * 16 + 7 * 7 * 16 * k
        biases = 8 + 16 + k + 16 + 8 + 1
        by_tied = {r["tied"]: int(r["num_params"]) for r in rows if r["code_size"] == str(k)}
        assert by_tied == {"true": kernels + biases, "false": 2 * kernels + biases}

    # ablation.md: per code size, statistics recomputed from the CSV with NumPy, PCA beside them,
    # and a verdict consistent with Welch's test.
    md = (out / "ablation.md").read_text()
    from scipy import stats

    for k in ("4", "8"):
        section = md.split(f"## Code of {k} numbers\n", 1)[1].split("\n## ", 1)[0]
        mse = {v: np.array([float(r["test_mse"]) for r in rows
                            if r["tied"] == v and r["code_size"] == k]) for v in ("true", "false")}
        for v in mse.values():
            assert f"{v.mean():.6f} ± {np.std(v, ddof=1):.6f}" in section
            assert f"{pca[int(k)] / v.mean():.2f}x" in section
        assert f"| PCA-{k} (linear baseline) | | {k} components | {pca[int(k)]:.6f} |" in section
        a, b = mse["true"], mse["false"]
        t = (b.mean() - a.mean()) / math.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2)
        assert f"Welch t = {t:.2f}" in section
        better = "Untied" if b.mean() < a.mean() else "Tied"
        mse_verdict = section.split(f"### Verdict at {k} numbers\n\n", 1)[1].split("\n", 1)[0]
        assert mse_verdict.startswith(f"{better} has the lower test MSE: untied - tied = "
                                      f"{b.mean() - a.mean():+.3g}")
        p = stats.ttest_ind(b, a, equal_var=False).pvalue
        assert ("exceeds the seed-to-seed spread" in mse_verdict) == (p < 0.05)
        overview = md.split("## Test MSE against code size", 1)[1].split("\n## ", 1)[0]
        assert f"| {k} | {pca[int(k)]:.6f} | {a.mean():.6f} ± {np.std(a, ddof=1):.6f} |" in overview
    assert f"code of 4 numbers: PCA-4 {pca[4]:.5f}; PCA's MSE / tied's " in stdout  # last lines

    # ablation.png: a real PNG of the rate-distortion plot.
    from matplotlib import image

    assert image.imread(out / "ablation.png").shape[:2] == (400, 1000)

    # 3. The same command again: nothing retrained, the same reports.
    reports = {f: (out / f).read_bytes() for f in ("ablation.csv", "ablation.md")}
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0,1]")
    assert code == 0 and stdout.count("finished earlier, reusing") == 8, stdout
    assert _summary_mtimes(out) == mtimes
    assert {f: (out / f).read_bytes() for f in reports} == reports

    # 4. A run killed after its last checkpoint but before its summary resumes, same numbers.
    (out / "code8_untied_seed1" / "summary.json").unlink()
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0,1]")
    assert code == 0 and "[8/8] code8_untied_seed1: resuming from its last checkpoint" in stdout
    assert stdout.count("finished earlier, reusing") == 7
    resumed = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    assert [r["test_mse"] for r in resumed] == [r["test_mse"] for r in rows]

    # 5. Another config on finished runs: refused before anything is touched.
    before = _summary_mtimes(out), (out / "ablation.csv").stat().st_mtime_ns
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0,1]",
                               "train.learning_rate=1e-3")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"code4_tied_seed0 holds a finished run with another config \(train\."
                     r"learning_rate: saved 0\.003, now 0\.001\); choose another output\.dir "
                     r"or set output\.overwrite=true", err), err
    assert (_summary_mtimes(out), (out / "ablation.csv").stat().st_mtime_ns) == before


@pytest.mark.slow
def test_single_code_sweep_keeps_its_run_names_and_epoch_curves(capsys, mnist_dirs, tmp_path,
                                                                monkeypatch):
    """ablation.code_sizes=null: the sweep of PR 3 (tied/untied at the base config's code), run
    dirs named as before so finished sweeps are reused; the figure shows the epoch curves."""
    monkeypatch.setenv("CAE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0]",
                               "ablation.code_sizes=null", "model.code_size=6")
    assert code == 0, err
    assert sorted(_summary_mtimes(out)) == ["tied_seed0", "untied_seed0"]
    rows = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    assert [r["code_size"] for r in rows] == ["6", "6"] and all(r["pca_test_mse"] for r in rows)
    base, sweep = ablate.load_ablation_config(
        ABLATION, [f"output.dir={out}", *SMALL, "ablation.seeds=[0]", "ablation.code_sizes=null",
                   "model.code_size=6"], note=lambda s: None)
    _, curves = ablate.collect(ablate.plan_runs(base, sweep))
    metrics = [json.loads(line) for line in (out / "untied_seed0" / "metrics.jsonl")
               .read_text().splitlines()]
    np.testing.assert_array_equal(curves["untied"][0],
                                  [metrics[0]["initial_test_mse"], metrics[0]["test_mse"]])
    md = (out / "ablation.md").read_text()
    assert "# Tied vs untied ablation" in md and "## Verdict\n\n" in md and "PCA-6" in md


@pytest.mark.slow
def test_decoder_sweep_end_to_end(capsys, mnist_dirs, tmp_path, monkeypatch):
    """ablation.variants=[untied, resize_conv] at two code sizes, one seed, through
    cae.ablate.main on real MNIST (tiny: the SMALL model and data, no linear probe)."""
    monkeypatch.setenv("CAE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    code, stdout, err = _sweep(capsys, mnist_dirs, out, "ablation.seeds=[0]",
                               "ablation.variants=[untied,resize_conv]", "train.linear_probe=false")
    assert code == 0, err
    names = ["code4_untied_seed0", "code4_resize_conv_seed0", "code8_untied_seed0",
             "code8_resize_conv_seed0"]
    for i, name in enumerate(names, 1):
        assert f"[{i}/4] {name}: done" in stdout
    rows = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    assert [(r["code_size"], r["variant"], r["decoder"], r["tied"], r["run_dir"]) for r in rows] \
        == [(n[4], v, d, "false", n) for n, v, d in zip(
            names, ["untied", "resize_conv"] * 2, ["mirror", "resize_conv"] * 2)]
    for r in rows:
        run = out / r["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        saved = config.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        assert (saved.model.decoder, saved.model.tied) == (r["decoder"], False)
        assert saved.model.code_size == int(r["code_size"]) == summary["code_size"]
        assert summary["decoder"] == r["decoder"]
        for key in ("checkerboard_score", "pca_checkerboard_score", "test_mse", "num_params"):
            assert r[key] != "" and float(r[key]) == summary[key], key
        assert 0.0 <= float(r["checkerboard_score"]) <= 1.0
        assert r["linear_probe_acc"] == ""  # train.linear_probe=false
        assert summary["test_mse"] < 0.9 * summary["initial_test_mse"]  # it trained
        assert (run / "checkerboard.png").read_bytes().startswith(b"\x89PNG")

    md = (out / "ablation.md").read_text()
    assert md.startswith("# Rate-distortion ablation: untied vs resize_conv against PCA")
    for k in ("4", "8"):
        section = md.split(f"## Code of {k} numbers\n", 1)[1].split("\n## ", 1)[0]
        mse = {r["variant"]: float(r["test_mse"]) for r in rows if r["code_size"] == k}
        for v in ("untied", "resize_conv"):
            assert f"| {v} | 1 | " in section and f"{mse[v]:.6f} ± n/a" in section
        judged = section.split(f"### Verdict at {k} numbers\n\n", 1)[1].split("\n", 1)[0]
        assert f"resize_conv - untied = {mse['resize_conv'] - mse['untied']:+.3g}" in judged
        assert "cannot be judged" in judged  # one seed
        assert "untied - tied" not in section  # no tied run, no tied-vs-untied verdict
    assert "| code size | PCA test MSE | untied test MSE | resize_conv test MSE |" in md
    assert "code of 4 numbers: PCA-4 " in stdout and "/ resize_conv's " in stdout

    from matplotlib import image

    assert image.imread(out / "ablation.png").shape[:2] == (400, 1000)
