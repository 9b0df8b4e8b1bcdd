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
``IMPLEMENTATIONS`` maps each name to an :class:`Implementation`:

``"zero_insertion"``: the gather recipe written out (``lax.pad`` with interior padding, then a
stride-1 conv).
``"subpixel"``: the sub-pixel recipe.
``"subpixel_phasewise"``: the same forward, differentiated phase by phase (each phase's stride-1
conv has its own custom VJP; the backward is s*s stride-1 convs, never a strided one).

"zero_insertion" and "subpixel" share one custom VJP (``conv_transpose_cotangents``): ``C g``
for ``y`` and one backward-filter conv for the kernel, whatever computed the forward. All compute
the same operator; the tests run every identity against each. ``conv_transpose`` picks one with
``impl=``; the default, ``"auto"``, picks per layer shape (``choose_impl``). Forms kept only for
comparison (``lax.conv_transpose``, one im2col GEMM for all phases, JAX's own autodiff) live in
``scripts/conv_transpose_variants.py`` and plug in as an :class:`Implementation`.

A conv that covers its input (a fully connected layer)
------------------------------------------------------
When the kernel spans the whole unpadded input (``kh = H``, ``kw = W``, no padding) the output is
1x1 and the sum above has one term per input entry: ``y[n, co] = sum_{i, ci} x[n, i, ci] K[i, ci,
co]``, i.e. ``y = flatten(x) @ W`` with ``W = K.reshape(kh*kw*C_in, C_out)``, and ``C^T = W^T``:
``x = (y @ W^T).reshape(N, kh, kw, C_in)`` (``output_padding`` must be 0: it would add rows no
tap reaches). ``conv`` and ``conv_transpose(impl="auto")`` run that geometry as one GEMM, which
XLA:CPU runs about twice as fast as the same product written as a convolution (BENCHMARKS.md,
"Fast training on CPU"). ``with gemm_for_covering_kernels(False):`` traces that geometry as a
convolution instead (the same numbers; for benchmarks and tests that compare the two paths).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cae import cpu_speed

__all__ = [
    "conv",
    "conv_transpose",
    "conv_output_size",
    "conv_transpose_output_size",
    "output_padding_for",
    "resolve_padding",
    "check_kernel_fits",
    "gather_padding",
    "accumulation_type",
    "conv_transpose_cotangents",
    "Implementation",
    "IMPLEMENTATIONS",
    "AUTO",
    "DEFAULT_IMPL",
    "choose_impl",
    "gemm_for_covering_kernels",
]

Pair = tuple[int, int]
PaddingLike = str | int | Sequence[int] | Sequence[Sequence[int]]
_DN = ("NHWC", "HWIO", "NHWC")


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


def check_kernel_fits(input_hw: Sequence[int], kernel_hw: Sequence[int],
                      pads: Sequence[Pair]) -> None:
    """Raise ``ValueError`` unless the kernel fits in the padded input along H and W (else the
    conv has no output). ``conv``, ``output_padding_for`` and ``cae.models.layer_sizes`` share
    this one check."""
    for size, k, p, axis in zip(input_hw, kernel_hw, pads, "HW"):
        if size + p[0] + p[1] < k:
            raise ValueError(
                f"kernel size {k} along {axis} is larger than the padded input "
                f"{size}+{p[0]}+{p[1]}={size + p[0] + p[1]}: need kernel <= padded input"
            )


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
    check_kernel_fits(hw, kernel_hw, pads)
    out = []
    for size, k, st, pad in zip(hw, kernel_hw, s, pads):
        small = conv_transpose_output_size(conv_output_size(size, k, st, pad), k, st, pad)
        if isinstance(padding, str) and padding.upper() == "SAME":
            # SAME's own indexing (see module docstring): H = (H' - 1) * s + 1 + op.
            small = (conv_output_size(size, k, st, pad) - 1) * st + 1
        out.append(size - small)
    return (out[0], out[1])


def gather_padding(kernel_hw: Sequence[int], pads: Sequence[Pair], op: Pair) -> list[Pair]:
    """The "full" padding of the gather recipe (module docstring), per axis: ``k - 1 - lo``
    before, ``k - 1 - hi + output_padding`` after; negative amounts crop."""
    return [(k - 1 - p[0], k - 1 - p[1] + o) for k, p, o in zip(kernel_hw, pads, op)]


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


def _check_operands(a, name: str, kernel, kernel_axis: int, hint: str = "") -> tuple[Pair, ...]:
    """Validate ``a`` [N, H, W, C] against ``kernel`` [kh, kw, C_in, C_out], whose axis
    ``kernel_axis`` must match a's channels -> the kernel's (kh, kw)."""
    if getattr(a, "ndim", None) != 4:
        raise ValueError(f"{name} must have rank 4 [N, H, W, C], got shape {jnp.shape(a)}")
    khw = _kernel_hw(kernel)
    if a.shape[-1] != kernel.shape[kernel_axis]:
        axis = "C_in" if kernel_axis == 2 else "C_out"
        mine = "C_in" if kernel_axis == 2 else "C"  # y's C is the kernel's C_out
        raise ValueError(f"channel mismatch: {name} has {mine}={a.shape[-1]} but kernel [kh, kw, "
                         f"C_in, C_out] has {axis}={kernel.shape[kernel_axis]}{hint}")
    return khw


def accumulation_type(*arrays):
    """The ``preferred_element_type`` for a conv or matmul of ``arrays``: float32 for bf16/f16
    inputs (the result is cast back), None (the inputs' own) otherwise."""
    dt = jnp.result_type(*arrays)
    return jnp.float32 if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32 else None


# ----------------------------------------------------------------------------------------------
# Forward convolution C
# ----------------------------------------------------------------------------------------------


def _conv_explicit(x, kernel, strides: Pair, pads: tuple[Pair, Pair]):
    out = lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=pads, dimension_numbers=_DN,
        preferred_element_type=accumulation_type(x, kernel),
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
    khw = _check_operands(x, "x", kernel, 2)
    s = _strides(strides)
    pads = resolve_padding(padding, x.shape[1:3], khw, s)
    check_kernel_fits(x.shape[1:3], khw, pads)
    if _covers_input(x.shape[1:3], khw, pads):
        return _dense_conv(x, kernel)
    return _conv(x, kernel, s, pads)


_GEMM_FOR_COVERING = contextvars.ContextVar("cae_ops_gemm_for_covering", default=True)


@contextlib.contextmanager
def gemm_for_covering_kernels(enabled: bool):
    """Within the block, ``conv`` and ``conv_transpose(impl="auto")`` run a kernel that covers
    its unpadded input as one GEMM (``enabled``, the default outside any block) or as the
    convolution it also is (False). Read at trace time: a function jitted inside the block keeps
    the path it was traced with. The numbers are the same either way (module docstring)."""
    token = _GEMM_FOR_COVERING.set(bool(enabled))
    try:
        yield
    finally:
        _GEMM_FOR_COVERING.reset(token)


def _covers_input(in_hw: Sequence[int], kernel_hw: Sequence[int],
                  pads: tuple[Pair, Pair]) -> bool:
    """True when a conv with this geometry is a fully connected layer (module docstring) and
    the GEMM path is on (:func:`gemm_for_covering_kernels`)."""
    return (_GEMM_FOR_COVERING.get() and tuple(in_hw) == tuple(kernel_hw)
            and all(p == (0, 0) for p in pads))


def _dense_conv(x, kernel):
    """x: [N, kh, kw, C_in] -> [N, 1, 1, C_out]: conv of a kernel covering x, as one GEMM.
    Plain jnp ops: their autodiff is the transposed GEMMs, exact and fast."""
    w = kernel.reshape(-1, kernel.shape[3])
    y = jnp.dot(x.reshape(x.shape[0], -1), w, preferred_element_type=accumulation_type(x, kernel))
    return y.astype(jnp.result_type(x, kernel)).reshape(x.shape[0], 1, 1, -1)


def _dense_conv_transpose(y, kernel):
    """y: [N, 1, 1, C_out] -> [N, kh, kw, C_in] = (y @ W^T), the adjoint of ``_dense_conv``."""
    kh, kw, c_in, c_out = kernel.shape
    x = jnp.dot(y.reshape(y.shape[0], c_out), kernel.reshape(-1, c_out).T,
                preferred_element_type=accumulation_type(y, kernel))
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
    # C^T g by the form conv_transpose's default would pick for this shape; forward-only, as
    # this backward is itself differentiated (second order) through plain convs.
    c_transpose = IMPLEMENTATIONS[choose_impl(kernel.shape, strides)].forward_only
    g_x = c_transpose(g, kernel, strides, pads, op).astype(x.dtype)
    g_k = _kernel_cotangent(x_for_kernel, g, khw, strides, pads, kernel.dtype)
    return g_x, g_k


def _conv_bwd(strides, pads, res, g):
    x, kernel = res
    return _conv_cotangents(strides, pads, x, kernel, g, cpu_speed.materialize(x))


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _phase_conv(y, sub_kernel, pads: tuple[Pair, Pair]):
    """One phase of the sub-pixel form: a stride-1 ``_conv`` whose kernel cotangent reads y as
    it is: y is a slice of the layer's input, and s*s ``cpu_speed.materialize`` copies per layer
    cost more than they save (BENCHMARKS.md, ``impl="subpixel_phasewise"``)."""
    return _conv_explicit(y, sub_kernel, (1, 1), pads)


_phase_conv.defvjp(
    lambda y, sub_kernel, pads: (_conv_explicit(y, sub_kernel, (1, 1), pads), (y, sub_kernel)),
    lambda pads, res, g: _conv_cotangents((1, 1), pads, *res, g, res[0]),
)


# ----------------------------------------------------------------------------------------------
# The backward pass every conv_transpose implementation shares
# ----------------------------------------------------------------------------------------------


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
    instead (``("CHWN", "IHWO", "HWNC")``), XLA:CPU runs it with a generic loop, tens of times
    slower, inside ``lax.scan`` (BENCHMARKS.md, "Issues 5 and 6, second pass").
    """
    out_hw = g.shape[1:3]
    # Crop x's padding after the last tap so the correlation is exactly k long.
    full = [(p[0], (o - 1) * s + k - size - p[0])
            for p, o, s, k, size in zip(pads, out_hw, strides, kernel_hw, x.shape[1:3])]
    dk = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),  # [C_in, H, W, N]
        jnp.transpose(g, (1, 2, 0, 3)),  # [H', W', N, C_out]
        window_strides=(1, 1), padding=full, rhs_dilation=strides,
        dimension_numbers=_DN, preferred_element_type=accumulation_type(x, g),
    )  # [C_in, kh, kw, C_out]
    assert dk.shape[1:3] == tuple(kernel_hw), (dk.shape, kernel_hw)
    return jnp.transpose(dk, (1, 2, 0, 3)).astype(dtype)


def conv_transpose_cotangents(strides: Pair, pads: tuple[Pair, Pair], op: Pair, res, g):
    """The custom VJP of ``x = C^T y``: res = (y, kernel), g: [N, H, W, C_in] (x's cotangent)
    -> (g_y: [N, H', W', C_out], g_kernel: [kh, kw, C_in, C_out]).

    ``g_y = (C^T)^T g = C g``, the forward strided conv of g with the same kernel and pads: no
    zeros are inserted anywhere, so it costs what the encoder's own conv costs. ``g_kernel`` is
    ``_kernel_cotangent`` with g in x's role. ``op`` is not needed (the rows it added are
    cropped), but every backward takes the geometry the forward took."""
    del op
    y, kernel = res
    g_y = _conv_explicit(g, kernel, strides, pads).astype(y.dtype)
    g_k = _kernel_cotangent(g, y, _kernel_hw(kernel), strides, pads, kernel.dtype)
    return g_y, g_k


# ----------------------------------------------------------------------------------------------
# Implementations of C^T and their registry
# ----------------------------------------------------------------------------------------------

# forward(y, kernel, strides, pads, op) -> x: y: [N, H', W', C_out], kernel HWIO, strides and
# explicit pads / output_padding as ``_transpose_geometry`` resolves them.
Forward = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute ``C^T``: ``with_vjp`` is what ``conv_transpose`` calls (differentiable,
    with this implementation's custom VJP); ``forward_only`` computes the same values without
    it (used inside other backward passes). Both take ``(y, kernel, strides, pads, op)``."""

    with_vjp: Forward
    forward_only: Forward

    @classmethod
    def from_forward(cls, forward: Forward, backward=conv_transpose_cotangents):
        """``forward`` with a custom VJP ``backward(strides, pads, op, (y, kernel), g) ->
        (g_y, g_kernel)`` (default: the shared one); strides, pads and op are static."""
        fn = jax.custom_vjp(forward, nondiff_argnums=(2, 3, 4))
        fn.defvjp(lambda y, kernel, *geometry: (forward(y, kernel, *geometry), (y, kernel)),
                  backward)
        return cls(with_vjp=fn, forward_only=forward)


def _zero_insertion(y, kernel, strides, pads, op):
    """The gather recipe written out: ``lax.pad`` inserts the s - 1 zeros (interior padding) and
    adds the "full" padding (negative amounts crop), then one stride-1 VALID correlation with the
    kernel rotated by 180 degrees and I/O-swapped. Not ``lax.conv_transpose`` (its
    ``lhs_dilation``): XLA:CPU (jaxlib 0.10.2) aborts the process compiling that for some
    geometries, e.g. y [2, 5, 3, 3], K [2, 4, 2, 3], strides (2, 3), padding ((1, 1), (3, 0)),
    output_padding (0, 2); this form compiles for all of them."""
    (ph, pw), (sh, sw) = gather_padding(_kernel_hw(kernel), pads, op), strides
    zero = jnp.zeros((), y.dtype)
    yd = lax.pad(y, zero, [(0, 0, 0), (ph[0], ph[1], sh - 1), (pw[0], pw[1], sw - 1), (0, 0, 0)])
    out = lax.conv_general_dilated(yd, kernel[::-1, ::-1].transpose(0, 1, 3, 2), (1, 1),
                                   "VALID", dimension_numbers=_DN,
                                   preferred_element_type=accumulation_type(y, kernel))
    return out.astype(jnp.result_type(y, kernel))


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


def _subpixel_forward(y, kernel, strides, pads, op):
    return _subpixel(y, kernel, strides, pads, op,
                     lambda yy, sub, p: _conv_explicit(yy, sub, (1, 1), p))


def _subpixel_phasewise(y, kernel, strides, pads, op):
    """The sub-pixel form differentiated phase by phase: every operation in it is linear and
    each phase conv has the canonical-layout custom VJP (``_phase_conv``), so JAX's autodiff of
    it *is* the adjoint of each phase, summed: the input cotangent is s_h*s_w stride-1 convs of
    g's phase sub-images (not one strided conv over the full g) and the kernel cotangent s_h*s_w
    stride-1 backward-filter convs, each filling its own phase's taps. Faster than the shared
    backward where the stride divides the kernel (every phase has the same taps: k=4, s=2),
    slower for k=3, s=2 (BENCHMARKS.md, ``impl="subpixel_phasewise"``)."""
    return _subpixel(y, kernel, strides, pads, op, _phase_conv)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "subpixel": Implementation.from_forward(_subpixel_forward),
    "subpixel_phasewise": Implementation(with_vjp=_subpixel_phasewise,
                                         forward_only=_subpixel_forward),
    "zero_insertion": Implementation.from_forward(_zero_insertion),
}
AUTO = "auto"  # choose_impl per layer shape, at trace time
DEFAULT_IMPL = AUTO

# choose_impl: below this many output channels (the kernel's C_in) the sub-pixel form's s*s
# separate convolutions are each too thin to pay for themselves, and one convolution over the
# zero-inserted y is faster: C_in = 1, the decoder's last layer (BENCHMARKS.md, "Fast training
# on CPU", and the log's "impl="zero_insertion" and auto no longer picking lax").
_SUBPIXEL_MIN_CHANNELS = 8


def choose_impl(kernel_shape: Sequence[int], strides=1) -> str:
    """The implementation ``impl="auto"`` (the default) uses for a kernel [kh, kw, C_in, C_out]
    and strides: for strided layers with at least 8 output channels (C_in) the sub-pixel form,
    "subpixel_phasewise" where each stride divides its kernel size (k=4, s=2) and "subpixel"
    otherwise (k=3, s=2); else "zero_insertion" (with stride 1 there are no zeros to avoid and
    both are one convolution)."""
    s = _strides(strides)
    if max(s) > 1 and kernel_shape[2] >= _SUBPIXEL_MIN_CHANNELS:
        if all(k % st == 0 for k, st in zip(kernel_shape[:2], s)):
            return "subpixel_phasewise"
        return "subpixel"
    return "zero_insertion"


def conv_transpose(y: jax.Array, kernel: jax.Array, strides=1, padding: PaddingLike = 0,
                   output_padding=0, *, impl: str | Implementation | None = None) -> jax.Array:
    """Transposed convolution ``x = C^T y``: the exact adjoint of ``conv(., kernel, strides,
    padding)``. Pass the *same* kernel, strides and padding as the forward conv.

    y: [N, H', W', C_out]; kernel: [kh, kw, C_in, C_out] (HWIO, the forward conv's kernel);
    output_padding: int | (op_h, op_w), each in ``[0, stride)``.
    impl: a name in ``IMPLEMENTATIONS``, "auto" (default: ``choose_impl`` per shape, and one
    GEMM for a kernel covering its output) or an :class:`Implementation`; all compute the same
    operator.
    Returns x: [N, H, W, C_in] with ``H = (H' - 1) * sh - (top + bottom) + kh + op_h``.
    ``<conv(x, k), y> == <x, conv_transpose(y, k)>`` for all x, y of matching shapes.
    """
    khw = _check_operands(y, "y", kernel, 3, " (conv_transpose takes the forward conv's kernel)")
    s = _strides(strides)
    impl = DEFAULT_IMPL if impl is None else impl
    if not isinstance(impl, Implementation) and impl != AUTO and impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: allowed are {[AUTO, *sorted(IMPLEMENTATIONS)]}")
    pads, op = _transpose_geometry(y.shape[1:3], khw, s, padding, output_padding)
    if impl == AUTO:
        x_hw = [conv_transpose_output_size(h, k, st, p, o)
                for h, k, st, p, o in zip(y.shape[1:3], khw, s, pads, op)]
        if _covers_input(x_hw, khw, pads):  # the forward conv is a fully connected layer
            return _dense_conv_transpose(y, kernel)  # W^T
        impl = choose_impl(kernel.shape, s)
    if not isinstance(impl, Implementation):
        impl = IMPLEMENTATIONS[impl]
    return impl.with_vjp(y, kernel, s, pads, op)
