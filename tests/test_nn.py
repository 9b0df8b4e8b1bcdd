"""``cae.nn``: the Flax layers give PyTorch's numbers for PyTorch's constructor arguments and
weights (loaded from torch layers and state dicts), Keras' for Keras kernels, and a tied
``ConvTranspose`` is the exact adjoint of its ``Conv``."""

from __future__ import annotations

import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_import import import_torch

from cae import nn as cnn
from cae import ops


@pytest.fixture(scope="module")
def torch():
    torch = import_torch()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    return torch


def _nchw(torch, a):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


# (nd, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, spatial)
CONV_LAYERS = [
    (1, 4, 6, 3, 2, 1, 1, 2, True, (11,)),
    (2, 6, 4, (3, 2), (2, 1), (1, 0), (1, 2), 2, True, (9, 8)),
    (2, 3, 5, 3, 1, "same", 2, 1, False, (7, 6)),
    (3, 4, 4, (2, 3, 2), (1, 2, 2), (0, 1, 1), 1, 4, True, (5, 6, 5)),
]


@pytest.mark.parametrize("spec", CONV_LAYERS, ids=lambda s: f"{s[0]}d-g{s[7]}")
def test_conv_from_torch_matches_torch(torch, spec):
    nd, c_in, c_out, k, s, p, d, g, bias, sp = spec
    layer = getattr(torch.nn, f"Conv{nd}d")(c_in, c_out, k, s, p, d, g, bias)
    module, variables = cnn.Conv.from_torch(layer)
    x = np.random.default_rng(nd).standard_normal((2, *sp, c_in)).astype(np.float32)
    want = _nhwc(layer(_nchw(torch, x)))
    got = module.apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The same layer built from our constructor has the parameter shapes the torch one loads into.
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    assert {n: v.shape for n, v in shapes.items()} == {
        n: v.shape for n, v in variables["params"].items()}


# (nd, in_channels (y's), out_channels, kernel, stride, padding, output_padding, groups,
#  dilation, bias, y spatial)
CT_LAYERS = [
    (1, 6, 4, 4, 2, 1, 0, 2, 1, True, (9,)),
    (2, 4, 6, 3, 2, 1, 1, 1, 1, True, (7, 7)),  # the default decoder's 7 -> 14
    (2, 6, 3, (3, 2), (2, 3), (1, 0), (1, 2), 3, (1, 1), False, (4, 5)),
    (2, 4, 4, 3, 1, 1, 1, 2, 2, True, (5, 6)),  # output_padding 1 < dilation 2, stride 1
    (3, 4, 2, 3, 2, 1, 1, 2, 1, True, (3, 4, 3)),
]


@pytest.mark.parametrize("spec", CT_LAYERS, ids=lambda s: f"{s[0]}d-g{s[7]}-d{s[8]}")
def test_conv_transpose_from_torch_matches_torch(torch, spec):
    nd, c_in, c_out, k, s, p, op, g, d, bias, sp = spec
    layer = getattr(torch.nn, f"ConvTranspose{nd}d")(c_in, c_out, k, s, p, op, g, bias, d)
    module, variables = cnn.ConvTranspose.from_torch(layer)
    y = np.random.default_rng(nd).standard_normal((2, *sp, c_in)).astype(np.float32)
    want = _nhwc(layer(_nchw(torch, y)))
    got = module.apply(variables, y)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shapes = jax.eval_shape(module.init, jax.random.key(0), y)["params"]
    assert {n: v.shape for n, v in shapes.items()} == {
        n: v.shape for n, v in variables["params"].items()}


def test_state_dict_of_a_torch_decoder_loads_and_matches(torch):
    """A PyTorch decoder's state_dict (ConvTranspose2d, ReLU, ConvTranspose2d) -> our params by
    kernel_from_torch, same outputs."""
    tnet = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 4, 3, 2, 1, 0),
                               torch.nn.ReLU(),
                               torch.nn.ConvTranspose2d(4, 1, 3, 2, 1, 1))
    sd = tnet.state_dict()
    params = {f"layer_{i}": {"kernel": jnp.asarray(cnn.kernel_from_torch(sd[f"{j}.weight"])),
                             "bias": jnp.asarray(sd[f"{j}.bias"].numpy())}
              for i, j in enumerate((0, 2))}

    class Decoder(linen.Module):
        @linen.compact
        def __call__(self, y):
            h = jax.nn.relu(cnn.ConvTranspose(4, 3, 2, 1, 0, name="layer_0")(y))
            return cnn.ConvTranspose(1, 3, 2, 1, 1, name="layer_1")(h)

    y = np.random.default_rng(0).standard_normal((3, 4, 4, 8)).astype(np.float32)
    got = Decoder().apply({"params": params}, y)
    want = _nhwc(tnet(_nchw(torch, y)))
    assert got.shape == (3, 14, 14, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cnn.kernel_to_torch(params["layer_1"]["kernel"]),
                                  sd["2.weight"].numpy())


def test_default_init_is_pytorchs_bound():
    """Kernel and bias uniform in +-1/sqrt(fan_in), fan_in = prod(k) * C_in / groups (Conv) or
    prod(k) * features / groups (ConvTranspose), as PyTorch's reset_parameters."""
    x = jnp.ones((1, 9, 9, 8))
    conv = cnn.Conv(16, 3, groups=2)
    p = conv.init(jax.random.key(0), x)["params"]
    bound = 1 / math.sqrt(9 * 4)
    assert p["kernel"].shape == (3, 3, 4, 16)
    for v in p.values():
        assert float(jnp.max(jnp.abs(v))) <= bound and float(jnp.max(jnp.abs(v))) > 0.8 * bound
    ct = cnn.ConvTranspose(6, 4, 2, groups=2)
    p = ct.init(jax.random.key(1), x)["params"]
    assert p["kernel"].shape == (4, 4, 3, 8)
    bound = 1 / math.sqrt(16 * 3)
    for v in p.values():
        assert float(jnp.max(jnp.abs(v))) <= bound and float(jnp.max(jnp.abs(v))) > 0.8 * bound


def test_tied_conv_transpose_is_the_adjoint_and_shares_the_gradient():
    """ConvTranspose(kernel=conv's kernel) without biases is C^T of the Conv; with one shared
    leaf the kernel's gradient is the sum of both uses (vs two separate copies)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8, 4)), jnp.float32)
    conv = cnn.Conv(6, 3, 2, 1, groups=2, use_bias=False)
    ct = cnn.ConvTranspose(4, 3, 2, 1, output_padding=1, groups=2, use_bias=False)
    kernel = conv.init(jax.random.key(0), x)["params"]["kernel"]
    y = conv.apply({"params": {"kernel": kernel}}, x)
    y2 = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    back = ct.apply({}, y2, kernel)
    assert back.shape == x.shape
    lhs, rhs = float(jnp.vdot(y, y2)), float(jnp.vdot(x, back))
    assert abs(lhs - rhs) <= 1e-5 * float(jnp.vdot(jnp.abs(y), jnp.abs(y2)))

    def loss(k1, k2):
        code = conv.apply({"params": {"kernel": k1}}, x)
        return jnp.sum(ct.apply({}, jnp.tanh(code), k2) ** 2)

    g_tied = jax.grad(lambda k: loss(k, k))(kernel)
    g1, g2 = jax.grad(loss, (0, 1))(kernel, kernel)
    np.testing.assert_allclose(g_tied, g1 + g2, rtol=1e-5, atol=1e-5)


def test_keras_kernels_load_unchanged():
    """Keras Conv2D / Conv2DTranspose kernels are our layout as is: same outputs for 'valid'
    (our VALID, output_padding 0) and 'same' (our SAME with output_padding s - 1: H = H' * s)."""
    import keras
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    for padding, op in (("valid", 0), ("same", 1)):
        kconv = keras.layers.Conv2D(5, 3, strides=2, padding=padding)
        want = np.asarray(kconv(x))
        kernel, bias = (np.asarray(w) for w in kconv.get_weights())
        ours = cnn.Conv(5, 3, 2, padding.upper())
        got = ours.apply({"params": {"kernel": kernel, "bias": bias}}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        kct = keras.layers.Conv2DTranspose(4, 3, strides=2, padding=padding)
        want = np.asarray(kct(want))
        kernel, bias = (np.asarray(w) for w in kct.get_weights())
        assert kernel.shape == (3, 3, 4, 5)  # [*k, features, C_y]: ours
        ct = cnn.ConvTranspose(4, 3, 2, padding.upper(), output_padding=op)
        got = ct.apply({"params": {"kernel": kernel, "bias": bias}}, got)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Keras layers converted whole: (layer class, x spatial, constructor arguments).
KERAS_LAYERS = [
    ("Conv1D", (11,), dict(filters=4, kernel_size=3, strides=2, padding="same")),
    ("Conv1D", (11,), dict(filters=4, kernel_size=3, dilation_rate=2, padding="causal")),
    ("Conv2D", (9, 8), dict(filters=4, kernel_size=(3, 2), strides=(2, 1), padding="valid")),
    ("Conv2D", (9, 8), dict(filters=6, kernel_size=3, dilation_rate=2, padding="same",
                            groups=3, use_bias=False)),
    ("Conv3D", (5, 6, 4), dict(filters=2, kernel_size=2, strides=2, padding="same")),
    ("Conv1DTranspose", (7,), dict(filters=4, kernel_size=4, strides=2, padding="same")),
    ("Conv2DTranspose", (5, 4), dict(filters=4, kernel_size=3, strides=2, padding="same",
                                     output_padding=1)),
    ("Conv2DTranspose", (5, 4), dict(filters=4, kernel_size=(4, 3), strides=(3, 2),
                                     padding="same", output_padding=(2, 0))),
    ("Conv2DTranspose", (5, 4), dict(filters=4, kernel_size=3, strides=2, padding="valid",
                                     output_padding=1, use_bias=False)),
    # (TensorFlow's CPU Conv2DBackpropInput has no dilation > 1: not testable against Keras)
    ("Conv3DTranspose", (3, 4, 2), dict(filters=2, kernel_size=3, strides=2, padding="valid")),
]


@pytest.mark.parametrize("name,x_sp,kwargs", KERAS_LAYERS)
def test_keras_layers_convert_to_the_same_numbers(name, x_sp, kwargs):
    """Conv.from_keras / ConvTranspose.from_keras: 1-3 D, valid / same / causal, strides,
    dilation, groups, Keras' output_padding, with and without bias; the outputs equal Keras'."""
    import keras
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *x_sp, 3)).astype(np.float32)
    layer = getattr(keras.layers, name)(**kwargs)
    want = np.asarray(layer(x))
    if layer.use_bias:  # Keras initialises the bias to zero: give it numbers to compare
        layer.set_weights([layer.get_weights()[0],
                           rng.standard_normal(kwargs["filters"]).astype(np.float32)])
        want = np.asarray(layer(x))
    cls = cnn.ConvTranspose if name.endswith("Transpose") else cnn.Conv
    module, variables = cls.from_keras(layer)
    got = module.apply(variables, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_value_errors():
    x = jnp.ones((1, 8, 8, 6))
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3, 3\) has 3 entries but the input "
                                         r"has 2 spatial dims"):
        cnn.Conv(4, (3, 3, 3)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"groups=4: the input's C_in=6 is not divisible"):
        cnn.Conv(4, 3, groups=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"groups=4: features=6 is not divisible by groups"):
        cnn.ConvTranspose(6, 3, groups=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"kernel of shape \(3, 3, 6, 6\) does not fit"):
        cnn.ConvTranspose(4, 3).apply({}, x, jnp.ones((3, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"output_padding=2 out of range"):
        cnn.ConvTranspose(4, 3, stride=2, output_padding=2).init(jax.random.key(0), x)
    assert ops.DEFAULT_IMPL == cnn.ConvTranspose(4, 3).impl


# ----------------------------------------------------------------------------------------------
# Flax NNX
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [CONV_LAYERS[0], CONV_LAYERS[3]], ids=["1d", "3d"])
def test_nnx_conv_from_torch_matches_torch(torch, spec):
    nd, c_in, c_out, k, s, p, d, g, bias, sp = spec
    layer = getattr(torch.nn, f"Conv{nd}d")(c_in, c_out, k, s, p, d, g, bias)
    ours = cnn.NNXConv.from_torch(layer)
    x = np.random.default_rng(nd).standard_normal((2, *sp, c_in)).astype(np.float32)
    np.testing.assert_allclose(ours(x), _nhwc(layer(_nchw(torch, x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [CT_LAYERS[0], CT_LAYERS[3], CT_LAYERS[4]],
                         ids=["1d", "2d-dilated", "3d"])
def test_nnx_conv_transpose_from_torch_matches_torch(torch, spec):
    nd, c_in, c_out, k, s, p, op, g, d, bias, sp = spec
    layer = getattr(torch.nn, f"ConvTranspose{nd}d")(c_in, c_out, k, s, p, op, g, bias, d)
    ours = cnn.NNXConvTranspose.from_torch(layer)
    y = np.random.default_rng(nd).standard_normal((2, *sp, c_in)).astype(np.float32)
    np.testing.assert_allclose(ours(y), _nhwc(layer(_nchw(torch, y))), rtol=1e-5, atol=1e-5)


def test_nnx_tied_layers_share_one_param():
    """NNXConvTranspose.kernel = NNXConv.kernel: one nnx.Param (one state leaf); the transposed
    layer is the conv's adjoint; the shared leaf's gradient is the sum of both uses."""
    from flax import nnx

    conv = cnn.NNXConv(4, 6, (3, 3), 2, 1, groups=2, use_bias=False, rngs=nnx.Rngs(0))
    ct = cnn.NNXConvTranspose(6, 4, (3, 3), 2, 1, output_padding=1, groups=2, use_bias=False,
                              rngs=nnx.Rngs(1))
    ct.kernel = conv.kernel
    assert ct.kernel is conv.kernel

    class AE(nnx.Module):
        def __init__(self):
            self.enc, self.dec = conv, ct

        def __call__(self, x):
            return self.dec(jnp.tanh(self.enc(x)))

    model = AE()
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 1
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    y = conv(x)
    y2 = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    assert abs(float(jnp.vdot(y, y2)) - float(jnp.vdot(x, ct(y2)))) <= 1e-4
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    k = conv.kernel[...]

    def split(k1, k2):
        h = jnp.tanh(ops.conv(x, k1, 2, 1, groups=2))
        return jnp.sum(ops.conv_transpose(h, k2, 2, 1, 1, groups=2) ** 2)

    g1, g2 = jax.grad(split, (0, 1))(k, k)
    (g_shared,) = jax.tree.leaves(grads)  # the one leaf, under whichever path nnx keeps
    np.testing.assert_allclose(g_shared, g1 + g2, rtol=1e-5, atol=1e-5)
