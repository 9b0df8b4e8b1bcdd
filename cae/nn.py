"""Flax layers over :mod:`cae.ops` (Linen: ``Conv``, ``ConvTranspose``; NNX: ``NNXConv``,
``NNXConvTranspose``), with PyTorch's constructor meaning.

``Conv`` and ``ConvTranspose`` are PyTorch's ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` in
channels-last layout: the number of spatial dims is ``len(kernel_size)`` (an int
``kernel_size`` means "every spatial axis of the input"), and ``features`` is PyTorch's
``out_channels`` (the input channels are read from the input, as Flax does). ``stride``,
``padding``, ``output_padding``, ``dilation`` and ``groups`` mean exactly what they mean in
PyTorch (``padding`` also takes per-axis ``(lo, hi)`` pairs and ``"SAME"``/``"VALID"``).
Initialisation is PyTorch's default: kernel and bias uniform in ``+-1/sqrt(fan_in)``.

Both layers store the *forward* conv's kernel, ``[*k, C_in // groups, C_out]``:

* ``Conv(features=C_out)``: kernel ``[*k, C_in // groups, C_out]``;
* ``ConvTranspose(features=F)`` on y with ``C`` channels: kernel ``[*k, F // groups, C]``, the
  kernel of the conv ``F -> C`` it is the transpose of. So a ``ConvTranspose`` can *tie* to a
  ``Conv``: pass the conv's kernel, ``ConvTranspose(...)(y, kernel=conv_kernel)``, and the two
  layers read one parameter (its gradient is the sum of both uses).

Porting weights (``kernel_from_torch``): PyTorch's ``Conv{N}d.weight`` is ``[C_out,
C_in // g, *k]`` and ``ConvTranspose{N}d.weight`` is ``[C_in, C_out // g, *k]`` (its own input
first); both become ours by the same axis move, ``[*k, axis 1, axis 0]``, with no flip: PyTorch
computes the same cross-correlation and the same adjoint. ``Conv.from_torch`` /
``ConvTranspose.from_torch`` turn a whole torch layer into ``(module, variables)``. Keras'
``Conv{N}D`` and ``Conv{N}DTranspose`` kernels are already in our layout (TensorFlow's filter
layouts are ``[*k, in, out]`` and ``[*k, out, in]``), unchanged; ``Conv.from_keras`` /
``ConvTranspose.from_keras`` turn a built Keras layer into ``(module, variables)``, its
``padding``/``output_padding`` translated. Flax's ``Conv`` kernel is ours; its ``ConvTranspose``
kernel is ours only with ``transpose_kernel=True``, else rotated by 180 degrees with the last two
axes swapped (:func:`kernel_from_flax_conv_transpose`); ``ConvTranspose.from_flax`` converts
the module, translating lax's padding (:func:`padding_from_lax`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cae import cpu_speed, ops

__all__ = ["Conv", "ConvTranspose", "NNXConv", "NNXConvTranspose", "kernel_from_torch",
           "kernel_to_torch", "kernel_from_flax_conv_transpose", "padding_from_lax",
           "torch_uniform"]


def torch_uniform(fan_in_axes: Sequence[int]) -> Callable:
    """PyTorch's default init for conv weights and biases: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    (``kaiming_uniform_(a=sqrt(5))`` reduces to this), fan_in = the product of the kernel's
    ``fan_in_axes``. The bias uses the kernel's fan_in, passed as ``fan_in_axes`` of its shape
    by the layers."""

    def init(key, shape, dtype=jnp.float32, fan_in=None):
        n = fan_in if fan_in is not None else math.prod(shape[a] for a in fan_in_axes)
        bound = 1.0 / math.sqrt(max(n, 1))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _spatial(kernel_size, rank: int, name: str = "kernel_size") -> tuple[int, ...]:
    nd = rank - 2
    if isinstance(kernel_size, int):
        return (kernel_size,) * nd
    k = tuple(int(v) for v in kernel_size)
    if len(k) != nd:
        raise ValueError(f"{name}={kernel_size!r} has {len(k)} entries but the input has {nd} "
                         f"spatial dims (rank {rank})")
    return k


def kernel_from_torch(weight) -> np.ndarray:
    """A PyTorch ``Conv{N}d`` weight ``[C_out, C_in // g, *k]`` or ``ConvTranspose{N}d`` weight
    ``[C_in, C_out // g, *k]`` (a tensor or array) -> our kernel ``[*k, axis 1, axis 0]``."""
    w = np.asarray(weight.detach().cpu().numpy() if hasattr(weight, "detach") else weight)
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def kernel_to_torch(kernel) -> np.ndarray:
    """The inverse of :func:`kernel_from_torch`: ``[*k, I, O] -> [O, I, *k]``."""
    k = np.asarray(kernel)
    nd = k.ndim - 2
    return np.transpose(k, (nd + 1, nd, *range(nd)))


def kernel_from_flax_conv_transpose(kernel, transpose_kernel: bool = False) -> np.ndarray:
    """A Flax ``ConvTranspose`` kernel -> ours ``[*k, features, C_y]``.

    With ``transpose_kernel=True`` Flax's kernel already is the forward conv's (ours, unchanged).
    With Flax's default ``False`` it is the kernel lax convolves the dilated ``y`` with,
    ``[*k, C_y, features]``, which is the forward kernel rotated by 180 degrees over space with
    its last two axes swapped (the gather recipe, ``ops.gather_kernel``). That map is its own
    inverse, so this function also converts ours to Flax's."""
    k = np.asarray(kernel)
    if transpose_kernel:
        return k
    nd = k.ndim - 2
    return np.swapaxes(k[(slice(None, None, -1),) * nd], -1, -2)


def padding_from_lax(padding, kernel_size: Sequence[int], stride, dilation=1):
    """``lax.conv_transpose``'s padding (Flax ``ConvTranspose``'s; ``use_consistent_padding``
    False, the default) -> ours ``(padding, output_padding)`` for the same output.

    ``"SAME"`` (output ``H' * s``) is our ``"SAME"`` with output_padding ``s - 1``. ``"VALID"``
    (output ``H' * s + max(k' - s, 0)``, k' the dilated kernel extent) is padding 0 with
    output_padding ``max(s - k', 0)``. Integers / ``(a, b)`` pairs are the padding of the
    dilated ``y`` before the convolution (``ops.gather_padding``): ours is ``lo = k' - 1 - a``
    and ``hi - output_padding = k' - 1 - b``. ValueError when no PyTorch-style geometry equals
    it (a negative ``lo``, an output_padding ``>= max(s, d)``)."""
    nd = len(kernel_size)
    s = ops._ntuple(stride, nd, "stride")
    d = ops._ntuple(dilation, nd, "dilation")
    ke = [ops._effective(int(k), dd) for k, dd in zip(kernel_size, d)]
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return "SAME", tuple(ss - 1 for ss in s)
        if mode == "VALID":
            return 0, tuple(max(ss - e, 0) for ss, e in zip(s, ke))
        raise ValueError(f"padding={padding!r}: only 'SAME', 'VALID', ints and (lo, hi) pairs "
                         "have a cae.ops equivalent")
    if isinstance(padding, int):
        pairs = [(padding, padding)] * nd
    else:
        pairs = [(int(p), int(p)) if isinstance(p, int) else tuple(int(v) for v in p)
                 for p in padding]
    if len(pairs) != nd:
        raise ValueError(f"padding={padding!r} has {len(pairs)} entries for {nd} spatial dims")
    pads, op = [], []
    for (a, b), e, ss, dd in zip(pairs, ke, s, d):
        lo, hi = e - 1 - a, e - 1 - b
        extra = max(-hi, 0)  # a negative hi is output_padding
        if lo < 0 or extra >= max(ss, dd):
            raise ValueError(f"padding={padding!r}: lax's padding ({a}, {b}) of a kernel of "
                             f"extent {e}, stride {ss} has no PyTorch-style equivalent "
                             "(padding >= 0, output_padding < max(stride, dilation))")
        pads.append((lo, hi + extra))
        op.append(extra)
    return tuple(pads), tuple(op)


def _keras_config(layer) -> dict:
    cfg = layer.get_config()
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise ValueError(f"data_format={cfg['data_format']!r}: only 'channels_last' layers "
                         "convert (ours are channels-last)")
    if not layer.built:
        raise ValueError("the Keras layer is not built: call it once (or .build) so it has "
                         "weights")
    return cfg


def _keras_variables(layer, use_bias: bool) -> dict:
    weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
    params = {"kernel": jnp.asarray(weights[0])}
    if use_bias:
        params["bias"] = jnp.asarray(weights[1])
    return {"params": params}


def _torch_padding(m):
    if isinstance(m.padding, str):  # torch's 'same' (stride 1 only) and 'valid'
        return m.padding.upper()
    return tuple(int(p) for p in m.padding)


def _check_zeros_mode(m):
    mode = getattr(m, "padding_mode", "zeros")
    if mode != "zeros":
        raise ValueError(f"padding_mode={mode!r}: only 'zeros' has a cae.ops equivalent")


def _variables(m, dtype=np.float32):
    params = {"kernel": jnp.asarray(kernel_from_torch(m.weight), dtype)}
    if m.bias is not None:
        params["bias"] = jnp.asarray(m.bias.detach().cpu().numpy(), dtype)
    return {"params": params}


class Conv(nn.Module):
    """``y = conv(x, kernel) + bias``: PyTorch's ``Conv{N}d`` on channels-last input.

    x: [N, *spatial, C_in] -> [N, *spatial', features]. Parameters: ``kernel``
    ``[*k, C_in // groups, features]``, ``bias`` ``[features]`` (if ``use_bias``).
    """

    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Any = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Callable | None = None  # default: PyTorch's (torch_uniform)
    bias_init: Callable | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = _spatial(self.kernel_size, x.ndim)
        nd = len(k)
        if x.shape[-1] % self.groups:
            raise ValueError(f"groups={self.groups}: the input's C_in={x.shape[-1]} is not "
                             f"divisible by groups")
        shape = (*k, x.shape[-1] // self.groups, self.features)
        fan_in = math.prod(shape[:-1])
        kernel = self.param("kernel", self.kernel_init or torch_uniform(range(nd + 1)), shape,
                            self.param_dtype)
        y = ops.conv(x, kernel, self.stride, self.padding, dilation=self.dilation,
                     groups=self.groups)
        return _with_bias(self, y, fan_in)

    @classmethod
    def from_torch(cls, m) -> tuple[Conv, dict]:
        """A ``torch.nn.Conv{1,2,3}d`` -> ``(Conv, variables)`` computing the same numbers on
        channels-last input (``padding_mode`` must be ``'zeros'``)."""
        _check_zeros_mode(m)
        module = cls(m.out_channels, tuple(m.kernel_size), tuple(m.stride), _torch_padding(m),
                     tuple(m.dilation), m.groups, m.bias is not None)
        return module, _variables(m)

    @classmethod
    def from_keras(cls, layer) -> tuple[Conv, dict]:
        """A built Keras ``Conv{1,2,3}D`` (channels-last) -> ``(Conv, variables)`` computing the
        same numbers: its kernel as is, ``"valid"``/``"same"`` as our ``"VALID"``/``"SAME"``
        (TensorFlow's rule), ``"causal"`` as ``(k' - 1, 0)``."""
        cfg = _keras_config(layer)
        k, d = tuple(cfg["kernel_size"]), tuple(cfg["dilation_rate"])
        padding = cfg["padding"].upper()
        if padding == "CAUSAL":
            padding = tuple((ops._effective(kk, dd) - 1, 0) for kk, dd in zip(k, d))
        module = cls(cfg["filters"], k, tuple(cfg["strides"]), padding, d,
                     cfg.get("groups", 1), cfg["use_bias"])
        return module, _keras_variables(layer, cfg["use_bias"])


def _with_bias(layer: nn.Module, out: jax.Array, fan_in: int) -> jax.Array:
    """``out + bias`` for a Linen layer with ``use_bias`` (PyTorch's init from ``fan_in``), else
    ``out``. cpu_speed.add_bias: the same sum, its gradient summed in an order XLA:CPU runs
    faster."""
    if not layer.use_bias:
        return out
    init = layer.bias_init or (lambda key, s, dt: torch_uniform(())(key, s, dt, fan_in))
    return cpu_speed.add_bias(out, layer.param("bias", init, (layer.features,),
                                               layer.param_dtype))


class ConvTranspose(nn.Module):
    """``x = conv_transpose(y, kernel) + bias``: PyTorch's ``ConvTranspose{N}d`` on
    channels-last input, the exact adjoint of the conv ``features -> C`` with the same
    geometry.

    y: [N, *spatial', C] -> [N, *spatial, features],
    ``spatial = (spatial' - 1) * stride - 2 * padding + dilation * (k - 1) + 1 + output_padding``.
    ``kernel``: ``[*k, features // groups, C]`` (the forward conv's): pass one to tie this
    layer to a ``Conv``'s kernel; if None, the layer owns a ``kernel`` parameter of that shape.
    """

    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Any = 0
    output_padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Callable | None = None  # default: PyTorch's (torch_uniform)
    bias_init: Callable | None = None
    param_dtype: Any = jnp.float32
    impl: str = ops.DEFAULT_IMPL

    @nn.compact
    def __call__(self, y: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        k = _spatial(self.kernel_size, y.ndim)
        nd = len(k)
        if self.features % self.groups:
            raise ValueError(f"groups={self.groups}: features={self.features} is not divisible "
                             f"by groups")
        shape = (*k, self.features // self.groups, y.shape[-1])
        # PyTorch's fan_in for ConvTranspose: weight.size(1) * prod(k) = (features / g) * prod(k).
        fan_in = math.prod(shape[:-1])
        if kernel is None:
            kernel = self.param("kernel", self.kernel_init or torch_uniform(range(nd + 1)),
                                shape, self.param_dtype)
        elif tuple(kernel.shape) != shape:
            raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not fit: this layer "
                             f"needs [*k, features // groups, C_y] = {shape}")
        x = ops.conv_transpose(y, kernel, self.stride, self.padding, self.output_padding,
                               dilation=self.dilation, groups=self.groups, impl=self.impl)
        return _with_bias(self, x, fan_in)

    @classmethod
    def from_torch(cls, m) -> tuple[ConvTranspose, dict]:
        """A ``torch.nn.ConvTranspose{1,2,3}d`` -> ``(ConvTranspose, variables)`` computing
        the same numbers on channels-last input (``padding_mode`` must be ``'zeros'``)."""
        _check_zeros_mode(m)
        module = cls(m.out_channels, tuple(m.kernel_size), tuple(m.stride), _torch_padding(m),
                     tuple(m.output_padding), tuple(m.dilation), m.groups, m.bias is not None)
        return module, _variables(m)

    @classmethod
    def from_keras(cls, layer) -> tuple[ConvTranspose, dict]:
        """A built Keras ``Conv{1,2,3}DTranspose`` (channels-last) -> ``(ConvTranspose,
        variables)`` computing the same numbers. Its kernel ``[*k, filters, C_y]`` is ours as is.
        Keras' output size is ``(H' - 1) s + k' - 2 pad + output_padding`` with pad 0
        (``"valid"``) or ``k' // 2`` (``"same"``), and ``H' s`` for ``"same"`` without
        output_padding: the adjoint of TensorFlow's ``"SAME"`` conv on that size, i.e. our
        ``"SAME"`` with output_padding ``k' - 2 (k' // 2) + output_padding - 1`` (``s - 1``
        without)."""
        cfg = _keras_config(layer)
        k, s, d = (tuple(cfg[key]) for key in ("kernel_size", "strides", "dilation_rate"))
        op = cfg.get("output_padding")
        padding = cfg["padding"].upper()
        if padding == "VALID":
            out_pad = (0,) * len(k) if op is None else tuple(op)
        elif op is None:
            out_pad = tuple(ss - 1 for ss in s)
        else:
            ke = [ops._effective(kk, dd) for kk, dd in zip(k, d)]
            out_pad = tuple(e - 2 * (e // 2) + o - 1 for e, o in zip(ke, op))
            if min(out_pad) < 0:
                raise ValueError(f"output_padding={tuple(op)!r} with padding='same' and an "
                                 f"even kernel {k}: Keras' output is one pixel smaller than "
                                 "any SAME geometry gives; use output_padding >= 1")
        module = cls(cfg["filters"], k, s, padding, out_pad, d, 1, cfg["use_bias"])
        return module, _keras_variables(layer, cfg["use_bias"])

    @classmethod
    def from_flax(cls, module, params: dict) -> tuple[ConvTranspose, dict]:
        """A Flax Linen ``nn.ConvTranspose`` and its ``params`` (``{"kernel", "bias"}``) ->
        ``(ConvTranspose, variables)`` computing the same numbers: the kernel through
        :func:`kernel_from_flax_conv_transpose`, the padding through :func:`padding_from_lax`."""
        k = tuple(module.kernel_size)
        s = module.strides or 1
        d = module.kernel_dilation or 1
        padding, op = padding_from_lax(module.padding, k, s, d)
        ours = cls(module.features, k, s, padding, op, d, 1, module.use_bias)
        out = {"kernel": jnp.asarray(kernel_from_flax_conv_transpose(
            params["kernel"], module.transpose_kernel))}
        if module.use_bias:
            out["bias"] = jnp.asarray(params["bias"])
        return ours, {"params": out}


# ----------------------------------------------------------------------------------------------
# Flax NNX
# ----------------------------------------------------------------------------------------------


def _nnx_kernel_size(kernel_size, num_spatial_dims: int) -> tuple[int, ...]:
    if isinstance(kernel_size, int):
        return (kernel_size,) * num_spatial_dims
    return tuple(int(k) for k in kernel_size)


def _nnx_params(shape: tuple[int, ...], out_features: int, use_bias: bool, rngs: nnx.Rngs,
                param_dtype) -> tuple[nnx.Param, nnx.Param | None]:
    """(kernel of ``shape``, bias [out_features] or None) with PyTorch's default init, whose
    fan_in is the product of all kernel axes but the last for both layer kinds."""
    fan_in = math.prod(shape[:-1])
    init = torch_uniform(())
    kernel = nnx.Param(init(rngs.params(), shape, param_dtype, fan_in))
    bias = (nnx.Param(init(rngs.params(), (out_features,), param_dtype, fan_in))
            if use_bias else None)
    return kernel, bias


def _load_torch(layer: nnx.Module, m) -> nnx.Module:
    """``layer`` with the torch module ``m``'s weights (converted to our layout) -> ``layer``."""
    for name, value in _variables(m)["params"].items():
        getattr(layer, name)[...] = value
    return layer


class NNXConv(nnx.Module):
    """PyTorch's ``Conv{N}d(in_features, out_features, kernel_size, stride, padding, dilation,
    groups, bias)`` as a Flax NNX module on channels-last input. N = ``len(kernel_size)``, or
    ``num_spatial_dims`` (default 2) for an int ``kernel_size``. ``self.kernel``:
    ``nnx.Param`` ``[*k, in_features // groups, out_features]``; ``self.bias``:
    ``[out_features]`` or None."""

    def __init__(self, in_features: int, out_features: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, use_bias: bool = True, *, rngs: nnx.Rngs,
                 num_spatial_dims: int = 2, param_dtype=jnp.float32):
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups}: in_features={in_features} and "
                             f"out_features={out_features} must both be divisible by groups")
        k = _nnx_kernel_size(kernel_size, num_spatial_dims)
        shape = (*k, in_features // groups, out_features)
        self.kernel, self.bias = _nnx_params(shape, out_features, use_bias, rngs, param_dtype)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ops.conv(x, self.kernel[...], self.stride, self.padding, dilation=self.dilation,
                     groups=self.groups)
        return y if self.bias is None else cpu_speed.add_bias(y, self.bias[...])

    @classmethod
    def from_torch(cls, m, *, rngs: nnx.Rngs | None = None) -> NNXConv:
        """A ``torch.nn.Conv{1,2,3}d`` -> ``NNXConv`` with its weights."""
        _check_zeros_mode(m)
        layer = cls(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                    _torch_padding(m), tuple(m.dilation), m.groups, m.bias is not None,
                    rngs=rngs or nnx.Rngs(0))
        return _load_torch(layer, m)


class NNXConvTranspose(nnx.Module):
    """PyTorch's ``ConvTranspose{N}d(in_features, out_features, kernel_size, stride, padding,
    output_padding, groups, bias, dilation)`` as a Flax NNX module on channels-last input.
    ``self.kernel``: ``nnx.Param`` ``[*k, out_features // groups, in_features]``, the kernel of
    the conv ``out_features -> in_features`` it is the adjoint of. Tie it to an ``NNXConv``
    ``c`` by sharing the parameter: ``layer.kernel = c.kernel`` (one ``nnx.Param``, two uses)."""

    def __init__(self, in_features: int, out_features: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, use_bias: bool = True, dilation=1, *,
                 rngs: nnx.Rngs, num_spatial_dims: int = 2, param_dtype=jnp.float32,
                 impl: str = ops.DEFAULT_IMPL):
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups}: in_features={in_features} and "
                             f"out_features={out_features} must both be divisible by groups")
        k = _nnx_kernel_size(kernel_size, num_spatial_dims)
        shape = (*k, out_features // groups, in_features)
        # PyTorch's fan_in here: (out_features / groups) * prod(k), the same product.
        self.kernel, self.bias = _nnx_params(shape, out_features, use_bias, rngs, param_dtype)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation, self.groups, self.impl = dilation, groups, impl

    def __call__(self, y: jax.Array) -> jax.Array:
        x = ops.conv_transpose(y, self.kernel[...], self.stride, self.padding,
                               self.output_padding, dilation=self.dilation, groups=self.groups,
                               impl=self.impl)
        return x if self.bias is None else cpu_speed.add_bias(x, self.bias[...])

    @classmethod
    def from_torch(cls, m, *, rngs: nnx.Rngs | None = None) -> NNXConvTranspose:
        """A ``torch.nn.ConvTranspose{1,2,3}d`` -> ``NNXConvTranspose`` with its weights."""
        _check_zeros_mode(m)
        layer = cls(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                    _torch_padding(m), tuple(m.output_padding), m.groups, m.bias is not None,
                    tuple(m.dilation), rngs=rngs or nnx.Rngs(0))
        return _load_torch(layer, m)
