"""Transposed-convolution forms kept only for comparison: ``scripts/bench_ops.py`` times them and
``tests/test_ops.py`` runs every identity against them; ``cae.ops.choose_impl`` never picks them.

* ``LAX``: ``jax.lax.conv_transpose`` (zero insertion by ``lhs_dilation``) with the shared custom
  VJP of ``cae.ops``. XLA:CPU (jaxlib 0.10.2) aborts the process compiling it for some
  geometries (see ``cae.ops``' "zero_insertion"), which is why ``cae.ops`` does not ship it.
* ``PHASE``: all ``s*s`` sub-pixel phases as one im2col matmul, with a matmul VJP.
* ``AUTODIFF`` / :func:`conv_transpose_autodiff`: plain ``lax.conv_transpose`` (other ranks,
  groups, dilation: the ``lhs_dilation`` conv it lowers to) differentiated by
  JAX itself: the baseline the custom VJPs are checked and timed against.

Each is a :class:`cae.ops.Implementation`: pass it as ``cae.ops.conv_transpose(..., impl=...)``,
which validates the arguments and resolves the geometry as for the shipped forms.
Layouts: y [N, H', W', C_out], kernel HWIO [kh, kw, C_in, C_out] -> x [N, H, W, C_in].
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cae import ops

__all__ = ["AUTODIFF", "LAX", "PHASE", "VARIANTS", "conv_transpose_autodiff"]

DN = ("NHWC", "HWIO", "NHWC")

# jax-ml/jax#32267 (2025) gave lax.conv_transpose `use_consistent_padding`, changing what its
# explicit padding means. We pass the padding of the dilated convolution itself (the gather
# recipe's), so pin that reading on JAX versions that have the switch.
_CT_KWARGS = (
    {"use_consistent_padding": False}
    if "use_consistent_padding" in inspect.signature(lax.conv_transpose).parameters
    else {}
)


def _only_2d_ungrouped(name, y, dilation, groups):
    """The comparison-only forms are written for today's 2-D layers: refuse anything else
    with a clear error rather than compute something else."""
    if y.ndim != 4 or groups != 1 or any(d != 1 for d in dilation):
        raise ValueError(f"{name}: comparison-only form for 2-D inputs without groups or "
                         f"dilation (got rank {y.ndim}, groups={groups}, dilation={dilation})")


def _lax_forward(y, kernel, strides, pads, op, dilation=(1, 1), groups=1):
    _only_2d_ungrouped("lax.conv_transpose", y, dilation, groups)
    out = lax.conv_transpose(
        y, kernel, strides, ops.gather_padding(kernel.shape[:2], pads, op),
        dimension_numbers=DN,
        transpose_kernel=True,  # rotate 180 degrees and swap I/O: the kernel of C, used for C^T
        preferred_element_type=ops.accumulation_type(y, kernel), **_CT_KWARGS,
    )
    return out.astype(jnp.result_type(y, kernel))


def _autodiff_forward(y, kernel, strides, pads, op, dilation, groups):
    """The gather recipe as one ``lax.conv_general_dilated`` with ``lhs_dilation`` (what
    ``lax.conv_transpose`` lowers to), for any rank, dilation and groups; JAX differentiates
    it. On 2-D ungrouped geometries it is ``lax.conv_transpose`` itself."""
    if y.ndim == 4 and groups == 1 and all(d == 1 for d in dilation):
        return _lax_forward(y, kernel, strides, pads, op)
    nd = y.ndim - 2
    out = lax.conv_general_dilated(
        y, ops.gather_kernel(kernel, groups), (1,) * nd,
        ops.gather_padding(kernel.shape[:nd], pads, op, dilation), lhs_dilation=strides,
        rhs_dilation=dilation, dimension_numbers=ops.dimension_numbers(nd),
        feature_group_count=groups, preferred_element_type=ops.accumulation_type(y, kernel))
    return out.astype(jnp.result_type(y, kernel))


LAX = ops.Implementation.from_forward(_lax_forward)
AUTODIFF = ops.Implementation(with_vjp=_autodiff_forward, forward_only=_autodiff_forward)


def conv_transpose_autodiff(y: jax.Array, kernel: jax.Array, strides=1,
                            padding: ops.PaddingLike = 0, output_padding=0) -> jax.Array:
    """``cae.ops.conv_transpose`` computed by plain ``lax.conv_transpose`` and differentiated
    by JAX's own autodiff (``AUTODIFF``)."""
    return ops.conv_transpose(y, kernel, strides, padding, output_padding, impl=AUTODIFF)


# ----------------------------------------------------------------------------------------------
# "phase": all phases as one im2col GEMM per pass
# ----------------------------------------------------------------------------------------------

# Below this many combined output channels (s_h * s_w * C_in) a GEMM is too thin to pay for the
# im2col copy; the forward then uses one stride-1 XLA conv with the combined kernel, and the
# backward the shared one (C_in = 1, dec3, is faster that way; BENCHMARKS.md, "Issue 6:
# conv_transpose vs PyTorch (CPU)").
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
    out_h = ops.conv_transpose_output_size(h, kh, strides[0], pads[0], op[0])
    out_w = ops.conv_transpose_output_size(w, kw, strides[1], pads[1], op[1])
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


def _phase_forward(y, kernel, strides, pads, op, dilation=(1, 1), groups=1):
    _only_2d_ungrouped("phase", y, dilation, groups)
    ph, pw, out_h, out_w = _phase_plans(y.shape, kernel.shape, strides, pads, op)
    acc = ops.accumulation_type(y, kernel)
    dtype = jnp.result_type(y, kernel)
    kc = _phase_kernel(kernel, ph, pw)
    yp = _phase_pad(y, ph, pw)
    if _phase_use_gemm(kernel, strides):
        z = jnp.einsum("nhwk,ko->nhwo", _phase_patches(yp, ph, pw),
                       kc.reshape(-1, kc.shape[-1]), preferred_element_type=acc)
    else:
        z = lax.conv_general_dilated(yp, kc, (1, 1), "VALID", dimension_numbers=DN,
                                     preferred_element_type=acc)
    return _phase_interleave(z.astype(dtype), ph, pw, kernel.shape[2], out_h, out_w)


def _phase_backward(strides, pads, op, dilation, groups, res, g):
    """Adjoint of each linear step of the forward, written out: g -> g_z (space-to-depth, the
    transpose of the interleave); g_Kc = patches(ypad)^T g_z (one GEMM contracting N*U_h*U_w);
    g_patches = g_z Kc^T (one GEMM), folded back onto y (transpose of the im2col slices and
    the pad). Thin problems use the shared backward (see _PHASE_GEMM_MIN_CHANNELS)."""
    y, kernel = res
    if not _phase_use_gemm(kernel, strides):
        return ops.conv_transpose_cotangents(strides, pads, op, dilation, groups, res, g)
    ph, pw, _, _ = _phase_plans(y.shape, kernel.shape, strides, pads, op)
    acc = ops.accumulation_type(g, y, kernel)
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


PHASE = ops.Implementation.from_forward(_phase_forward, _phase_backward)


VARIANTS = {"lax": LAX, "phase": PHASE, "autodiff": AUTODIFF}
