"""The rows of docs/ops.md's conversion table that no other test executes: ``lax.conv_transpose``
(both padding readings, ``use_consistent_padding``) and Flax's ``nn.ConvTranspose`` (both kernel
conventions, integer and "SAME" padding) against ``ops.conv_transpose`` with our kernel.
PyTorch's rows: tests/test_ops_nd.py and tests/test_nn.py; TensorFlow/Keras': the same files
and tests/test_ops.py."""

from __future__ import annotations

import inspect

import flax.linen as linen
import numpy as np
import pytest
from jax import lax

from cae import ops

HAS_CONSISTENT = "use_consistent_padding" in inspect.signature(lax.conv_transpose).parameters

# (y spatial, k, s, p, d): symmetric forward padding p, dilation d (2-D, per axis)
GEOMETRIES = [((5, 4), (3, 3), (2, 2), (1, 1), (1, 1)),
              ((4, 6), (4, 3), (2, 3), (1, 0), (1, 1)),
              ((3, 5), (3, 2), (3, 1), (2, 1), (2, 3))]


def _arrays(y_sp, k, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((2, *y_sp, 5)).astype(np.float32)
    kernel = rng.standard_normal((*k, 3, 5)).astype(np.float32)  # ours: [*k, C_in, C_out=5]
    return y, kernel


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)


@pytest.mark.skipif(not HAS_CONSISTENT, reason="use_consistent_padding needs JAX >= 0.9")
@pytest.mark.parametrize("y_sp,k,s,p,d", GEOMETRIES)
def test_lax_conv_transpose_consistent_padding_is_pytorchs(y_sp, k, s, p, d):
    """lax.conv_transpose(y, K, s, [(p, p)], rhs_dilation=d, transpose_kernel=True,
    use_consistent_padding=True) == ours with padding p and output_padding 0 (PyTorch's
    reading; lax has no output_padding)."""
    y, kernel = _arrays(y_sp, k)
    want = lax.conv_transpose(y, kernel, s, [(pp, pp) for pp in p], rhs_dilation=d,
                              dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True,
                              use_consistent_padding=True)
    _close(ops.conv_transpose(y, kernel, s, p, 0, dilation=d), want)


@pytest.mark.parametrize("y_sp,k,s,p,d", GEOMETRIES)
@pytest.mark.parametrize("op", [0, 1])
def test_lax_conv_transpose_default_padding_is_the_gather_padding(y_sp, k, s, p, d, op):
    """With integer padding and use_consistent_padding=False (the default), lax pads the
    zero-inserted y itself: ours with (p, op) == lax with ops.gather_padding(k, p, op, d)."""
    op = tuple(min(op, ss - 1) for ss in s)
    y, kernel = _arrays(y_sp, k, 1)
    pads = [(pp, pp) for pp in p]
    want = lax.conv_transpose(y, kernel, s, ops.gather_padding(k, pads, op, d), rhs_dilation=d,
                              dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
    _close(ops.conv_transpose(y, kernel, s, pads, op, dilation=d), want)


@pytest.mark.parametrize("y_sp,k,s", [((5, 4), (3, 3), (2, 2)), ((4, 3), (2, 5), (3, 2)),
                                      ((3, 3), (4, 1), (1, 3))])
def test_lax_and_flax_same_is_ours_with_output_padding_stride_minus_one(y_sp, k, s):
    """"SAME" (lax and Flax alike, either padding reading): H = H' * s, i.e. our "SAME" with
    output_padding s - 1 (TF/Keras' convention)."""
    y, kernel = _arrays(y_sp, k, 2)
    ours = ops.conv_transpose(y, kernel, s, "SAME", tuple(ss - 1 for ss in s))
    want = lax.conv_transpose(y, kernel, s, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                              transpose_kernel=True)
    _close(ours, want)
    flax_ct = linen.ConvTranspose(3, k, s, padding="SAME", transpose_kernel=True, use_bias=False)
    _close(flax_ct.apply({"params": {"kernel": kernel}}, y), ours)


@pytest.mark.parametrize("y_sp,k,s,p,d", GEOMETRIES)
def test_flax_conv_transpose_kernels_and_integer_padding(y_sp, k, s, p, d):
    """Flax's nn.ConvTranspose: with transpose_kernel=True its kernel [*k, features, C_y] is
    ours as is; with False (the default) it is ours rotated 180 degrees with the last two axes
    swapped. Its padding is lax's default reading: the gather padding, which carries our
    output_padding on the high side."""
    y, kernel = _arrays(y_sp, k, 3)
    op = tuple(ss - 1 for ss in s)
    pads = [(pp, pp) for pp in p]
    ours = ops.conv_transpose(y, kernel, s, pads, op, dilation=d)
    flax_pad = [tuple(v) for v in ops.gather_padding(k, pads, op, d)]
    tied = linen.ConvTranspose(3, k, s, padding=flax_pad, kernel_dilation=d,
                               transpose_kernel=True, use_bias=False)
    _close(tied.apply({"params": {"kernel": kernel}}, y), ours)
    flax_kernel = np.swapaxes(kernel[::-1, ::-1], -1, -2)  # [*k, C_y, features], unflipped
    plain = linen.ConvTranspose(3, k, s, padding=flax_pad, kernel_dilation=d, use_bias=False)
    _close(plain.apply({"params": {"kernel": flax_kernel}}, y), ours)


def test_flax_conv_kernel_is_ours():
    """Flax's nn.Conv (cross-correlation, [*k, C_in / groups, C_out], feature_group_count) is
    ops.conv with the same kernel and padding."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 8, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    layer = linen.Conv(4, (3, 2), (2, 1), padding=[(1, 1), (0, 1)], kernel_dilation=(2, 1),
                       feature_group_count=2, use_bias=False)
    want = layer.apply({"params": {"kernel": kernel}}, x)
    _close(ops.conv(x, kernel, (2, 1), ((1, 1), (0, 1)), dilation=(2, 1), groups=2), want)
    assert want.shape == (2, 4, 8, 4)


# Flax ConvTranspose modules converted whole: (y spatial, k, s, d, Flax padding).
FLAX_MODULES = [((5, 4), (3, 3), (2, 2), (1, 1), "SAME"),
                ((4, 5), (4, 2), (2, 3), (1, 1), "SAME"),
                ((3, 4), (3, 3), (2, 1), (2, 1), "SAME"),
                ((5, 4), (3, 3), (2, 2), (1, 1), "VALID"),
                ((4, 3), (2, 1), (3, 2), (1, 1), "VALID"),  # kernel smaller than the stride
                ((4, 3), (3, 2), (2, 2), (1, 1), 1),
                ((4, 3), (3, 3), (2, 2), (2, 1), [(2, 3), (1, 2)]),
                ((6,), (5,), (3,), (1,), "SAME"),
                ((3, 2, 3), (3, 2, 2), (2, 2, 1), (1, 1, 1), "VALID")]


@pytest.mark.parametrize("transpose_kernel", [False, True])
@pytest.mark.parametrize("y_sp,k,s,d,padding", FLAX_MODULES)
def test_conv_transpose_from_flax_computes_the_same_numbers(y_sp, k, s, d, padding,
                                                            transpose_kernel):
    """cae.nn.ConvTranspose.from_flax: kernel (either convention) and lax's padding (SAME,
    VALID, ints, pairs; 1-, 2- and 3-D) converted; the outputs equal Flax's."""
    import jax

    from cae import nn as cnn

    rng = np.random.default_rng(5)
    y = rng.standard_normal((2, *y_sp, 5)).astype(np.float32)
    flax_layer = linen.ConvTranspose(3, k, s, padding=padding, kernel_dilation=d,
                                     transpose_kernel=transpose_kernel)
    params = flax_layer.init(jax.random.key(0), y)["params"]
    params = {**params, "bias": rng.standard_normal(3).astype(np.float32)}
    want = flax_layer.apply({"params": params}, y)
    ours, variables = cnn.ConvTranspose.from_flax(flax_layer, params)
    got = ours.apply(variables, y)
    assert got.shape == want.shape
    _close(got, want)
    # the kernel map is its own inverse
    back = cnn.kernel_from_flax_conv_transpose(variables["params"]["kernel"], transpose_kernel)
    np.testing.assert_array_equal(back, params["kernel"])


def test_padding_from_lax_refuses_what_has_no_pytorch_geometry():
    from cae import nn as cnn

    with pytest.raises(ValueError, match=r"padding=\[\(3, 0\)\]: lax's padding \(3, 0\) of a "
                                         r"kernel of extent 3"):
        cnn.padding_from_lax([(3, 0)], (3,), 2)  # lo = 3 - 1 - 3 < 0: a crop, not a padding
    with pytest.raises(ValueError, match=r"padding='CIRCULAR': only 'SAME', 'VALID'"):
        cnn.padding_from_lax("CIRCULAR", (3,), 2)
    # hi = 3 - 1 - 4 = -2: two pixels of output_padding, allowed for stride 3, not for 2
    assert cnn.padding_from_lax([(2, 4)], (3,), 3) == (((0, 0),), (2,))
    with pytest.raises(ValueError, match=r"output_padding < max\(stride, dilation\)"):
        cnn.padding_from_lax([(2, 4)], (3,), 2)
