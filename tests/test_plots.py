"""cae.plots: every figure is built from arrays; what is drawn is checked against the inputs and,
for the PCA, against an independent eigen-decomposition of the covariance."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from cae import plots


def _rng(seed=0):
    return np.random.default_rng(seed)


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_reconstruction_figure_draws_originals_reconstructions_and_error():
    rng = _rng(1)
    x = rng.uniform(size=(5, 12, 10, 1)).astype(np.float32)
    r = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    fig = plots.reconstruction_figure(x, r, title="t")
    grid = np.array([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]).reshape(3, 5)
    for j in range(5):
        np.testing.assert_array_equal(grid[0, j].images[0].get_array(), x[j, ..., 0])
        np.testing.assert_array_equal(grid[1, j].images[0].get_array(), r[j, ..., 0])
        np.testing.assert_allclose(grid[2, j].images[0].get_array(), np.abs(x[j] - r[j])[..., 0],
                                   rtol=1e-6)
    assert [grid[i, 0].get_ylabel() for i in range(3)] == ["original", "reconstruction",
                                                           "|error|"]
    # One error scale for the whole row, shown by a colorbar.
    for j in range(5):
        assert grid[2, j].images[0].get_clim() == pytest.approx((0.0, float(np.abs(x - r).max())))
    (cbar,) = _colorbars(fig)
    assert "original - reconstruction" in cbar.get_ylabel()


def test_rgb_reconstruction_error_is_the_channel_mean(tmp_path):
    rng = _rng(2)
    x = rng.uniform(size=(2, 6, 6, 3))
    r = rng.uniform(size=(2, 6, 6, 3))
    fig = plots.reconstruction_figure(x, r)
    err_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][4:]
    np.testing.assert_allclose(err_axes[1].images[0].get_array(),
                               np.abs(x[1] - r[1]).mean(-1), rtol=1e-6)
    path = tmp_path / "r.png"
    plots.save_figure(path, plots.reconstruction_figure(x, r, title="rgb"))
    png = matplotlib.image.imread(path)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temp file left


def test_curves_figure_plots_the_history():
    history = [{"epoch": e, "train_loss": 0.1 / e, "test_mse": 0.01 / e ** 2,
                "initial_test_mse": 0.2} for e in (1, 2, 3)]
    fig = plots.curves_figure(history, loss_name="train loss (BCE)")
    left, right = fig.axes
    (line,) = left.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(line.get_ydata(), [0.1, 0.05, 0.1 / 3])
    (line,) = right.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2, 3])  # epoch 0: untrained model
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.01, 0.0025, 0.01 / 9])
    assert right.get_yscale() == "log" and left.get_yscale() == "linear"
    assert left.get_xlabel() == right.get_xlabel() == "epoch"
    assert left.get_ylabel() == "train loss (BCE)" and "squared error" in right.get_ylabel()
    # With a baseline (cae.train passes PCA with as many components): a dashed line at its MSE.
    fig = plots.curves_figure(history, baseline=("PCA, 32 components", 0.0152))
    baseline = [ln for ln in fig.axes[1].get_lines() if ln.get_linestyle() == "--"]
    assert len(baseline) == 1 and set(baseline[0].get_ydata()) == {0.0152}
    assert baseline[0].get_label() == "PCA, 32 components: 0.0152"


@pytest.mark.parametrize("c_in", [1, 3])
def test_filters_figure_shows_every_filter_on_a_symmetric_scale(c_in):
    kernel = _rng(3).normal(size=(5, 5, c_in, 12)).astype(np.float32)
    fig = plots.filters_figure(kernel, title="filters")
    shown = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(shown) == 12 * c_in
    vmax = float(np.abs(kernel).max())
    by_title = {ax.get_title(): ax for ax in shown}
    for j in range(12):
        for c in range(c_in):
            ax = by_title[f"filter {j}" if c_in == 1 else f"filter {j}, in {c}"]
            np.testing.assert_array_equal(ax.images[0].get_array(), kernel[:, :, c, j])
            assert ax.images[0].get_clim() == pytest.approx((-vmax, vmax))
    (cbar,) = _colorbars(fig)
    assert cbar.get_ylabel() == "weight"


def _reference_pca(x):
    """Independent PCA: eigenvectors of the covariance matrix (np.linalg.eigh)."""
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc, rowvar=False))
    order = np.argsort(evals)[::-1]
    return xc @ evecs[:, order[:2]], evals[order[:2]] / evals.sum()


def test_pca_matches_the_covariance_eigenvectors():
    rng = _rng(4)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0
    proj, explained = plots.pca_2d(x)
    ref_proj, ref_explained = _reference_pca(x)
    np.testing.assert_allclose(explained, ref_explained, rtol=1e-8)
    for k in range(2):  # an eigenvector's sign is arbitrary
        sign = np.sign(proj[:, k] @ ref_proj[:, k])
        np.testing.assert_allclose(proj[:, k], sign * ref_proj[:, k], rtol=1e-6, atol=1e-8)
    assert explained[0] > explained[1] > 0


def test_pca_of_points_on_a_line_explains_everything_with_one_axis():
    t = np.linspace(-1, 1, 50)
    direction = np.array([1.0, -2.0, 0.5])
    proj, explained = plots.pca_2d(t[:, None] * direction + 7.0)
    np.testing.assert_allclose(explained, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(proj[:, 0]), np.abs(t) * np.linalg.norm(direction),
                               rtol=1e-9, atol=1e-12)


def test_codes_figure_scatters_the_projection_coloured_by_label():
    rng = _rng(5)
    labels = rng.integers(0, 10, 300)
    codes = rng.normal(size=(300, 8)) + labels[:, None] * rng.normal(size=8)
    fig = plots.codes_figure(codes, labels, max_points=1000)
    (ax,) = fig.axes
    proj, explained = plots.pca_2d(codes)
    assert len(ax.collections) == 10  # one scatter per class
    for c, coll in enumerate(ax.collections):
        np.testing.assert_allclose(coll.get_offsets(), proj[labels == c], rtol=1e-6)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(c) for c in range(10)]
    assert f"{100 * explained[0]:.1f}%" in ax.get_xlabel()
    assert f"{100 * explained[1]:.1f}%" in ax.get_ylabel()


def test_codes_figure_subsamples_and_uses_a_colorbar_for_many_classes():
    rng = _rng(6)
    labels = rng.integers(0, 26, 2000)
    fig = plots.codes_figure(rng.normal(size=(2000, 4)), labels, max_points=500)
    ax = [a for a in fig.axes if a.get_label() != "<colorbar>"][0]
    (coll,) = ax.collections
    assert len(coll.get_offsets()) == 500
    (cbar,) = _colorbars(fig)
    assert cbar.get_ylabel() == "label"


def test_unit_decodes_figure_shows_each_image_with_its_title():
    images = _rng(7).uniform(size=(5, 9, 9, 1)).astype(np.float32)
    fig = plots.unit_decodes_figure(images, labels=[f"channel {j}" for j in range(5)])
    shown = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in shown] == [f"channel {j}" for j in range(5)]
    for ax, image in zip(shown, images):
        np.testing.assert_array_equal(ax.images[0].get_array(), image[..., 0])
        assert ax.images[0].get_clim() == (0.0, 1.0)
    (cbar,) = _colorbars(fig)
    assert "sigmoid" in cbar.get_ylabel()
