"""Pictures of a run, drawn with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

import io
import os

import numpy as np
from matplotlib.figure import Figure

from cae.rundir import write_atomic

__all__ = ["reconstruction_figure", "save_reconstructions"]


def _show(ax, image: np.ndarray) -> None:
    """image: [H, W, C] in [0, 1]; grayscale for C == 1."""
    image = np.clip(image, 0.0, 1.0)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_figure(originals: np.ndarray, reconstructions: np.ndarray,
                          title: str | None = None) -> Figure:
    """originals, reconstructions: [n, H, W, C] images in [0, 1] (not logits).

    Row 1: the originals; row 2: their reconstructions, column by column.
    """
    n = originals.shape[0]
    fig = Figure(figsize=(1.2 * n, 2.6), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        _show(axes[0, j], originals[j])
        _show(axes[1, j], reconstructions[j])
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("reconstruction")
    if title:
        fig.suptitle(title)
    return fig


def save_reconstructions(path: str | os.PathLike, originals: np.ndarray,
                         reconstructions: np.ndarray, title: str | None = None) -> None:
    """Render to PNG in memory, then write ``path`` atomically."""
    buf = io.BytesIO()
    reconstruction_figure(originals, reconstructions, title).savefig(buf, format="png", dpi=100)
    write_atomic(path, buf.getvalue())
