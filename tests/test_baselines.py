"""The PCA baseline (cae.baselines), the code size, and the fully connected bottleneck."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_transpose_variants import conv_transpose_autodiff

from cae import baselines, config, data, experiment, models, ops, probe, train


def _images(n: int, shape=(6, 5, 2), seed: int = 0) -> np.ndarray:
    """Correlated uint8 images: a few smooth patterns mixed at random, plus noise, so PCA has a
    real spectrum (and some reconstructions leave [0, 1], which the clip must handle)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    patterns = rng.uniform(0, 1, (4, d))
    mix = rng.normal(0.0, 1.0, (n, 4))
    x = 0.5 + 0.25 * mix @ patterns / 2 + rng.normal(0, 0.05, (n, d))
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8).reshape(n, *shape)


def _numpy_svd_mse(train_images: np.ndarray, test_images: np.ndarray, k: int) -> float:
    """Independent reference: NumPy's SVD of the centred train matrix, float64."""
    a = train_images.reshape(len(train_images), -1).astype(np.float64) / 255
    t = test_images.reshape(len(test_images), -1).astype(np.float64) / 255
    mean = a.mean(axis=0)
    _, _, vt = np.linalg.svd(a - mean, full_matrices=False)
    v = vt[:k].T
    recon = np.clip(mean + (t - mean) @ v @ v.T, 0, 1)
    return float(np.mean((recon - t) ** 2))


@pytest.mark.parametrize("k", [1, 3, 17, 60])
def test_pca_mse_matches_an_independent_numpy_svd(k):
    train_images, test_images = _images(300), _images(120, seed=1)
    pca = baselines.fit_pca(train_images)
    got = baselines.reconstruction_mse(pca, test_images, k)
    assert got == pytest.approx(_numpy_svd_mse(train_images, test_images, k), rel=1e-9)
    # The variances are the squared singular values / (n - 1), in descending order.
    a = train_images.reshape(300, -1) / 255
    s = np.linalg.svd(a - a.mean(0), compute_uv=False)
    np.testing.assert_allclose(pca.variances[:len(s)], s ** 2 / 299, rtol=1e-9, atol=1e-12)


def test_pca_error_falls_with_k_and_vanishes_with_every_component():
    train_images = _images(200)
    pca = baselines.fit_pca(train_images)
    mses = [baselines.reconstruction_mse(pca, train_images, k) for k in (1, 2, 4, 8, 60)]
    assert all(a >= b for a, b in zip(mses, mses[1:]))
    assert mses[-1] < 1e-20  # all 60 components: the train images themselves


def _dataset(n_train=400, n_test=100) -> data.Dataset:
    train_images, test_images = _images(n_train), _images(n_test, seed=1)
    # Labels a linear classifier can read off the first pixels' brightness.
    def labels(x):
        return (x.reshape(len(x), -1)[:, :4].mean(axis=1) > 127).astype(np.int32)
    return data.Dataset("toy", train_images, test_images, labels(train_images),
                        labels(test_images))


def test_pca_baseline_is_cached_per_dataset_and_k(tmp_path, monkeypatch):
    monkeypatch.setenv("CAE_CACHE_DIR", str(tmp_path))
    ds = _dataset()
    first = baselines.pca_baseline(ds, 5, probe=True)
    assert first.test_mse == pytest.approx(_numpy_svd_mse(ds.train, ds.test, 5), rel=1e-9)
    # The probe of the PCA codes is cae.probe's probe of the reference PCA coefficients.
    a = ds.train.reshape(len(ds.train), -1) / 255
    v = np.linalg.svd(a - a.mean(0), full_matrices=False)[2][:5].T
    t = ds.test.reshape(len(ds.test), -1) / 255
    want = probe.linear_probe(((a - a.mean(0)) @ v).astype(np.float32), ds.train_labels,
                              ((t - a.mean(0)) @ v).astype(np.float32), ds.test_labels)
    assert first.probe_acc == pytest.approx(want, abs=0.011)  # one test example at most
    folders = list((tmp_path / "baselines").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("toy-")
    cached = json.loads((folders[0] / "k5-probe100.json").read_text())
    assert cached["test_mse"] == first.test_mse and (folders[0] / "pca.npz").is_file()
    # A cached figure is what the next call returns (here: a planted value proves it is read).
    (folders[0] / "k5-probe100.json").write_text(json.dumps({**cached, "test_mse": 0.5}))
    assert baselines.pca_baseline(ds, 5, probe=True).test_mse == 0.5
    # A damaged entry is recomputed, not trusted and not fatal.
    (folders[0] / "k5-probe100.json").write_text("{not json")
    (folders[0] / "pca.npz").write_bytes(b"garbage")
    assert baselines.pca_baseline(ds, 5, probe=True) == first
    # Other data (a different train split) gets a different entry.
    smaller = data.Dataset("toy", ds.train[:300], ds.test, ds.train_labels[:300], ds.test_labels)
    assert baselines.pca_baseline(smaller, 5).test_mse == pytest.approx(
        _numpy_svd_mse(smaller.train, ds.test, 5), rel=1e-9)
    assert len(list((tmp_path / "baselines").iterdir())) == 2
    with pytest.raises(ValueError, match="k=61"):
        baselines.pca_baseline(ds, 61)


@pytest.mark.parametrize("overrides,shape", [
    ([], (4, 4, 16)),  # configs/smoke.yaml-like default geometry: 28 -> 14 -> 7 -> 4
    (["model.features=[32,128]"], (7, 7, 128)),
    (["model.features=[32,64]", "model.code_size=32"], (1, 1, 32)),
    (["model.features=[8]", "model.padding=VALID", "model.kernel_size=4"], (13, 13, 8)),
    (["model.features=[8,16]", "model.padding=SAME", "model.strides=[2,3]"], (5, 5, 16)),
    (["model.features=[32,64,64]", "model.kernel_size=[3,3,7]", "model.strides=[2,2,1]",
      "model.padding=[1,1,0]"], (1, 1, 64)),
])
def test_code_shape_is_the_encoders_output(overrides, shape):
    cfg = config.from_dict(config.apply_overrides({}, config.parse_overrides(overrides)))
    assert experiment.model_code_shape(cfg, (28, 28, 1)) == shape
    model = experiment.build_model(cfg)
    x = jnp.zeros((2, 28, 28, 1))
    code = jax.eval_shape(lambda v: model.apply(v, x, method="encode"),
                          jax.eval_shape(model.init, jax.random.key(0), x))
    assert code.shape == (2, *shape)


def test_code_size_is_validated():
    with pytest.raises(config.ConfigError, match=r"model.code_size=0: must be >= 1"):
        config.from_dict({"model": {"code_size": 0}})
    with pytest.raises(config.ConfigError, match=r"model.code_size='x'"):
        config.from_dict({"model": {"code_size": "x"}})


# ----------------------------------------------------------------------------------------------
# The fully connected bottleneck: a conv whose kernel covers its input is W, its transpose W^T
# ----------------------------------------------------------------------------------------------


def _dense_problem(dtype=jnp.float32, c_in=5, c_out=3, hw=(4, 3)):
    keys = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(keys[0], (2, *hw, c_in), dtype)
    kernel = jax.random.normal(keys[1], (*hw, c_in, c_out), dtype)
    y = jax.random.normal(keys[2], (2, 1, 1, c_out), dtype)
    return x, kernel, y


def test_fully_connected_conv_is_the_matrix_w_and_its_transpose_w_t():
    x, kernel, y = _dense_problem()
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[3])  # [kh*kw*C_in, C_out]
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    got_y = ops.conv(x, kernel, 1, "VALID")
    np.testing.assert_allclose(got_y.reshape(2, -1), xn.reshape(2, -1) @ w, rtol=1e-5, atol=1e-5)
    got_x = ops.conv_transpose(y, kernel, 1, "VALID")  # impl "auto": the GEMM path
    np.testing.assert_allclose(got_x, (yn.reshape(2, -1) @ w.T).reshape(x.shape), rtol=1e-5,
                               atol=1e-5)
    # Adjoint identity <C x, y> = <x, C^T y>, in float64 arithmetic on the float32 results.
    lhs = float(np.vdot(np.asarray(got_y, np.float64), yn))
    rhs = float(np.vdot(xn, np.asarray(got_x, np.float64)))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # Every convolution implementation agrees with the GEMM path on this geometry.
    for impl in ops.IMPLEMENTATIONS:
        np.testing.assert_allclose(ops.conv_transpose(y, kernel, 1, 0, impl=impl), got_x,
                                   rtol=1e-5, atol=1e-5, err_msg=impl)
    ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(got_y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [1, 2])
def test_fully_connected_conv_gradients_match_jax_vjp_of_the_lax_conv(strides):
    x, kernel, y = _dense_problem()

    def ours(x, k):
        return ops.conv(x, k, strides, 0)

    def reference(x, k):
        return jax.lax.conv_general_dilated(x, k, (strides, strides), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out, vjp = jax.vjp(ours, x, kernel)
    ref_out, ref_vjp = jax.vjp(reference, x, kernel)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(y), ref_vjp(y)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # And the transpose's own gradients (w.r.t. y and the kernel) against the lax reference.
    t_out, t_vjp = jax.vjp(lambda y, k: ops.conv_transpose(y, k, strides, 0), y, kernel)
    r_out, r_vjp = jax.vjp(lambda y, k: conv_transpose_autodiff(y, k, strides, 0), y, kernel)
    np.testing.assert_allclose(t_out, r_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(t_vjp(x), r_vjp(x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fully_connected_conv_in_bfloat16_accumulates_in_float32():
    x, kernel, y = _dense_problem(jnp.bfloat16, c_in=64, hw=(7, 7))
    got = ops.conv(x, kernel, 1, 0)
    assert got.dtype == jnp.bfloat16
    want = ops.conv(x.astype(jnp.float32), kernel.astype(jnp.float32), 1, 0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=0.3)


def test_tied_fully_connected_bottleneck_shares_one_matrix():
    """model.code_size: the decoder's first layer reads the encoder's W itself (no copy): the
    tied model has exactly |W| fewer parameters, and decode(code) == W^T code + bias chain."""
    x = jnp.zeros((1, 28, 28, 1))
    kwargs = dict(features=(8, 16), kernel_size=(3, 3), strides=(2, 2), padding=(1, 1),
                  code_size=10)
    tied = models.ConvAutoencoder(**kwargs, tied=True)
    untied = models.ConvAutoencoder(**kwargs, tied=False)

    def count(m):
        return sum(v.size for v in jax.tree.leaves(jax.eval_shape(m.init, jax.random.key(0), x)))

    assert count(untied) - count(tied) == 9 * 1 * 8 + 9 * 8 * 16 + 7 * 7 * 16 * 10
    variables = jax.jit(tied.init)(jax.random.key(0), x)  # eager init compiles op by op: ~5x slower
    w = variables["params"]["encoder_2"]["kernel"]
    assert w.shape == (7, 7, 16, 10) and "kernel" not in variables["params"]["decoder_2"]
    model = models.ConvAutoencoder(**kwargs, tied=True, image_shape=(28, 28, 1))
    code = jax.random.normal(jax.random.key(3), (2, 1, 1, 10))
    # The decoder's first layer alone: W^T code + its bias (zero at init), before the ReLU.
    first = jax.jit(models.transposed_conv(16, (7, 7), 1, 0, (7, 7)).apply)(
        {"params": {"bias": variables["params"]["decoder_2"]["bias"]}}, code, w)
    want = (np.asarray(code).reshape(2, 10) @ np.asarray(w).reshape(-1, 10).T).reshape(2, 7, 7,
                                                                                     16)
    np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-5)
    assert jax.eval_shape(lambda v, c: model.apply(v, c, method="decode"), variables,
                          code).shape == (2, 28, 28, 1)


def test_code_size_is_the_hand_spelt_fully_connected_conv():
    """model.code_size=K is the layer a user could spell by hand (one more feature, kernel = the
    last map, stride 1, padding 0): the same parameter tree, initial values and outputs."""
    short = config.from_dict({"model": {"features": [8, 16], "code_size": 10}})
    spelt = config.from_dict({"model": {"features": [8, 16, 10], "kernel_size": [3, 3, 7],
                                        "strides": [2, 2, 1], "padding": [1, 1, 0]}})
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    outputs = []
    for cfg in (short, spelt):
        model = experiment.build_model(cfg)
        variables = model.init(jax.random.key(0), x)
        outputs.append((variables, model.apply(variables, x),
                        model.apply(variables, x, method="encode")))
    (v1, y1, c1), (v2, y2, c2) = outputs
    assert jax.tree.structure(v1) == jax.tree.structure(v2)
    for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(y1, y2)
    assert c1.shape == c2.shape == (3, 1, 1, 10)


def _conv_operand_shapes(jaxpr) -> list[tuple]:
    """(lhs shape, rhs shape) of every convolution in a jaxpr, sub-jaxprs (custom VJPs, scans)
    included."""
    from jax.extend.core import jaxprs_in_params

    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            shapes.append(tuple(tuple(v.aval.shape) for v in eqn.invars[:2]))
        for sub in jaxprs_in_params(eqn.params):
            shapes += _conv_operand_shapes(sub)
    return shapes


def test_the_fully_connected_code_trains_as_gemms_not_convolutions():
    """The loss and its gradient for model.code_size hold no convolution that touches the
    code's kernel W [4, 4, 32, 10] (forward, transpose, both gradients are GEMMs), while the
    strided convs remain; with the GEMM path switched off, those convolutions appear."""
    cfg = config.from_dict({"model": {"features": [8, 16, 32], "code_size": 10}})
    state = experiment.create_train_state(cfg, (28, 28, 1), 10)
    images = jnp.zeros((4, 28, 28, 1), jnp.uint8)

    def conv_shapes():
        jaxpr = jax.make_jaxpr(jax.value_and_grad(train.loss_fn), static_argnums=(1, 3))(
            state.params, state.apply_fn, images, "bce").jaxpr
        return _conv_operand_shapes(jaxpr)

    def touches_w(shapes):
        return [s for s in shapes if s[1] in ((4, 4, 32, 10), (4, 4, 10, 32))]

    gemm = conv_shapes()
    assert not touches_w(gemm), gemm
    assert any(rhs == (3, 3, 16, 32) for _, rhs in gemm)  # the strided convs are still convs
    with ops.gemm_for_covering_kernels(False):
        assert touches_w(conv_shapes())  # the check can see the conv path when it is there
