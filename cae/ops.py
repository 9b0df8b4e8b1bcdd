"""Strided 2-D convolution ``C`` and its exact adjoint ``C^T`` (the transposed convolution).

Layouts are Flax's: activations NHWC, kernels HWIO (``[kh, kw, C_in, C_out]``).

The one idea in this file
-------------------------
A strided convolution is a linear map ``y = C x``. Written out (cross-correlation, as every
DL framework computes it), with explicit padding ``(lo, hi)`` per spatial axis::

    y[n, o, co] = sum_{j, ci} x[n, o*s - lo + j, ci] * K[j, ci, co]      (o = 0 .. H'-1)
    H' = floor((H + lo + hi - k) / s) + 1

Its adjoint ``x = C^T y`` satisfies ``<C x, y> = <x, C^T y>`` for all x, y, which gives::

    x[n, i, ci] = sum_{o, co} y[n, o, co] * K[i - o*s + lo, ci, co]

Every name the field uses for this operator is one of three equivalent recipes for it:

* *scatter* (col2im): each ``y[o]`` times the kernel, accumulated into ``x`` at offset ``o*s - lo``;
* *gather* ("fractionally strided convolution", Theano's ``conv2d_grad_wrt_inputs``, TF's
  ``conv2d_backprop_input``): insert ``s - 1`` zeros between the entries of ``y``, pad it by
  ``k - 1 - lo`` before and ``k - 1 - hi + output_padding`` after (a "full" convolution), and
  cross-correlate with the kernel rotated by 180 degrees with its in/out channels swapped.
  Substituting ``j' = k - 1 - j`` in the sum above shows why: the flip turns the scatter into a
  gather, the zero insertion puts each ``y[o]`` at position ``o*s``, and the padding ``k - 1 - lo``
  re-aligns position 0 of ``x`` with the first tap that touches it;
* *sub-pixel*: the same gather split by output phase ``i mod s`` into ``s*s`` ordinary stride-1
  convolutions of the undilated ``y`` with the kernel's phase sub-kernels (never touches zeros).

Input sizes ``H`` that map to the same ``H'`` form a run of ``s`` consecutive integers (the
floor in the formula above). The transposed convolution cannot know which one was meant;
``output_padding`` in ``[0, s)`` picks it, exactly as PyTorch's ``ConvTranspose2d`` does::

    H = (H' - 1) * s - (lo + hi) + k + output_padding

``output_padding_for`` computes the value that restores a given input size.

"SAME" and "VALID"
------------------
``"VALID"`` is explicit padding ``(0, 0)``. ``"SAME"`` is TensorFlow's rule: ``H' = ceil(H / s)``
with total padding ``max((H' - 1) * s + k - H, 0)``, the odd pixel going *after*. That padding
depends on ``H``, so ``conv_transpose(..., padding="SAME", output_padding=p)`` first recovers
``H = (H' - 1) * s + 1 + p`` (``p`` again indexes the ``s`` sizes with the same ``H'``; TF's and
Keras' ``Conv2DTranspose`` default ``H = H' * s`` is ``p = s - 1``), then resolves the explicit
padding of the forward "SAME" conv on that ``H`` and transposes that.

Implementations of ``conv_transpose``
-------------------------------------
``"lax"``: ``jax.lax.conv_transpose`` (zero insertion via ``lhs_dilation``) with a custom VJP.
``"subpixel"``: the phase decomposition, with the same custom VJP.
``"subpixel_phasewise"``: the same forward, differentiated phase by phase (each phase's
stride-1 conv has its own custom VJP; the backward is s*s stride-1 convs, never a strided one).
``"phase"``: all phases as one im2col matmul, with a matmul VJP (kept for comparison).
``"zero_insertion"``: the gather recipe written out (``lax.pad`` with interior padding, then a
stride-1 conv), with the same custom VJP as "lax"; compiles where ``lax.conv_transpose`` makes
XLA:CPU abort.
All compute the same operator; the tests run every identity against each. ``conv_transpose``
picks one with ``impl=``; the default, ``"auto"``, picks per layer shape (``choose_impl``,
from the measurements in BENCHMARKS.md).

A conv that covers its input (a fully connected layer)
------------------------------------------------------
When the kernel spans the whole unpadded input (``kh = H``, ``kw = W``, no padding) the output is
1x1 and the sum above has one term per input entry: ``y[n, co] = sum_{i, ci} x[n, i, ci] K[i, ci,
co]``, i.e. ``y = flatten(x) @ W`` with ``W = K.reshape(kh*kw*C_in, C_out)``, and ``C^T = W^T``:
``x = (y @ W^T).reshape(N, kh, kw, C_in)`` (``output_padding`` must be 0: it would add rows no
tap reaches). ``conv`` and ``conv_transpose(impl="auto")`` run that geometry as one GEMM:
XLA:CPU's convolution of a 7x7x64 map by a 7x7 kernel ran at half the speed of the same product
as a matmul (BENCHMARKS.md, issue 15).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cae import cpu_speed

__all__ = [
    "conv",
    "conv_transpose",
    "conv_transpose_autodiff",
    "conv_output_size",
    "conv_transpose_output_size",
    "output_padding_for",
    "resolve_padding",
    "IMPLEMENTATIONS",
    "choose_impl",
]

Pair = tuple[int, int]
PaddingLike = str | int | Sequence[int] | Sequence[Sequence[int]]
_DN = ("NHWC", "HWIO", "NHWC")

# jax-ml/jax#32267 / PR #32268 (2025): `lax.conv_transpose` gained `use_consistent_padding`.
# With it False (or on JAX versions that predate it), explicit integer padding is the padding of
# the *transposed* (dilated) convolution itself, which is what we compute and pass below. We
# always pass explicit pads and pin that reading here instead of relying on a default that has
# changed; tests/test_ops.py checks the result against independent references either way.
_CT_KWARGS = (
    {"use_consistent_padding": False}
    if "use_consistent_padding" in inspect.signature(lax.conv_transpose).parameters
    else {}
)


# ----------------------------------------------------------------------------------------------
# Argument normalisation and shape arithmetic
# ----------------------------------------------------------------------------------------------


def _as_int(v, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return int(v)


def _pair(v, name: str) -> Pair:
    """int | (a, b) -> (a, b) of Python ints."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return (int(v), int(v))
    if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2:
        return (_as_int(v[0], name), _as_int(v[1], name))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _strides(strides) -> Pair:
    s = _pair(strides, "strides")
    if min(s) < 1:
        raise ValueError(f"strides={strides!r}: each stride must be >= 1")
    return s


def _kernel_hw(kernel) -> Pair:
    if getattr(kernel, "ndim", None) != 4:
        raise ValueError(
            f"kernel must have rank 4 [kh, kw, C_in, C_out] (HWIO), got shape "
            f"{getattr(kernel, 'shape', None)}"
        )
    return (int(kernel.shape[0]), int(kernel.shape[1]))


def _same_pads(size: int, k: int, s: int) -> Pair:
    """TensorFlow's "SAME": out = ceil(size / s); the odd padding pixel goes after."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2)


def resolve_padding(padding: PaddingLike, input_hw: Sequence[int], kernel_hw: Sequence[int],
                    strides) -> tuple[Pair, Pair]:
    """Any accepted padding spec -> ``((top, bottom), (left, right))`` of the forward conv.

    ``padding``: ``int | (ph, pw) | ((top, bottom), (left, right)) | "SAME" | "VALID"``.
    ``input_hw`` is the forward conv's input size (needed only for ``"SAME"``).
    """
    sh, sw = _strides(strides)
    kh, kw = (int(k) for k in kernel_hw)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            return (_same_pads(int(input_hw[0]), kh, sh), _same_pads(int(input_hw[1]), kw, sw))
        raise ValueError(f"padding={padding!r}: allowed strings are 'SAME' and 'VALID'")
    try:
        if isinstance(padding, Sequence) and len(padding) == 2 and all(
            isinstance(p, Sequence) and not isinstance(p, str) for p in padding
        ):
            pads = (_pair(padding[0], "padding"), _pair(padding[1], "padding"))
        else:
            ph, pw = _pair(padding, "padding")
            pads = ((ph, ph), (pw, pw))
    except ValueError:
        raise ValueError(
            f"padding={padding!r}: allowed are an int, (ph, pw), ((top, bottom), (left, right)), "
            "'SAME' or 'VALID'"
        ) from None
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"padding={padding!r}: every padding amount must be >= 0")
    return pads


def conv_output_size(size: int, kernel_size: int, stride: int, pad: Pair) -> int:
    """Forward conv along one axis: ``floor((size + lo + hi - k) / s) + 1``."""
    return (size + pad[0] + pad[1] - kernel_size) // stride + 1


def conv_transpose_output_size(size: int, kernel_size: int, stride: int, pad: Pair,
                               output_padding: int = 0) -> int:
    """Transposed conv along one axis: ``(size - 1) * s - (lo + hi) + k + output_padding``."""
    return (size - 1) * stride - (pad[0] + pad[1]) + kernel_size + output_padding


def output_padding_for(input_hw: Sequence[int], kernel_hw: Sequence[int], strides,
                       padding: PaddingLike) -> Pair:
    """The ``output_padding`` that makes ``conv_transpose`` restore ``input_hw`` exactly.

    For a forward ``conv`` with input spatial size ``input_hw``, returns ``(op_h, op_w)`` such
    that ``conv_transpose(conv(x, k, s, p), k, s, p, output_padding=...)`` has ``x``'s size.
    Example: k=3, s=2, p=1: 7 -> 4 -> 7 needs 0; 14 -> 7 -> 14 needs 1.
    """
    s = _strides(strides)
    hw = tuple(int(v) for v in input_hw)
    kernel_hw = tuple(int(v) for v in kernel_hw)
    pads = resolve_padding(padding, hw, kernel_hw, s)
    out = []
    for size, k, st, pad in zip(hw, kernel_hw, s, pads):
        if size + pad[0] + pad[1] < k:
            raise ValueError(
                f"kernel size {k} is larger than the padded input {size}+{pad[0]}+{pad[1]}"
            )
        small = conv_transpose_output_size(conv_output_size(size, k, st, pad), k, st, pad)
        if isinstance(padding, str) and padding.upper() == "SAME":
            # SAME's own indexing (see module docstring): H = (H' - 1) * s + 1 + op.
            small = (conv_output_size(size, k, st, pad) - 1) * st + 1
        out.append(size - small)
    return (out[0], out[1])


def _transpose_geometry(y_hw: Sequence[int], kernel_hw: Pair, strides: Pair,
                        padding: PaddingLike, output_padding) -> tuple[tuple[Pair, Pair], Pair]:
    """Resolve conv_transpose's arguments to the forward conv's explicit pads and the explicit
    output_padding, validating ranges. Returns ``(pads, output_padding)``."""
    op = _pair(output_padding, "output_padding")
    if any(not 0 <= o < s for o, s in zip(op, strides)):
        raise ValueError(
            f"output_padding={output_padding!r} out of range: need 0 <= output_padding < "
            f"strides={strides} per axis"
        )
    if isinstance(padding, str) and padding.upper() == "SAME":
        # Which forward input size is meant: H = (H' - 1) * s + 1 + op (module docstring).
        x_hw = [(h - 1) * s + 1 + o for h, s, o in zip(y_hw, strides, op)]
        pads = resolve_padding(padding, x_hw, kernel_hw, strides)
        op = tuple(
            x - conv_transpose_output_size(h, k, s, p)
            for x, h, k, s, p in zip(x_hw, y_hw, kernel_hw, strides, pads)
        )
    else:
        pads = resolve_padding(padding, (0, 0), kernel_hw, strides)
    for h, k, s, p, o, axis in zip(y_hw, kernel_hw, strides, pads, op, "HW"):
        if conv_transpose_output_size(h, k, s, p, o) < 1:
            raise ValueError(
                f"conv_transpose output {axis} would be "
                f"{conv_transpose_output_size(h, k, s, p, o)} < 1 for input {axis}={h}, "
                f"kernel {k}, stride {s}, padding {p}: reduce the padding"
            )
    return pads, (int(op[0]), int(op[1]))


def _check_input(a, name: str):
    if getattr(a, "ndim", None) != 4:
        raise ValueError(f"{name} must have rank 4 [N, H, W, C], got shape {jnp.shape(a)}")


def _accum_type(*arrays):
    """bf16/f16 inputs accumulate in f32 (the result is cast back)."""
    dt = jnp.result_type(*arrays)
    return jnp.float32 if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32 else None


# ----------------------------------------------------------------------------------------------
# Forward convolution C
# ----------------------------------------------------------------------------------------------


def _conv_explicit(x, kernel, strides: Pair, pads: tuple[Pair, Pair]):
    acc = _accum_type(x, kernel)
    out = lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=pads, dimension_numbers=_DN,
        preferred_element_type=acc,
    )
    return out.astype(jnp.result_type(x, kernel))


def conv(x: jax.Array, kernel: jax.Array, strides=1, padding: PaddingLike = 0) -> jax.Array:
    """2-D cross-correlation ``y = C x`` (what DL frameworks call conv).

    x: [N, H, W, C_in]; kernel: [kh, kw, C_in, C_out] (HWIO); strides: int | (sh, sw);
    padding: int | (ph, pw) | ((top, bottom), (left, right)) | "SAME" | "VALID".
    Returns y: [N, H', W', C_out], ``H' = floor((H + top + bottom - kh) / sh) + 1``.
    ``lax.conv_general_dilated`` with a custom VJP: ``conv_transpose`` for the input, a
    canonical-layout backward-filter conv for the kernel (fast inside ``lax.scan`` on CPU too).
    """
    _check_input(x, "x")
    khw = _kernel_hw(kernel)
    s = _strides(strides)
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"channel mismatch: x has C_in={x.shape[-1]} but kernel [kh, kw, C_in, C_out] has "
            f"C_in={kernel.shape[2]}"
        )
    pads = resolve_padding(padding, x.shape[1:3], khw, s)
    for size, k, p, axis in zip(x.shape[1:3], khw, pads, "HW"):
        if size + p[0] + p[1] < k:
            raise ValueError(
                f"kernel size {k} along {axis} is larger than the padded input "
                f"{size}+{p[0]}+{p[1]}={size + p[0] + p[1]}: need kernel <= padded input"
            )
    if _covers_input(x.shape[1:3], khw, pads):
        return _dense_conv(x, kernel)
    return _conv(x, kernel, s, pads)


def _covers_input(in_hw: Sequence[int], kernel_hw: Sequence[int],
                  pads: tuple[Pair, Pair]) -> bool:
    """True when a conv with this geometry is a fully connected layer (module docstring)."""
    return tuple(in_hw) == tuple(kernel_hw) and all(p == (0, 0) for p in pads)


def _dense_conv(x, kernel):
    """x: [N, kh, kw, C_in] -> [N, 1, 1, C_out]: conv of a kernel covering x, as one GEMM.
    Plain jnp ops: their autodiff is the transposed GEMMs, exact and fast."""
    w = kernel.reshape(-1, kernel.shape[3])
    y = jnp.dot(x.reshape(x.shape[0], -1), w, preferred_element_type=_accum_type(x, kernel))
    return y.astype(jnp.result_type(x, kernel)).reshape(x.shape[0], 1, 1, -1)


def _dense_conv_transpose(y, kernel):
    """y: [N, 1, 1, C_out] -> [N, kh, kw, C_in] = (y @ W^T), the adjoint of ``_dense_conv``."""
    kh, kw, c_in, c_out = kernel.shape
    x = jnp.dot(y.reshape(y.shape[0], c_out), kernel.reshape(-1, c_out).T,
                preferred_element_type=_accum_type(y, kernel))
    return x.astype(jnp.result_type(y, kernel)).reshape(y.shape[0], kh, kw, c_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides: Pair, pads: tuple[Pair, Pair]):
    return _conv_explicit(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
    return _conv_explicit(x, kernel, strides, pads), (x, kernel)


def _conv_cotangents(strides, pads, x, kernel, g, x_for_kernel):
    """The input cotangent is C^T g (the transposed conv, with the output padding that gives
    back x's size); the kernel cotangent is the correlation of ``x_for_kernel`` (x's value)
    with g. Same values as JAX's autodiff of ``lax.conv_general_dilated``, but in a layout that
    stays fast inside ``lax.scan`` on CPU (see ``_kernel_cotangent``)."""
    khw = _kernel_hw(kernel)
    op = output_padding_for(x.shape[1:3], khw, strides, pads)  # rows no output window reached
    # C^T g by whichever form is fastest for this shape (as for conv_transpose's default).
    c_transpose = _FORWARD_ONLY[choose_impl(kernel.shape, strides)]
    g_x = c_transpose(g, kernel, strides, pads, op).astype(x.dtype)
    g_k = _kernel_cotangent(x_for_kernel, g, khw, strides, pads, kernel.dtype)
    return g_x, g_k


def _conv_bwd(strides, pads, res, g):
    x, kernel = res
    return _conv_cotangents(strides, pads, x, kernel, g, cpu_speed.materialize(x))


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _phase_conv(y, sub_kernel, pads: tuple[Pair, Pair]):
    """One phase of the sub-pixel form: a stride-1 ``_conv`` whose backward skips
    ``cpu_speed.materialize`` (its input is a slice of the layer's y, and four identity convs
    per layer cost more than they save: BENCHMARKS.md, issue 6)."""
    return _conv_explicit(y, sub_kernel, (1, 1), pads)


_phase_conv.defvjp(
    lambda y, sub_kernel, pads: (_conv_explicit(y, sub_kernel, (1, 1), pads), (y, sub_kernel)),
    lambda pads, res, g: _conv_cotangents((1, 1), pads, *res, g, res[0]),
)


# ----------------------------------------------------------------------------------------------
# Transposed convolution C^T, "lax" implementation
# ----------------------------------------------------------------------------------------------


def _dilated_pads(kernel_hw: Pair, pads: tuple[Pair, Pair], op: Pair) -> list[Pair]:
    # The "full" padding of the gather form: k - 1 - lo before, k - 1 - hi + output_padding after
    # (negative values crop, which lax supports). See the module docstring for the derivation.
    return [(k - 1 - p[0], k - 1 - p[1] + o) for k, p, o in zip(kernel_hw, pads, op)]


def _conv_transpose_lax_fwd_only(y, kernel, strides, pads, op):
    acc = _accum_type(y, kernel)
    out = lax.conv_transpose(
        y, kernel, strides, _dilated_pads(_kernel_hw(kernel), pads, op),
        dimension_numbers=_DN,
        transpose_kernel=True,  # rotate 180 degrees and swap I/O: the kernel of C, used for C^T
        preferred_element_type=acc, **_CT_KWARGS,
    )
    return out.astype(jnp.result_type(y, kernel))


def _kernel_cotangent(x, g, kernel_hw: Pair, strides: Pair, pads: tuple[Pair, Pair], dtype):
    """``dK[j, ci, co] = sum_{n, o} x_pad[n, o*s + j, ci] * g[n, o, co]``: the kernel gradient.

    It is the same sum for both operators: for ``y = conv(x, K)`` with cotangent ``g`` of y, and
    for ``x = conv_transpose(y, K)`` with cotangent ``g`` of x (there: ``x := g``, ``g := y``;
    from ``x[i] = sum_o y[o] K[i - o*s + lo]``, ``dK[j] = sum_o g[o*s - lo + j] y[o]``).
    x: [N, H, W, C_in]; g: [N, H', W', C_out]; pads: x's padding before, ``lo`` per axis (rows
    after the last tap, e.g. those output_padding added, are cropped).
    Returns ``[kh, kw, C_in, C_out]``.

    It is one stride-1 "backward-filter" convolution: over space, x (batch and channels
    swapped: C_in is the batch, N the contracted feature) correlated with g as the kernel,
    dilated by ``s`` (g's taps are ``s`` apart in x). The swaps are explicit transposes so that
    the convolution itself has the canonical NHWC/HWIO layout: written with dimension numbers
    instead (``("CHWN", "IHWO", "HWNC")``), XLA:CPU runs it ~50-100x slower inside a while loop,
    i.e. inside ``lax.scan`` over training steps, than outside one (measured: 290 vs 4.6 ms at
    14x14x32 -> 7x7x64, batch 128); with the transposes it is as fast in both places (~5 ms).
    """
    acc = _accum_type(x, g)
    out_hw = g.shape[1:3]
    # Crop x's padding after the last tap so the correlation is exactly k long.
    full = [(p[0], (o - 1) * s + k - size - p[0])
            for p, o, s, k, size in zip(pads, out_hw, strides, kernel_hw, x.shape[1:3])]
    dk = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),  # [C_in, H, W, N]
        jnp.transpose(g, (1, 2, 0, 3)),  # [H', W', N, C_out]
        window_strides=(1, 1), padding=full, rhs_dilation=strides,
        dimension_numbers=_DN, preferred_element_type=acc,
    )  # [C_in, kh, kw, C_out]
    assert dk.shape[1:3] == tuple(kernel_hw), (dk.shape, kernel_hw)
    return jnp.transpose(dk, (1, 2, 0, 3)).astype(dtype)


def _conv_transpose_zero_insertion_fwd_only(y, kernel, strides, pads, op):
    """The gather recipe written out: ``lax.pad`` inserts the s - 1 zeros (interior padding) and
    adds the "full" padding (negative amounts crop), then one stride-1 VALID correlation with the
    kernel rotated by 180 degrees and I/O-swapped. Same numbers as the "lax" form, but no
    ``lhs_dilation``: XLA:CPU's algebraic simplifier aborts the process (a CHECK failure,
    "Window dimensions do not match RHS shape") on ``lax.conv_transpose`` for some geometries,
    e.g. y [2, 5, 3, 3], K [2, 4, 2, 3], strides (2, 3), padding ((1, 1), (3, 0)),
    output_padding (0, 2) (jaxlib 0.10.2); this form compiles for all of them."""
    acc = _accum_type(y, kernel)
    (ph, pw), (sh, sw) = _dilated_pads(_kernel_hw(kernel), pads, op), strides
    zero = jnp.zeros((), y.dtype)
    yd = lax.pad(y, zero, [(0, 0, 0), (ph[0], ph[1], sh - 1), (pw[0], pw[1], sw - 1), (0, 0, 0)])
    out = lax.conv_general_dilated(yd, kernel[::-1, ::-1].transpose(0, 1, 3, 2), (1, 1),
                                   "VALID", dimension_numbers=_DN, preferred_element_type=acc)
    return out.astype(jnp.result_type(y, kernel))


def _with_vjp(forward, backward):
    """``forward(y, kernel, strides, pads, op)`` as a ``jax.custom_vjp`` (strides, pads, op static)
    that keeps ``(y, kernel)`` for ``backward(strides, pads, op, (y, kernel), g)``."""
    fn = jax.custom_vjp(forward, nondiff_argnums=(2, 3, 4))
    fn.defvjp(lambda y, kernel, *geometry: (forward(y, kernel, *geometry), (y, kernel)), backward)
    return fn


def _conv_transpose_bwd(strides, pads, op, res, g):
    y, kernel = res
    # Cotangent for y: (C^T)^T g = C g, i.e. the forward strided conv of g, same kernel/pads.
    # No zeros are inserted anywhere: this is as cheap as the encoder's own conv.
    g_y = _conv_explicit(g, kernel, strides, pads).astype(y.dtype)
    # Not cpu_speed.materialize(y), as ops.conv's backward does for its x: measured in the
    # default training
    # step (lax.scan), it made the step ~5 % slower although an isolated decoder step got ~12 %
    # faster (BENCHMARKS.md, issue 6).
    g_k = _kernel_cotangent(g, y, _kernel_hw(kernel), strides, pads, kernel.dtype)
    return g_y, g_k


# The backward pass is the same math whatever computed the forward: every impl but "phase"
# shares it.
_conv_transpose_lax = _with_vjp(_conv_transpose_lax_fwd_only, _conv_transpose_bwd)
_conv_transpose_zero_insertion = _with_vjp(_conv_transpose_zero_insertion_fwd_only,
                                           _conv_transpose_bwd)


# ----------------------------------------------------------------------------------------------
# Transposed convolution C^T, "subpixel" implementation
# ----------------------------------------------------------------------------------------------


def _subpixel_axis_plan(k: int, s: int, lo: int, n_in: int, n_out: int):
    """Per-phase plan along one axis for the sub-pixel form.

    Output position ``i = q*s + r`` (phase r) receives ``y[o] K[j]`` with ``j = i - o*s + lo``,
    i.e. taps ``j = j0 + m*s`` (``j0 = (r + lo) mod s``) meeting ``o = q + c - m`` with
    ``c = (r + lo - j0) / s``. So phase r is a stride-1 correlation of y with the sub-kernel
    ``K[j0::s]`` reversed, with y padded so that output q reads ``y[q + c - M + 1 .. q + c]``.
    Returns a list over r of ``(j0, taps M, pad_before, pad_after, n_q)``.
    """
    plan = []
    for r in range(s):
        n_q = -(-(n_out - r) // s) if n_out > r else 0  # number of q with q*s + r < n_out
        j0 = (r + lo) % s
        m = len(range(j0, k, s))
        c = (r + lo - j0) // s
        # Correlation output q reads padded-y indices q .. q+M-1 == y[q + c - M + 1 .. q + c].
        before = m - 1 - c
        after = (n_q - 1 + c) - (n_in - 1) if n_q > 0 else 0
        plan.append((j0, m, before, after, n_q))
    return plan


def _subpixel(y, kernel, strides, pads, op, phase_conv):
    """C^T y as s_h*s_w stride-1 convs ``phase_conv(y_crop, sub_kernel, pads)`` of the
    undilated y, interleaved (depth-to-space)."""
    n, h, w, _ = y.shape
    kh, kw, c_in, _ = kernel.shape
    sh, sw = strides
    out_h = conv_transpose_output_size(h, kh, sh, pads[0], op[0])
    out_w = conv_transpose_output_size(w, kw, sw, pads[1], op[1])
    plan_h = _subpixel_axis_plan(kh, sh, pads[0][0], h, out_h)
    plan_w = _subpixel_axis_plan(kw, sw, pads[1][0], w, out_w)
    dtype = jnp.result_type(y, kernel)
    # Phases share a common q-grid: pad every phase's output to the max count, then interleave.
    q_h = -(-out_h // sh)
    q_w = -(-out_w // sw)
    rows = []
    for (j0h, mh, bh, ah, nqh) in plan_h:
        cols = []
        for (j0w, mw, bw, aw, nqw) in plan_w:
            if mh == 0 or mw == 0 or nqh == 0 or nqw == 0:
                cols.append(jnp.zeros((n, q_h, q_w, c_in), dtype))
                continue
            # Sub-kernel for this phase, flipped (gather) and I/O swapped: [mh, mw, C_out, C_in].
            sub = kernel[j0h::sh, j0w::sw][::-1, ::-1].transpose(0, 1, 3, 2)
            # Negative pads mean "drop those rows of y": slice rather than pass negative
            # padding to XLA (its CPU conv mis-handled that for C_out > 1 in our tests).
            yy = y[:, max(-bh, 0):h - max(-ah, 0), max(-bw, 0):w - max(-aw, 0)]
            part = phase_conv(yy, sub, ((max(bh, 0), max(ah, 0)), (max(bw, 0), max(aw, 0))))
            part = jnp.pad(part, ((0, 0), (0, q_h - nqh), (0, q_w - nqw), (0, 0)))
            cols.append(part)
        rows.append(jnp.stack(cols, axis=3))  # [N, q_h, q_w, sw, C]
    z = jnp.stack(rows, axis=2)  # [N, q_h, sh, q_w, sw, C]
    z = z.reshape(n, q_h * sh, q_w * sw, c_in)
    return z[:, :out_h, :out_w]


def _conv_transpose_subpixel_fwd_only(y, kernel, strides, pads, op):
    return _subpixel(y, kernel, strides, pads, op,
                     lambda yy, sub, p: _conv_explicit(yy, sub, (1, 1), p))


_conv_transpose_subpixel = _with_vjp(_conv_transpose_subpixel_fwd_only, _conv_transpose_bwd)


def _conv_transpose_subpixel_phasewise(y, kernel, strides, pads, op):
    """The sub-pixel form differentiated phase by phase: every operation in it is linear and
    each phase conv has the canonical-layout custom VJP (``_phase_conv``), so JAX's autodiff of
    it *is* the adjoint of each phase, summed: the input cotangent is s_h*s_w stride-1 convs of
    g's phase sub-images (not one strided conv over the full g) and the kernel cotangent s_h*s_w
    stride-1 backward-filter convs, each filling its own phase's taps. Faster than the shared
    backward where the stride divides the kernel (every phase has the same taps: k=4, s=2),
    slower in the default model's k=3 training step (BENCHMARKS.md, issue 6)."""
    return _subpixel(y, kernel, strides, pads, op, _phase_conv)


# ----------------------------------------------------------------------------------------------
# Transposed convolution C^T, "phase" implementation (one GEMM per pass)
# ----------------------------------------------------------------------------------------------

# Below this many combined output channels (s_h * s_w * C_in) a GEMM is too thin to pay for the
# im2col copy; the forward then uses one stride-1 XLA conv with the combined kernel, and the
# backward the "lax" formulas (strided conv, backward-filter conv). Measured on 2 CPU cores
# (BENCHMARKS.md, issue 6): C_in = 1 (dec3) is faster that way, C_in >= 16 with the GEMMs.
_PHASE_GEMM_MIN_CHANNELS = 16


def _phase_axis_plan(k: int, s: int, lo: int, n_in: int, n_out: int) -> dict:
    """Along one axis, write output ``i = q*s + r``. Phase r gets ``y[q + d] K[r + lo - d*s]``
    for the ``d`` with ``0 <= r + lo - d*s < k`` (a run of at most ``T`` consecutive values
    starting at ``d_r``). With ``ypad[u] = y[u + base]`` (``base = min_r d_r``), every phase is
    ``z[u, r] = sum_t ypad[u + t] Kc[t, r]`` read at ``u = q + off_r`` (``off_r = d_r - base``),
    ``Kc[t, r] = K[r + lo - (d_r + t)*s]`` (zero outside ``[0, k)``): all phases together are one
    stride-1 correlation of ``y`` with a ``T``-tap kernel of ``s`` times the output channels.
    Returns Q (q count), T, offs, U (u count), pad before/after of y (negative: crop) and
    idx[t, r] (the K tap, or k for "zero")."""
    q = -(-n_out // s)
    d_r, taps = [], []
    for r in range(s):
        ds = [d for d in range(-(k // s) - 2, (k + s) // s + 2) if 0 <= r + lo - d * s < k]
        d_r.append(min(ds) if ds else None)
        taps.append(len(ds))
    t_max = max(max(taps), 1)
    base = min((d for d in d_r if d is not None), default=0)
    d_r = [base if d is None else d for d in d_r]
    offs = tuple(d - base for d in d_r)
    u = q + max(offs)
    idx = np.full((t_max, s), k, np.int32)
    for r in range(s):
        for t in range(t_max):
            j = r + lo - (d_r[r] + t) * s
            if 0 <= j < k:
                idx[t, r] = j
    return dict(Q=q, T=t_max, offs=offs, U=u, before=-base,
                after=(u - 1 + base + t_max - 1) - (n_in - 1), idx=idx)


def _phase_plans(y_shape, kernel_shape, strides, pads, op):
    _, h, w, _ = y_shape
    kh, kw = kernel_shape[:2]
    out_h = conv_transpose_output_size(h, kh, strides[0], pads[0], op[0])
    out_w = conv_transpose_output_size(w, kw, strides[1], pads[1], op[1])
    return (_phase_axis_plan(kh, strides[0], pads[0][0], h, out_h),
            _phase_axis_plan(kw, strides[1], pads[1][0], w, out_w), out_h, out_w)


def _phase_kernel(kernel, ph, pw):
    """K [kh, kw, C_in, C_out] -> Kc [T_h, T_w, C_out, s_h*s_w*C_in] (HWIO of the stride-1
    correlation; output channels ordered (r_h, r_w, c_in))."""
    kh, kw, c_in, c_out = kernel.shape
    kp = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # index k reads a zero tap
    kc = kp[ph["idx"]][:, :, pw["idx"]]  # [T_h, s_h, T_w, s_w, C_in, C_out]
    (th, sh), (tw, sw) = ph["idx"].shape, pw["idx"].shape
    return kc.transpose(0, 2, 5, 1, 3, 4).reshape(th, tw, c_out, sh * sw * c_in)


def _phase_pad(y, ph, pw):
    """ypad: y padded (or cropped, for negative amounts) to [N, U_h + T_h - 1, U_w + T_w - 1]."""
    _, h, w, _ = y.shape
    y = y[:, max(-ph["before"], 0):h - max(-ph["after"], 0),
          max(-pw["before"], 0):w - max(-pw["after"], 0)]
    return jnp.pad(y, ((0, 0), (max(ph["before"], 0), max(ph["after"], 0)),
                       (max(pw["before"], 0), max(pw["after"], 0)), (0, 0)))


def _phase_patches(yp, ph, pw):
    """im2col by T_h*T_w shifted slices: [N, U_h, U_w, T_h*T_w*C_out] (tap-major)."""
    return jnp.concatenate([yp[:, a:a + ph["U"], b:b + pw["U"]]
                            for a in range(ph["T"]) for b in range(pw["T"])], axis=-1)


def _phase_interleave(z, ph, pw, c_in, out_h, out_w):
    """z [N, U_h, U_w, s_h*s_w*C_in] -> x [N, out_h, out_w, C_in] (depth-to-space, each phase
    read at its own offset)."""
    n = z.shape[0]
    (_, sh), (_, sw) = ph["idx"].shape, pw["idx"].shape
    qh, qw = ph["Q"], pw["Q"]
    z = z.reshape(n, z.shape[1], z.shape[2], sh, sw, c_in)
    if len(set(ph["offs"])) == 1 and len(set(pw["offs"])) == 1:
        oh, ow = ph["offs"][0], pw["offs"][0]
        x = z[:, oh:oh + qh, ow:ow + qw].transpose(0, 1, 3, 2, 4, 5)
    else:
        x = jnp.stack([
            jnp.stack([z[:, ph["offs"][rh]:ph["offs"][rh] + qh,
                         pw["offs"][rw]:pw["offs"][rw] + qw, rh, rw] for rw in range(sw)], axis=3)
            for rh in range(sh)], axis=2)
    return x.reshape(n, qh * sh, qw * sw, c_in)[:, :out_h, :out_w]


def _phase_use_gemm(kernel, strides) -> bool:
    return strides[0] * strides[1] * kernel.shape[2] >= _PHASE_GEMM_MIN_CHANNELS


def _conv_transpose_phase_fwd_only(y, kernel, strides, pads, op):
    ph, pw, out_h, out_w = _phase_plans(y.shape, kernel.shape, strides, pads, op)
    acc = _accum_type(y, kernel)
    dtype = jnp.result_type(y, kernel)
    kc = _phase_kernel(kernel, ph, pw)
    yp = _phase_pad(y, ph, pw)
    if _phase_use_gemm(kernel, strides):
        z = jnp.einsum("nhwk,ko->nhwo", _phase_patches(yp, ph, pw),
                       kc.reshape(-1, kc.shape[-1]), preferred_element_type=acc)
    else:
        z = lax.conv_general_dilated(yp, kc, (1, 1), "VALID", dimension_numbers=_DN,
                                     preferred_element_type=acc)
    return _phase_interleave(z.astype(dtype), ph, pw, kernel.shape[2], out_h, out_w)


def _conv_transpose_phase_bwd(strides, pads, op, res, g):
    """Adjoint of each linear step of the forward, written out: g -> g_z (space-to-depth, the
    transpose of the interleave); g_Kc = patches(ypad)^T g_z (one GEMM contracting N*U_h*U_w);
    g_patches = g_z Kc^T (one GEMM), folded back onto y (transpose of the im2col slices and
    the pad). Thin problems use the "lax" backward (see _PHASE_GEMM_MIN_CHANNELS)."""
    y, kernel = res
    if not _phase_use_gemm(kernel, strides):
        return _conv_transpose_bwd(strides, pads, op, res, g)
    ph, pw, _, _ = _phase_plans(y.shape, kernel.shape, strides, pads, op)
    acc = _accum_type(g, y, kernel)
    c_in = kernel.shape[2]
    z_shape = jax.ShapeDtypeStruct(
        (g.shape[0], ph["U"], pw["U"], ph["idx"].shape[1] * pw["idx"].shape[1] * c_in), g.dtype)
    g_z = jax.linear_transpose(
        lambda z: _phase_interleave(z, ph, pw, c_in, g.shape[1], g.shape[2]), z_shape)(g)[0]
    yp = _phase_pad(y, ph, pw)
    g_kc = jnp.einsum("nhwk,nhwo->ko", _phase_patches(yp, ph, pw), g_z,
                      preferred_element_type=acc).astype(kernel.dtype)
    g_k = jax.linear_transpose(lambda k: _phase_kernel(k, ph, pw), kernel)(
        g_kc.reshape(ph["T"], pw["T"], kernel.shape[3], -1))[0]
    kc = _phase_kernel(kernel, ph, pw)
    g_p = jnp.einsum("nhwo,ko->nhwk", g_z, kc.reshape(-1, kc.shape[-1]),
                     preferred_element_type=acc).astype(y.dtype)
    g_yp = jax.linear_transpose(lambda a: _phase_patches(a, ph, pw), yp)(g_p)[0]
    g_y = jax.linear_transpose(lambda a: _phase_pad(a, ph, pw), y)(g_yp)[0]
    return g_y, g_k


_conv_transpose_phase = _with_vjp(_conv_transpose_phase_fwd_only, _conv_transpose_phase_bwd)


IMPLEMENTATIONS = {"lax": _conv_transpose_lax, "subpixel": _conv_transpose_subpixel,
                   "subpixel_phasewise": _conv_transpose_subpixel_phasewise,
                   "phase": _conv_transpose_phase,
                   "zero_insertion": _conv_transpose_zero_insertion}
_FORWARD_ONLY = {"lax": _conv_transpose_lax_fwd_only, "subpixel": _conv_transpose_subpixel_fwd_only,
                 "subpixel_phasewise": _conv_transpose_subpixel_fwd_only,
                 "phase": _conv_transpose_phase_fwd_only,
                 "zero_insertion": _conv_transpose_zero_insertion_fwd_only}  # without custom VJP
AUTO = "auto"  # choose_impl per layer shape, at trace time
DEFAULT_IMPL = AUTO

# choose_impl: below this many output channels (the kernel's C_in) the sub-pixel form's s*s
# separate convolutions are each too thin to pay for themselves, and one convolution over the
# zero-inserted y is faster. Measured (BENCHMARKS.md, issue 6, 2 CPU cores, batch 128): C_in = 1
# (the decoder's last layer): lax 2.2-3.3 ms, zero_insertion 3.4 ms, subpixel 3.5-4.4 ms;
# C_in = 32 / 64 / 128: subpixel 10-45 % faster than lax.
_SUBPIXEL_MIN_CHANNELS = 8


def choose_impl(kernel_shape: Sequence[int], strides=1) -> str:
    """The implementation ``impl="auto"`` (the default) uses for a kernel [kh, kw, C_in, C_out]
    and strides: for strided layers with at least 8 output channels (C_in) the sub-pixel form,
    "subpixel_phasewise" where each stride divides its kernel size (k=4, s=2) and "subpixel"
    otherwise (k=3, s=2: the default model); else "zero_insertion" (with stride 1 there are no
    zeros to avoid and both are one convolution). Never "lax": ``lax.conv_transpose`` aborts
    XLA:CPU for some geometries (see ``_conv_transpose_zero_insertion_fwd_only``), and the
    explicit form is as fast."""
    s = _strides(strides)
    if max(s) > 1 and kernel_shape[2] >= _SUBPIXEL_MIN_CHANNELS:
        if all(k % st == 0 for k, st in zip(kernel_shape[:2], s)):
            return "subpixel_phasewise"
        return "subpixel"
    return "zero_insertion"


def conv_transpose(y: jax.Array, kernel: jax.Array, strides=1, padding: PaddingLike = 0,
                   output_padding=0, *, impl: str | None = None) -> jax.Array:
    """Transposed convolution ``x = C^T y``: the exact adjoint of ``conv(., kernel, strides,
    padding)``. Pass the *same* kernel, strides and padding as the forward conv.

    y: [N, H', W', C_out]; kernel: [kh, kw, C_in, C_out] (HWIO, the forward conv's kernel);
    output_padding: int | (op_h, op_w), each in ``[0, stride)``.
    impl: one of ``IMPLEMENTATIONS`` or "auto" (default: ``choose_impl`` per shape); all
    compute the same operator.
    Returns x: [N, H, W, C_in] with ``H = (H' - 1) * sh - (top + bottom) + kh + op_h``.
    ``<conv(x, k), y> == <x, conv_transpose(y, k)>`` for all x, y of matching shapes.
    """
    _check_input(y, "y")
    khw = _kernel_hw(kernel)
    s = _strides(strides)
    if y.shape[-1] != kernel.shape[3]:
        raise ValueError(
            f"channel mismatch: y has C={y.shape[-1]} but kernel [kh, kw, C_in, C_out] has "
            f"C_out={kernel.shape[3]} (conv_transpose takes the forward conv's kernel)"
        )
    name = DEFAULT_IMPL if impl is None else impl
    if name != AUTO and name not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: allowed are {[AUTO, *sorted(IMPLEMENTATIONS)]}")
    pads, op = _transpose_geometry(y.shape[1:3], khw, s, padding, output_padding)
    if name == AUTO:
        x_hw = [conv_transpose_output_size(h, k, st, p, o)
                for h, k, st, p, o in zip(y.shape[1:3], khw, s, pads, op)]
        if _covers_input(x_hw, khw, pads):  # the forward conv is a fully connected layer
            return _dense_conv_transpose(y, kernel)  # W^T
        name = choose_impl(kernel.shape, s)
    return IMPLEMENTATIONS[name](y, kernel, s, pads, op)


def conv_transpose_autodiff(y: jax.Array, kernel: jax.Array, strides=1,
                            padding: PaddingLike = 0, output_padding=0) -> jax.Array:
    """Same operator as ``conv_transpose`` but plain ``lax.conv_transpose`` with JAX's own
    autodiff: the baseline the custom VJPs are tested and benchmarked against."""
    _check_input(y, "y")
    khw = _kernel_hw(kernel)
    s = _strides(strides)
    pads, op = _transpose_geometry(y.shape[1:3], khw, s, padding, output_padding)
    return _conv_transpose_lax_fwd_only(y, kernel, s, pads, op)
