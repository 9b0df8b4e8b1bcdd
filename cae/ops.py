"""Strided convolution ``C`` and its exact adjoint ``C^T`` (the transposed convolution), over 1,
2 or 3 spatial dims, with dilation and groups.

Layouts are Flax's: activations channels-last (NWC, NHWC, NDHWC), kernels ``[*k, C_in // groups,
C_out]`` (HWIO in 2-D). PyTorch's weight for the same layer is the kernel moved to ``[C_out,
C_in // groups, *k]``, for ``conv{N}d`` and ``conv_transpose{N}d`` alike. The derivation below is
written for one spatial axis and no groups; every axis works the same way, independently.

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

Dilation ``d`` puts the taps ``d`` apart: read ``K[j]`` at offset ``j*d`` (``k`` becomes the
extent ``(k - 1) * d + 1`` in every size formula). PyTorch then allows ``output_padding`` up to
``max(s, d) - 1``: rows beyond the ``s`` sizes with the same ``H'``, still reached by a tap;
``conv_transpose`` is then the adjoint of ``conv`` cropped to ``H'`` outputs.
Groups ``G`` split ``C_in`` and ``C_out`` into ``G`` contiguous blocks, output block ``i`` reading
input block ``i`` only (``feature_group_count``); the transposed conv swaps in/out *within* each
block (``gather_kernel``), and the kernel cotangent pairs x's block ``i`` with g's block ``i``
(``batch_group_count``).

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

``"gemm"``: the scatter recipe as one GEMM (``y`` times the kernel, ``[N*H', C_out] x [C_out,
k*C_in]``) and col2im (each tap's slab added at its offset); its backward is the im2col of the
cotangent and two GEMMs. ``auto``'s pick in 3-D, where XLA:CPU's convolutions are slow.

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
import itertools
import math
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
    "gather_kernel",
    "dimension_numbers",
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

# Channels-last layouts per number of spatial dims: activations [N, *spatial, C], kernels
# [*k, I, O]. One table so that every conv in this file is built the same way for 1, 2 and 3-D.
_DNS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
_DN = _DNS[2]
_AXES = {1: "W", 2: "HW", 3: "DHW"}
_X_LAYOUT = {1: "[N, W, C]", 2: "[N, H, W, C]", 3: "[N, D, H, W, C]"}
_K_LAYOUT = {1: "[k, C_in, C_out]", 2: "[kh, kw, C_in, C_out]",
             3: "[kd, kh, kw, C_in, C_out]"}


def dimension_numbers(nd: int) -> tuple[str, str, str]:
    """``lax.conv_general_dilated``'s dimension numbers for ``nd`` spatial dims (1, 2 or 3):
    channels-last activations, ``[*k, C_in, C_out]`` kernels."""
    return _DNS[nd]


# ----------------------------------------------------------------------------------------------
# Argument normalisation and shape arithmetic
# ----------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_int(v, name: str) -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return int(v)


def _ntuple(v, nd: int, name: str) -> tuple[int, ...]:
    """int | one int per spatial axis -> tuple of ``nd`` Python ints."""
    if _is_int(v):
        return (int(v),) * nd
    if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == nd:
        return tuple(_as_int(a, name) for a in v)
    raise ValueError(f"{name} must be an int or a sequence of {nd} ints (one per spatial axis), "
                     f"got {v!r}")


def _pair(v, name: str) -> Pair:
    """int | (a, b) -> (a, b) of Python ints."""
    return _ntuple(v, 2, name)  # type: ignore[return-value]


def _strides(strides, nd: int = 2) -> tuple[int, ...]:
    s = _ntuple(strides, nd, "strides")
    if min(s) < 1:
        raise ValueError(f"strides={strides!r}: each stride must be >= 1")
    return s


def _dilation(dilation, nd: int) -> tuple[int, ...]:
    d = _ntuple(dilation, nd, "dilation")
    if min(d) < 1:
        raise ValueError(f"dilation={dilation!r}: each dilation must be >= 1")
    return d


def _groups(groups) -> int:
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"groups={groups!r}: must be an int >= 1")
    return int(groups)


def _effective(k: int, d: int) -> int:
    """Extent of a k-tap kernel with dilation d: its taps sit at 0, d, ..., (k - 1) * d."""
    return (k - 1) * d + 1


def _same_pads(size: int, k: int, s: int) -> Pair:
    """TensorFlow's "SAME": out = ceil(size / s); the odd padding pixel goes after."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2)


def _is_pair(p) -> bool:
    return isinstance(p, Sequence) and not isinstance(p, str)


def resolve_padding(padding: PaddingLike, input_hw: Sequence[int], kernel_hw: Sequence[int],
                    strides, dilation=1) -> tuple[Pair, ...]:
    """Any accepted padding spec -> ``((lo, hi), ...)`` of the forward conv, one pair per axis.

    The number of spatial axes is ``len(kernel_hw)``. ``padding``: an int (every side), one int
    per axis (both sides), one ``(lo, hi)`` pair per axis, ``"SAME"`` or ``"VALID"``; in 2-D:
    ``int | (ph, pw) | ((top, bottom), (left, right)) | "SAME" | "VALID"``.
    ``input_hw`` is the forward conv's input size (needed only for ``"SAME"``); ``dilation``
    spreads the kernel's taps (``"SAME"`` pads for the dilated extent).
    """
    nd = len(kernel_hw)
    s = _strides(strides, nd)
    d = _dilation(dilation, nd)
    ks = [_effective(int(k), dd) for k, dd in zip(kernel_hw, d)]
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * nd
        if mode == "SAME":
            return tuple(_same_pads(int(size), k, st) for size, k, st in zip(input_hw, ks, s))
        raise ValueError(f"padding={padding!r}: allowed strings are 'SAME' and 'VALID'")
    try:
        if _is_pair(padding) and len(padding) == nd and all(_is_pair(p) for p in padding):
            pads = tuple(_pair(p, "padding") for p in padding)
        else:
            pads = tuple((p, p) for p in _ntuple(padding, nd, "padding"))
    except ValueError:
        allowed = ("an int, (ph, pw), ((top, bottom), (left, right))" if nd == 2 else
                   f"an int, {nd} ints (one per axis), {nd} (lo, hi) pairs")
        raise ValueError(f"padding={padding!r}: allowed are {allowed}, 'SAME' or 'VALID'"
                         ) from None
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"padding={padding!r}: every padding amount must be >= 0")
    return pads


def conv_output_size(size: int, kernel_size: int, stride: int, pad: Pair,
                     dilation: int = 1) -> int:
    """Forward conv along one axis: ``floor((size + lo + hi - (k - 1) * d - 1) / s) + 1``."""
    return (size + pad[0] + pad[1] - _effective(kernel_size, dilation)) // stride + 1


def conv_transpose_output_size(size: int, kernel_size: int, stride: int, pad: Pair,
                               output_padding: int = 0, dilation: int = 1) -> int:
    """Transposed conv along one axis:
    ``(size - 1) * s - (lo + hi) + (k - 1) * d + 1 + output_padding`` (PyTorch's formula)."""
    return ((size - 1) * stride - (pad[0] + pad[1]) + _effective(kernel_size, dilation)
            + output_padding)


def check_kernel_fits(input_hw: Sequence[int], kernel_hw: Sequence[int],
                      pads: Sequence[Pair], dilation=1) -> None:
    """Raise ``ValueError`` unless the (dilated) kernel fits in the padded input along every
    spatial axis (else the conv has no output). ``conv``, ``output_padding_for`` and
    ``cae.models.layer_sizes`` share this one check."""
    nd = len(kernel_hw)
    d = _dilation(dilation, nd)
    for size, k, p, dd, axis in zip(input_hw, kernel_hw, pads, d, _AXES.get(nd, "?" * nd)):
        ke = _effective(k, dd)
        if size + p[0] + p[1] < ke:
            what = f"kernel size {k}" if dd == 1 else f"dilated kernel size {ke} (k={k}, " \
                f"dilation={dd})"
            raise ValueError(
                f"{what} along {axis} is larger than the padded input "
                f"{size}+{p[0]}+{p[1]}={size + p[0] + p[1]}: need kernel <= padded input"
            )


def output_padding_for(input_hw: Sequence[int], kernel_hw: Sequence[int], strides,
                       padding: PaddingLike, dilation=1) -> tuple[int, ...]:
    """The ``output_padding`` that makes ``conv_transpose`` restore ``input_hw`` exactly.

    For a forward ``conv`` with input spatial size ``input_hw``, returns one value per axis
    such that ``conv_transpose(conv(x, k, s, p), k, s, p, output_padding=...)`` has x's size.
    Example: k=3, s=2, p=1: 7 -> 4 -> 7 needs 0; 14 -> 7 -> 14 needs 1.
    """
    kernel_hw = tuple(int(v) for v in kernel_hw)
    nd = len(kernel_hw)
    s = _strides(strides, nd)
    d = _dilation(dilation, nd)
    hw = tuple(int(v) for v in input_hw)
    pads = resolve_padding(padding, hw, kernel_hw, s, d)
    check_kernel_fits(hw, kernel_hw, pads, d)
    out = []
    for size, k, st, pad, dd in zip(hw, kernel_hw, s, pads, d):
        n_out = conv_output_size(size, k, st, pad, dd)
        small = conv_transpose_output_size(n_out, k, st, pad, 0, dd)
        if isinstance(padding, str) and padding.upper() == "SAME":
            # SAME's own indexing (see module docstring): H = (H' - 1) * s + 1 + op.
            small = (n_out - 1) * st + 1
        out.append(size - small)
    return tuple(out)


def gather_padding(kernel_hw: Sequence[int], pads: Sequence[Pair], op: Sequence[int],
                   dilation=1) -> list[Pair]:
    """The "full" padding of the gather recipe (module docstring), per axis: ``k' - 1 - lo``
    before, ``k' - 1 - hi + output_padding`` after, with ``k' = (k - 1) * d + 1`` the dilated
    extent; negative amounts crop."""
    d = _dilation(dilation, len(kernel_hw))
    return [(_effective(k, dd) - 1 - p[0], _effective(k, dd) - 1 - p[1] + o)
            for k, p, o, dd in zip(kernel_hw, pads, op, d)]


def gather_kernel(kernel: jax.Array, groups: int = 1) -> jax.Array:
    """The kernel of the gather recipe: ``[*k, C_in // g, C_out] -> [*k, C_out // g, C_in]``,
    rotated by 180 degrees over space, with each group's in/out channels swapped (group ``i``
    of the output reads group ``i`` of the input, as ``feature_group_count`` expects)."""
    nd = kernel.ndim - 2
    flipped = kernel[(slice(None, None, -1),) * nd]
    *k, c_in_g, c_out = kernel.shape
    if groups == 1:
        return jnp.swapaxes(flipped, -1, -2)
    k5 = flipped.reshape(*k, c_in_g, groups, c_out // groups)
    perm = (*range(nd), nd + 2, nd + 1, nd)  # [*k, C_out/g, G, C_in/g]
    return k5.transpose(perm).reshape(*k, c_out // groups, groups * c_in_g)


def _transpose_geometry(y_hw: Sequence[int], kernel_hw: Sequence[int], strides,
                        padding: PaddingLike, output_padding, dilation):
    """Resolve conv_transpose's arguments to the forward conv's explicit pads and the explicit
    output_padding, validating ranges. Returns ``(pads, output_padding)``."""
    nd = len(kernel_hw)
    op = _ntuple(output_padding, nd, "output_padding")
    same = isinstance(padding, str) and padding.upper() == "SAME"
    # PyTorch's rule: output_padding < max(stride, dilation) (with dilation > stride, the extra
    # rows can still be reached by a tap). SAME indexes the s sizes with one H', so < stride.
    limit = strides if same else tuple(max(s, d) for s, d in zip(strides, dilation))
    if any(not 0 <= o < lim for o, lim in zip(op, limit)):
        bound = (f"strides={strides}" if same or limit == tuple(strides)
                 else f"max(strides, dilation)={limit}")
        raise ValueError(f"output_padding={output_padding!r} out of range: need 0 <= "
                         f"output_padding < {bound} per axis")
    if same:
        # Which forward input size is meant: H = (H' - 1) * s + 1 + op (module docstring).
        x_hw = [(h - 1) * s + 1 + o for h, s, o in zip(y_hw, strides, op)]
        pads = resolve_padding(padding, x_hw, kernel_hw, strides, dilation)
        op = tuple(
            x - conv_transpose_output_size(h, k, s, p, 0, d)
            for x, h, k, s, p, d in zip(x_hw, y_hw, kernel_hw, strides, pads, dilation)
        )
    else:
        pads = resolve_padding(padding, (0,) * nd, kernel_hw, strides, dilation)
    for h, k, s, p, o, d, axis in zip(y_hw, kernel_hw, strides, pads, op, dilation, _AXES[nd]):
        size = conv_transpose_output_size(h, k, s, p, o, d)
        if size < 1:
            raise ValueError(
                f"conv_transpose output {axis} would be {size} < 1 for input {axis}={h}, "
                f"kernel {k}, stride {s}, padding {p}: reduce the padding"
            )
    return pads, tuple(int(o) for o in op)


def _check_operands(a, name: str, kernel, transpose: bool, groups: int) -> int:
    """Validate ``a`` ([N, *spatial, C]) against ``kernel`` ([*k, C_in // groups, C_out]) ->
    the number of spatial axes. ``transpose``: a is conv_transpose's y (C = C_out), else
    conv's x (C = C_in)."""
    a_rank, k_rank = getattr(a, "ndim", None), getattr(kernel, "ndim", None)
    if a_rank not in (3, 4, 5) and k_rank not in (3, 4, 5):
        raise ValueError(f"{name} must have rank 3, 4 or 5 ({', '.join(_X_LAYOUT.values())}) "
                         f"and kernel one rank less per batch axis: got shapes "
                         f"{jnp.shape(a)} and {jnp.shape(kernel)}")
    if a_rank != k_rank:
        # Either may be the wrong one: say what each would need to be.
        parts = []
        if k_rank in (3, 4, 5):
            parts.append(f"{name} must have rank {k_rank} {_X_LAYOUT[k_rank - 2]} to match "
                         f"kernel of shape {jnp.shape(kernel)}")
        if a_rank in (3, 4, 5):
            parts.append(f"kernel must have rank {a_rank} {_K_LAYOUT[a_rank - 2]} to match "
                         f"{name} of shape {jnp.shape(a)}")
        raise ValueError("; or ".join(parts))
    nd = a_rank - 2
    c_in_g, c_out = kernel.shape[-2], kernel.shape[-1]
    klay = _K_LAYOUT[nd]
    if c_out % groups:
        raise ValueError(f"groups={groups}: the kernel's C_out={c_out} (last axis of {klay}) "
                         f"is not divisible by groups")
    if transpose:
        if a.shape[-1] != c_out:
            raise ValueError(f"channel mismatch: {name} has C={a.shape[-1]} but kernel {klay} "
                             f"has C_out={c_out} (conv_transpose takes the forward conv's "
                             f"kernel)")
    elif a.shape[-1] != c_in_g * groups:
        if groups == 1:
            raise ValueError(f"channel mismatch: {name} has C_in={a.shape[-1]} but kernel "
                             f"{klay} has C_in={c_in_g}")
        raise ValueError(f"channel mismatch: {name} has C_in={a.shape[-1]} but kernel "
                         f"{klay} has C_in/groups={c_in_g}, i.e. C_in={c_in_g * groups} with "
                         f"groups={groups}")
    return nd


def accumulation_type(*arrays):
    """The ``preferred_element_type`` for a conv or matmul of ``arrays``: float32 for bf16/f16
    inputs (the result is cast back), None (the inputs' own) otherwise."""
    dt = jnp.result_type(*arrays)
    return jnp.float32 if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32 else None


def _crop_negative(a, pads: Sequence[Pair]):
    """Slice off the negative part of ``pads`` (per spatial axis of a: [N, *spatial, C]) and
    return ``(a, the non-negative pads)``: XLA:CPU's conv mis-handled negative padding for
    C_out > 1 in our tests, so no conv here is ever given one."""
    idx = (slice(None),) + tuple(slice(max(-lo, 0), a.shape[i + 1] - max(-hi, 0))
                                 for i, (lo, hi) in enumerate(pads)) + (slice(None),)
    return a[idx], tuple((max(lo, 0), max(hi, 0)) for lo, hi in pads)


# ----------------------------------------------------------------------------------------------
# Forward convolution C
# ----------------------------------------------------------------------------------------------


def _conv_explicit(x, kernel, strides, pads, dilation=None, groups: int = 1):
    nd = x.ndim - 2
    x, pads = _crop_negative(x, pads)
    out = lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides), padding=pads,
        rhs_dilation=None if dilation is None else tuple(dilation),
        dimension_numbers=_DNS[nd], feature_group_count=groups,
        preferred_element_type=accumulation_type(x, kernel),
    )
    return out.astype(jnp.result_type(x, kernel))


def conv(x: jax.Array, kernel: jax.Array, strides=1, padding: PaddingLike = 0, *,
         dilation=1, groups: int = 1) -> jax.Array:
    """Cross-correlation ``y = C x`` (what DL frameworks call conv) over 1, 2 or 3 spatial axes.

    x: [N, *spatial, C_in] (NWC, NHWC or NDHWC); kernel: [*k, C_in // groups, C_out];
    strides, dilation: an int or one per axis; padding: an int, one int per axis, one
    ``(lo, hi)`` pair per axis, "SAME" or "VALID"; groups: C_in and C_out split into ``groups``
    blocks, output block i reading input block i only.
    Returns y: [N, *spatial', C_out], ``H' = floor((H + lo + hi - (k - 1) * d - 1) / s) + 1``.
    Equals ``torch.nn.functional.conv{1,2,3}d(x, w, None, strides, padding, dilation, groups)``
    with ``w`` = kernel moved to ``[C_out, C_in // groups, *k]`` (and x to channels-first).
    ``lax.conv_general_dilated`` with a custom VJP: ``conv_transpose`` for the input, a
    canonical-layout backward-filter conv for the kernel (fast inside ``lax.scan`` on CPU too).
    """
    g = _groups(groups)
    nd = _check_operands(x, "x", kernel, False, g)
    khw = tuple(int(k) for k in kernel.shape[:nd])
    s = _strides(strides, nd)
    d = _dilation(dilation, nd)
    pads = resolve_padding(padding, x.shape[1:-1], khw, s, d)
    check_kernel_fits(x.shape[1:-1], khw, pads, d)
    if g == 1 and d == (1,) * nd and _covers_input(x.shape[1:-1], khw, pads):
        return _dense_conv(x, kernel)
    return _conv(x, kernel, s, pads, d, g)


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
                  pads: Sequence[Pair]) -> bool:
    """True when a conv with this geometry is a fully connected layer (module docstring) and
    the GEMM path is on (:func:`gemm_for_covering_kernels`)."""
    return (_GEMM_FOR_COVERING.get() and tuple(in_hw) == tuple(kernel_hw)
            and all(p == (0, 0) for p in pads))


def _dense_conv(x, kernel):
    """x: [N, *k, C_in] -> [N, 1, ..., 1, C_out]: conv of a kernel covering x, as one GEMM.
    Plain jnp ops: their autodiff is the transposed GEMMs, exact and fast."""
    nd = x.ndim - 2
    w = kernel.reshape(-1, kernel.shape[-1])
    y = jnp.dot(x.reshape(x.shape[0], -1), w, preferred_element_type=accumulation_type(x, kernel))
    return y.astype(jnp.result_type(x, kernel)).reshape(x.shape[0], *(1,) * nd, -1)


def _dense_conv_transpose(y, kernel):
    """y: [N, 1, ..., 1, C_out] -> [N, *k, C_in] = (y @ W^T), the adjoint of ``_dense_conv``."""
    c_out = kernel.shape[-1]
    x = jnp.dot(y.reshape(y.shape[0], c_out), kernel.reshape(-1, c_out).T,
                preferred_element_type=accumulation_type(y, kernel))
    return x.astype(jnp.result_type(y, kernel)).reshape(y.shape[0], *kernel.shape[:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, dilation, groups):
    return _conv_explicit(x, kernel, strides, pads, dilation, groups)


def _conv_fwd(x, kernel, strides, pads, dilation, groups):
    return _conv_explicit(x, kernel, strides, pads, dilation, groups), (x, kernel)


def _conv_cotangents(strides, pads, dilation, groups, x, kernel, g, x_for_kernel,
                     kernel_cotangent=None):
    """The input cotangent is C^T g (the transposed conv, with the output padding that gives
    back x's size); the kernel cotangent is the correlation of ``x_for_kernel`` (x's value)
    with g. Same values as JAX's autodiff of ``lax.conv_general_dilated``, but in a layout that
    stays fast inside ``lax.scan`` on CPU (see ``_kernel_cotangent``)."""
    nd = x.ndim - 2
    khw = kernel.shape[:nd]
    op = output_padding_for(x.shape[1:-1], khw, strides, pads, dilation)  # rows no window reached
    # C^T g by the form conv_transpose's default would pick for this shape; forward-only, as
    # this backward is itself differentiated (second order) through plain convs.
    c_transpose = IMPLEMENTATIONS[choose_impl(kernel.shape, strides, dilation, groups,
                                              out_shape=x.shape)]
    g_x = c_transpose.forward_only(g, kernel, strides, pads, op, dilation, groups).astype(x.dtype)
    if kernel_cotangent is None:  # 3-D: XLA:CPU's backward-filter conv is ~5x its GEMM's time
        kernel_cotangent = _kernel_cotangent_gemm if nd == 3 else _kernel_cotangent
    g_k = kernel_cotangent(x_for_kernel, g, khw, strides, pads, kernel.dtype, dilation, groups)
    return g_x, g_k


def _conv_bwd(strides, pads, dilation, groups, res, g):
    x, kernel = res
    # materialize is a 2-D (NHWC) device; other ranks read x as it is.
    x_for_kernel = cpu_speed.materialize(x) if x.ndim == 4 else x
    return _conv_cotangents(strides, pads, dilation, groups, x, kernel, g, x_for_kernel)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _phase_conv(y, sub_kernel, pads, dilation, groups):
    """One phase of the sub-pixel form: a stride-1 ``_conv`` whose kernel cotangent reads y as
    it is: y is a slice of the layer's input, and s*s ``cpu_speed.materialize`` copies per layer
    cost more than they save (BENCHMARKS.md, ``impl="subpixel_phasewise"``)."""
    return _conv_explicit(y, sub_kernel, (1,) * (y.ndim - 2), pads, dilation, groups)


def _phase_conv_fwd(y, sub_kernel, pads, dilation, groups):
    return _phase_conv(y, sub_kernel, pads, dilation, groups), (y, sub_kernel)


def _phase_conv_bwd(pads, dilation, groups, res, g):
    ones = (1,) * (res[0].ndim - 2)
    return _conv_cotangents(ones, pads, dilation, groups, *res, g, res[0])


_phase_conv.defvjp(_phase_conv_fwd, _phase_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _phase_conv_gemm(y, sub_kernel, pads, dilation, groups):
    """``_phase_conv`` whose kernel cotangent is an im2col GEMM (``_kernel_cotangent_gemm``)
    instead of a backward-filter conv: that conv's window is the whole phase image (16x16 for
    a 32x32 output) and XLA:CPU's default (YNNPACK) convolutions run such a window slowly
    (BENCHMARKS.md, "Plain jax.jit vs PyTorch")."""
    return _conv_explicit(y, sub_kernel, (1,) * (y.ndim - 2), pads, dilation, groups)


def _phase_conv_gemm_bwd(pads, dilation, groups, res, g):
    ones = (1,) * (res[0].ndim - 2)
    return _conv_cotangents(ones, pads, dilation, groups, *res, g, res[0],
                            kernel_cotangent=_kernel_cotangent_gemm)


_phase_conv_gemm.defvjp(_phase_conv_fwd, _phase_conv_gemm_bwd)


# ----------------------------------------------------------------------------------------------
# The backward pass every conv_transpose implementation shares
# ----------------------------------------------------------------------------------------------


def _kernel_cotangent(x, g, kernel_hw, strides, pads, dtype, dilation=None, groups: int = 1):
    """``dK[j, ci, co] = sum_{n, o} x_pad[n, o*s + j*d, g(co)*C_in/G + ci] * g[n, o, co]``: the
    kernel gradient (``g(co)`` is co's group).

    It is the same sum for both operators: for ``y = conv(x, K)`` with cotangent ``g`` of y, and
    for ``x = conv_transpose(y, K)`` with cotangent ``g`` of x (there: ``x := g``, ``g := y``;
    from ``x[i] = sum_o y[o] K[(i - o*s + lo) / d]``, ``dK[j] = sum_o g[o*s - lo + j*d] y[o]``).
    x: [N, *spatial, C_in]; g: [N, *spatial', C_out]; pads: x's padding before, ``lo`` per axis
    (rows after the last tap, e.g. those output_padding added, are cropped).
    Returns ``[*k, C_in // groups, C_out]``.

    It is one "backward-filter" convolution: over space, x (batch and channels swapped: C_in is
    the batch, N the contracted feature) correlated with g as the kernel, g's taps ``s`` apart
    (rhs dilation), successive kernel taps ``d`` apart (window stride); with groups, batch
    group i of x meets output-feature group i of g (``batch_group_count``). The swaps are
    explicit transposes so that the convolution itself has the canonical channels-last layout:
    written with dimension numbers instead (``("CHWN", "IHWO", "HWNC")``), XLA:CPU runs it with a
    generic loop, tens of times slower, inside ``lax.scan`` (BENCHMARKS.md, "Issues 5 and 6,
    second pass").
    """
    nd = x.ndim - 2
    strides = tuple(strides)
    dilation = (1,) * nd if dilation is None else tuple(dilation)
    out_hw = g.shape[1:-1]
    # Crop x's padding after the last tap so the correlation is exactly k long.
    full = [(p[0], (o - 1) * s + _effective(k, d) - size - p[0])
            for p, o, s, k, d, size in zip(pads, out_hw, strides, kernel_hw, dilation,
                                           x.shape[1:-1])]
    x, full = _crop_negative(x, full)
    to_batch = (nd + 1, *range(1, nd + 1), 0)  # [N, *sp, C] -> [C, *sp, N]
    dk = lax.conv_general_dilated(
        jnp.transpose(x, to_batch),  # [C_in, *sp, N]
        jnp.transpose(g, (*range(1, nd + 1), 0, nd + 1)),  # [*sp', N, C_out]
        window_strides=dilation, padding=full, rhs_dilation=strides,
        dimension_numbers=_DNS[nd], batch_group_count=groups,
        preferred_element_type=accumulation_type(x, g),
    )  # [C_in // groups, *k, C_out]
    assert dk.shape[1:-1] == tuple(kernel_hw), (dk.shape, kernel_hw)
    return jnp.transpose(dk, (*range(1, nd + 1), 0, nd + 1)).astype(dtype)


def _kernel_cotangent_gemm(x, g, kernel_hw, strides, pads, dtype, dilation=None,
                           groups: int = 1):
    """The sum of ``_kernel_cotangent`` as im2col and one GEMM: the patches of x at g's
    positions ``[N*H', T, C_in]`` contracted with g ``[N*H', C_out]`` over ``N*H'``."""
    nd = x.ndim - 2
    dilation = (1,) * nd if dilation is None else tuple(dilation)
    patches = _grouped(_im2col(x, kernel_hw, strides, pads, g.shape[1:-1], dilation), groups)
    dk = jnp.einsum("...tgc,...gO->tcgO", patches, _grouped(g, groups),
                    preferred_element_type=accumulation_type(x, g))
    return dk.reshape(*kernel_hw, x.shape[-1] // groups, g.shape[-1]).astype(dtype)


def conv_transpose_cotangents(strides, pads, op, dilation, groups, res, g):
    """The custom VJP of ``x = C^T y``: res = (y, kernel), g: [N, *spatial, C_in] (x's
    cotangent) -> (g_y: [N, *spatial', C_out], g_kernel: [*k, C_in // groups, C_out]).

    ``g_y = (C^T)^T g = C g``, the forward strided conv of g with the same kernel and pads: no
    zeros are inserted anywhere, so it costs what the encoder's own conv costs. ``g_kernel`` is
    ``_kernel_cotangent`` with g in x's role. ``op`` is not needed (the rows it added are
    cropped), but every backward takes the geometry the forward took."""
    del op
    y, kernel = res
    nd = y.ndim - 2
    g_y = _conv_explicit(g, kernel, strides, pads, dilation, groups).astype(y.dtype)
    g_k = _kernel_cotangent(g, y, kernel.shape[:nd], strides, pads, kernel.dtype, dilation,
                            groups)
    return g_y, g_k


# ----------------------------------------------------------------------------------------------
# Implementations of C^T and their registry
# ----------------------------------------------------------------------------------------------

# forward(y, kernel, strides, pads, op, dilation, groups) -> x: y: [N, *spatial', C_out],
# kernel [*k, C_in // groups, C_out], per-axis tuples of strides, explicit pads,
# output_padding and dilation as ``_transpose_geometry`` resolves them, and groups.
Forward = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute ``C^T``: ``with_vjp`` is what ``conv_transpose`` calls (differentiable,
    with this implementation's custom VJP); ``forward_only`` computes the same values without
    it (used inside other backward passes). Both take
    ``(y, kernel, strides, pads, op, dilation, groups)``."""

    with_vjp: Forward
    forward_only: Forward

    @classmethod
    def from_forward(cls, forward: Forward, backward=conv_transpose_cotangents):
        """``forward`` with a custom VJP ``backward(strides, pads, op, dilation, groups,
        (y, kernel), g) -> (g_y, g_kernel)`` (default: the shared one); everything but y and
        kernel is static."""
        fn = jax.custom_vjp(forward, nondiff_argnums=(2, 3, 4, 5, 6))
        fn.defvjp(lambda y, kernel, *geometry: (forward(y, kernel, *geometry), (y, kernel)),
                  backward)
        return cls(with_vjp=fn, forward_only=forward)


def _zero_insertion(y, kernel, strides, pads, op, dilation, groups):
    """The gather recipe written out: ``lax.pad`` inserts the s - 1 zeros (interior padding) and
    adds the "full" padding (negative amounts crop), then one stride-1 VALID correlation with the
    gather kernel (rotated by 180 degrees, in/out swapped per group) at the same dilation. Not
    ``lax.conv_transpose`` (its ``lhs_dilation``): XLA:CPU (jaxlib 0.10.2) aborts the process
    compiling that for some geometries, e.g. y [2, 5, 3, 3], K [2, 4, 2, 3], strides (2, 3),
    padding ((1, 1), (3, 0)), output_padding (0, 2); this form compiles for all of them."""
    nd = y.ndim - 2
    full = gather_padding(kernel.shape[:nd], pads, op, dilation)
    zero = jnp.zeros((), y.dtype)
    yd = lax.pad(y, zero, [(0, 0, 0), *((lo, hi, s - 1) for (lo, hi), s in zip(full, strides)),
                           (0, 0, 0)])
    out = lax.conv_general_dilated(yd, gather_kernel(kernel, groups), (1,) * nd, "VALID",
                                   rhs_dilation=tuple(dilation), dimension_numbers=_DNS[nd],
                                   feature_group_count=groups,
                                   preferred_element_type=accumulation_type(y, kernel))
    return out.astype(jnp.result_type(y, kernel))


def _subpixel_axis_plan(k: int, s: int, lo: int, n_in: int, n_out: int, d: int = 1):
    """Per-phase plan along one axis for the sub-pixel form.

    Output position ``i = q*s + r`` (phase r) receives ``y[o] K[j]`` with ``j*d = i - o*s + lo``.
    On the dilated kernel ``Kd`` (``Kd[j*d] = K[j]``, zeros between; extent ``k' = (k-1)*d+1``),
    that is taps ``t = t0 + m*s`` (``t0 = (r + lo) mod s``) meeting ``o = q + c - m`` with
    ``c = (r + lo - t0) / s``. So phase r is a stride-1 correlation of y with the sub-kernel
    ``Kd[t0::s]`` reversed, with y padded so that output q reads ``y[q + c - M + 1 .. q + c]``.
    Returns a list over r of ``(t0, taps M, pad_before, pad_after, n_q, live)``; ``live`` is
    False when none of the phase's taps is a real (non-inserted-zero) tap of K.
    """
    ke = _effective(k, d)
    plan = []
    for r in range(s):
        n_q = -(-(n_out - r) // s) if n_out > r else 0  # number of q with q*s + r < n_out
        t0 = (r + lo) % s
        taps = range(t0, ke, s)
        m = len(taps)
        c = (r + lo - t0) // s
        # Correlation output q reads padded-y indices q .. q+M-1 == y[q + c - M + 1 .. q + c].
        before = m - 1 - c
        after = (n_q - 1 + c) - (n_in - 1) if n_q > 0 else 0
        live = m > 0 and n_q > 0 and any(t % d == 0 for t in taps)
        plan.append((t0, m, before, after, n_q, live))
    return plan


def _dilate_kernel(kernel, dilation):
    """K [*k, I, O] -> Kd [*((k-1)*d+1), I, O] with ``Kd[j*d] = K[j]`` and zeros between."""
    if all(d == 1 for d in dilation):
        return kernel
    zero = jnp.zeros((), kernel.dtype)
    return lax.pad(kernel, zero, [*((0, 0, d - 1) for d in dilation), (0, 0, 0), (0, 0, 0)])


def _subpixel(y, kernel, strides, pads, op, dilation, groups, phase_conv):
    """C^T y as prod(s) stride-1 convs ``phase_conv(y_crop, sub_kernel, pads)`` of the undilated
    y, interleaved (depth-to-space). A dilated kernel is first written out with its zeros; a
    phase none of whose taps is real is a zero block."""
    nd = y.ndim - 2
    n, *sp, _ = y.shape
    kd = _dilate_kernel(kernel, dilation)
    c_in = kernel.shape[-2] * groups
    out = [conv_transpose_output_size(h, k, s, p, o, d) for h, k, s, p, o, d in
           zip(sp, kernel.shape[:nd], strides, pads, op, dilation)]
    plans = [_subpixel_axis_plan(k, s, p[0], h, o_, d) for k, s, p, h, o_, d in
             zip(kernel.shape[:nd], strides, pads, sp, out, dilation)]
    dtype = jnp.result_type(y, kernel)
    # Phases share a common q-grid: pad every phase's output to the max count, then interleave.
    q = [-(-o_ // s) for o_, s in zip(out, strides)]
    parts = []
    for phase in itertools.product(*plans):  # r_1, ..., r_nd in C order
        if not all(a[5] for a in phase):
            parts.append(jnp.zeros((n, *q, c_in), dtype))
            continue
        sub = kd[tuple(slice(a[0], None, s) for a, s in zip(phase, strides))]
        # Negative pads mean "drop those rows of y": slice rather than pass negative padding.
        yy, ppads = _crop_negative(y, [(a[2], a[3]) for a in phase])
        part = phase_conv(yy, gather_kernel(sub, groups), ppads, (1,) * nd, groups)
        part = jnp.pad(part, ((0, 0), *((0, qq - a[4]) for qq, a in zip(q, phase)), (0, 0)))
        parts.append(part)
    z = jnp.stack(parts, axis=-2).reshape(n, *q, *strides, c_in)  # [N, *q, *s, C]
    perm = (0, *itertools.chain.from_iterable((1 + i, 1 + nd + i) for i in range(nd)),
            2 * nd + 1)
    z = z.transpose(perm).reshape(n, *(qq * s for qq, s in zip(q, strides)), c_in)
    return z[(slice(None), *(slice(0, o_) for o_ in out))]


def _subpixel_forward(y, kernel, strides, pads, op, dilation, groups):
    return _subpixel(y, kernel, strides, pads, op, dilation, groups,
                     lambda yy, sub, p, d, g: _conv_explicit(yy, sub, (1,) * len(p), p, d, g))


def _subpixel_phasewise(y, kernel, strides, pads, op, dilation, groups):
    """The sub-pixel form differentiated phase by phase: every operation in it is linear and
    each phase conv has the canonical-layout custom VJP (``_phase_conv``), so JAX's autodiff of
    it *is* the adjoint of each phase, summed: the input cotangent is prod(s) stride-1 convs of
    g's phase sub-images (not one strided conv over the full g) and the kernel cotangent
    prod(s) stride-1 backward-filter convs, each filling its own phase's taps. Faster than the
    shared backward where the stride divides the kernel (every phase has the same taps: k=4,
    s=2), slower for k=3, s=2 (BENCHMARKS.md, ``impl="subpixel_phasewise"``)."""
    return _subpixel(y, kernel, strides, pads, op, dilation, groups, _phase_conv)


def _im2col(g, kernel_sp, strides, pads, out_sp, dilation):
    """g [N, *spatial, C] -> [N, *out_sp, T, C], T = prod(k): the entry ``g[n, o*s + t*d - lo]``
    (zero outside g) for every output position o and kernel tap t (taps in C order). The
    patches a strided conv reads; ``C g`` is these times the kernel, one GEMM."""
    lo = [p[0] for p in pads]
    # Pad after by what the last tap of the last window reads beyond g (crop never needed:
    # the slices stop there).
    hi = [max((o - 1) * s + (k - 1) * d - lo_ - (h - 1), 0)
          for o, s, k, d, lo_, h in zip(out_sp, strides, kernel_sp, dilation, lo, g.shape[1:-1])]
    gp = jnp.pad(g, ((0, 0), *zip(lo, hi), (0, 0)))
    cols = [gp[(slice(None), *(slice(t * d, t * d + (o - 1) * s + 1, s)
                                for t, d, o, s in zip(taps, dilation, out_sp, strides)))]
            for taps in itertools.product(*(range(k) for k in kernel_sp))]
    return jnp.stack(cols, axis=-2)


def _grouped(a, groups: int):
    """[..., C] -> [..., groups, C // groups] (the block layout of feature_group_count)."""
    return a.reshape(*a.shape[:-1], groups, a.shape[-1] // groups)


def _gemm_forward(y, kernel, strides, pads, op, dilation, groups):
    """The scatter recipe as one GEMM: ``z[n, o, t, ci] = sum_co y[n, o, co] K[t, ci, co]``
    ([N*H', C_out] times [C_out, T*C_in]), then each tap's slab added at its offset ``o*s +
    t*d - lo`` of x (col2im: the linear transpose of :func:`_im2col`, pads and adds). XLA:CPU
    runs these GEMMs well by default where its 3-D convolutions are slow (BENCHMARKS.md,
    "Plain jax.jit vs PyTorch")."""
    nd = y.ndim - 2
    k_sp = kernel.shape[:nd]
    x_sp = [conv_transpose_output_size(h, k, s, p, o, d)
            for h, k, s, p, o, d in zip(y.shape[1:-1], k_sp, strides, pads, op, dilation)]
    t = math.prod(k_sp)
    kr = _grouped(kernel.reshape(t, *kernel.shape[-2:]), groups)  # [T, C_in/G, G, C_out/G]
    z = jnp.einsum("...gO,tcgO->...tgc", _grouped(y, groups), kr,
                   preferred_element_type=accumulation_type(y, kernel))
    # z stays in the accumulation type through col2im's adds (up to prod(k) terms per entry).
    z = z.reshape(*y.shape[:-1], t, -1)
    x_struct = jax.ShapeDtypeStruct((y.shape[0], *x_sp, z.shape[-1]), z.dtype)
    col2im = jax.linear_transpose(
        lambda g: _im2col(g, k_sp, strides, pads, y.shape[1:-1], dilation), x_struct)
    return col2im(z)[0].astype(jnp.result_type(y, kernel))


def _gemm_cotangents(strides, pads, op, dilation, groups, res, g):
    """The adjoint of ``_gemm_forward``, step by step: the patches of g at y's positions
    (``_im2col``, the transpose of col2im), then ``g_y = patches . K`` and ``g_K = patches^T
    . y``, two GEMMs sharing one im2col (``g_y`` is ``C g``, as in the shared backward)."""
    del op
    y, kernel = res
    nd = y.ndim - 2
    k_sp = kernel.shape[:nd]
    t = math.prod(k_sp)
    patches = _grouped(_im2col(g, k_sp, strides, pads, y.shape[1:-1], dilation), groups)
    kr = _grouped(kernel.reshape(t, *kernel.shape[-2:]), groups)
    acc = accumulation_type(g, y, kernel)
    g_y = jnp.einsum("...tgc,tcgO->...gO", patches, kr, preferred_element_type=acc)
    g_k = jnp.einsum("...tgc,...gO->tcgO", patches, _grouped(y, groups),
                     preferred_element_type=acc)
    return (g_y.reshape(y.shape).astype(y.dtype), g_k.reshape(kernel.shape).astype(kernel.dtype))


def _subpixel_phasewise_gemm(y, kernel, strides, pads, op, dilation, groups):
    """"subpixel_phasewise" with each phase's kernel cotangent as an im2col GEMM
    (``_phase_conv_gemm``): faster under XLA's default options (a plain ``jax.jit``), slower
    under ``cpu_speed.compile_fast`` (BENCHMARKS.md, "Plain jax.jit vs PyTorch")."""
    return _subpixel(y, kernel, strides, pads, op, dilation, groups, _phase_conv_gemm)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "subpixel": Implementation.from_forward(_subpixel_forward),
    "subpixel_phasewise": Implementation(with_vjp=_subpixel_phasewise,
                                         forward_only=_subpixel_forward),
    "zero_insertion": Implementation.from_forward(_zero_insertion),
    "gemm": Implementation.from_forward(_gemm_forward, _gemm_cotangents),
    "subpixel_phasewise_gemm": Implementation(with_vjp=_subpixel_phasewise_gemm,
                                              forward_only=_subpixel_forward),
}
AUTO = "auto"  # choose_impl per layer shape, at trace time
DEFAULT_IMPL = AUTO

# choose_impl: below this many output channels (the kernel's C_in) the sub-pixel form's s*s
# separate convolutions are each too thin to pay for themselves, and one convolution over the
# zero-inserted y is faster: C_in = 1, the decoder's last layer (BENCHMARKS.md, "Fast training
# on CPU", and the log's "impl="zero_insertion" and auto no longer picking lax").
_SUBPIXEL_MIN_CHANNELS = 8


# choose_impl: "gemm" materialises prod(k) copies of the layer's output (its im2col); above
# this many elements (256 MiB of float32) the sub-pixel form is used instead.
_GEMM_MAX_ELEMENTS = 2**26


def choose_impl(kernel_shape: Sequence[int], strides=1, dilation=1, groups: int = 1, *,
                out_shape: Sequence[int] | None = None) -> str:
    """The implementation ``impl="auto"`` (the default) uses for a kernel
    ``[*k, C_in // groups, C_out]``, strides and dilation (``out_shape``: the transposed conv's
    output ``[N, *spatial, C_in]``, when known):

    * 3 spatial dims: "gemm" (XLA:CPU's 3-D convolutions are slow, its GEMMs are not), unless
      its im2col would exceed 2^26 elements;
    * strided, undilated layers with at least 8 output channels per group (the kernel's
      ``C_in // groups`` axis): the sub-pixel form; where each stride divides its kernel size
      (k=4, s=2) "subpixel_phasewise", in 2-D "subpixel_phasewise_gemm" (its phase kernel
      cotangents as GEMMs: 1.7x faster under a plain ``jax.jit``, and no shipped config has
      such a layer for ``cpu_speed.compile_fast``, under which it is slower); otherwise
      (k=3, s=2) "subpixel" in a program traced for ``cpu_speed.compile_fast``
      (``cpu_speed.tracing_for_compile_fast``: cae.train's) or off the CPU, and "gemm" in one
      a plain ``jax.jit`` compiles on the CPU, where XLA's default (YNNPACK) convolutions make
      the sub-pixel form's convolutions slower than one im2col and two GEMMs (BENCHMARKS.md,
      "Plain jax.jit vs PyTorch");
    * else "zero_insertion" (with stride 1 there are no zeros to avoid and both are one
      convolution; a dilated kernel's sub-pixel phases would multiply its inserted zeros).
    """
    nd = len(kernel_shape) - 2
    s = _strides(strides, nd)
    d = _dilation(dilation, nd)
    del groups  # the rules read the per-group channel count, kernel_shape[-2]
    if nd == 3 and (out_shape is None
                    or math.prod(out_shape) * math.prod(kernel_shape[:nd]) <= _GEMM_MAX_ELEMENTS):
        return "gemm"
    if max(s) > 1 and max(d) == 1 and kernel_shape[-2] >= _SUBPIXEL_MIN_CHANNELS:
        if all(k % st == 0 for k, st in zip(kernel_shape[:nd], s)):
            return "subpixel_phasewise_gemm" if nd == 2 else "subpixel_phasewise"
        if (nd == 2 and not cpu_speed.tracing_for_compile_fast()
                and jax.default_backend() == "cpu"):
            return "gemm"
        return "subpixel"
    return "zero_insertion"


def conv_transpose(y: jax.Array, kernel: jax.Array, strides=1, padding: PaddingLike = 0,
                   output_padding=0, *, dilation=1, groups: int = 1,
                   impl: str | Implementation | None = None) -> jax.Array:
    """Transposed convolution ``x = C^T y``: the exact adjoint of ``conv(., kernel, strides,
    padding, dilation=dilation, groups=groups)``. Pass the *same* kernel and geometry as the
    forward conv. 1, 2 or 3 spatial axes.

    y: [N, *spatial', C_out]; kernel: [*k, C_in // groups, C_out] (the forward conv's kernel);
    strides, dilation: an int or one per axis; padding as for :func:`conv`; output_padding: an
    int or one per axis, each in ``[0, max(stride, dilation))`` (``[0, stride)`` with "SAME").
    impl: a name in ``IMPLEMENTATIONS``, "auto" (default: ``choose_impl`` per shape, and one
    GEMM for a kernel covering its output) or an :class:`Implementation`; all compute the same
    operator.
    Returns x: [N, *spatial, C_in] with ``H = (H' - 1) * s - (lo + hi) + (k - 1) * d + 1 + op``.
    Equals ``torch.nn.functional.conv_transpose{1,2,3}d(y, w, None, strides, padding,
    output_padding, groups, dilation)`` with the *same* ``w`` as :func:`conv`'s (the kernel
    moved to ``[C_out, C_in // groups, *k]``).
    ``<conv(x, k), y> == <x, conv_transpose(y, k)>`` for all x, y of matching shapes.
    """
    g = _groups(groups)
    nd = _check_operands(y, "y", kernel, True, g)
    khw = tuple(int(k) for k in kernel.shape[:nd])
    s = _strides(strides, nd)
    d = _dilation(dilation, nd)
    impl = DEFAULT_IMPL if impl is None else impl
    if not isinstance(impl, Implementation) and impl != AUTO and impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: allowed are {[AUTO, *sorted(IMPLEMENTATIONS)]}")
    pads, op = _transpose_geometry(y.shape[1:-1], khw, s, padding, output_padding, d)
    if impl == AUTO:
        x_hw = [conv_transpose_output_size(h, k, st, p, o, dd)
                for h, k, st, p, o, dd in zip(y.shape[1:-1], khw, s, pads, op, d)]
        if g == 1 and d == (1,) * nd and _covers_input(x_hw, khw, pads):
            return _dense_conv_transpose(y, kernel)  # the forward conv is fully connected: W^T
        impl = choose_impl(kernel.shape, s, d, g,
                           out_shape=(y.shape[0], *x_hw, kernel.shape[-2] * g))
    if not isinstance(impl, Implementation):
        impl = IMPLEMENTATIONS[impl]
    return impl.with_vjp(y, kernel, s, pads, op, d, g)
