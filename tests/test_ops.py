"""Tests for ``cae.ops``: ``conv`` (``C``) and its exact adjoint ``conv_transpose`` (``C^T``).

Layouts: activations NHWC, kernels HWIO ``[kh, kw, C_in, C_out]`` (the forward conv's kernel is
also what ``conv_transpose`` takes). ``x: [N, H, W, C_in]``, ``y = C x: [N, H', W', C_out]``.

What is tested, against what (every check compares computed numbers; nothing is mocked):

1. Adjoint identity ``<C x, y> == <x, C^T y>`` on 30 seeded geometries that cover every
   (kernel 1-5, stride 1-3, output_padding in [0, stride)) combination on each spatial axis,
   random asymmetric paddings in 0..k-1, channels 1-6, batch 1-3, non-square images; every
   implementation (``ops.IMPLEMENTATIONS``: "subpixel", "subpixel_phasewise", "zero_insertion",
   and the comparison-only "lax" and "phase" of ``scripts/conv_transpose_variants.py``).
2. ``conv_transpose`` equals three references written here from first principles: (a) zero
   insertion + "full" padding + stride-1 ``ops.conv`` with the 180-degree-rotated, I/O-swapped
   kernel, (b) ``C^T vec(y)`` with the dense matrix ``C`` built entry by entry in NumPy,
   (c) a NumPy scatter-add (col2im). ``ops.conv`` equals a NumPy direct loop and ``C vec(x)``.
3. ``conv_transpose`` equals ``jax.vjp`` of ``ops.conv`` w.r.t. its input, TensorFlow's
   ``tf.nn.conv2d_transpose`` ("SAME"/"VALID") and PyTorch's ``conv_transpose2d`` (installed
   by CI; ``tests/torch_import.py``). N-D, groups and dilation: ``tests/test_ops_nd.py``.
4. The custom VJPs: gradients w.r.t. y and kernel equal autodiff of plain
   ``lax.conv_transpose`` (``AUTODIFF``) and NumPy references; ``check_grads`` to
   order 2 (reverse mode; ``custom_vjp`` has no forward mode); the gradient's program really is
   the custom backward (its jaxpr: canonical-layout convs only, no zero insertion).
5. Shape arithmetic: the examples of Dumoulin & Visin, "A guide to convolution arithmetic for
   deep learning" (arXiv:1603.07285), ``output_padding_for`` (also as a hypothesis property) and
   ``ValueError`` messages for impossible requests.
6. ``jit``, ``vmap`` (incl. of ``grad``), bf16 inputs (bf16 result, f32 accumulation).
7. ``conv`` with "SAME"/"VALID" equals ``lax.conv_general_dilated`` with the same strings.

Kept fast: jitted functions are module-level with static geometry, so tests that share a case
share its compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_transpose_variants import AUTODIFF, LAX, PHASE
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads
from torch_import import import_torch

from cae import cpu_speed, ops

# Every form of C^T: the shipped ones by name, the comparison-only ones as Implementation objects.
IMPLS = {**{name: name for name in sorted(ops.IMPLEMENTATIONS)}, "lax": LAX, "phase": PHASE}
IMPL_PARAMS = [pytest.param(impl, id=name) for name, impl in IMPLS.items()]
DN = ("NHWC", "HWIO", "NHWC")

# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One geometry. ``x: [n, *x_hw, c_in]``, ``y: [n, *y_hw, c_out]``,
    ``kernel: [*k, c_in, c_out]``; ``conv(x)`` has y's shape and ``conv_transpose(y)`` x's."""

    n: int
    x_hw: tuple[int, int]
    y_hw: tuple[int, int]
    c_in: int
    c_out: int
    k: tuple[int, int]
    s: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    op: tuple[int, int]
    seed: int

    @property
    def id(self) -> str:
        (t, b), (lf, r) = self.pads
        return (f"k{self.k[0]}x{self.k[1]}-s{self.s[0]}x{self.s[1]}-p{t}{b}{lf}{r}"
                f"-op{self.op[0]}{self.op[1]}-c{self.c_in}.{self.c_out}-n{self.n}"
                f"-y{self.y_hw[0]}x{self.y_hw[1]}")

    def arrays(self):
        """float32 ``(x, y, kernel, g)``; g is a cotangent with x's shape."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.n, *self.x_hw, self.c_in)).astype(np.float32)
        y = rng.standard_normal((self.n, *self.y_hw, self.c_out)).astype(np.float32)
        kernel = rng.standard_normal((*self.k, self.c_in, self.c_out)).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        return x, y, kernel, g

    def kw(self) -> dict:
        return dict(strides=self.s, padding=self.pads, output_padding=self.op)


def make_case(k, s, pads, op, y_hw, c_in=2, c_out=3, n=2, seed=0) -> Case:
    x_hw = tuple(ops.conv_transpose_output_size(h, kk, ss, p, o)
                 for h, kk, ss, p, o in zip(y_hw, k, s, pads, op))
    return Case(n, x_hw, tuple(y_hw), c_in, c_out, tuple(k), tuple(s),
                tuple(tuple(p) for p in pads), tuple(op), seed)


# Every (kernel, stride, output_padding) triple: 5 * (1 + 2 + 3) = 30.
AXIS_COMBOS = [(k, s, o) for k in range(1, 6) for s in range(1, 4) for o in range(s)]


def _make_cases(seed: int = 20240611) -> list[Case]:
    """30 geometries; axis H walks AXIS_COMBOS in order, axis W in a seeded permutation, so each
    axis sees every (k, s, op). Paddings are drawn per side from 0..k-1 (asymmetric), y's size
    from 1..4 (redrawn while the transposed output would be empty)."""
    rng = np.random.default_rng(seed)
    w_order = rng.permutation(len(AXIS_COMBOS))
    cases = []
    for h_combo, wi in zip(AXIS_COMBOS, w_order):
        axes = []
        for k, s, o in (h_combo, AXIS_COMBOS[wi]):
            while True:
                lo, hi = (int(v) for v in rng.integers(0, k, 2))
                size_y = int(rng.integers(1, 5))
                if ops.conv_transpose_output_size(size_y, k, s, (lo, hi), o) >= 1:
                    break
            axes.append((k, s, (lo, hi), o, size_y))
        c_in, c_out = (int(v) for v in rng.integers(1, 7, 2))
        n = int(rng.integers(1, 4))
        (kh, sh, ph, oh, yh), (kw_, sw, pw, ow, yw) = axes
        cases.append(make_case((kh, kw_), (sh, sw), (ph, pw), (oh, ow), (yh, yw), c_in, c_out, n,
                               seed=int(rng.integers(2**31))))
    return cases


CASES = _make_cases()


def _greedy_cover(cases: list[Case]) -> list[Case]:
    """A small subset of ``cases`` (greedy set cover, deterministic) that still has every
    kernel size, every (stride, output_padding) pair and asymmetric padding on both axes."""

    def items(c: Case) -> set:
        out = set()
        for a in (0, 1):
            out |= {("k", a, c.k[a]), ("s_op", a, c.s[a], c.op[a])}
            out |= {("asym", a)} if c.pads[a][0] != c.pads[a][1] else set()
        return out

    todo = set().union(*(items(c) for c in cases))
    chosen = []
    while todo:
        best = max(cases, key=lambda c: len(items(c) & todo))
        chosen.append(best)
        todo -= items(best)
    return chosen


GRAD_CASES = _greedy_cover(CASES)
GRAD_CASES += [c for c in CASES[::6] if c not in GRAD_CASES]  # 11 in all


def case_params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# ----------------------------------------------------------------------------------------------
# Jitted entry points shared by tests (one compile per geometry)
# ----------------------------------------------------------------------------------------------

_GEOM = ("strides", "padding", "output_padding")

ct_jit = jax.jit(ops.conv_transpose, static_argnames=(*_GEOM, "impl"))
conv_jit = jax.jit(ops.conv, static_argnames=("strides", "padding"))


@functools.partial(jax.jit, static_argnames=(*_GEOM, "impl"))
def grad_ct(y, kernel, g, strides, padding, output_padding, impl):
    """Gradient of ``sum(conv_transpose(y, k) * g)`` w.r.t. (y, kernel)."""

    def loss(y, kernel):
        out = ops.conv_transpose(y, kernel, strides, padding, output_padding, impl=impl)
        return jnp.sum(out * g)

    return jax.grad(loss, argnums=(0, 1))(y, kernel)


def inner64(a, b) -> float:
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def assert_close(actual, desired, rtol=1e-5, atol=1e-5, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64),
                               rtol=rtol, atol=atol, err_msg=err_msg)


# ----------------------------------------------------------------------------------------------
# First-principles references (NumPy; none of them calls ops.conv_transpose)
# ----------------------------------------------------------------------------------------------


def np_conv(x, kernel, s, pads):
    """Direct loop: ``y[n, o, p, co] = sum x_pad[n, o*sh + j, p*sw + l, ci] K[j, l, ci, co]``.
    x: [N, H, W, C_in], kernel: [kh, kw, C_in, C_out] -> [N, H', W', C_out] (float64)."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    kh, kw, _, c_out = kernel.shape
    ho = (xp.shape[1] - kh) // s[0] + 1
    wo = (xp.shape[2] - kw) // s[1] + 1
    out = np.zeros((xp.shape[0], ho, wo, c_out))
    for o in range(ho):
        for p in range(wo):
            for j in range(kh):
                for lj in range(kw):
                    out[:, o, p, :] += xp[:, o * s[0] + j, p * s[1] + lj, :] @ kernel[j, lj]
    return out


def dense_conv_matrix(x_hw, kernel, s, pads):
    """The matrix of ``C`` on one image: ``vec(y) = C vec(x)`` with C-order vec of [H, W, C].
    Built entry by entry: output (o, p, co) gets K[j, l, ci, co] from input
    (o*sh - top + j, p*sw - left + l, ci) when that lies inside the image. [H'W'C_out, HWC_in]."""
    h, w = x_hw
    kernel = np.asarray(kernel, np.float64)
    kh, kw, c_in, c_out = kernel.shape
    (top, bottom), (left, right) = pads
    ho = (h + top + bottom - kh) // s[0] + 1
    wo = (w + left + right - kw) // s[1] + 1
    mat = np.zeros((ho * wo * c_out, h * w * c_in))
    for o in range(ho):
        for p in range(wo):
            rows = (o * wo + p) * c_out + np.arange(c_out)
            for j in range(kh):
                for lj in range(kw):
                    i, q = o * s[0] - top + j, p * s[1] - left + lj
                    if 0 <= i < h and 0 <= q < w:
                        cols = (i * w + q) * c_in + np.arange(c_in)
                        mat[np.ix_(rows, cols)] += kernel[j, lj].T
    return mat


def ref_col2im(y, kernel, s, pads, x_hw):
    """Scatter-add: each ``y[n, o, p]`` times the kernel is added at offset (o*sh, p*sw) of a
    buffer whose index 0 is input position ``-top`` (resp. ``-left``); then crop to x_hw.
    Rows of x that no tap reaches (output_padding) stay 0. -> [N, H, W, C_in] float64."""
    y = np.asarray(y, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, ho, wo, _ = y.shape
    kh, kw, c_in, _ = kernel.shape
    top, left = pads[0][0], pads[1][0]
    h, w = x_hw
    buf = np.zeros((n, max((ho - 1) * s[0] + kh, top + h), max((wo - 1) * s[1] + kw, left + w),
                    c_in))
    for o in range(ho):
        for p in range(wo):
            buf[:, o * s[0]:o * s[0] + kh, p * s[1]:p * s[1] + kw, :] += np.einsum(
                "nc,jlic->njli", y[:, o, p], kernel)
    return buf[:, top:top + h, left:left + w]


def ref_zero_insertion(y, kernel, s, pads, op):
    """Gather form: s-1 zeros between entries of y, pad k-1-lo before and k-1-hi+op after,
    stride-1 ``ops.conv`` with the kernel rotated 180 degrees and I/O swapped."""
    y = np.asarray(y)
    n, ho, wo, c_out = y.shape
    kh, kw = kernel.shape[:2]
    up = np.zeros((n, (ho - 1) * s[0] + 1, (wo - 1) * s[1] + 1, c_out), y.dtype)
    up[:, ::s[0], ::s[1]] = y
    (top, bottom), (left, right) = pads
    padded = np.pad(up, ((0, 0), (kh - 1 - top, kh - 1 - bottom + op[0]),
                         (kw - 1 - left, kw - 1 - right + op[1]), (0, 0)))
    rotated = np.asarray(kernel)[::-1, ::-1].transpose(0, 1, 3, 2)  # [kh, kw, C_out, C_in]
    return ops.conv(jnp.asarray(padded), jnp.asarray(rotated), 1, 0)


def ref_kernel_grad(g, y, k_hw, s, pads):
    """``d<C^T y, g>/dK[j, l, ci, co] = sum_{n,o,p} g[n, o*sh-top+j, p*sw-left+l, ci]
    y[n, o, p, co]`` (out-of-image g taps are 0). -> [kh, kw, C_in, C_out] float64."""
    g = np.asarray(g, np.float64)
    y = np.asarray(y, np.float64)
    n, h, w, c_in = g.shape
    _, ho, wo, c_out = y.shape
    dk = np.zeros((*k_hw, c_in, c_out))
    for j in range(k_hw[0]):
        for lj in range(k_hw[1]):
            for o in range(ho):
                for p in range(wo):
                    i, q = o * s[0] - pads[0][0] + j, p * s[1] - pads[1][0] + lj
                    if 0 <= i < h and 0 <= q < w:
                        dk[j, lj] += g[:, i, q, :].T @ y[:, o, p, :]
    return dk


# ----------------------------------------------------------------------------------------------
# 1. Adjoint identity
# ----------------------------------------------------------------------------------------------


def test_case_generator_covers_the_grid():
    """The generated cases really cover what the adjoint tests claim to cover."""
    for axis in (0, 1):
        seen = {(c.k[axis], c.s[axis], c.op[axis]) for c in CASES}
        assert seen == set(AXIS_COMBOS)
        assert {c.k[axis] for c in GRAD_CASES} == set(range(1, 6))
        assert {(c.s[axis], c.op[axis]) for c in GRAD_CASES} == {(s, o) for _, s, o in seen}
    for c in CASES:
        assert all(0 <= p < k for pair, k in zip(c.pads, c.k) for p in pair)
        assert all(0 <= o < s for o, s in zip(c.op, c.s))
    assert any(p[0] != p[1] for c in CASES for p in c.pads)  # asymmetric
    assert any(p == k - 1 >= 3 for c in CASES for pair, k in zip(c.pads, c.k) for p in pair)
    assert sum(c.x_hw[0] != c.x_hw[1] for c in CASES) >= len(CASES) // 2  # non-square
    assert {c.n for c in CASES} == {1, 2, 3}
    assert {1, 6} <= {c.c_in for c in CASES} | {c.c_out for c in CASES}


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("case", case_params(CASES))
def test_adjoint_identity(case, impl):
    """<conv(x), y> == <x, conv_transpose(y)> with x: [n, *x_hw, c_in], y: [n, *y_hw, c_out]."""
    x, y, kernel, _ = case.arrays()
    assert ops.output_padding_for(case.x_hw, case.k, case.s, case.pads) == case.op
    cx = conv_jit(x, kernel, strides=case.s, padding=case.pads)
    cty = ct_jit(y, kernel, **case.kw(), impl=impl)
    assert cx.shape == y.shape and cty.shape == x.shape
    lhs, rhs = inner64(cx, y), inner64(x, cty)
    # Relative error w.r.t. sum |Cx * y|, the condition scale of a dot product: |lhs| alone can be
    # ~0 by chance (random signs); a wrong entry of C^T y still gives an error of O(1e-2..1).
    scale = inner64(np.abs(cx), np.abs(y))
    assert abs(lhs - rhs) <= 1e-5 * scale, (lhs, rhs, scale)


# ----------------------------------------------------------------------------------------------
# 2. Independent references
# ----------------------------------------------------------------------------------------------


@functools.cache
def _references(case: Case):
    x, y, kernel, _ = case.arrays()
    mat = dense_conv_matrix(case.x_hw, kernel, case.s, case.pads)
    dense = np.stack([(mat.T @ yi.reshape(-1)).reshape(*case.x_hw, case.c_in) for yi in y])
    return {
        "zero_insertion": np.asarray(ref_zero_insertion(y, kernel, case.s, case.pads, case.op)),
        "dense_matrix": dense,
        "col2im": ref_col2im(y, kernel, case.s, case.pads, case.x_hw),
    }


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("case", case_params(CASES))
def test_matches_first_principles_references(case, impl):
    """conv_transpose(y) [n, *x_hw, c_in] == zero insertion, == C^T vec(y), == col2im."""
    _, y, kernel, _ = case.arrays()
    out = ct_jit(y, kernel, **case.kw(), impl=impl)
    for name, ref in _references(case).items():
        assert ref.shape == out.shape, name
        assert_close(out, ref, err_msg=name)


@pytest.mark.parametrize("case", case_params(CASES[:10]))
def test_conv_matches_numpy_loop_and_dense_matrix(case):
    """conv(x) [n, *y_hw, c_out] == direct NumPy loop == C vec(x)."""
    x, _, kernel, _ = case.arrays()
    out = conv_jit(x, kernel, strides=case.s, padding=case.pads)
    assert_close(out, np_conv(x, kernel, case.s, case.pads), err_msg="loop")
    mat = dense_conv_matrix(case.x_hw, kernel, case.s, case.pads)
    dense = np.stack([(mat @ xi.reshape(-1)).reshape(out.shape[1:]) for xi in x])
    assert_close(out, dense, err_msg="dense")


def test_references_agree_with_each_other_on_a_hand_case():
    """Guard against a shared mistake in the references: 1-D-like case computed by hand.
    y = [1, 2] (H'=2), kernel [a, b, c] = [1, 10, 100], s=2, pads (1, 1), op 1:
    x has (2-1)*2 - 2 + 3 + 1 = 4 rows; x[i] = sum_o y[o] K[i - 2o + 1]:
    x[0] = y0*K1 = 10, x[1] = y0*K2 + y1*K0 = 100 + 2 = 102, x[2] = y1*K1 = 20, x[3] = y1*K2 = 200.
    """
    y = np.array([1.0, 2.0], np.float32).reshape(1, 2, 1, 1)
    kernel = np.array([1.0, 10.0, 100.0], np.float32).reshape(3, 1, 1, 1)
    s, pads, op = (2, 1), ((1, 1), (0, 0)), (1, 0)
    want = np.array([10.0, 102.0, 20.0, 200.0]).reshape(1, 4, 1, 1)
    assert_close(ref_col2im(y, kernel, s, pads, (4, 1)), want)
    assert_close(ref_zero_insertion(y, kernel, s, pads, op), want)
    mat = dense_conv_matrix((4, 1), kernel, s, pads)
    assert_close((mat.T @ y.reshape(-1)).reshape(want.shape), want)
    for impl in IMPLS.values():
        assert_close(ops.conv_transpose(y, kernel, s, pads, op, impl=impl), want)


# ----------------------------------------------------------------------------------------------
# 3. jax.vjp of conv, TensorFlow, PyTorch
# ----------------------------------------------------------------------------------------------

VJP_CASES = CASES[1::5] + [
    # "SAME"/"VALID" strings: x size chosen, op from output_padding_for.
    ("SAME", (7, 8), (3, 3), (2, 2)),
    ("SAME", (5, 9), (4, 2), (3, 2)),
    ("VALID", (9, 6), (3, 2), (2, 3)),
    ("SAME", (1, 4), (5, 3), (1, 2)),
]


def _string_pad_case(spec, x_hw, k, s):
    pads = ops.resolve_padding(spec, x_hw, k, s)
    y_hw = tuple(ops.conv_output_size(h, kk, ss, p) for h, kk, ss, p in zip(x_hw, k, s, pads))
    op = ops.output_padding_for(x_hw, k, s, spec)
    return x_hw, y_hw, op


@functools.partial(jax.jit, static_argnames=("strides", "padding"))
def _vjp_of_conv(x, kernel, y, strides, padding):
    _, vjp = jax.vjp(lambda x: ops.conv(x, kernel, strides, padding), x)
    return vjp(y)[0]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("spec", [pytest.param(c, id=c.id if isinstance(c, Case) else
                                               f"{c[0]}-x{c[1][0]}x{c[1][1]}-k{c[2]}-s{c[3]}")
                                  for c in VJP_CASES])
def test_matches_vjp_of_conv(spec, impl):
    """conv_transpose(y) == vjp of x -> conv(x) at cotangent y, x: [N, H, W, C_in]."""
    if isinstance(spec, Case):
        x, y, kernel, _ = spec.arrays()
        padding, s, op = spec.pads, spec.s, spec.op
    else:
        padding, x_hw, k, s = spec
        x_hw, y_hw, op = _string_pad_case(padding, x_hw, k, s)
        rng = np.random.default_rng(7)
        x = rng.standard_normal((2, *x_hw, 3)).astype(np.float32)
        y = rng.standard_normal((2, *y_hw, 4)).astype(np.float32)
        kernel = rng.standard_normal((*k, 3, 4)).astype(np.float32)
    want = _vjp_of_conv(x, kernel, y, s, padding)
    got = ct_jit(y, kernel, strides=s, padding=padding, output_padding=op, impl=impl)
    assert got.shape == x.shape
    assert_close(got, want)


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf  # project dependency; imported lazily (slow import)

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: fine for CPU-only tests
        pass
    return tf


TF_CASES = [  # (padding, x_hw, kernel, strides)
    ("SAME", (7, 7), (3, 3), (2, 2)),
    ("SAME", (9, 10), (4, 5), (3, 2)),
    ("SAME", (5, 6), (2, 1), (1, 3)),
    ("SAME", (3, 11), (5, 2), (2, 3)),
    ("VALID", (8, 11), (3, 4), (2, 3)),
    ("VALID", (9, 6), (5, 2), (3, 1)),
    ("VALID", (5, 5), (5, 1), (2, 2)),
]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("padding,x_hw,k,s", TF_CASES)
def test_matches_tensorflow_conv2d_transpose(tf, padding, x_hw, k, s, impl):
    """tf.nn.conv2d_transpose(y, K, output_shape=[N, H, W, C_in]) with TF's filter layout
    [kh, kw, out_channels, in_channels] == our HWIO forward kernel [kh, kw, C_in, C_out].
    SAME: H = (H'-1)*s + 1 + op; VALID: H = (H'-1)*s + k + op."""
    n, c_in, c_out = 2, 3, 5
    h_out = [(-(-x // st) if padding == "SAME" else (x - kk) // st + 1)
             for x, kk, st in zip(x_hw, k, s)]
    if padding == "SAME":
        op = tuple(x - ((ho - 1) * st + 1) for x, ho, st in zip(x_hw, h_out, s))
    else:
        op = tuple(x - ((ho - 1) * st + kk) for x, ho, st, kk in zip(x_hw, h_out, s, k))
    assert op == ops.output_padding_for(x_hw, k, s, padding)
    rng = np.random.default_rng(sum(x_hw) + 10 * sum(k))
    y = rng.standard_normal((n, *h_out, c_out)).astype(np.float32)
    kernel = rng.standard_normal((*k, c_in, c_out)).astype(np.float32)
    want = tf.nn.conv2d_transpose(y, kernel, output_shape=[n, *x_hw, c_in], strides=[1, *s, 1],
                                  padding=padding).numpy()
    got = ct_jit(y, kernel, strides=s, padding=padding, output_padding=op, impl=impl)
    assert got.shape == want.shape
    assert_close(got, want, atol=2e-5)


TORCH_CASES = [  # (kernel, stride, symmetric padding, output_padding, y_hw)
    (3, 2, 1, 1, (7, 5)), (4, 2, 1, 1, (3, 6)), (5, 3, 2, 2, (3, 2)), (1, 2, 0, 1, (3, 3)),
]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("k,s,p,op,y_hw", TORCH_CASES)
def test_matches_torch_conv_transpose2d(k, s, p, op, y_hw, impl):
    """torch weight [C_out(=y channels), C_in, kh, kw] is our HWIO kernel transposed
    (3, 2, 0, 1); torch's output_padding is ours. Runs in CI (tests/torch_import.py)."""
    torch = import_torch()
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    y = rng.standard_normal((2, *y_hw, 4)).astype(np.float32)
    kernel = rng.standard_normal((k, k, 3, 4)).astype(np.float32)
    want = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(y.transpose(0, 3, 1, 2)),
        torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))),
        stride=s, padding=p, output_padding=op).numpy().transpose(0, 2, 3, 1)
    got = ct_jit(y, kernel, strides=s, padding=p, output_padding=op, impl=impl)
    assert got.shape == want.shape
    assert_close(got, want, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# 4. Custom VJP
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("case", case_params(GRAD_CASES))
def test_grads_match_autodiff_and_references(case, impl):
    """d sum(conv_transpose(y, K) * g) / d(y, K): custom VJP == autodiff of plain
    lax.conv_transpose == (conv(g), NumPy backward-filter sum). y: [n, *y_hw, c_out]."""
    _, y, kernel, g = case.arrays()
    gy, gk = grad_ct(y, kernel, g, **case.kw(), impl=impl)
    ay, ak = grad_ct(y, kernel, g, **case.kw(), impl=AUTODIFF)
    assert gy.shape == y.shape and gk.shape == kernel.shape
    assert_close(gy, ay, err_msg="d/dy vs autodiff")
    assert_close(gk, ak, err_msg="d/dK vs autodiff")
    assert_close(gy, np_conv(g, kernel, case.s, case.pads), err_msg="d/dy vs C g")
    assert_close(gk, ref_kernel_grad(g, y, case.k, case.s, case.pads), rtol=1e-4, atol=1e-4,
                 err_msg="d/dK vs NumPy")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_grads_of_a_wide_two_layer_decoder_match_autodiff(impl):
    """relu between two conv_transposes with >= 8 channels (the decoder's shape; the geometry
    cases above are thinner, and "auto" picks "subpixel" only from 8 channels on), gradients
    w.r.t. y and both kernels. y: [3, 4, 4, 16] -> 7x7x8 -> 14x14x1."""
    rng = np.random.default_rng(7)
    y = jnp.asarray(rng.standard_normal((3, 4, 4, 16)), jnp.float32)
    k1 = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) / 12, jnp.float32)
    k2 = jnp.asarray(rng.standard_normal((3, 3, 1, 8)) / 8, jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 14, 14, 1)), jnp.float32)

    def loss(y, k1, k2, impl):
        h = jax.nn.relu(ops.conv_transpose(y, k1, 2, 1, 0, impl=impl))
        return jnp.sum(ops.conv_transpose(h, k2, 2, 1, 1, impl=impl) * g)

    got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(y, k1, k2, impl)
    want = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(y, k1, k2, AUTODIFF)
    for a, b, name in zip(got, want, ("y", "K1", "K2")):
        assert_close(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")


@pytest.mark.parametrize("case", case_params(GRAD_CASES))
def test_conv_grads_match_lax_autodiff_and_references(case):
    """d sum(conv(x, K) * y) / d(x, K): ops.conv's custom VJP (conv_transpose + a
    canonical-layout backward-filter conv)
    == JAX's autodiff of plain lax.conv_general_dilated == (col2im of y, NumPy sum), also when
    the same step runs inside lax.scan (where the fast path matters). Cases include rows of x
    that no window reaches (output_padding > 0): their cotangent must be 0."""
    x, y, kernel, _ = case.arrays()

    def loss(conv_fn):
        return lambda x, k: jnp.sum(conv_fn(x, k) * y)

    def plain(x, k):
        return lax.conv_general_dilated(x, k, case.s, case.pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    ours = jax.jit(jax.grad(loss(lambda x, k: ops.conv(x, k, case.s, case.pads)), (0, 1)))
    gx, gk = ours(x, kernel)
    ax, ak = jax.grad(loss(plain), (0, 1))(x, kernel)
    assert_close(gx, ax, err_msg="d/dx vs autodiff")
    assert_close(gk, ak, err_msg="d/dK vs autodiff")
    assert_close(gx, ref_col2im(y, kernel, case.s, case.pads, case.x_hw), err_msg="d/dx vs col2im")
    assert_close(gk, ref_kernel_grad(x, y, case.k, case.s, case.pads), rtol=1e-4, atol=1e-4,
                 err_msg="d/dK vs NumPy")
    stacked = jnp.stack([x, 2 * x])
    _, (sx, sk) = jax.jit(lambda xs: lax.scan(lambda c, xi: (c, ours(xi, kernel)), 0.0, xs))(
        stacked)
    assert_close(sx[1], gx)
    assert_close(sk[1], 2 * np.asarray(gk), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_custom_grad_where_autodiff_aborts_xla(impl):
    """Geometry where jax.grad of plain lax.conv_transpose w.r.t. the kernel aborts the process
    in XLA CPU's AlgebraicSimplifier (jax/jaxlib 0.10.2: "Window dimensions do not match RHS
    shape"), so autodiff cannot be the reference here: the custom VJP must still be right.
    y: [2, 3, 2, 3], kernel: [4, 2, 2, 3], s=(2, 1), pads ((3, 3), (0, 0)) -> x: [2, 2, 3, 2]."""
    case = make_case((4, 2), (2, 1), ((3, 3), (0, 0)), (0, 0), (3, 2), c_in=2, c_out=3, n=2)
    _, y, kernel, g = case.arrays()
    gy, gk = grad_ct(y, kernel, g, **case.kw(), impl=impl)
    assert_close(gy, np_conv(g, kernel, case.s, case.pads))
    assert_close(gk, ref_kernel_grad(g, y, case.k, case.s, case.pads))


CHECK_GRADS_CASES = [  # asymmetric padding, stride 2 and 3, every output_padding > 0
    make_case((3, 2), (2, 3), ((1, 0), (0, 1)), (1, 2), (2, 3), c_in=2, c_out=2, n=1),
]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("case", case_params(CHECK_GRADS_CASES))
def test_check_grads_second_order(case, impl):
    """jax.test_util.check_grads, order 2, reverse mode (custom_vjp has no forward mode; the
    second order works because the custom backward is itself made of differentiable convs)."""
    _, y, kernel, _ = case.arrays()
    f = functools.partial(ops.conv_transpose, **case.kw(), impl=impl)
    check_grads(jax.jit(lambda y, k: jnp.sin(f(y, k))), (y, kernel), order=2, modes=["rev"],
                atol=2e-2, rtol=2e-2, eps=1e-2)


def _conv_eqns(jaxpr, primitives=("conv_general_dilated",)):
    """All equations of ``primitives``, recursing into sub-jaxprs (jit, custom_vjp...)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            out.append(eqn)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(_conv_eqns(inner, primitives))
    return out


# s=2, C_in=2: thin enough that "phase" uses the shared backward, not its GEMMs.
JAXPR_CASE = make_case((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (3, 4))
JAXPR_PARAMS = [*IMPL_PARAMS, pytest.param(AUTODIFF, id="autodiff")]


def _grad_convs(impl) -> list:
    """The conv equations of the jitted gradient of ``sum(conv_transpose(y, K) * g)``."""
    _, y, kernel, g = JAXPR_CASE.arrays()
    jaxpr = jax.make_jaxpr(
        lambda y, k: grad_ct(y, k, g, **JAXPR_CASE.kw(), impl=impl))(y, kernel).jaxpr
    return _conv_eqns(jaxpr)


@pytest.mark.parametrize("impl", JAXPR_PARAMS)
def test_gradient_is_the_custom_backward(impl):
    """What JAX differentiates is the custom backward, not the forward: JAX's transpose rules for
    a conv permute its dimension numbers (the autodiff baseline's gradient has such convs),
    while every custom backward keeps all its convs in the canonical NHWC/HWIO layout (the
    layout that stays fast inside lax.scan on CPU). The shared backward computes the y cotangent
    as one strided conv ``C g``; "subpixel_phasewise" as s*s stride-1 convs, none strided;
    "gemm" as GEMMs only (no convolution anywhere)."""
    canonical = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), DN)
    convs = _grad_convs(impl)
    if impl == "gemm":
        assert convs == []
        return
    layouts = [e.params["dimension_numbers"] == canonical for e in convs]
    strided = [e for e in convs if tuple(e.params["window_strides"]) == JAXPR_CASE.s]
    if impl is AUTODIFF:
        assert not all(layouts)
        return
    assert all(layouts), [e.params["dimension_numbers"] for e in convs]
    assert len(strided) == (0 if impl in ("subpixel_phasewise", "subpixel_phasewise_gemm")
                            else 1)


@pytest.mark.parametrize("impl", JAXPR_PARAMS)
def test_grad_jaxpr_has_no_zero_insertion_in_backward(impl):
    """Zero insertion is ``lhs_dilation > 1``. Autodiff of lax.conv_transpose dilates y again in
    the backward-filter conv (2 dilated convs); the custom backward uses strides/rhs_dilation
    instead: "lax" keeps only its forward one, the others have none at all."""
    convs = _grad_convs(impl)
    dilated = [e for e in convs if tuple(e.params["lhs_dilation"]) != (1, 1)]
    want = {AUTODIFF: 2, LAX: 1}.get(impl, 0)
    assert len(dilated) == want, [e.params for e in convs]


# ----------------------------------------------------------------------------------------------
# 5. Shape arithmetic and errors
# ----------------------------------------------------------------------------------------------

# Dumoulin & Visin (arXiv:1603.07285), relationships 1-6 and the (i + 2p - k) % s != 0 case:
# (name, i, k, s, p, o, output_padding that transposes o back to i).
DV_CASES = [
    ("no_padding_unit_strides", 4, 3, 1, 0, 2, 0),
    ("arbitrary_padding_unit_strides", 5, 4, 1, 2, 6, 0),
    ("half_same_padding", 5, 3, 1, 1, 5, 0),
    ("full_padding", 5, 3, 1, 2, 7, 0),
    ("no_padding_strides", 5, 3, 2, 0, 2, 0),
    ("padding_strides", 5, 3, 2, 1, 3, 0),
    ("padding_strides_odd", 6, 3, 2, 1, 3, 1),
    ("issue_7_to_14", 14, 3, 2, 1, 7, 1),
    ("issue_4_to_7", 7, 3, 2, 1, 4, 0),
]


@pytest.mark.parametrize("name,i,k,s,p,o,a", DV_CASES, ids=[c[0] for c in DV_CASES])
def test_dumoulin_visin_shapes(name, i, k, s, p, o, a):
    """conv: [1, i, i+1, 1] -> [1, o, o', 1]; conv_transpose back with output_padding a."""
    # Non-square: W = i + 1 exercises the per-axis arithmetic.
    x = jnp.ones((1, i, i + 1, 1))
    kernel = jnp.ones((k, k, 1, 1))
    y = conv_jit(x, kernel, strides=s, padding=p)
    o_w = (i + 1 + 2 * p - k) // s + 1
    assert y.shape == (1, o, o_w, 1)
    assert ops.conv_output_size(i, k, s, (p, p)) == o
    op = ops.output_padding_for((i, i + 1), (k, k), s, p)
    assert op[0] == a and 0 <= op[1] < s
    assert ops.conv_transpose_output_size(o, k, s, (p, p), a) == i
    for impl in IMPLS.values():
        out = ct_jit(y, kernel, strides=s, padding=p, output_padding=op, impl=impl)
        assert out.shape == x.shape
    if a:  # without output_padding the transpose lands one short
        assert jax.eval_shape(lambda y: ops.conv_transpose(y, kernel, s, p, 0), y).shape[1] \
            == i - a


@settings(derandomize=True, max_examples=100, deadline=None)
@given(size=st.integers(1, 40), k=st.integers(1, 7), s=st.integers(1, 4),
       lo=st.integers(0, 6), hi=st.integers(0, 6), same=st.booleans())
def test_output_padding_for_round_trips(size, k, s, lo, hi, same):
    """For every forward geometry, output_padding_for gives op in [0, s) with which
    conv_transpose (traced shape) returns exactly the forward input size."""
    padding = "SAME" if same else ((lo, hi), (0, 0))
    if not same and size + lo + hi < k:
        with pytest.raises(ValueError, match="larger than the padded input"):
            ops.output_padding_for((size, 3), (k, 1), (s, 1), padding)
        return
    op = ops.output_padding_for((size, 3), (k, 1), (s, 1), padding)
    assert 0 <= op[0] < s and op[1] == 0
    x = jax.ShapeDtypeStruct((1, size, 3, 2), jnp.float32)
    kernel = jax.ShapeDtypeStruct((k, 1, 2, 3), jnp.float32)
    y = jax.eval_shape(lambda x, w: ops.conv(x, w, (s, 1), padding), x, kernel)
    if same:
        assert y.shape[1] == -(-size // s)
    back = jax.eval_shape(lambda y, w: ops.conv_transpose(y, w, (s, 1), padding, op), y, kernel)
    assert back.shape == x.shape


def test_same_output_padding_convention():
    """SAME: H = (H'-1)*s + 1 + op, so TF/Keras' default H = H'*s is op = s - 1."""
    y = jnp.ones((1, 4, 5, 1))
    kernel = jnp.ones((3, 3, 1, 1))
    for op in range(3):
        out = ops.conv_transpose(y, kernel, 3, "SAME", op)
        assert out.shape == (1, 3 * 3 + 1 + op, 4 * 3 + 1 + op, 1)
    assert ops.conv_transpose(y, kernel, 3, "SAME", 2).shape == (1, 12, 15, 1)
    assert ops.output_padding_for((12, 15), (3, 3), 3, "SAME") == (2, 2)
    assert ops.output_padding_for((10, 13), (3, 3), 3, "same") == (0, 0)


def test_padding_spec_forms_are_equivalent():
    """int, (ph, pw) and ((top, bottom), (left, right)) describe the same padding."""
    forms = [1, (1, 1), ((1, 1), (1, 1)), [[1, 1], [1, 1]], np.int64(1)]
    for form in forms:
        assert ops.resolve_padding(form, (7, 7), (3, 3), 2) == ((1, 1), (1, 1))
    assert ops.resolve_padding((2, 0), (7, 7), (3, 3), 1) == ((2, 2), (0, 0))
    assert ops.resolve_padding("valid", (7, 7), (3, 3), 1) == ((0, 0), (0, 0))
    # SAME's odd padding pixel goes after (TF): H=8, k=4, s=2 -> total 2 -> (1, 1);
    # H=7, k=4, s=2 -> out 4, total (4-1)*2+4-7 = 3 -> (1, 2).
    assert ops.resolve_padding("SAME", (8, 7), (4, 4), 2) == ((1, 1), (1, 2))


_Y = jnp.ones((1, 4, 4, 2))
_X = jnp.ones((1, 7, 7, 3))
_K = jnp.ones((3, 3, 3, 2))

ERROR_CASES = [
    # (id, thunk, regex that must name the argument and the allowed range)
    ("op_ge_stride", lambda: ops.conv_transpose(_Y, _K, 2, 1, 2),
     r"output_padding=2 out of range: need 0 <= output_padding < strides=\(2, 2\)"),
    ("op_ge_stride_one_axis", lambda: ops.conv_transpose(_Y, _K, (2, 3), 1, (1, 3)),
     r"output_padding=\(1, 3\) out of range: need 0 <= output_padding < strides"),
    ("op_negative", lambda: ops.conv_transpose(_Y, _K, 2, 1, -1),
     r"output_padding=-1 out of range: need 0 <= output_padding"),
    ("op_nonzero_stride_1", lambda: ops.conv_transpose(_Y, _K, 1, 1, 1),
     r"output_padding=1 out of range.*strides=\(1, 1\)"),
    ("op_for_stride_le_0", lambda: ops.output_padding_for((7, 7), (3, 3), 0, 1),
     r"strides=0: each stride must be >= 1"),
    ("ct_stride_0", lambda: ops.conv_transpose(_Y, _K, 0, 1),
     r"strides=0: each stride must be >= 1"),
    ("conv_stride_negative", lambda: ops.conv(_X, _K, (1, -2), 1),
     r"strides=\(1, -2\): each stride must be >= 1"),
    ("conv_stride_float", lambda: ops.conv(_X, _K, 1.5, 1), r"strides must be an int"),
    ("conv_kernel_too_large", lambda: ops.conv(_X, jnp.ones((9, 3, 3, 2)), 1, 0),
     r"kernel size 9 along H is larger than the padded input 7\+0\+0=7: need kernel <= padded"),
    ("conv_kernel_too_large_w", lambda: ops.conv(_X, jnp.ones((3, 8, 3, 2)), 1, (1, 0)),
     r"kernel size 8 along W is larger than the padded input"),
    ("op_for_kernel_too_large", lambda: ops.output_padding_for((2, 2), (5, 5), 1, 1),
     r"kernel size 5 along H is larger than the padded input 2\+1\+1=4"),
    ("conv_kernel_rank", lambda: ops.conv(_X, jnp.ones((3, 3, 3)), 1, 1),
     r"kernel must have rank 4 \[kh, kw, C_in, C_out\]"),
    ("ct_kernel_rank", lambda: ops.conv_transpose(_Y, jnp.ones((3, 3, 3, 2, 1)), 1, 1),
     r"kernel must have rank 4"),
    ("conv_input_rank", lambda: ops.conv(jnp.ones((7, 7, 3)), _K, 1, 1),
     r"x must have rank 4 \[N, H, W, C\]"),
    ("ct_input_rank", lambda: ops.conv_transpose(jnp.ones((4, 4, 2)), _K, 1, 1),
     r"y must have rank 4"),
    ("conv_channels", lambda: ops.conv(jnp.ones((1, 7, 7, 2)), _K, 1, 1),
     r"channel mismatch: x has C_in=2 but kernel .* has C_in=3"),
    ("ct_channels", lambda: ops.conv_transpose(jnp.ones((1, 4, 4, 3)), _K, 1, 1),
     r"channel mismatch: y has C=3 but kernel .* has C_out=2"),
    ("conv_padding_string", lambda: ops.conv(_X, _K, 1, "FULL"),
     r"padding='FULL': allowed strings are 'SAME' and 'VALID'"),
    ("ct_padding_string", lambda: ops.conv_transpose(_Y, _K, 1, "causal"),
     r"padding='causal': allowed strings are 'SAME' and 'VALID'"),
    ("conv_padding_negative", lambda: ops.conv(_X, _K, 1, -1),
     r"padding=-1: every padding amount must be >= 0"),
    ("ct_padding_negative", lambda: ops.conv_transpose(_Y, _K, 1, ((0, 1), (-1, 0))),
     r"every padding amount must be >= 0"),
    ("padding_malformed", lambda: ops.conv(_X, _K, 1, (1, 2, 3)),
     r"padding=\(1, 2, 3\): allowed are an int, \(ph, pw\)"),
    ("ct_padding_too_large", lambda: ops.conv_transpose(_Y, _K, 1, 4),
     r"conv_transpose output H would be -2 < 1 .*reduce the padding"),
    ("unknown_impl", lambda: ops.conv_transpose(_Y, _K, 1, 1, impl="fft"),
     r"impl='fft': allowed are \['auto', 'gemm', 'subpixel', 'subpixel_phasewise', "
     r"'subpixel_phasewise_gemm', 'zero_insertion'\]"),
    ("comparison_only_impl_by_name", lambda: ops.conv_transpose(_Y, _K, 2, 1, impl="lax"),
     r"impl='lax': allowed are \['auto', 'gemm', 'subpixel'"),
]


@pytest.mark.parametrize("thunk,match", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_impossible_requests_raise_value_error(thunk, match):
    with pytest.raises(ValueError, match=match):
        thunk()


# ----------------------------------------------------------------------------------------------
# 6. jit, vmap, grad, bf16
# ----------------------------------------------------------------------------------------------

TRANSFORM_CASE = make_case((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 0), (4, 3), c_in=2, c_out=3,
                           n=2, seed=3)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_jit_vmap_grad(impl):
    """Under jit: == col2im. vmap over an extra leading axis of y ([B, n, H', W', c_out], shared
    kernel) == loop; vmap over a stack of kernels == loop; jit(vmap(grad)) == loop of grads."""
    case = TRANSFORM_CASE
    _, y, kernel, g = case.arrays()
    f = functools.partial(ops.conv_transpose, **case.kw(), impl=impl)
    ref = functools.partial(ref_col2im, s=case.s, pads=case.pads, x_hw=case.x_hw)
    assert_close(jax.jit(f)(y, kernel), ref(y, kernel))
    ys = np.stack([y, 2 * y + 1, -y])  # [3, n, H', W', c_out]
    batched = jax.jit(jax.vmap(f, in_axes=(0, None)))(ys, kernel)
    assert batched.shape == (3, case.n, *case.x_hw, case.c_in)
    assert_close(batched, np.stack([ref(yi, kernel) for yi in ys]))
    ks = np.stack([kernel, kernel[::-1] * 0.5])  # [2, kh, kw, c_in, c_out]
    assert_close(jax.jit(jax.vmap(f, in_axes=(None, 0)))(y, ks),
                 np.stack([ref(y, ki) for ki in ks]))
    grad = jax.grad(lambda y, k: jnp.sum(f(y, k) * g), (0, 1))
    gy_b, gk_b = jax.jit(jax.vmap(grad, in_axes=(0, None)))(ys, kernel)
    for i, yi in enumerate(ys):
        gy, gk = grad_ct(yi, kernel, g, **case.kw(), impl=impl)
        assert_close(gy_b[i], gy)
        assert_close(gk_b[i], gk, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_bf16_result_dtype_and_accuracy(impl):
    """bf16 y and kernel -> bf16 x (and bf16 gradients), equal to the f32 result on the same
    (bf16-representable) inputs up to the final bf16 rounding (relative 2^-8)."""
    case = TRANSFORM_CASE
    _, y, kernel, g = case.arrays()
    yb, kb = jnp.asarray(y, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    out = ct_jit(yb, kb, **case.kw(), impl=impl)
    assert out.dtype == jnp.bfloat16
    ref = ref_col2im(yb.astype(jnp.float32), kb.astype(jnp.float32), case.s, case.pads,
                     case.x_hw)
    assert_close(out.astype(jnp.float32), ref, rtol=2**-8, atol=1e-6)
    gy, gk = grad_ct(yb, kb, jnp.asarray(g, jnp.bfloat16), **case.kw(), impl=impl)
    assert gy.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_bf16_accumulates_in_f32(impl):
    """Sums of thousands of bf16 terms: the forward (2048 channels per output) and the
    backward-filter (4096 positions per kernel entry) must be within the final bf16 rounding
    of the exact sum. bf16 accumulation would stall around 2^8-2^9 (8-bit mantissa). XLA:CPU
    computes bf16 convs in f32 whatever is requested, so on CPU only the jaxpr check (every conv,
    fwd and bwd, requests preferred_element_type=float32) can catch a regression; the numeric
    part is for accelerators."""
    rng = np.random.default_rng(0)
    # Forward: 1x1 kernel, s=1: x[ci] = sum over 2048 channels of y * K, all terms positive.
    y = jnp.asarray(1 + rng.random((1, 2, 2, 2048)) / 8, jnp.bfloat16)
    kernel = jnp.asarray(1 + rng.random((1, 1, 2, 2048)) / 8, jnp.bfloat16)
    out = ct_jit(y, kernel, strides=1, padding=0, impl=impl)
    exact = np.einsum("nhwc,ic->nhwi", np.asarray(y, np.float64),
                      np.asarray(kernel, np.float64)[0, 0])
    assert_close(np.asarray(out, np.float64), exact, rtol=2**-8, atol=0)
    # Backward-filter: dK sums g * y over n*H'*W' = 4 * 32 * 32 = 4096 positions.
    y2 = jnp.asarray(1 + rng.random((4, 32, 32, 1)) / 8, jnp.bfloat16)
    k2 = jnp.ones((1, 1, 1, 1), jnp.bfloat16)
    g2 = jnp.asarray(1 + rng.random((4, 32, 32, 1)) / 8, jnp.bfloat16)

    def loss(y, k):
        return jnp.sum((ops.conv_transpose(y, k, 1, 0, impl=impl) * g2).astype(jnp.float32))

    _, gk = jax.jit(jax.grad(loss, (0, 1)))(y2, k2)
    exact_k = np.sum(np.asarray(g2, np.float64) * np.asarray(y2, np.float64))
    assert gk.dtype == jnp.bfloat16
    assert abs(float(gk.reshape(())) - exact_k) <= 2**-8 * exact_k
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(y2, k2).jaxpr
    eqns = _conv_eqns(jaxpr, ("conv_general_dilated", "dot_general"))
    assert len(eqns) >= 3  # forward, input cotangent, kernel cotangent (a conv or a matmul)
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in eqns), \
        [e.params["preferred_element_type"] for e in eqns]


# ----------------------------------------------------------------------------------------------
# 7. SAME / VALID in conv
# ----------------------------------------------------------------------------------------------

STRING_PAD_CASES = [  # (x_hw, kernel, strides)
    ((7, 7), (3, 3), (2, 2)), ((8, 5), (3, 4), (2, 3)), ((9, 10), (5, 2), (3, 1)),
    ((4, 6), (1, 1), (3, 2)), ((5, 5), (5, 5), (1, 1)), ((1, 6), (3, 2), (2, 2)),
]


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_string_padding_matches_lax(padding):
    """ops.conv(x, K, s, "SAME"/"VALID") == lax.conv_general_dilated with the same string,
    x: [2, H, W, 3], kernel [kh, kw, 3, 4]."""
    rng = np.random.default_rng(1)
    for x_hw, k, s in STRING_PAD_CASES:
        if padding == "VALID" and any(x < kk for x, kk in zip(x_hw, k)):
            continue
        x = rng.standard_normal((2, *x_hw, 3)).astype(np.float32)
        kernel = rng.standard_normal((*k, 3, 4)).astype(np.float32)
        want = lax.conv_general_dilated(x, kernel, s, padding, dimension_numbers=DN)
        got = conv_jit(x, kernel, strides=s, padding=padding)
        assert got.shape == want.shape, (x_hw, k, s)
        assert_close(got, want, err_msg=str((x_hw, k, s)))
        assert ops.resolve_padding(padding, x_hw, k, s) == tuple(
            lax.padtype_to_pads(x_hw, k, s, padding))


def test_auto_impl_is_the_chosen_impl_exactly():
    """impl="auto" (the default) is choose_impl's pick for each layer shape, bit for bit, and the
    pick follows the documented rule."""
    assert ops.DEFAULT_IMPL == "auto"
    # k=3, s=2 (the default decoder's dec2): the sub-pixel form where cae.train traces for its
    # compile options, one im2col and two GEMMs under a plain jax.jit on the CPU
    plain = "gemm" if jax.default_backend() == "cpu" else "subpixel"
    assert ops.choose_impl((3, 3, 32, 64), 2) == plain
    assert ops.choose_impl((3, 3, 64, 16), (2, 2)) == plain
    with cpu_speed.traced_for_compile_fast():
        assert ops.choose_impl((3, 3, 32, 64), 2) == "subpixel"
        assert ops.choose_impl((3, 3, 64, 16), (2, 2)) == "subpixel"
    assert ops.choose_impl((3, 3, 3, 64, 16), 2) == "gemm"  # 3-D: either way
    assert ops.choose_impl((4, 4, 64, 64), 2) == "subpixel_phasewise_gemm"  # s divides k
    with cpu_speed.traced_for_compile_fast():
        assert ops.choose_impl((4, 3, 64, 64), 2) == "subpixel"  # ... along both axes only
    assert ops.choose_impl((3, 3, 1, 32), 2) == "zero_insertion"   # C_in = 1: the last layer
    assert ops.choose_impl((3, 3, 32, 64), 1) == "zero_insertion"  # stride 1: no zeros to avoid
    rng = np.random.default_rng(3)
    for k_shape, y_shape, op in [((3, 3, 16, 8), (2, 4, 4, 8), 1), ((3, 3, 1, 8), (2, 4, 4, 8), 1),
                                 ((4, 4, 8, 4), (1, 5, 3, 4), 0)]:
        y = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
        chosen = ops.choose_impl(k_shape, 2)
        for impl in ("auto", None):
            got = ops.conv_transpose(y, kernel, 2, 1, op, impl=impl)
            want = ops.conv_transpose(y, kernel, 2, 1, op, impl=chosen)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="'auto'"):
        ops.conv_transpose(y, kernel, 2, 1, 0, impl="fast")


def test_programs_compiled_fast_are_traced_knowing_it():
    """cpu_speed.lower_and_compile_fast traces with tracing_for_compile_fast() true on the CPU
    (where compile_fast has options), so auto picks cae.train's forms there; a plain jax.jit
    traces with it false, and the flag does not leak out of the block."""
    seen = []

    def doubler():  # a new function each time: JAX caches traces per function
        def f(x):
            seen.append(cpu_speed.tracing_for_compile_fast())
            return x * 2
        return f

    x = jnp.ones(3)
    np.testing.assert_array_equal(cpu_speed.lower_and_compile_fast(jax.jit(doubler()), x)(x),
                                  2 * x)
    jax.jit(doubler())(x)
    assert seen == [bool(cpu_speed.xla_compiler_options()), False]
    assert cpu_speed.tracing_for_compile_fast() is False


def test_cpu_speed_jit_is_jax_jit_with_our_options_and_choices():
    """cpu_speed.jit: traced for compile_fast (auto picks cae.train's forms), the same gradients
    as a plain jax.jit of the same function up to rounding, and jit's own arguments pass."""
    seen = []

    def loss(y, k):
        seen.append(cpu_speed.tracing_for_compile_fast())
        return jnp.sum(ops.conv_transpose(y, k, 2, 1, 1) ** 2)

    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal((2, 7, 7, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 8, 16)), jnp.float32)
    fast = cpu_speed.jit(jax.grad(loss, argnums=(0, 1)))
    plain = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for a, b in zip(fast(y, k), plain(y, k)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert seen == [bool(cpu_speed.xla_compiler_options()), False]
    fast(y, k)  # a second call reuses the compiled program: no new trace
    assert len(seen) == 2
    donated = cpu_speed.jit(lambda a: a * 2, donate_argnums=0)
    np.testing.assert_array_equal(donated(jnp.ones(3)), 2 * np.ones(3))


# A geometry on which XLA:CPU (jaxlib 0.10.2) aborts the process compiling lax.conv_transpose
# (algebraic_simplifier CHECK failure). Run in a child process: an abort must fail this test, not
# kill the test session.
_ABORT_CASE = """
import jax, jax.numpy as jnp, numpy as np
from cae import ops
rng = np.random.default_rng(0)
y = jnp.asarray(rng.standard_normal((2, 5, 3, 3)), jnp.float32)
k = jnp.asarray(rng.standard_normal((2, 4, 2, 3)), jnp.float32)
args = ((2, 3), ((1, 1), (3, 0)), (0, 2))
ref = ops.conv_transpose(y, k, *args, impl="subpixel")
g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
for impl in ("auto", "zero_insertion"):
    np.testing.assert_allclose(ops.conv_transpose(y, k, *args, impl=impl), ref, atol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda k: jnp.sum(ops.conv_transpose(
        y, k, *args, impl=impl) * g))(k), jax.grad(lambda k: jnp.sum(ops.conv_transpose(
        y, k, *args, impl="subpixel") * g))(k), rtol=1e-5, atol=1e-4)
x = jnp.asarray(rng.standard_normal((2, 8, 9, 2)), jnp.float32)  # conv's input cotangent too
jax.grad(lambda x: jnp.sum(ops.conv(x, k, (2, 3), ((1, 1), (3, 0))) ** 2))(x)
print("ok")
"""


def test_default_impl_compiles_where_lax_conv_transpose_aborts():
    proc = subprocess.run([sys.executable, "-c", _ABORT_CASE], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("shape", [(128, 14, 14, 32), (3, 5, 7, 3), (13, 1, 1, 300), (2, 64)])
def test_add_bias_is_plus_with_the_same_gradients(shape):
    """cpu_speed.add_bias only reorders the bias-gradient sum: values and both gradients equal those
    of ``x + bias`` (float64 reference for the sum; M = 13, 105, ... exercise the row split
    when the leading size has no convenient divisor)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(shape[-1:]), jnp.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(cpu_speed.add_bias(x, bias)), np.asarray(x + bias))
    out, vjp = jax.vjp(jax.jit(cpu_speed.add_bias), x, bias)
    g_x, g_b = vjp(jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(g_x), g)
    want = g.astype(np.float64).reshape(-1, shape[-1]).sum(0)
    np.testing.assert_allclose(np.asarray(g_b), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_materialize_is_an_exact_copy(dtype):
    """cpu_speed.materialize (the identity 1x1 conv ops.conv's backward feeds its kernel
    cotangent on CPU) returns its input bit for bit, at the default model's activation shape."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 14, 14, 32)) * 10.0 ** rng.integers(-20, 20, (32,)),
                    dtype)
    got = jax.jit(cpu_speed.materialize)(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x, np.float32))


def test_add_bias_mixed_dtypes_get_cotangents_of_their_own_dtype():
    x = jnp.ones((2, 3, 4), jnp.float32)
    bias = jnp.ones((4,), jnp.bfloat16)
    g_x, g_b = jax.grad(lambda x, b: jnp.sum(cpu_speed.add_bias(x, b)), (0, 1))(x, bias)
    assert g_x.dtype == jnp.float32 and g_b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g_b, np.float32), np.full(4, 6.0, np.float32))
