"""The notebooks in ``notebooks/`` run from top to bottom, and are committed without outputs.

``transposed_convolution.ipynb`` checks every claim it makes with ``np.testing`` / ``assert``, so
executing it is a test of ``cae.ops`` (and the test below also shows that a wrong ``C^T`` makes
it fail). ``reconstructions.ipynb`` is executed against a small run dir and a small ablation dir
made here by the real tools, and must show their numbers and pictures.

Each notebook runs in a fresh ``python3`` Jupyter kernel (nbclient) with ``notebooks/`` as its
working directory, and must finish in under 2 minutes.
"""

from __future__ import annotations

import os
import time

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
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
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


@pytest.mark.parametrize("path", [TRANSPOSED], ids=lambda p: p.name)
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
        "ops.conv_transpose = lambda y, k, *a, **kw: _true_transpose(y, k[::-1, ::-1], *a, **kw)"))
    with pytest.raises(CellExecutionError, match="Not equal to tolerance"):
        _execute(nb)
