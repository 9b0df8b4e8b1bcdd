"""Pictures of a run, drawn with matplotlib's object API (no pyplot state, no display needed).

Every ``*_figure`` function takes NumPy arrays and returns a ``matplotlib.figure.Figure``;
:func:`save_figure` renders one to PNG in memory and writes it atomically. The pictures:
reconstructions (originals / reconstructions / absolute error), training curves, the encoder's
first-layer filters, a 2-D PCA of the codes coloured by label, and what single code units
decode to.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cae.files import write_atomic

__all__ = ["reconstruction_figure", "save_figure", "curves_figure",
           "filters_figure", "pca_2d", "codes_figure", "unit_decodes_figure",
           "ablation_figure", "rate_distortion_figure", "checkerboard_figure"]


def save_figure(path: str | os.PathLike, fig: Figure, dpi: int = 100) -> None:
    """Render ``fig`` to PNG in memory, then write ``path`` atomically (never half a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


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

    Row 1: the originals; row 2: their reconstructions; row 3: the absolute error per pixel
    (averaged over channels), all error images on one colour scale with a colorbar.
    """
    n = originals.shape[0]
    error = np.abs(np.asarray(originals, np.float32) - np.asarray(reconstructions, np.float32))
    error = error.mean(axis=-1)  # [n, H, W]
    vmax = max(float(error.max(initial=0.0)), 1e-6)
    fig = Figure(figsize=(1.2 * n + 1.2, 4.0), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    for j in range(n):
        _show(axes[0, j], originals[j])
        _show(axes[1, j], reconstructions[j])
        im = axes[2, j].imshow(error[j], cmap="magma", vmin=0.0, vmax=vmax,
                               interpolation="nearest")
        axes[2, j].set_xticks([])
        axes[2, j].set_yticks([])
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("reconstruction")
    axes[2, 0].set_ylabel("|error|")
    fig.colorbar(im, ax=axes[:, -1], label="|original - reconstruction|", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def curves_figure(history: Sequence[dict], loss_name: str = "train loss",
                  title: str | None = None, baseline: tuple[str, float] | None = None) -> Figure:
    """history: the records of ``metrics.jsonl`` (keys ``epoch``, ``train_loss``, ``test_mse``,
    optionally ``initial_test_mse``), one per epoch.

    Left: the mean train loss per epoch; right: the test MSE per epoch (log scale; the untrained
    model's MSE at epoch 0 when the records carry it), with ``baseline`` = (name, test MSE),
    e.g. PCA with as many components as the code has numbers, as a dashed line. Two panels,
    because the units differ.
    """
    epochs = np.array([r["epoch"] for r in history], float)
    train_loss = np.array([r["train_loss"] for r in history], float)
    test_epochs, test_mse = list(epochs), [r["test_mse"] for r in history]
    if history and history[0].get("initial_test_mse") is not None:
        test_epochs, test_mse = [0.0, *test_epochs], [history[0]["initial_test_mse"], *test_mse]
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(epochs, train_loss, "o-", color="tab:blue")
    left.set_title(f"{loss_name} (mean over the epoch)")
    left.set_ylabel(loss_name)
    right.plot(test_epochs, test_mse, "o-", color="tab:orange")
    right.set_yscale("log")  # the untrained model's MSE is ~100x the trained one's
    right.set_title("test MSE (whole test split)")
    right.set_ylabel("mean squared error per pixel")
    if baseline is not None:
        right.axhline(baseline[1], color="0.4", linestyle="--",
                      label=f"{baseline[0]}: {baseline[1]:.4g}")
        right.legend(fontsize="small")
    for ax, xs, ys in ((left, epochs, train_loss), (right, test_epochs, test_mse)):
        # The values themselves, so the picture can be read without the metrics file.
        shown = range(len(xs)) if len(xs) <= 6 else [0, len(xs) - 1]  # more would overlap
        for i in shown:
            ax.annotate(f"{ys[i]:.4g}", (xs[i], ys[i]), textcoords="offset points",
                        xytext=(4, 5), fontsize=8)
        ax.margins(x=0.15, y=0.15)  # room for the value labels inside the frame
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def filters_figure(kernel: np.ndarray, title: str | None = None) -> Figure:
    """kernel: the first encoder layer's HWIO kernel [k, k, C_in, F] -> one image per filter
    (per input channel when C_in > 1), on one symmetric diverging colour scale (blue < 0 < red)
    with a shared colorbar."""
    kernel = np.asarray(kernel, np.float32)
    _, _, c_in, f = kernel.shape
    cols = min(f, 8)
    rows_per_channel = math.ceil(f / cols)
    vmax = max(float(np.abs(kernel).max(initial=0.0)), 1e-12)
    fig = Figure(figsize=(1.1 * cols + 1.3, 1.15 * rows_per_channel * c_in + 0.8),
                 layout="constrained")
    axes = fig.subplots(rows_per_channel * c_in, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for c in range(c_in):
        for j in range(f):
            ax = axes[c * rows_per_channel + j // cols, j % cols]
            ax.set_axis_on()
            im = ax.imshow(kernel[:, :, c, j], cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"filter {j}" if c_in == 1 else f"filter {j}, in {c}", fontsize=8)
    fig.colorbar(im, ax=axes, label="weight", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def pca_2d(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes: [N, D] -> (projection onto the first two principal axes [N, 2], the fraction of
    the total variance each explains [2]). PCA by SVD of the centred data, in float64; each
    axis's sign is fixed so that its largest loading is positive (deterministic pictures)."""
    x = np.asarray(codes, np.float64).reshape(len(codes), -1)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])
    axes = axes * signs[:, None]
    variance = s ** 2
    explained = variance[:2] / max(float(variance.sum()), 1e-300)
    proj = x @ axes.T
    if proj.shape[1] < 2:  # one-dimensional codes: pad the missing axis with zeros
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
        explained = np.pad(explained, (0, 2 - len(explained)))
    return proj, explained


def codes_figure(codes: np.ndarray, labels: np.ndarray | None,
                 class_names: Sequence[str] | None = None, title: str | None = None,
                 max_points: int = 5000, seed: int = 0) -> Figure:
    """codes: [N, D] (flattened codes), labels: [N] int or None -> the codes projected on their
    first two principal axes (fitted on all N), one dot per example coloured by its label.

    At most ``max_points`` dots are drawn (a fixed random subset), so dense classes do not bury
    the others. Up to 10 classes get a legend; more get a colorbar.
    """
    proj, explained = pca_2d(codes)
    n = len(proj)
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    fig = Figure(figsize=(6.8, 5.6), layout="constrained")
    ax = fig.subplots()
    pts = proj[keep]
    if labels is None:
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6, linewidths=0)
    else:
        labels = np.asarray(labels)[keep]
        classes = np.unique(labels)
        if len(classes) <= 10:
            cmap = matplotlib.colormaps["tab10"]
            for i, c in enumerate(classes):
                name = class_names[c] if class_names is not None else str(c)
                sel = labels == c
                ax.scatter(pts[sel, 0], pts[sel, 1], s=4, alpha=0.6, linewidths=0,
                           color=cmap(i), label=name)
            ax.legend(title="label", markerscale=4, fontsize=8, loc="center left",
                      bbox_to_anchor=(1.01, 0.5), frameon=False)
        else:
            sc = ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6, linewidths=0, c=labels,
                            cmap="turbo")
            fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(f"principal axis 1 ({100 * explained[0]:.1f}% of the variance)")
    ax.set_ylabel(f"principal axis 2 ({100 * explained[1]:.1f}% of the variance)")
    ax.set_title(title or f"codes, PCA to 2-D ({len(keep)} of {n} shown)")
    return fig


def unit_decodes_figure(images: np.ndarray, title: str | None = None,
                        labels: Sequence[str] | None = None) -> Figure:
    """images: [F, H, W, C] in [0, 1], e.g. the sigmoid of the decoder applied to one one-hot
    code per code channel -> a grid of F images titled ``labels`` (default "unit j"), with a
    colorbar for the grey scale (C == 1)."""
    images = np.asarray(images, np.float32)
    f = len(images)
    cols = min(f, 8)
    rows = math.ceil(f / cols)
    fig = Figure(figsize=(1.3 * cols + 1.3, 1.45 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    im = None
    for j in range(f):
        ax = axes[j // cols, j % cols]
        ax.set_axis_on()
        _show(ax, images[j])
        im = ax.images[0]
        ax.set_title(labels[j] if labels is not None else f"unit {j}", fontsize=8)
    if im is not None and images.shape[-1] == 1:
        fig.colorbar(im, ax=axes, label="decoded pixel value (sigmoid)", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------
# Tied vs untied ablation (cae.ablate)
# ----------------------------------------------------------------------------------------------


def _mean_with_band(ax, x: np.ndarray, values: np.ndarray, color: str, label: str,
                    band_label: str | None = None) -> None:
    """values: [S, len(x)], one row per seed: the mean as a line, the min-to-max as a band."""
    values = np.asarray(values, np.float64)
    ax.plot(x, values.mean(axis=0), "o-", color=color, label=label)
    ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.25,
                    linewidth=0, label=band_label)


def _log_mse_axis(ax, title: str) -> None:
    ax.set_yscale("log")
    ax.set_ylabel("test MSE (per pixel, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


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
        _mean_with_band(left, epochs, curve, color, f"{variant} (mean of {len(curve)})",
                        f"{variant} min-max over seeds")
        x, y = np.asarray(num_params[variant]), np.asarray(final_mse[variant], np.float64)
        right.scatter(x, y, color=color, alpha=0.8, label=f"{variant}: one point per seed")
        right.scatter([x.mean()], [y.mean()], marker="_", s=600, color=color, linewidths=2)
    _log_mse_axis(left, "test MSE per epoch")
    left.set_xticks(epochs)
    left.set_xlabel("epoch (0 = before training)" if 0 in epochs else "epoch")
    right.set_xlabel("parameters")
    right.set_ylabel("final test MSE (per pixel)")
    right.set_title("final test MSE vs parameter count (bar: mean)")
    right.yaxis.set_major_formatter("{x:.3g}")  # no offset text: it collides with the title
    right.xaxis.set_major_formatter("{x:,.0f}")
    right.xaxis.set_major_locator(MaxNLocator(nbins=5))  # comma-grouped labels need room
    lo = min(np.min(v) for v in num_params.values())
    hi = max(np.max(v) for v in num_params.values())
    pad = 0.1 * max(hi - lo, hi * 0.1)
    right.set_xlim(lo - pad, hi + pad)
    right.grid(True, alpha=0.3)
    right.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def rate_distortion_figure(code_sizes: np.ndarray, final_mse: dict[str, np.ndarray],
                           pca_mse: np.ndarray, title: str | None = None) -> Figure:
    """Test MSE against code size: what each variant buys over the linear baseline.

    code_sizes: [K] numbers per image; final_mse[v]: [S, K] test MSE of each seed (rows) at each
    size; pca_mse: [K] PCA with as many components (NaN where there is none).
    Left: log-log rate-distortion curves, the mean over seeds as a line with the min-to-max
    band, PCA dashed. Right: PCA's MSE / the variant's (how many times lower).
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    sizes = np.asarray(code_sizes, np.float64)
    pca = np.asarray(pca_mse, np.float64)
    for i, (variant, mse) in enumerate(final_mse.items()):
        mse = np.asarray(mse, np.float64)
        color = f"C{i}"
        _mean_with_band(left, sizes, mse, color,
                        f"{variant} (mean of {len(mse)} seed{'s' * (len(mse) > 1)})")
        right.plot(sizes, pca / mse.mean(axis=0), "o-", color=color, label=variant)
    if np.any(np.isfinite(pca)):
        left.plot(sizes, pca, "s--", color="0.4", label="PCA, as many components")
    right.axhline(1.0, color="0.4", linestyle="--", label="PCA (= 1)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{int(k)}" for k in sizes])
        ax.minorticks_off()
        ax.set_xlabel("code size (numbers per image)")
    _log_mse_axis(left, "rate-distortion (band: min-max over seeds)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize="small")
    right.set_ylim(bottom=0)
    right.yaxis.set_major_formatter("{x:g}x")
    right.set_ylabel("PCA's test MSE / variant's (> 1: better than PCA)")
    right.set_title("times lower MSE than PCA at the same size")
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------
# Checkerboard artifacts (cae.experiment.checkerboard)
# ----------------------------------------------------------------------------------------------


def checkerboard_figure(overlaps: Sequence[tuple[str, np.ndarray]],
                        spectra: Sequence[tuple[str, np.ndarray, float | None]],
                        alias: np.ndarray, title: str | None = None) -> Figure:
    """Top row: each decoder layer's overlap map ([H_i, W_i]: how many kernel taps reach each
    output pixel; a checkerboard of 1, 2, 4 is the k=3, s=2 transpose's), its top-left 8x8
    corner at most, each pixel labelled with its count. Bottom row: mean error power spectra
    (name, [H, W] in ``np.fft.fft2`` order, score), centred (0 in the middle, +-0.5 cycles per
    pixel at the edges), on one log colour scale; ``alias`` [H, W] (the bins the score counts)
    is outlined in cyan; last, each spectrum's power per frequency along the rows and columns
    (the two marginals averaged), where a checkerboard is a spike at the alias frequency."""
    spectra = list(spectra)
    cols = max(len(overlaps), len(spectra) + 1 if spectra else 1)
    fig = Figure(figsize=(3.3 * cols + 1.0, 7.0), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (label, overlap) in zip(axes[0], overlaps):
        ax.set_axis_on()
        corner = np.asarray(overlap)[:8, :8]
        im = ax.imshow(corner, cmap="viridis", vmin=0, vmax=max(float(overlap.max()), 1.0),
                       interpolation="nearest")
        for (r, c), v in np.ndenumerate(corner):
            ax.text(c, r, f"{v:g}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks([])
        ax.set_yticks([])
        inside = np.asarray(overlap)[2:-2, 2:-2]
        counts = (f"{inside.min():g} to {inside.max():g}" if inside.size and inside.min()
                  != inside.max() else f"{inside.max() if inside.size else 0:g} everywhere")
        ax.set_title(f"{label}\ntaps per pixel inside: {counts}", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.7, label="kernel taps")
    if overlaps:
        axes[0, 0].set_ylabel("overlap map (top-left corner)")
    if spectra:
        shown = [np.fft.fftshift(np.asarray(p, np.float64)) for _, p, _ in spectra]
        positive = np.concatenate([p[p > 0] for p in shown] or [np.ones(1)])
        lo, hi = float(np.percentile(positive, 1)), float(positive.max())
        mask = np.fft.fftshift(np.asarray(alias, bool))
        h, w = mask.shape
        extent = (-w // 2 - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -h // 2 - 0.5)
        for ax, (label, _, score), p in zip(axes[1], spectra, shown):
            ax.set_axis_on()
            im = ax.imshow(np.maximum(p, lo), cmap="magma", interpolation="nearest",
                           norm=LogNorm(lo, hi), extent=extent)
            ax.contour(np.arange(-(w // 2), w - w // 2), np.arange(-(h // 2), h - h // 2),
                       mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xlabel("column frequency (DFT bin)")
            ax.set_ylabel("row frequency (DFT bin)")
            score_text = "n/a" if score is None else f"{score:.3f}"
            ax.set_title(f"{label}\nmean test error spectrum; checkerboard {score_text}\n"
                         f"(bin +-{w // 2} = 0.5 cycles/pixel)", fontsize=8)
        fig.colorbar(im, ax=list(axes[1, :len(spectra)]), shrink=0.7,
                     label="error power (sums to the MSE)")
        ax = axes[1, len(spectra)]
        ax.set_axis_on()
        for i, (label, p, _) in enumerate(spectra):
            p = np.asarray(p, np.float64)
            rows, cols_ = p.sum(axis=1), p.sum(axis=0)  # power per row / column frequency
            n = min(len(rows), len(cols_))
            freq = np.arange(n // 2 + 1)
            # per bin, rows and columns averaged: bins f and n - f (the two signs of one
            # frequency) are averaged, so the one Nyquist bin is not drawn at half height
            profile = [(rows[f] + rows[-f] + cols_[f] + cols_[-f]) / 4 for f in freq]
            ax.plot(freq / n, profile, "o-", ms=3, color=f"C{i}", label=label)
        alias_f = np.flatnonzero(np.asarray(alias, bool)[:, 0])
        for j, f in enumerate(alias_f[alias_f <= len(alias) // 2]):
            ax.axvline(f / len(alias), color="cyan", linestyle="--",
                       label="alias frequency" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("frequency along rows or columns (cycles/pixel)")
        ax.set_ylabel("error power per DFT row / column")
        ax.set_title("error power per frequency\n(a checkerboard: a spike at the dashed line)",
                     fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
