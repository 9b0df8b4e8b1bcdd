"""Decoder choices (model.decoder) and the checkerboard score (cae.spectra).

Shapes over odd and non-square geometries, parameter counts by hand, tying only where allowed,
the checkerboard score on constructed cases, and a run that writes the new summary keys and
checkerboard.png (quick tier: synthetic digits)."""

from __future__ import annotations

import csv
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from test_models import GEOMETRIES  # the same encoder geometries

from cae import ablate, ablation_report, config, models, ops, plots, spectra, train
from cae.config import ConfigError

SMOKE = REPO / "configs" / "smoke.yaml"


NON_MIRROR = [d for d in models.DECODERS if d != "mirror"]


def _model(geometry, decoder, tied=False, code_size=None):
    _, features, kernel_size, strides, padding = geometry
    return models.ConvAutoencoder(features, kernel_size, strides, padding, tied=tied,
                                  decoder=decoder, code_size=code_size)


def _shapes(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))["params"]


def _init(model, x, seed=0):
    """NumPy normals in the shapes model.init makes (no threefry compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype),
                        jax.eval_shape(model.init, jax.random.key(0), x)["params"])


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("decoder", NON_MIRROR)
@pytest.mark.parametrize("code_size", [None, 7])
def test_every_decoder_layer_restores_its_encoder_layers_input(geometry, decoder, code_size):
    shape, features = geometry[0], geometry[1]
    model = _model(geometry, decoder, code_size=code_size)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *shape)), jnp.float32)
    params = _init(model, x, seed=1)
    out, state = model.apply({"params": params}, x, capture_intermediates=True,
                             mutable=["intermediates"])
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    inter = state["intermediates"]
    sizes = models.layer_sizes(shape[:2], *geometry[2:])
    for i in range(len(features)):
        dec_out = inter[f"decoder_{i}"]["__call__"][0]
        assert dec_out.shape[1:] == (*sizes[i], shape[-1] if i == 0 else features[i - 1])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("code_size", [None, 7])
def test_parameter_counts(geometry, code_size):
    """resize_conv: each layer's kernel [k, k, C_out_i, C_in_i] has as many numbers as the
    untied mirror's, so the counts are equal; resize_conv_deep adds k*k*F_i*F_i + F_i per
    upsampling layer (not for the fully connected code)."""
    shape, features, ks, strides, padding = geometry
    untied = _count(_shapes(_model(geometry, "mirror"), shape))
    resize = _shapes(_model(geometry, "resize_conv", code_size=code_size), shape)
    assert _count(resize) == _count(_shapes(_model(geometry, "mirror", code_size=code_size),
                                            shape))
    if code_size is None:
        assert _count(resize) == untied
        # by hand: every conv has k*k*C_in*C_out + C_out, each decoder layer the same + C_in
        chans = [shape[-1], *features]
        assert untied == sum(2 * k * k * a * b + a + b
                             for k, a, b in zip(ks, chans[:-1], chans[1:]))
    deep = _shapes(_model(geometry, "resize_conv_deep", code_size=code_size), shape)
    extra = sum(k * k * f * f + f + 1 for k, f in zip(ks, features))  # kernel, bias, gate
    assert _count(deep) - _count(resize) == extra
    assert ("decoder_0_refine" in deep) and ("decoder_0_refine" not in resize)


def test_default_recipe_parameter_counts():
    """configs/mnist_tied.yaml's geometry: mirror tied 158,465 and untied 316,449 as before."""
    geometry = ((28, 28, 1), (32, 64, 128), (3, 3, 3), (2, 2, 2), (1, 1, 1))
    counts = {(d, t): _count(_shapes(_model(geometry, d, tied=t, code_size=32), (28, 28, 1)))
              for d, t in [("mirror", True), ("mirror", False), ("resize_conv", False),
                           ("resize_conv_deep", False)]}
    assert counts == {("mirror", True): 158465, ("mirror", False): 316449,
                      ("resize_conv", False): 316449,
                      ("resize_conv_deep", False): 316449 + 9 * (32 ** 2 + 64 ** 2 + 128 ** 2)
                      + 32 + 64 + 128 + 3}


def test_resize_conv_layer_is_nearest_upsampling_then_a_stride_1_conv():
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(2, 7, 5, 3)), jnp.float32)
    layer = models.ResizeConv(4, 3, (14, 10))
    params = _init(layer, y)
    up = np.repeat(np.repeat(np.asarray(y), 2, axis=1), 2, axis=2)  # exact 2x: 2x2 blocks
    np.testing.assert_array_equal(models.nearest_resize(y, (14, 10)), up)
    want = ops.conv(jnp.asarray(up), params["kernel"], 1, "SAME") + params["bias"]
    np.testing.assert_allclose(layer.apply({"params": params}, y), want, rtol=1e-5, atol=1e-5)
    # a non-integer ratio (4 -> 7) reads input pixel floor((i + 0.5) * 4 / 7)
    z = jnp.arange(4.0).reshape(1, 4, 1, 1)
    assert np.asarray(models.nearest_resize(z, (7, 1))).ravel().tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_deep_decoder_starts_as_resize_conv():
    """The refine blocks' gates start at 0: at init the deep decoder computes resize_conv, while
    the refine kernels are He-normal (not zero), so a gate that leaves 0 switches a real conv on."""
    geometry = GEOMETRIES[2]
    shape = geometry[0]
    deep, plain = _model(geometry, "resize_conv_deep"), _model(geometry, "resize_conv")
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, *shape)), jnp.float32)
    with jax.threefry_partitionable(False):
        params = deep.init(jax.random.key(0), x)["params"]
    for i in range(len(geometry[1])):
        refine = params[f"decoder_{i}_refine"]
        assert float(refine["gate"]) == 0.0
        kernel = np.asarray(refine["conv"]["kernel"])
        fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
        assert 0.5 < kernel.std() * np.sqrt(fan_in / 2.0) < 1.2  # He-normal (truncated)
    shared = {k: v for k, v in params.items() if not k.endswith("_refine")}
    np.testing.assert_allclose(deep.apply({"params": params}, x),
                               plain.apply({"params": shared}, x), rtol=1e-6, atol=1e-6)
    # the gates get a gradient at 0, and with a gate open the kernel gets one
    loss = lambda p: jnp.sum(deep.apply({"params": p}, x) ** 2)  # noqa: E731
    assert float(jnp.abs(jax.grad(loss)(params)["decoder_1_refine"]["gate"])) > 0
    opened = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.full_like(v, 0.1) if path[-1].key == "gate" else v, params)
    assert float(jnp.abs(jax.grad(loss)(opened)["decoder_1_refine"]["conv"]["kernel"]).max()) > 0


def test_refine_block_is_the_input_plus_the_gated_conv():
    rng = np.random.default_rng(3)
    y = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
    block = models.Refine(3, jax.nn.relu)
    params = _init(block, y)
    params = {**params, "gate": jnp.float32(0.7)}
    conv = ops.conv(jax.nn.relu(y), params["conv"]["kernel"], 1, "SAME") + params["conv"]["bias"]
    np.testing.assert_allclose(block.apply({"params": params}, y), y + 0.7 * conv,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", NON_MIRROR)
def test_tying_a_decoder_without_encoder_kernels_is_a_one_line_config_error(decoder):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"model": {"decoder": decoder}})  # tied defaults to true
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"model.tied=true: model.decoder={decoder!r} has no encoder "
                              "kernel to share")
    assert "model.tied=false" in message
    cfg = config.from_dict({"model": {"decoder": decoder, "tied": False}})
    assert cfg.model.decoder == decoder
    with pytest.raises(ValueError, match="no encoder kernel to share"):
        _model(GEOMETRIES[0], decoder, tied=True).init(jax.random.key(0),
                                                       jnp.zeros((1, 28, 28, 1)))


def test_unknown_decoder_names_the_allowed_values():
    with pytest.raises(ConfigError, match=r"^model\.decoder='transpose': allowed are 'mirror' "
                                          r"\| 'resize_conv' \| 'resize_conv_deep'$"):
        config.from_dict({"model": {"decoder": "transpose"}})


def test_existing_configs_keep_the_mirror_decoder():
    for path in sorted((REPO / "configs").glob("mnist_*.yaml")):
        assert config.load_config(path).model.decoder == "mirror", path.name


# ----------------------------------------------------------------------------------------------
# The checkerboard score on constructed cases
# ----------------------------------------------------------------------------------------------


def _score(image, stride=2):
    return spectra.checkerboard_score(spectra.power_spectrum(np.asarray(image)[None]), stride)


def _ones_through(kernel_size, padding, output_padding):
    """A 14x14 constant through a stride-2 transposed conv with an all-ones kernel: its overlap
    map, 28x28."""
    ones = jnp.ones((1, 14, 14, 1))
    k = jnp.ones((kernel_size, kernel_size, 1, 1))
    return np.asarray(ops.conv_transpose(ones, k, 2, padding, output_padding))[0, :, :, 0]


def test_transposed_conv_k3_s2_of_a_constant_scores_a_checkerboard():
    out = _ones_through(3, 1, 1)
    assert out.shape == (28, 28)
    assert sorted(np.unique(out[2:-2, 2:-2])) == [1.0, 2.0, 4.0]
    # Inside, all its variation is at the alias bins: exactly 1 (the border's roll-off is not).
    assert _score(out[2:-2, 2:-2]) == pytest.approx(1.0, abs=1e-9)
    assert _score(out) > 0.8


def test_transposed_conv_k4_s2_and_resize_conv_of_a_constant_do_not():
    inside = _ones_through(4, 1, 0)[2:-2, 2:-2]
    assert np.all(inside == 4.0) and _score(inside) == 0.0
    resized = np.asarray(ops.conv(models.nearest_resize(jnp.ones((1, 14, 14, 1)), (28, 28)),
                                  jnp.ones((3, 3, 1, 1)), 1, "SAME"))[0, :, :, 0]
    assert np.all(resized[1:-1, 1:-1] == 9.0) and _score(resized[2:-2, 2:-2]) == 0.0
    assert _score(resized) < 1e-6  # the zero-padded border has no period-2 pattern either


def test_a_smooth_image_scores_low_a_checkerboard_high_white_noise_at_chance():
    i, j = np.mgrid[:28, :28]
    assert _score(np.exp(-((i - 13.5) ** 2 + (j - 11.0) ** 2) / 30.0)) < 1e-3
    assert _score((-1.0) ** (i + j)) == pytest.approx(1.0)
    assert _score((-1.0) ** i) == pytest.approx(1.0)  # stripes alias too (a row at pi)
    # a digit-like image plus a 10 % checkerboard scores far above the image alone
    blob = np.exp(-((i - 13.5) ** 2 + (j - 11.0) ** 2) / 30.0)
    assert _score(blob + 0.1 * (-1.0) ** (i + j)) > 20 * _score(blob) + 0.05
    noise = np.random.default_rng(0).normal(size=(400, 28, 28, 1))
    chance = spectra.chance_score((28, 28), 2)
    assert chance == pytest.approx(55 / 783)
    assert spectra.checkerboard_score(spectra.power_spectrum(noise), 2) == pytest.approx(
        chance, rel=0.05)


def test_power_spectrum_sums_to_the_mse_and_stride_3_bins():
    e = np.random.default_rng(1).normal(size=(5, 12, 9, 2))
    assert spectra.power_spectrum(e).sum() == pytest.approx(np.mean(e ** 2))
    # a stripe of amplitude a at pi puts a**2 of the MSE at the alias bins
    i = np.arange(16)[:, None] * np.ones((1, 16))
    stripes = 0.3 * (-1.0) ** i
    assert spectra.alias_power(spectra.power_spectrum(stripes[None]), 2) == pytest.approx(0.09)
    mask = spectra.alias_mask((12, 9), 3)
    assert np.flatnonzero(mask[:, 0]).tolist() == [4, 8]  # 12 / 3 and 2 * 12 / 3
    assert np.flatnonzero(mask[0]).tolist() == [3, 6]
    assert not mask[0, 0] and not spectra.alias_mask((8, 8), 1).any()


def test_overlap_maps_of_each_decoder():
    geometry = ((28, 28, 1), (32, 64, 128), (3, 3, 3), (2, 2, 2), (1, 1, 1))
    mirror = models.overlap_maps(*geometry, 32, "mirror")
    assert [i for i, _ in mirror] == [2, 1, 0]  # the fully connected code layer left out
    assert [m.shape for _, m in mirror] == [(7, 7), (14, 14), (28, 28)]
    assert set(np.unique(mirror[-1][1][1:-1, 1:-1])) == {1.0, 2.0, 4.0}
    for decoder in NON_MIRROR:
        maps = models.overlap_maps(*geometry, 32, decoder)
        assert all(np.all(m[1:-1, 1:-1] == 9.0) for _, m in maps)
    figure = plots.checkerboard_figure(
        [(f"layer {i}", m) for i, m in mirror],
        [("model", spectra.power_spectrum(mirror[-1][1][None]), 0.9), ("PCA", np.ones((28, 28)),
                                                                       None)],
        spectra.alias_mask((28, 28), 2), title="t")
    assert len(figure.axes) >= 5


def test_a_resize_conv_run_reports_its_decoder_and_checkerboard(synthetic_mnist, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("CAE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = config.load_config(SMOKE, ["model.code_size=16", "model.decoder=resize_conv",
                                     "model.tied=false", "output.progress=off",
                                     "train.linear_probe=false", f"output.dir={run}"])
    summary = train.train_and_evaluate(cfg, dataset=synthetic_mnist)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["decoder"] == "resize_conv" and summary["checkerboard_stride"] == 2
    assert 0.0 <= summary["checkerboard_score"] <= 1.0
    assert 0.0 <= summary["pca_checkerboard_score"] <= 1.0
    assert summary["checkerboard_chance"] == pytest.approx(55 / 783)
    assert 0.0 < summary["checkerboard_mse"] < summary["test_mse"]
    assert 0.0 < summary["pca_checkerboard_mse"] < summary["pca_test_mse"]
    assert (run / "checkerboard.png").read_bytes().startswith(b"\x89PNG")


def test_ablation_report_carries_decoder_and_checkerboard():
    rows = []
    for tied, cb in ((True, [0.30, 0.34]), (False, [0.20, 0.22])):
        for seed in range(2):
            rows.append({"code_size": 32, "decoder": "mirror", "tied": tied, "seed": seed,
                         "num_params": 100 if tied else 190, "test_mse": 0.003 + seed * 1e-4,
                         "test_psnr": 25.0, "pca_test_mse": 0.015, "pca_probe_acc": None,
                         "linear_probe_acc": None, "checkerboard_score": cb[seed],
                         "pca_checkerboard_score": 0.05, "wall_time_s": 1.0,
                         "train_images_per_sec": 1.0, "run_dir": f"r{tied}{seed}"})
    text = ablation_report.render_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["decoder"] for r in parsed] == ["mirror"] * 4
    assert [float(r["checkerboard_score"]) for r in parsed] == [0.30, 0.34, 0.20, 0.22]
    swept = config.AblationConfig(seeds=[0, 1], code_sizes=[32])
    md = ablation_report.render_markdown(rows, config.from_dict({}), swept)
    assert "| 0.050 / 0.320 / 0.210 |" in md  # overview: PCA / tied mean / untied mean
    assert f"{0.32:.3f} ± {np.std([0.30, 0.34], ddof=1):.3f}" in md  # per-size table
    old = [{k: v for k, v in r.items() if "checkerboard" not in k and k != "decoder"}
           for r in rows]  # runs finished before the score existed
    assert "| n/a / n/a / n/a |" in ablation_report.render_markdown(old, config.from_dict({}),
                                                                    swept)
    assert list(csv.DictReader(io.StringIO(ablation_report.render_csv(old))))[0][
        "checkerboard_score"] == ""


@pytest.mark.parametrize("kernel_size,in_hw,out_hw", [
    (3, (7, 5), (14, 10)), ((4, 3), (4, 6), (12, 12)), (5, (3, 3), (6, 9)), (2, (5, 4), (5, 8)),
    (1, (4, 4), (8, 8))])
def test_integer_resize_conv_runs_as_the_transposed_conv_it_equals(kernel_size, in_hw, out_hw):
    """ResizeConv computes an integer upsampling as one transposed conv: the same numbers as
    convolving the nearest-upsampled map (odd and even kernels, ratios 1 to 3)."""
    rng = np.random.default_rng(3)
    y = jnp.asarray(rng.normal(size=(2, *in_hw, 3)), jnp.float32)
    layer = models.ResizeConv(4, kernel_size, out_hw)
    params = _init(layer, y)
    want = ops.conv(models.nearest_resize(y, out_hw), params["kernel"], 1, "SAME")
    np.testing.assert_allclose(layer.apply({"params": params}, y) - params["bias"], want,
                               rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda k: jnp.sum(layer.apply({"params": {**params, "kernel": k}}, y) ** 2))
    want_grad = jax.grad(lambda k: jnp.sum((ops.conv(models.nearest_resize(y, out_hw), k, 1,
                                                     "SAME") + params["bias"]) ** 2))
    np.testing.assert_allclose(grad(params["kernel"]), want_grad(params["kernel"]), rtol=1e-4,
                               atol=1e-4)


def test_the_sweep_collects_decoder_and_checkerboard_from_summary_json(tmp_path):
    """cae.ablate.collect reads the new keys, and a run finished before them reads as empty."""
    base = config.from_dict({"output": {"dir": str(tmp_path)}})
    runs = ablate.plan_runs(base, config.AblationConfig(seeds=[0]))
    summary = {"code_size": 256, "num_params": 10, "test_mse": 0.004, "test_psnr": 24.0,
               "wall_time_s": 1.0, "train_images_per_sec": 5.0, "image_shape": [28, 28, 1]}
    for run, extra in zip(runs, ({"decoder": "mirror", "checkerboard_score": 0.25,
                                  "pca_checkerboard_score": 0.05}, {})):
        run.dir.mkdir(parents=True)
        (run.dir / "summary.json").write_text(json.dumps({**summary, **extra}))
        (run.dir / "metrics.jsonl").write_text(json.dumps(
            {"epoch": 1, "test_mse": 0.004, "initial_test_mse": 0.2}) + "\n")
    rows, _ = ablate.collect(runs)
    assert [(r["decoder"], r["checkerboard_score"], r["pca_checkerboard_score"]) for r in rows] \
        == [("mirror", 0.25, 0.05), ("mirror", None, None)]
