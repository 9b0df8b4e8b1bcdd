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


# ----------------------------------------------------------------------------------------------
# Tied vs untied ablation (cae.ablate)
# ----------------------------------------------------------------------------------------------

__all__ += ["ablation_figure", "save_ablation"]


def ablation_figure(epochs: np.ndarray, curves: dict[str, np.ndarray],
                    final_mse: dict[str, np.ndarray], num_params: dict[str, np.ndarray],
                    title: str | None = None) -> Figure:
    """Variants (e.g. ``tied``, ``untied``) compared over seeds.

    epochs: [E] (0 = before training); curves[v]: [S, E] test MSE of each seed after each epoch;
    final_mse[v], num_params[v]: [S] one value per run.
    Left: test MSE per epoch (log scale), the mean over seeds as a line and the min-to-max band.
    Right: final test MSE against parameter count, one point per run, the mean as a bar.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, (variant, curve) in enumerate(curves.items()):
        color = f"C{i}"
        curve = np.asarray(curve, np.float64)
        left.plot(epochs, curve.mean(axis=0), "o-", color=color,
                  label=f"{variant} (mean of {curve.shape[0]})")
        left.fill_between(epochs, curve.min(axis=0), curve.max(axis=0), color=color, alpha=0.25,
                          linewidth=0, label=f"{variant} min-max over seeds")
        x, y = np.asarray(num_params[variant]), np.asarray(final_mse[variant], np.float64)
        right.scatter(x, y, color=color, alpha=0.8, label=f"{variant}: one point per seed")
        right.scatter([x.mean()], [y.mean()], marker="_", s=600, color=color, linewidths=2)
    left.set_yscale("log")
    left.set_xticks(epochs)
    left.set_xlabel("epoch (0 = before training)" if 0 in epochs else "epoch")
    left.set_ylabel("test MSE (per pixel, log scale)")
    left.set_title("test MSE per epoch")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    right.set_xlabel("parameters")
    right.set_ylabel("final test MSE (per pixel)")
    right.set_title("final test MSE vs parameter count (bar: mean)")
    right.yaxis.set_major_formatter("{x:.3g}")  # no offset text: it collides with the title
    right.xaxis.set_major_formatter("{x:,.0f}")
    lo = min(np.min(v) for v in num_params.values())
    hi = max(np.max(v) for v in num_params.values())
    pad = 0.1 * max(hi - lo, hi * 0.1)
    right.set_xlim(lo - pad, hi + pad)
    right.grid(True, alpha=0.3)
    right.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def save_ablation(path: str | os.PathLike, epochs: np.ndarray, curves: dict[str, np.ndarray],
                  final_mse: dict[str, np.ndarray], num_params: dict[str, np.ndarray],
                  title: str | None = None) -> None:
    """:func:`ablation_figure` rendered to PNG in memory, then written to ``path`` atomically."""
    buf = io.BytesIO()
    ablation_figure(epochs, curves, final_mse, num_params, title).savefig(buf, format="png",
                                                                          dpi=100)
    write_atomic(path, buf.getvalue())
