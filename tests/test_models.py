"""The autoencoder: shapes through every layer, the tied kernel is one leaf used twice, and the
decoder layers are the transposes of the encoder layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae import models, ops

GEOMETRIES = [
    # (input [H, W, C], features, kernel_size, strides, padding)
    ((28, 28, 1), (32, 64, 16), (3, 3, 3), (2, 2, 2), (1, 1, 1)),  # 28-14-7-4-7-14-28
    ((28, 28, 1), (8, 8), (5, 4), (3, 2), (2, 1)),
    ((27, 19, 3), (4, 6, 5), (3, 3, 3), (2, 2, 2), (0, 1, 0)),  # odd and non-square, RGB
    ((32, 32, 3), (8, 16), (4, 4), (2, 2), ("SAME", "VALID")),
    ((13, 17, 2), (5,), (3,), (1,), ("SAME",)),
    ((9, 9, 1), (4, 4, 4), (2, 3, 2), (1, 3, 1), (0, 1, 1)),
]


def _init(model, *args, seed=0):
    """Parameters for input ``x``: the shapes ``model.init`` would make, filled with NumPy
    normals (these tests are about structure, not the initializer; compiling JAX's threefry
    RNG for every new shape costs seconds on CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)


def _uniform(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _model(geometry, tied=True, activation="relu"):
    _, features, kernel_size, strides, padding = geometry
    return models.ConvAutoencoder(features, kernel_size, strides, padding, tied=tied,
                                  activation=activation)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("tied", [True, False])
def test_output_restores_the_input_shape(geometry, tied):
    shape = geometry[0]
    model = _model(geometry, tied)
    x = _uniform((2, *shape))
    params = _init(model, x, seed=1)
    out = model.apply({"params": params}, x)
    assert out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))


def test_encoder_sizes_of_the_default_model():
    assert models.layer_sizes((28, 28), (3, 3, 3), (2, 2, 2), (1, 1, 1)) == [
        (28, 28), (14, 14), (7, 7), (4, 4)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_each_decoder_layer_restores_its_encoder_layers_input(geometry):
    shape, features, kernel_size, strides, padding = geometry
    model = _model(geometry)
    x = jnp.zeros((1, *shape))
    params = _init(model, x, seed=0)
    _, state = model.apply({"params": params}, x, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    sizes = models.layer_sizes(shape[:2], kernel_size, strides, padding)
    for i in range(len(features)):
        enc_out = inter[f"encoder_{i}"]["__call__"][0]
        dec_out = inter[f"decoder_{i}"]["__call__"][0]
        assert enc_out.shape[1:3] == sizes[i + 1]
        assert dec_out.shape[1:3] == sizes[i]
        assert dec_out.shape[-1] == (shape[-1] if i == 0 else features[i - 1])


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
def test_tied_model_has_one_kernel_leaf_per_layer_and_the_expected_count(geometry):
    shape = geometry[0]
    x = jnp.zeros((1, *shape))
    tied = _init(_model(geometry, True), x, seed=0)
    untied = _init(_model(geometry, False), x, seed=0)
    n = len(geometry[1])
    for i in range(n):
        assert "kernel" in tied[f"encoder_{i}"] and "kernel" not in tied[f"decoder_{i}"]
        assert "bias" in tied[f"decoder_{i}"]  # own biases
        assert untied[f"decoder_{i}"]["kernel"].shape == untied[f"encoder_{i}"]["kernel"].shape
    kernels = sum(tied[f"encoder_{i}"]["kernel"].size for i in range(n))
    assert _count(untied) - _count(tied) == kernels
    # Hand count: every conv has k*k*C_in*C_out weights and C_out biases; each decoder C_in biases.
    _, features, ks, _, _ = geometry
    chans = [shape[-1], *features]
    expected = sum(k * k * a * b + b + a for k, a, b in zip(ks, chans[:-1], chans[1:]))
    assert _count(tied) == expected


def test_shipped_models_parameter_counts():
    x = jnp.zeros((1, 28, 28, 1))
    # configs/mnist_tied_bottleneck.yaml: 32, 64, 16 channels (4x4x16 code)
    geometry = GEOMETRIES[0]
    assert _count(jax.eval_shape(_model(geometry, True).init, jax.random.key(0), x)) == 28145
    assert _count(jax.eval_shape(_model(geometry, False).init, jax.random.key(0), x)) == 56081
    # configs/mnist_tied_wide.yaml: 32, 128 channels (7x7x128 code). Tied: kernels
    # 9*1*32 + 9*32*128, encoder biases 32 + 128, decoder biases 32 + 1; untied adds the kernels.
    geometry = ((28, 28, 1), (32, 128), (3, 3), (2, 2), (1, 1))
    kernels = 9 * 1 * 32 + 9 * 32 * 128
    tied = _count(jax.eval_shape(_model(geometry, True).init, jax.random.key(0), x))
    assert tied == kernels + 32 + 128 + 32 + 1 == 37345
    untied = _count(jax.eval_shape(_model(geometry, False).init, jax.random.key(0), x))
    assert untied == tied + kernels == 74497


def test_tied_kernel_gradient_is_the_sum_of_its_two_uses():
    """d loss / dK (tied) == d loss / dK_enc + d loss / dK_dec of an untied model whose decoder
    kernels are set equal to the encoder's: the leaf really is used twice."""
    geometry = GEOMETRIES[2]
    shape = geometry[0]
    x = _uniform((2, *shape), 3)
    tied_model, untied_model = _model(geometry, True), _model(geometry, False)
    tied = _init(tied_model, x, seed=0)
    untied = jax.tree.map(lambda a: a, _init(untied_model, x, seed=0))
    n = len(geometry[1])
    for i in range(n):  # same weights in both models
        untied[f"encoder_{i}"] = tied[f"encoder_{i}"]
        untied[f"decoder_{i}"] = {"kernel": tied[f"encoder_{i}"]["kernel"],
                                  "bias": tied[f"decoder_{i}"]["bias"]}

    def loss(model, params):
        return jnp.mean((jax.nn.sigmoid(model.apply({"params": params}, x)) - x) ** 2)

    np.testing.assert_allclose(loss(tied_model, tied), loss(untied_model, untied), rtol=1e-6)
    g_tied = jax.grad(lambda p: loss(tied_model, p))(tied)
    g_untied = jax.grad(lambda p: loss(untied_model, p))(untied)
    for i in range(n):
        both = g_untied[f"encoder_{i}"]["kernel"] + g_untied[f"decoder_{i}"]["kernel"]
        np.testing.assert_allclose(g_tied[f"encoder_{i}"]["kernel"], both, rtol=1e-4, atol=1e-7)
        # and neither use alone accounts for it
        assert not np.allclose(g_tied[f"encoder_{i}"]["kernel"],
                               g_untied[f"encoder_{i}"]["kernel"], rtol=1e-3, atol=1e-7)


def test_decoder_layer_is_the_adjoint_of_its_encoder_layer():
    """Linear parts only: <enc_i(x) - b, y> == <x, dec_i(y) - c> with the tied kernel."""
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
    enc = models.strided_conv(7, 3, 2, 1)
    dec = models.transposed_conv(5, 3, 2, 1, output_hw=(14, 13))
    x = jnp.asarray(rng.normal(size=(2, 14, 13, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 7, 7, 7)), jnp.float32)
    enc_params = {"kernel": k, "bias": jnp.zeros(7)}
    dec_params = _init(dec, y, k)
    assert set(dec_params) == {"bias"}
    cx = enc.apply({"params": enc_params}, x)
    cty = dec.apply({"params": dec_params}, y, k) - dec_params["bias"]
    lhs = np.vdot(np.asarray(cx, np.float64), np.asarray(y, np.float64))
    rhs = np.vdot(np.asarray(x, np.float64), np.asarray(cty, np.float64))
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1.0)
    np.testing.assert_allclose(cty, ops.conv_transpose(y, k, 2, 1, output_padding=(1, 0)),
                               rtol=1e-6)


def test_no_activation_on_the_code_layer():
    """With ReLU, a code layer passed through an activation would be >= 0; ours has negatives."""
    geometry = GEOMETRIES[0]
    model = _model(geometry)
    x = _uniform((4, 28, 28, 1))
    params = _init(model, x, seed=1)
    _, state = model.apply({"params": params}, x, capture_intermediates=True,
                           mutable=["intermediates"])
    code = state["intermediates"]["encoder_2"]["__call__"][0]
    hidden = state["intermediates"]["encoder_1"]["__call__"][0]
    assert float(code.min()) < 0  # linear code
    assert float(hidden.min()) < 0  # pre-activation output; the ReLU comes after it
    logits = model.apply({"params": params}, x)
    assert float(logits.min()) < 0 < float(logits.max())  # logits, not an activation


@pytest.mark.parametrize("code_activation", ["relu", "tanh"])
def test_code_activation_is_applied_to_the_code_and_nowhere_else(code_activation):
    """code_activation=f: encode gives f(the linear code), with the same parameters; decode is
    the same function of its input either way (the activation sits between the halves)."""
    geometry = GEOMETRIES[2]
    shape = geometry[0]
    linear = _model(geometry).clone(image_shape=shape)
    model = linear.clone(code_activation=code_activation)
    x = _uniform((3, *shape), 9)
    params = _init(linear, x, seed=3)
    assert jax.tree.structure(params) == jax.tree.structure(_init(model, x, seed=3))
    variables = {"params": params}
    code = linear.apply(variables, x, method="encode")
    assert float(code.min()) < 0  # so a ReLU would change it
    f = models.ACTIVATIONS[code_activation]
    np.testing.assert_allclose(model.apply(variables, x, method="encode"), f(code), rtol=1e-6)
    np.testing.assert_array_equal(model.apply(variables, code, method="decode"),
                                  linear.apply(variables, code, method="decode"))
    np.testing.assert_allclose(model.apply(variables, x),
                               linear.apply(variables, f(code), method="decode"), rtol=1e-5,
                               atol=1e-6)


def test_kernel_too_large_for_the_image_is_a_value_error():
    with pytest.raises(ValueError, match=r"encoder layer 2: kernel size 5 along H is larger than "
                                         r"the padded input 2\+0\+0=2"):
        models.layer_sizes((8, 8), (3, 3, 5), (2, 2, 2), (1, 1, 0))


# ----------------------------------------------------------------------------------------------
# encode / decode: the two halves, same parameter tree
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("tied", [True, False])
def test_decode_of_encode_is_call_exactly(geometry, tied):
    shape = geometry[0]
    model = _model(geometry, tied).clone(image_shape=shape)
    x = _uniform((2, *shape), 5)
    params = _init(_model(geometry, tied), x, seed=2)  # initialised without image_shape
    # image_shape changes nothing in the parameter tree: old checkpoints load as they are.
    assert jax.tree.structure(params) == jax.tree.structure(_init(model, x, seed=2))
    variables = {"params": params}
    code = model.apply(variables, x, method="encode")
    sizes = models.layer_sizes(shape[:2], *geometry[2:])
    assert code.shape == (2, *sizes[-1], geometry[1][-1])
    np.testing.assert_array_equal(model.apply(variables, code, method="decode"),
                                  model.apply(variables, x))


def _hand_encode(params, x, geometry):
    """The encoder written out with cae.ops from the parameter dict (ReLU, none on the code)."""
    _, features, ks, strides, padding = geometry
    for i in range(len(features)):
        x = ops.conv(x, params[f"encoder_{i}"]["kernel"], strides[i], padding[i])
        x = x + params[f"encoder_{i}"]["bias"]
        if i < len(features) - 1:
            x = jax.nn.relu(x)
    return x


def _hand_decode(params, code, geometry, tied):
    """The decoder written out with ops.conv_transpose from the parameter dict: layer i uses the
    encoder kernel (tied) and output_padding from layer i's input size."""
    shape, features, ks, strides, padding = geometry
    sizes = models.layer_sizes(shape[:2], ks, strides, padding)
    y = code
    for i in reversed(range(len(features))):
        kernel = params[f"encoder_{i}" if tied else f"decoder_{i}"]["kernel"]
        op = ops.output_padding_for(sizes[i], (ks[i], ks[i]), strides[i], padding[i])
        y = ops.conv_transpose(y, kernel, strides[i], padding[i], op)
        y = y + params[f"decoder_{i}"]["bias"]
        if i > 0:
            y = jax.nn.relu(y)
    return y


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("tied", [True, False])
def test_encode_and_decode_match_a_hand_built_ops_chain(geometry, tied):
    shape = geometry[0]
    model = _model(geometry, tied).clone(image_shape=shape)
    x = _uniform((3, *shape), 7)
    params = _init(model, x, seed=4)
    code = model.apply({"params": params}, x, method="encode")
    np.testing.assert_allclose(code, _hand_encode(params, x, geometry), rtol=1e-5, atol=1e-5)
    # Decode a code that is not any image's code (random), so decode is tested on its own.
    z = jnp.asarray(np.random.default_rng(8).normal(size=code.shape), jnp.float32)
    out = model.apply({"params": params}, z, method="decode")
    assert out.shape == (3, *shape)
    np.testing.assert_allclose(out, _hand_decode(params, z, geometry, tied), rtol=1e-5,
                               atol=1e-5)


def test_decode_needs_image_shape_and_a_code_of_the_right_shape():
    geometry = GEOMETRIES[0]
    x = jnp.zeros((1, 28, 28, 1))
    params = _init(_model(geometry), x)
    code = jnp.zeros((1, 4, 4, 16))
    with pytest.raises(ValueError, match="needs image_shape"):
        _model(geometry).apply({"params": params}, code, method="decode")
    model = _model(geometry).clone(image_shape=(28, 28, 1))
    with pytest.raises(ValueError, match=r"code of shape \(4, 4, 8\).*expected \(4, 4, 16\)"):
        model.apply({"params": params}, jnp.zeros((1, 4, 4, 8)), method="decode")
    with pytest.raises(ValueError, match=r"do not match the model's image_shape"):
        model.apply({"params": params}, jnp.zeros((1, 27, 27, 1)))
