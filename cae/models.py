"""Flax (Linen) modules: a strided-conv encoder and its transposed-conv decoder, tied or untied.

Encoder layer i is ``y = conv(x, K_i, s_i, p_i) + b_i``; decoder layer i (run in reverse order) is
``x' = conv_transpose(y', K_i', s_i, p_i, output_padding_i) + c_i`` where ``conv_transpose`` is
the exact adjoint of encoder layer i's conv (``cae.ops``). Both are the public layers
:class:`cae.nn.Conv` and :class:`cae.nn.ConvTranspose` (:func:`strided_conv`,
:func:`transposed_conv` give them this model's He-normal init), the ones a user ties the
same way. With ``tied=True``, ``K_i' = K_i``:
*the same parameter leaf* is read by both layers, so its gradient is the sum of both uses and the
model has exactly ``sum_i |K_i|`` fewer parameters than the untied one. ``output_padding_i`` is
chosen from encoder layer i's input size, so every decoder layer restores exactly that size
(28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28 for k=3, s=2, p=1).

``decoder`` picks how the decoder upsamples (:data:`DECODERS`):

* ``"mirror"`` (the default): the transposes above, tied or untied.
* ``"resize_conv"``: decoder layer i is ``x' = conv(nearest_resize(y', size_i), K_i', 1, SAME)
  + c_i``: nearest-neighbour upsampling to encoder layer i's input size, then a stride-1 conv
  (Odena, Dumoulin & Olah, Distill 2016). Every output pixel is reached by the same number of
  kernel taps (a k=3, s=2 transpose reaches them with 1, 2 or 4), so the layer cannot paint a
  checkerboard by construction. Its kernel ``[k, k, C_out_i, C_in_i]`` has as many numbers as
  the untied mirror's: the same parameter count, but no encoder kernel to share (not tied).
* ``"resize_conv_deep"``: ``resize_conv`` with, before each upsampling, a residual stride-1 conv
  at the coarser size, ``y' + g_i * conv(act(y'), R_i, 1, SAME)`` (:class:`Refine`: ``R_i``
  ``[k, k, F_i, F_i]`` He-normal, the scalar gate ``g_i`` starting at 0, so at initialisation it
  computes what ``resize_conv`` computes): more capacity where the maps are small, hence cheap.

A layer whose kernel covers its whole input (the fully connected code, ``code_size``) has no
spatial structure to upsample: every decoder decodes it with its ``W^T``-shaped transpose
(``resize_conv*``: a kernel of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cae import cpu_speed, ops
from cae import nn as cae_nn

__all__ = ["ConvAutoencoder", "strided_conv", "transposed_conv", "ResizeConv", "Refine",
           "ACTIVATIONS", "DECODERS", "TIEABLE_DECODERS", "layer_sizes", "layer_plan",
           "code_shape", "kernel_hw", "covers_input", "nearest_resize", "overlap_maps",
           "resize_conv_as_transpose"]

# model.decoder's names. Only "mirror" has an encoder kernel for each decoder layer to share.
DECODERS = ("mirror", "resize_conv", "resize_conv_deep")
TIEABLE_DECODERS = ("mirror",)

ACTIVATIONS = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "tanh": jnp.tanh,
}

# He-normal for the encoder: fan-in of conv(x, K) is kh * kw * C_in (kernel axes 0, 1, 2).
_encoder_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal",
                                                 in_axis=(0, 1, 2), out_axis=3)
# An untied decoder kernel has the encoder's HWIO shape but is applied as C^T, which reads the
# C_out axis: its fan-in is kh * kw * C_out (axes 0, 1, 3).
_decoder_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal",
                                                 in_axis=(0, 1, 3), out_axis=2)


def kernel_hw(kernel_size) -> tuple[int, int]:
    """A layer's kernel_size, k or (kh, kw) -> (kh, kw)."""
    return ((kernel_size, kernel_size) if isinstance(kernel_size, int)
            else tuple(int(k) for k in kernel_size))


def strided_conv(features: int, kernel_size, strides: int, padding, **kwargs) -> cae_nn.Conv:
    """Encoder layer: ``y = conv(x, kernel, strides, padding) + bias``, the public
    :class:`cae.nn.Conv` with He-normal kernel and zero bias. x: [N, H, W, C_in] ->
    [N, H', W', features]; kernel ``[kh, kw, C_in, features]``. ``kwargs``: Flax's (``name``)."""
    return cae_nn.Conv(features, kernel_hw(kernel_size), strides, padding,
                       kernel_init=_encoder_init, bias_init=nn.initializers.zeros, **kwargs)


def transposed_conv(features: int, kernel_size, strides: int, padding, output_hw,
                    impl: str = ops.DEFAULT_IMPL, **kwargs) -> cae_nn.ConvTranspose:
    """Decoder layer: ``x = conv_transpose(y, kernel, strides, padding, output_padding) + bias``,
    the public :class:`cae.nn.ConvTranspose`: the adjoint of a ``strided_conv(C_out, ...)``
    whose input had ``features`` channels and size ``output_hw``, which fixes the
    output_padding (a stride-s conv maps s input sizes to one output size).

    y: [N, H', W', C_out] -> [N, *output_hw, features]. Called as ``layer(y, kernel)``: the
    encoder's kernel (HWIO of the *forward* conv, ``[kh, kw, features, C_out]``) for tied
    weights; with None the layer owns one (He-normal over its fan-in kh * kw * C_out).
    """
    khw = kernel_hw(kernel_size)
    output_padding = ops.output_padding_for(output_hw, khw, strides, padding)
    return cae_nn.ConvTranspose(features, khw, strides, padding, output_padding,
                                kernel_init=_decoder_init, bias_init=nn.initializers.zeros,
                                impl=impl, **kwargs)


def nearest_resize(x: jax.Array, output_hw: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize, x: [N, h, w, C] -> [N, H, W, C]: output pixel i reads input
    pixel ``floor((i + 0.5) * h / H)`` (``jax.image.resize``'s "nearest"); an exact 2x copies
    each pixel into a 2x2 block. A gather, so its gradient is a scatter-add."""
    rows = (np.arange(output_hw[0]) + 0.5) * x.shape[1] / output_hw[0]
    cols = (np.arange(output_hw[1]) + 0.5) * x.shape[2] / output_hw[1]
    x = jnp.take(x, np.floor(rows).astype(np.int32), axis=1)
    return jnp.take(x, np.floor(cols).astype(np.int32), axis=2)


class ResizeConv(nn.Module):
    """``x = conv(nearest_resize(y, output_hw), kernel, 1, "SAME") + bias``: the resize-conv
    upsampling layer (Odena et al. 2016). y: [N, h, w, C_in] -> [N, *output_hw, features].
    The kernel [k, k, C_in, features] is He-normal like an encoder conv's. Same size in and
    out: no resize, a plain stride-1 conv."""

    features: int
    kernel_size: int | tuple[int, int]  # k (square) or (kh, kw)
    output_hw: tuple[int, int]

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _encoder_init,
                            (*kernel_hw(self.kernel_size), y.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        ratio = [o // i if o % i == 0 else 0 for o, i in zip(self.output_hw, y.shape[1:3])]
        if min(ratio) >= 1 and max(ratio) > 1:
            # An integer upsampling: the same numbers as a transposed conv (s*s times fewer
            # multiplications than convolving the upsampled map; see resize_conv_as_transpose).
            k, pads = resize_conv_as_transpose(kernel, ratio)
            return cpu_speed.add_bias(ops.conv_transpose(y, k, ratio, pads), bias)
        if tuple(y.shape[1:3]) != tuple(self.output_hw):
            y = nearest_resize(y, self.output_hw)
        return cpu_speed.add_bias(ops.conv(y, kernel, 1, "SAME"), bias)


class Refine(nn.Module):
    """``y + gate * conv(act(y), kernel, 1, "SAME")``, y: [N, h, w, C] -> the same shape: a
    residual stride-1 conv with a He-normal kernel and a scalar ``gate`` that starts at 0
    (ReZero, Bachlechner et al. 2021; SkipInit, De & Smith 2020), so the block starts as the
    identity. Why a gate rather than a zero kernel: Adam moves every weight by about the
    learning rate, so a zero-initialised kernel's first steps change its output by ~lr * fan-in
    (9 * C numbers, up to 1,152 here) and blow up at the default 5e-3; the gate is one number,
    whose step moves the branch's output by ~lr times a He-scaled conv."""

    kernel_size: int | tuple[int, int]
    activation: Any

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        branch = ResizeConv(y.shape[-1], self.kernel_size, tuple(y.shape[1:3]), name="conv")
        gate = self.param("gate", nn.initializers.zeros, ())
        return y + gate * branch(self.activation(y))


def resize_conv_as_transpose(kernel: jax.Array, strides: Sequence[int]):
    """A stride-1 "SAME" conv (kernel [kh, kw, C_in, C_out]) of a map nearest-upsampled by the
    integers ``strides`` (s_h, s_w) is a transposed conv: -> (its forward kernel
    [kh + s_h - 1, kw + s_w - 1, C_out, C_in], its padding ((P, Q), (P', Q'))) for
    ``ops.conv_transpose(y, kernel', strides, padding)``.

    Along one axis, with ``lo = (k - 1) // 2`` (SAME's padding before), output pixel i reads
    ``y[floor((i + j - lo) / s)]`` through tap j, so ``x[i] = sum_o y[o] K'[i - o*s + P]`` with
    ``K'[q] = sum of K[j] for lo - q + P <= j < lo - q + P + s``, ``P = k - 1 - lo``, and the
    output size s*h needs ``Q = lo``. The zero padding matches too: an upsampled pixel outside
    the map is a y outside [0, h), which the transposed conv takes as zero.
    """
    mats, pads = [], []
    for k, s in zip(kernel.shape[:2], strides):
        lo = (k - 1) // 2
        p = k - 1 - lo
        q = np.arange(k + s - 1)[:, None]
        j = np.arange(k)[None, :]
        mats.append(jnp.asarray((j >= lo - q + p) & (j < lo - q + p + s), kernel.dtype))
        pads.append((p, lo))
    folded = jnp.einsum("aj,bl,jlio->aboi", mats[0], mats[1], kernel)
    return folded, tuple(pads)


def covers_input(input_hw: Sequence[int], kernel_size, strides: int, padding) -> bool:
    """Whether an encoder layer's kernel spans its whole unpadded input (output 1x1): a fully
    connected layer, e.g. the ``code_size`` bottleneck."""
    khw = kernel_hw(kernel_size)
    pads = ops.resolve_padding(padding, input_hw, khw, strides)
    return tuple(khw) == tuple(int(v) for v in input_hw) and pads == ((0, 0), (0, 0))


class ConvAutoencoder(nn.Module):
    """Encoder of ``len(features)`` strided convs, decoder of their transposes, output logits.

    x: [N, H, W, C] in [0, 1] -> logits [N, H, W, C] (``sigmoid`` gives the reconstruction).
    ``kernel_size``, ``strides``, ``padding``: one entry per layer. ``activation`` between layers,
    ``code_activation`` on the code (the last encoder layer's output; "none": linear in the last
    conv), none on the logits.

    ``encode`` (x -> code [N, h, w, features[-1]]) and ``decode`` (code -> logits) are the two
    halves, e.g. ``model.apply(variables, x, method="encode")``; ``__call__`` is exactly
    ``decode(encode(x))``. A code's size does not determine the image size (a stride-s conv maps
    s input sizes to one output size), so ``decode`` needs ``image_shape`` = (H, W, C); ``__call__``
    and ``encode`` read it from their input and, when it is set, check it.

    ``code_size`` (None: no such layer) appends a *fully connected* bottleneck to the encoder: a
    VALID, stride-1 conv whose kernel covers the last conv's whole output map [h, w, F], giving a
    code [N, 1, 1, code_size]. A conv that covers its input is a matrix product
    ``code = flatten(x) @ W`` (W = the kernel reshaped to [h*w*F, code_size]), and its transpose
    is exactly ``W^T``; ``cae.ops`` runs both as one GEMM. Tied, the decoder's first layer reads
    the same W.
    """

    features: Sequence[int]
    kernel_size: Sequence[int]
    strides: Sequence[int]
    padding: Sequence[Any]
    tied: bool = True
    activation: str = "relu"
    code_activation: str = "none"
    impl: str = ops.DEFAULT_IMPL
    image_shape: tuple[int, int, int] | None = None
    code_size: int | None = None
    decoder: str = "mirror"  # one of DECODERS

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> logits [N, H, W, C]."""
        return self._run(x, encode=True, decode=True)

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> code [N, h, w, features[-1]] (after ``code_activation``)."""
        return self._run(x, encode=True, decode=False)

    def decode(self, code: jax.Array) -> jax.Array:
        """code: [N, h, w, features[-1]] -> logits [N, H, W, C] for ``image_shape`` (H, W, C)."""
        return self._run(code, encode=False, decode=True)

    @nn.compact
    def _run(self, x: jax.Array, *, encode: bool, decode: bool) -> jax.Array:
        # One compact method builds every layer with the same names (encoder_i, decoder_i) and
        # the same parameter tree whichever half runs, so one checkpoint serves all three methods.
        assert len(self.features) == len(self.kernel_size) == len(self.strides) == len(
            self.padding)
        act = ACTIVATIONS[self.activation]
        if encode:
            image_shape = tuple(x.shape[1:])
            if self.image_shape is not None and tuple(self.image_shape) != image_shape:
                raise ValueError(f"input images {image_shape} do not match the model's "
                                 f"image_shape {tuple(self.image_shape)}")
        elif self.image_shape is None:
            raise ValueError("ConvAutoencoder.decode needs image_shape=(H, W, C): a code's size "
                             "does not determine the image size")
        else:
            image_shape = tuple(self.image_shape)
        features, kernel_size, strides, padding = layer_plan(
            image_shape, self.features, self.kernel_size, self.strides, self.padding,
            self.code_size)
        n = len(features)
        sizes = layer_sizes(image_shape[:2], kernel_size, strides, padding)
        channels = [image_shape[-1], *features[:-1]]  # each encoder layer's input channels
        encoder = [strided_conv(features[i], kernel_size[i], strides[i], padding[i],
                                name=f"encoder_{i}") for i in range(n)]
        if encode:
            for i, layer in enumerate(encoder):
                x = layer(x)
                if i < n - 1:
                    x = act(x)
                elif self.code_activation != "none":
                    x = ACTIVATIONS[self.code_activation](x)
        elif tuple(x.shape[1:]) != (*sizes[-1], features[-1]):
            raise ValueError(f"code of shape {tuple(x.shape[1:])} does not fit this model: "
                             f"expected {(*sizes[-1], features[-1])}")
        if not decode:
            return x
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}: allowed are {DECODERS}")
        if self.tied and self.decoder not in TIEABLE_DECODERS:
            raise ValueError(f"decoder={self.decoder!r} has no encoder kernel to share: "
                             "tied=True needs decoder='mirror'")
        for i in reversed(range(n)):
            if self.decoder == "mirror" or covers_input(sizes[i], kernel_size[i], strides[i],
                                                        padding[i]):
                # Tied: hand decoder layer i the encoder's kernel leaf itself (not a copy), so
                # its gradient accumulates from both uses.
                kernel = encoder[i].variables["params"]["kernel"] if self.tied else None
                x = transposed_conv(channels[i], kernel_size[i], strides[i], padding[i],
                                    sizes[i], self.impl, name=f"decoder_{i}")(x, kernel)
                assert x.shape[1:3] == tuple(sizes[i]), (x.shape, sizes[i])
            else:
                if self.decoder == "resize_conv_deep":
                    # Refine at the coarse size, where a conv is s*s times cheaper than after
                    # the upsampling; zero-initialised so training starts from resize_conv.
                    x = Refine(kernel_size[i], act, name=f"decoder_{i}_refine")(x)
                x = ResizeConv(channels[i], kernel_size[i], sizes[i], name=f"decoder_{i}")(x)
            if i > 0:
                x = act(x)
        return x


def layer_plan(image_shape: Sequence[int], features: Sequence[int], kernel_size: Sequence[Any],
                strides: Sequence[int], padding: Sequence[Any], code_size: int | None):
    """The encoder's layers as (features, kernel_size, strides, padding) lists, with the fully
    connected bottleneck of ``code_size`` appended (kernel = the last conv's output size, VALID,
    stride 1); unchanged when ``code_size`` is None."""
    features, kernel_size = list(features), list(kernel_size)
    strides, padding = list(strides), list(padding)
    if code_size is not None:
        last_hw = layer_sizes(image_shape[:2], kernel_size, strides, padding)[-1]
        features.append(int(code_size))
        kernel_size.append(tuple(last_hw))
        strides.append(1)
        padding.append(0)
    return features, kernel_size, strides, padding


def code_shape(image_shape: Sequence[int], features: Sequence[int], kernel_size: Sequence[Any],
               strides: Sequence[int], padding: Sequence[Any],
               code_size: int | None = None) -> tuple[int, int, int]:
    """The code's shape (h, w, C) for images of ``image_shape`` (H, W, C); its number of values,
    h * w * C, is what a PCA baseline of the same size keeps. Raises ``ValueError`` as
    :func:`layer_sizes` does."""
    features, kernel_size, strides, padding = layer_plan(
        image_shape, features, kernel_size, strides, padding, code_size)
    h, w = layer_sizes(image_shape[:2], kernel_size, strides, padding)[-1]
    return int(h), int(w), int(features[-1])


def layer_sizes(input_hw: Sequence[int], kernel_size: Sequence[Any], strides: Sequence[int],
                padding: Sequence[Any]) -> list[tuple[int, int]]:
    """Spatial sizes through the encoder, input first: e.g. [(28, 28), (14, 14), (7, 7), (4, 4)].

    kernel_size: per layer, k (square) or (kh, kw). Raises ``ValueError`` (from ``cae.ops``)
    naming the layer if a kernel does not fit.
    """
    sizes = [tuple(int(v) for v in input_hw)]
    for i, (k, s, p) in enumerate(zip(kernel_size, strides, padding)):
        hw = sizes[-1]
        khw = kernel_hw(k)
        pads = ops.resolve_padding(p, hw, khw, s)
        try:
            ops.check_kernel_fits(hw, khw, pads)
        except ValueError as err:
            raise ValueError(f"encoder layer {i}: {err} (sizes so far: {sizes})") from None
        sizes.append(tuple(ops.conv_output_size(size, kk, s, pad)
                           for size, kk, pad in zip(hw, khw, pads)))
    return sizes


def overlap_maps(image_shape: Sequence[int], features: Sequence[int], kernel_size: Sequence[Any],
                 strides: Sequence[int], padding: Sequence[Any], code_size: int | None = None,
                 decoder: str = "mirror") -> list[tuple[int, np.ndarray]]:
    """How many kernel taps reach each output pixel of each spatial decoder layer: the layer's
    linear part with an all-ones kernel (one channel) applied to an all-ones input.

    -> [(i, map [H_i, W_i] float32)] for decoder layers i = n-1 .. 0 (the order they run), the
    fully connected code layer left out (it has no spatial structure). A k=3, s=2 transpose gives
    1, 2 and 4 taps in a checkerboard; k=4, s=2 gives 4 everywhere inside; a resize-conv gives
    k*k everywhere inside (fewer at the border, where SAME pads with zeros).
    """
    features, kernel_size, strides, padding = layer_plan(
        image_shape, features, kernel_size, strides, padding, code_size)
    sizes = layer_sizes(image_shape[:2], kernel_size, strides, padding)
    maps = []
    for i in reversed(range(len(features))):
        if covers_input(sizes[i], kernel_size[i], strides[i], padding[i]):
            continue
        khw = kernel_hw(kernel_size[i])
        ones_in = jnp.ones((1, *sizes[i + 1], 1), jnp.float32)
        ones_k = jnp.ones((*khw, 1, 1), jnp.float32)
        if decoder == "mirror":
            op = ops.output_padding_for(sizes[i], khw, strides[i], padding[i])
            out = ops.conv_transpose(ones_in, ones_k, strides[i], padding[i], op)
        else:
            out = ops.conv(nearest_resize(ones_in, sizes[i]), ones_k, 1, "SAME")
        maps.append((i, np.asarray(out[0, :, :, 0])))
    return maps
