"""python -m cae.visualize: the pictures of a real (smoke) run, the linear probe in summary.json,
and user mistakes (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
from test_train import _main

from cae import config, visualize


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _run_main(capsys, *argv):
    code = visualize.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err):
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err


def test_bad_run_dirs_are_one_line_exit_2_and_write_nothing(capsys, tmp_path):
    missing = tmp_path / "nope"
    code, out, err = _run_main(capsys, missing)
    assert code == 2 and "no such directory" in err and not out
    _one_error_line(err)
    assert not missing.exists()

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = _run_main(capsys, a_file)
    assert code == 2 and "not a directory" in err
    _one_error_line(err)

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run_main(capsys, empty)
    assert code == 2 and "no config.yaml" in err
    _one_error_line(err)
    assert _listing(empty) == []

    # A run killed before its first checkpoint: config.yaml only.
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text(config.to_yaml(config.Config()))
    code, _, err = _run_main(capsys, started, "--out", tmp_path / "pictures")
    assert code == 2 and "no checkpoint" in err
    _one_error_line(err)
    assert _listing(started) == ["config.yaml"] and not (tmp_path / "pictures").exists()

    for name, text, expected in [("broken", "model: {features: [8, 16]\n", "malformed YAML"),
                                 ("wrong", "model: {featurez: [8, 16]}\n", "featurez")]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.yaml").write_text(text)
        code, _, err = _run_main(capsys, bad)
        assert code == 2 and expected in err
        _one_error_line(err)

    code, _, err = _run_main(capsys, started, "--out", a_file)
    assert code == 2 and "not a directory" in err
    _one_error_line(err)

    with pytest.raises(SystemExit) as exit_info:
        visualize.main([])
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err)


def test_one_hot_codes_have_one_unit_each():
    codes = visualize.one_hot_codes((4, 5, 3), 2.5)
    assert codes.shape == (3, 4, 5, 3)
    for j in range(3):
        (where,) = np.argwhere(codes[j])
        assert tuple(where) == (2, 2, j) and codes[j][tuple(where)] == 2.5


def _png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


@pytest.mark.slow
def test_smoke_run_then_visualize(capsys, mnist_dirs, tmp_path):
    code, out, err = _main(capsys, mnist_dirs, tmp_path, "data.max_train_examples=2048")
    assert code == 0, err
    run = tmp_path / "run"
    acc = json.loads((run / "summary.json").read_text())["linear_probe_acc"]
    assert isinstance(acc, float) and 0.5 < acc <= 1.0  # 10 classes: chance is 0.1
    assert f"linear_probe_acc {acc:.4f}" in out  # in the final "done:" line
    # cae.train draws the reconstructions (3 rows) and the curves.
    _png(run / "reconstructions.png")
    _png(run / "curves.png")

    before = _listing(run)
    code, out, err = _run_main(capsys, run, "--out", tmp_path / "pictures")
    assert code == 0, err
    assert "wrote" in out
    assert _listing(run) == before  # --out: the run dir is left as it was
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == sorted(
        visualize.PICTURES)
    for name in visualize.PICTURES:
        _png(tmp_path / "pictures" / name)

    code, _, err = _run_main(capsys, run)  # default: into the run dir
    assert code == 0, err
    assert set(visualize.PICTURES) <= {p.name for p in run.iterdir()}


@pytest.mark.slow
def test_linear_probe_can_be_switched_off(capsys, mnist_dirs, tmp_path):
    code, out, err = _main(capsys, mnist_dirs, tmp_path, "data.max_train_examples=512",
                           "train.linear_probe=false")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "linear_probe_acc" in summary and summary["linear_probe_acc"] is None
    assert "done:" in out and "linear_probe_acc" not in out
