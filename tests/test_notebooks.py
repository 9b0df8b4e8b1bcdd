"""The notebooks in ``notebooks/`` run from top to bottom, and are committed without outputs.

``transposed_convolution.ipynb`` checks every claim it makes with ``np.testing`` / ``assert``, so
executing it is a test of ``cae.ops`` (and the test below also shows that a wrong ``C^T`` makes
it fail). ``reconstructions.ipynb`` is executed against a small run dir and a small ablation dir
made here by the real tools, and must show their numbers and pictures.

Each notebook runs in a fresh ``python3`` Jupyter kernel (nbclient) with ``notebooks/`` as its
working directory, and must finish in under 2 minutes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = REPO / "notebooks"
TRANSPOSED = NOTEBOOKS / "transposed_convolution.ipynb"
RECONSTRUCTIONS = NOTEBOOKS / "reconstructions.ipynb"
TIME_LIMIT_S = 120


def _execute(nb, env: dict | None = None) -> float:
    """Run ``nb`` in place in a fresh kernel; returns the wall time in seconds. A cell that
    raises makes this raise ``CellExecutionError`` (with the cell's traceback)."""
    client = NotebookClient(nb, kernel_name="python3", timeout=TIME_LIMIT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    env = dict(os.environ if env is None else env)
    start = time.perf_counter()
    client.execute(env=env)
    return time.perf_counter() - start


def _outputs(nb) -> tuple[str, list[str]]:
    """All text a run printed or displayed (streams, text/plain, markdown), and the mime types
    of its rich outputs."""
    text, mimes = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif "data" in out:
                mimes.extend(out.data)
                text.extend(out.data.get(k, "") for k in ("text/plain", "text/markdown"))
    return "\n".join(text), mimes


# ----------------------------------------------------------------------------------------------
# Committed form
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [TRANSPOSED, RECONSTRUCTIONS], ids=lambda p: p.name)
def test_committed_notebook_is_valid_and_stripped(path):
    """Outputs are stripped in git: no outputs, no execution counts, valid nbformat 4."""
    assert path.is_file(), f"{path} is missing"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code cells"
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} of {path.name} have outputs or execution counts: strip them"


# ----------------------------------------------------------------------------------------------
# transposed_convolution.ipynb
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transposed_convolution_notebook_runs_and_checks():
    nb = nbformat.read(TRANSPOSED, as_version=4)
    seconds = _execute(nb)
    assert seconds < TIME_LIMIT_S, f"took {seconds:.0f} s"
    text, mimes = _outputs(nb)
    assert "image/png" in mimes  # the picture of C and C^T
    # One line per checked geometry and implementation set, and the cross-checks.
    assert text.count("matrix of conv_transpose == C^T") == 5
    assert text.count("zero insertion == scatter == ops.conv_transpose") == 5
    assert "jax.vjp of ops.conv == ops.conv_transpose" in text
    assert text.count("Conv2DBackpropInput == ops.conv_transpose") == 3
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "PyTorch is not installed" in text
    else:
        assert text.count("torch conv_transpose2d") == 2


@pytest.mark.slow
def test_transposed_convolution_notebook_fails_on_a_wrong_transpose():
    """The notebook is a test: with ``ops.conv_transpose`` replaced by a look-alike (the same
    shapes, kernel not flipped) its first check after setup raises."""
    nb = nbformat.read(TRANSPOSED, as_version=4)
    setup = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(setup + 1, nbformat.v4.new_code_cell(
        "_true_transpose = ops.conv_transpose\n"
        "def _look_alike(y, kernel, strides=1, padding=0, output_padding=0, *, impl=None):\n"
        "    return _true_transpose(y, kernel[::-1, ::-1], strides, padding, output_padding,\n"
        "                           impl=impl)\n"
        "ops.conv_transpose = _look_alike"))
    with pytest.raises(CellExecutionError, match="Not equal to tolerance"):
        _execute(nb)


# ----------------------------------------------------------------------------------------------
# reconstructions.ipynb
# ----------------------------------------------------------------------------------------------


def _ablation_dir(data_dirs, out: Path) -> Path:
    """A tiny tied-vs-untied ablation (one seed, 512 train images, the smoke model) made by the
    real command line, ``python -m cae.ablate`` (its ``main``, in this process)."""
    from cae import ablate

    sets = ["ablation.seeds=[0]", "data.max_train_examples=512", f"output.dir={out}",
            "output.progress=false", f"data.data_dir={data_dirs['data_dir']}",
            f"data.manual_dir={data_dirs['manual_dir']}"]
    argv = ["--config", str(REPO / "configs" / "smoke.yaml")]
    for item in sets:
        argv += ["--set", item]
    assert ablate.main(argv) == 0
    return out


@pytest.mark.slow
def test_reconstructions_notebook_shows_the_run_and_the_ablation(
        synthetic_mnist_dirs, synthetic_subprocess_env, tmp_path):
    """On the synthetic digits: the point is what the notebook shows of a run, not MNIST."""
    ablation = _ablation_dir(synthetic_mnist_dirs, tmp_path / "ablation")
    run = ablation / "tied_seed0"  # an ordinary cae.train run dir, made by the sweep
    summary = json.loads((run / "summary.json").read_text())
    with open(ablation / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_dir"] for r in rows] == ["tied_seed0", "untied_seed0"]

    nb = nbformat.read(RECONSTRUCTIONS, as_version=4)
    env = {**synthetic_subprocess_env, "CAE_RUN_DIR": str(run),
           "CAE_ABLATION_DIR": str(ablation)}
    seconds = _execute(nb, env)
    assert seconds < TIME_LIMIT_S, f"took {seconds:.0f} s"
    text, mimes = _outputs(nb)

    assert "not found" not in text
    # The run's numbers, as the summary table formats them (6 significant digits).
    for key in ("test_mse", "test_psnr", "initial_test_mse"):
        assert f"| {key} | {summary[key]:.6g} |" in text, key
    assert f"| num_params | {summary['num_params']} |" in text
    # Every picture of the run is shown (cae.visualize, where installed, has just made its own).
    pictures = sorted(p.name for p in run.glob("*.png"))
    assert "reconstructions.png" in pictures
    if importlib.util.find_spec("cae.visualize") is not None:
        assert len(pictures) > 1, pictures
    for name in pictures:
        assert f"**{name}**" in text, name
    # The ablation: its report, one table row per run with that run's numbers, its picture, and
    # the reconstructions of both variants.
    md_report = (ablation / "ablation.md").read_text()
    assert md_report.splitlines()[0] in text and "## Verdict" in text
    for r in rows:
        assert f"| {r['num_params']} | {float(r['test_mse']):.6g} |" in text, r
        assert f"**{r['run_dir']}**" in text
    assert "**ablation.png**" in text
    # Images: the metrics figure drawn by the notebook, the run's pictures, ablation.png, and
    # the two variants' reconstructions.png.
    assert mimes.count("image/png") == 1 + len(pictures) + 1 + 2


@pytest.mark.slow
def test_reconstructions_notebook_without_directories_says_how_to_make_them(tmp_path):
    nb = nbformat.read(RECONSTRUCTIONS, as_version=4)
    env = {**os.environ, "CAE_RUN_DIR": str(tmp_path / "no_run"),
           "CAE_ABLATION_DIR": str(tmp_path / "no_ablation")}
    _execute(nb, env)
    text, mimes = _outputs(nb)
    assert "python -m cae.train --config configs/mnist_tied.yaml" in text
    assert "python -m cae.ablate --config configs/ablation_tied_vs_untied.yaml" in text
    assert text.count("not found**: this section is skipped") == 2
    assert "image/png" not in mimes
