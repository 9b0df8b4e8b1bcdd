"""``cae.ops`` in 1, 2 and 3 spatial dims, with groups and dilation.

Layouts: x ``[N, *spatial, C_in]``, kernel ``[*k, C_in // groups, C_out]`` (also what
``conv_transpose`` takes), y ``[N, *spatial', C_out]``. PyTorch's weight for the same layer is
the kernel moved to ``[C_out, C_in // groups, *k]`` (for ``conv{N}d`` and ``conv_transpose{N}d``
alike: the transposed conv reads the forward conv's weight).

What is checked, against what (numbers, never mocks):

1. Adjoint identity ``<conv(x), y> == <x, conv_transpose(y)>`` on seeded random geometries
   (every rank; kernel 1-4, stride 1-3, dilation 1-3, asymmetric padding, groups 1-3), for
   every implementation ``auto`` may pick and ``auto`` itself.
2. ``conv_transpose`` and its gradients w.r.t. y and kernel equal JAX's autodiff of the plain
   ``lhs_dilation`` convolution (``conv_transpose_variants.AUTODIFF``); ``conv``'s gradients
   equal autodiff of ``lax.conv_general_dilated`` with the same groups and dilation.
3. PyTorch: ``conv{1,2,3}d`` and ``conv_transpose{1,2,3}d`` outputs *and* gradients (autograd)
   with the same weight, including ``output_padding`` in ``[stride, dilation)``, which PyTorch
   allows; asymmetric padding against ``conv_transpose`` with padding 0, cropped.
4. TensorFlow's ``tf.nn.conv_transpose`` (1-, 2- and 3-D, "SAME" and "VALID").
5. One ``ValueError`` naming the argument for each impossible geometry, raised before tracing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_transpose_variants import AUTODIFF
from jax import lax
from torch_import import import_torch

from cae import cpu_speed, ops

# auto and every implementation it may pick (ops.choose_impl).
ND_IMPLS = ["auto", *sorted(ops.IMPLEMENTATIONS)]


@dataclasses.dataclass(frozen=True)
class NdCase:
    """One geometry: x [n, *x_sp, groups * cig], kernel [*k, cig, groups * cog]."""

    n: int
    x_sp: tuple[int, ...]
    k: tuple[int, ...]
    s: tuple[int, ...]
    d: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    groups: int
    cig: int
    cog: int
    seed: int

    @property
    def nd(self) -> int:
        return len(self.k)

    @property
    def op(self) -> tuple[int, ...]:
        return ops.output_padding_for(self.x_sp, self.k, self.s, self.pads, self.d)

    @property
    def y_sp(self) -> tuple[int, ...]:
        return tuple(ops.conv_output_size(h, k, s, p, d)
                     for h, k, s, p, d in zip(self.x_sp, self.k, self.s, self.pads, self.d))

    @property
    def id(self) -> str:
        j = lambda t: "x".join(map(str, t))  # noqa: E731
        p = "".join(f"{lo}{hi}" for lo, hi in self.pads)
        return (f"{self.nd}d-x{j(self.x_sp)}-k{j(self.k)}-s{j(self.s)}-d{j(self.d)}-p{p}"
                f"-g{self.groups}-c{self.cig}.{self.cog}")

    def arrays(self):
        """float32 (x, y, kernel, g): g is a cotangent of x's shape."""
        rng = np.random.default_rng(self.seed)
        c_in, c_out = self.groups * self.cig, self.groups * self.cog
        x = rng.standard_normal((self.n, *self.x_sp, c_in)).astype(np.float32)
        y = rng.standard_normal((self.n, *self.y_sp, c_out)).astype(np.float32)
        kernel = rng.standard_normal((*self.k, self.cig, c_out)).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        return x, y, kernel, g

    def kw(self, symmetric_padding: bool = False) -> dict:
        pad = tuple(p[0] for p in self.pads) if symmetric_padding else self.pads
        return dict(strides=self.s, padding=pad, output_padding=self.op, dilation=self.d,
                    groups=self.groups)


def _random_cases(nd: int, count: int, seed: int, wide: bool = False,
                  symmetric: bool = False) -> list[NdCase]:
    """Seeded geometries: per axis kernel 1-4, stride 1-3, dilation 1-3, padding 0..extent-1
    per side (asymmetric unless ``symmetric``), input size drawn so the kernel fits;
    groups 1-3; ``wide``: 8 channels per group (where ``auto`` picks the sub-pixel forms)."""
    rng = np.random.default_rng(seed)
    cases = []
    max_size = {1: 12, 2: 8, 3: 6}[nd]
    while len(cases) < count:
        k = tuple(int(v) for v in rng.integers(1, 5, nd))
        s = tuple(int(v) for v in rng.integers(1, 4, nd))
        d = tuple(int(v) for v in rng.integers(1, 4, nd))
        if wide:  # strided and undilated: the sub-pixel path
            s, d = tuple(max(v, 2) for v in s), (1,) * nd
        pads = []
        for kk, dd in zip(k, d):
            ext = (kk - 1) * dd + 1
            lo = int(rng.integers(0, ext))
            hi = lo if symmetric else int(rng.integers(0, ext))
            pads.append((lo, hi))
        x_sp = tuple(int(rng.integers(1, max_size + 1)) for _ in range(nd))
        if any(h + lo + hi < (kk - 1) * dd + 1 for h, (lo, hi), kk, dd in zip(x_sp, pads, k, d)):
            continue
        groups = int(rng.integers(1, 4))
        cig = 8 if wide else int(rng.integers(1, 4))
        cog = int(rng.integers(1, 4))
        n = int(rng.integers(1, 3))
        cases.append(NdCase(n, x_sp, k, s, d, tuple(pads), groups, cig, cog,
                            int(rng.integers(2**31))))
    return cases


CASES = [c for nd in (1, 2, 3) for c in _random_cases(nd, 5, seed=100 + nd)]
CASES += [c for nd in (1, 2, 3) for c in _random_cases(nd, 1, seed=200 + nd, wide=True)]
# Where every stride divides its kernel size ("subpixel_phasewise" under auto): k=4, s=2.
CASES += [NdCase(2, (9,), (4,), (2,), (1,), ((1, 2),), 2, 8, 2, seed=11),
          NdCase(1, (6, 7), (4, 2), (2, 2), (1, 1), ((1, 1), (0, 1)), 3, 8, 1, seed=12),
          NdCase(1, (4, 5, 4), (2, 4, 2), (2, 2, 2), (1, 1, 1), ((0, 0), (1, 1), (1, 0)), 1, 8,
                 3, seed=13)]
TORCH_CASES = [c for nd in (1, 2, 3) for c in _random_cases(nd, 3, seed=300 + nd,
                                                             symmetric=True)]


def params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


def test_cases_cover_what_the_tests_claim():
    for cases in (CASES, TORCH_CASES):
        assert {c.nd for c in cases} == {1, 2, 3}
        assert {c.groups for c in cases} == {1, 2, 3}
        assert max(max(c.d) for c in cases) == 3 and max(max(c.s) for c in cases) == 3
    assert any(lo != hi for c in CASES for lo, hi in c.pads)
    assert any(max(c.op) > 0 for c in CASES)
    picks = set()
    for traced_for_compile_fast in (False, True):  # cae.train's choices and a plain jit's
        with (cpu_speed.traced_for_compile_fast() if traced_for_compile_fast
              else contextlib.nullcontext()):
            picks |= {ops.choose_impl((*c.k, c.cig, c.cog * c.groups), c.s, c.d, c.groups)
                      for c in CASES}
    assert picks == set(ops.IMPLEMENTATIONS), picks  # auto exercises every implementation


def inner64(a, b) -> float:
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def assert_close(actual, desired, rtol=1e-5, atol=2e-5, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64),
                               rtol=rtol, atol=atol, err_msg=err_msg)


_STATIC = ("strides", "padding", "output_padding", "dilation", "groups", "impl")
ct_jit = jax.jit(ops.conv_transpose, static_argnames=_STATIC)
conv_jit = jax.jit(ops.conv, static_argnames=("strides", "padding", "dilation", "groups"))


@functools.partial(jax.jit, static_argnames=_STATIC)
def grad_ct(y, kernel, g, strides, padding, output_padding, dilation, groups, impl):
    def loss(y, kernel):
        out = ops.conv_transpose(y, kernel, strides, padding, output_padding, dilation=dilation,
                                 groups=groups, impl=impl)
        return jnp.sum(out * g)

    return jax.grad(loss, argnums=(0, 1))(y, kernel)


# ----------------------------------------------------------------------------------------------
# 1-2. Adjoint identity; autodiff references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ND_IMPLS)
@pytest.mark.parametrize("case", params(CASES))
def test_adjoint_and_gradients(case, impl):
    """<conv(x), y> == <x, conv_transpose(y)>; conv_transpose and its (y, kernel) gradients ==
    JAX's autodiff of the plain lhs_dilation conv (AUTODIFF)."""
    x, y, kernel, g = case.arrays()
    kw = case.kw()
    cx = conv_jit(x, kernel, strides=case.s, padding=case.pads, dilation=case.d,
                  groups=case.groups)
    cty = ct_jit(y, kernel, **kw, impl=impl)
    assert cx.shape == y.shape and cty.shape == x.shape
    lhs, rhs = inner64(cx, y), inner64(x, cty)
    scale = inner64(np.abs(cx), np.abs(y))  # a wrong entry gives an error of O(1e-2..1) of it
    assert abs(lhs - rhs) <= 1e-5 * scale, (lhs, rhs, scale)
    assert_close(cty, ct_jit(y, kernel, **kw, impl=AUTODIFF), err_msg="forward vs lax")
    gy, gk = grad_ct(y, kernel, g, **kw, impl=impl)
    ay, ak = grad_ct(y, kernel, g, **kw, impl=AUTODIFF)
    assert gy.shape == y.shape and gk.shape == kernel.shape
    assert_close(gy, ay, err_msg="d/dy")
    assert_close(gk, ak, rtol=1e-4, atol=1e-4, err_msg="d/dK")


@pytest.mark.parametrize("case", params(CASES))
def test_conv_and_its_gradients_match_lax_autodiff(case):
    """ops.conv (custom VJP) == lax.conv_general_dilated with rhs_dilation and
    feature_group_count, values and gradients w.r.t. x and kernel (JAX's own autodiff)."""
    x, y, kernel, _ = case.arrays()
    dn = ops.dimension_numbers(case.nd)

    def plain(x, k):
        return lax.conv_general_dilated(x, k, case.s, case.pads, rhs_dilation=case.d,
                                        dimension_numbers=dn, feature_group_count=case.groups)

    def ours(x, k):
        return ops.conv(x, k, case.s, case.pads, dilation=case.d, groups=case.groups)

    assert_close(jax.jit(ours)(x, kernel), plain(x, kernel))
    loss = lambda f: lambda x, k: jnp.sum(f(x, k) * y)  # noqa: E731
    gx, gk = jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel)
    ax, ak = jax.grad(loss(plain), (0, 1))(x, kernel)
    assert_close(gx, ax, err_msg="d/dx")
    assert_close(gk, ak, rtol=1e-4, atol=1e-4, err_msg="d/dK")


# ----------------------------------------------------------------------------------------------
# 3. PyTorch
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    torch = import_torch()
    torch.set_num_threads(2)
    return torch


def _to_torch(torch, a, requires_grad=False):
    """[N, *sp, C] -> torch [N, C, *sp] (float64: the reference is exact to rounding)."""
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float64), -1, 1)))
    return t.requires_grad_(requires_grad)


def _weight(torch, kernel, requires_grad=False):
    """Our [*k, C_in // g, C_out] -> PyTorch's [C_out, C_in // g, *k] (conv and transpose)."""
    nd = kernel.ndim - 2
    w = np.transpose(np.asarray(kernel, np.float64), (nd + 1, nd, *range(nd)))
    return torch.from_numpy(np.ascontiguousarray(w)).requires_grad_(requires_grad)


def _from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _weight_grad_back(t, nd):
    """PyTorch's weight gradient [C_out, C_in // g, *k] -> ours [*k, C_in // g, C_out]."""
    return np.transpose(t.grad.numpy(), (*range(2, nd + 2), 1, 0))


@pytest.mark.parametrize("impl", ND_IMPLS)
@pytest.mark.parametrize("case", params(TORCH_CASES))
def test_conv_transpose_matches_torch(torch, case, impl):
    """conv_transpose{N}d(y, w, stride, padding, output_padding, groups, dilation) with the
    forward conv's w, and the gradients of sum(out * g) w.r.t. y and w (autograd)."""
    nd = case.nd
    _, y, kernel, g = case.arrays()
    f = getattr(torch.nn.functional, f"conv_transpose{nd}d")
    ty, tw = _to_torch(torch, y, True), _weight(torch, kernel, True)
    pad = tuple(p[0] for p in case.pads)
    out = f(ty, tw, None, case.s, pad, case.op, case.groups, case.d)
    (out * _to_torch(torch, g)).sum().backward()
    got = ct_jit(y, kernel, **case.kw(symmetric_padding=True), impl=impl)
    assert_close(got, _from_torch(out), err_msg="forward")
    gy, gk = grad_ct(y, kernel, g, **case.kw(symmetric_padding=True), impl=impl)
    assert_close(gy, _from_torch(ty.grad), err_msg="d/dy")
    assert_close(gk, _weight_grad_back(tw, nd), rtol=1e-4, atol=1e-4, err_msg="d/dK")


@pytest.mark.parametrize("case", params(TORCH_CASES))
def test_conv_matches_torch(torch, case):
    """conv{N}d(x, w, stride, padding, dilation, groups): values and both gradients."""
    nd = case.nd
    x, y, kernel, _ = case.arrays()
    f = getattr(torch.nn.functional, f"conv{nd}d")
    tx, tw = _to_torch(torch, x, True), _weight(torch, kernel, True)
    pad = tuple(p[0] for p in case.pads)
    out = f(tx, tw, None, case.s, pad, case.d, case.groups)
    (out * _to_torch(torch, y)).sum().backward()

    def ours(x, k):
        return ops.conv(x, k, case.s, pad, dilation=case.d, groups=case.groups)

    assert_close(jax.jit(ours)(x, kernel), _from_torch(out))
    gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) * y), (0, 1)))(x, kernel)
    assert_close(gx, _from_torch(tx.grad), err_msg="d/dx")
    assert_close(gk, _weight_grad_back(tw, nd), rtol=1e-4, atol=1e-4, err_msg="d/dK")


# output_padding in [stride, dilation): allowed by PyTorch (a dilated tap can reach those rows).
# (nd, y_sp, k, s, d, p, op, groups)
LARGE_OP_CASES = [
    (1, (5,), (3,), (1,), (3,), (1,), (2,), 1),
    (2, (3, 4), (2, 3), (2, 1), (3, 2), (0, 1), (2, 1), 2),
    (3, (2, 3, 2), (2, 2, 3), (1, 2, 1), (2, 3, 2), (1, 0, 0), (1, 2, 1), 1),
]


@pytest.mark.parametrize("impl", ND_IMPLS)
@pytest.mark.parametrize("spec", LARGE_OP_CASES, ids=[f"{c[0]}d-op{c[6]}" for c in LARGE_OP_CASES])
def test_output_padding_up_to_dilation_matches_torch(torch, spec, impl):
    nd, y_sp, k, s, d, p, op, groups = spec
    rng = np.random.default_rng(sum(y_sp))
    y = rng.standard_normal((2, *y_sp, 2 * groups)).astype(np.float32)
    kernel = rng.standard_normal((*k, 3, 2 * groups)).astype(np.float32)
    f = getattr(torch.nn.functional, f"conv_transpose{nd}d")
    want = _from_torch(f(_to_torch(torch, y), _weight(torch, kernel), None, s, p, op, groups, d))
    got = ct_jit(y, kernel, strides=s, padding=p, output_padding=op, dilation=d, groups=groups,
                 impl=impl)
    assert got.shape == want.shape
    assert_close(got, want)


@pytest.mark.parametrize("impl", ND_IMPLS)
@pytest.mark.parametrize("case", params([c for c in CASES if any(lo != hi for lo, hi in c.pads)]
                                        [:6]))
def test_asymmetric_padding_matches_torch_cropped(torch, case, impl):
    """PyTorch has no asymmetric padding for conv_transpose; its padding-0 output, cropped by
    lo before and hi after (zero-extended by output_padding), is the same operator."""
    nd = case.nd
    _, y, kernel, _ = case.arrays()
    f = getattr(torch.nn.functional, f"conv_transpose{nd}d")
    full = _from_torch(f(_to_torch(torch, y), _weight(torch, kernel), None, case.s, 0, 0,
                         case.groups, case.d))
    full = np.pad(full, ((0, 0), *((0, o) for o in case.op), (0, 0)))
    want = full[(slice(None), *(slice(lo, lo + h) for (lo, _), h in zip(case.pads, case.x_sp)))]
    got = ct_jit(y, kernel, **case.kw(), impl=impl)
    assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# 4. TensorFlow
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf  # a project dependency; imported lazily (slow import)

    try:
        tf.config.set_visible_devices([], "GPU")  # CPU results, whatever the machine has
    except (RuntimeError, ValueError):  # already initialised
        pass
    return tf


TF_CASES = [  # (padding, x_sp, k, s)
    ("SAME", (9,), (3,), (2,)),
    ("VALID", (11,), (4,), (3,)),
    ("SAME", (7, 6), (3, 2), (2, 3)),
    ("VALID", (8, 9), (3, 4), (2, 2)),
    ("SAME", (5, 6, 4), (3, 2, 3), (2, 2, 1)),
    ("VALID", (6, 5, 7), (2, 3, 3), (2, 1, 3)),
]


@pytest.mark.parametrize("impl", ND_IMPLS)
@pytest.mark.parametrize("padding,x_sp,k,s", TF_CASES)
def test_matches_tf_nn_conv_transpose(tf, padding, x_sp, k, s, impl):
    """tf.nn.conv_transpose(y, K, output_shape, strides, padding): TF's filter layout
    [*k, output channels, input channels] is our [*k, C_in, C_out] as is; its output_shape
    picks among the s sizes, which is our output_padding."""
    nd = len(k)
    pads = ops.resolve_padding(padding, x_sp, k, s)
    y_sp = [ops.conv_output_size(h, kk, ss, p) for h, kk, ss, p in zip(x_sp, k, s, pads)]
    rng = np.random.default_rng(len(x_sp) + sum(x_sp))
    y = rng.standard_normal((2, *y_sp, 5)).astype(np.float32)
    kernel = rng.standard_normal((*k, 3, 5)).astype(np.float32)
    want = tf.nn.conv_transpose(y, kernel, output_shape=[2, *x_sp, 3], strides=list(s),
                                padding=padding).numpy()
    op = ops.output_padding_for(x_sp, k, s, padding)
    got = ct_jit(y, kernel, strides=s, padding=padding, output_padding=op, impl=impl)
    assert got.shape == want.shape == (2, *x_sp, 3)
    assert_close(got, want, atol=3e-5)
    assert nd == y.ndim - 2


# ----------------------------------------------------------------------------------------------
# 5. Errors
# ----------------------------------------------------------------------------------------------

_Y1 = jnp.ones((2, 5, 4))
_K1 = jnp.ones((3, 2, 4))
_X3 = jnp.ones((1, 6, 6, 6, 4))
_K3 = jnp.ones((3, 3, 3, 2, 6))

ND_ERRORS = [
    ("groups_not_dividing_c_out", lambda: ops.conv(_X3, _K3, groups=4),
     r"groups=4: the kernel's C_out=6 .* is not divisible by groups"),
    ("groups_channel_mismatch", lambda: ops.conv(_X3, _K3, groups=3),
     r"channel mismatch: x has C_in=4 but kernel \[kd, kh, kw, C_in, C_out\] has "
     r"C_in/groups=2, i.e. C_in=6 with groups=3"),
    ("groups_zero", lambda: ops.conv(_X3, _K3, groups=0), r"groups=0: must be an int >= 1"),
    ("groups_float", lambda: ops.conv_transpose(_Y1, _K1, groups=2.0),
     r"groups=2.0: must be an int >= 1"),
    ("dilation_zero", lambda: ops.conv(_X3, _K3, dilation=(1, 0, 1), groups=2),
     r"dilation=\(1, 0, 1\): each dilation must be >= 1"),
    ("dilation_wrong_length", lambda: ops.conv_transpose(_Y1, _K1, dilation=(2, 2)),
     r"dilation must be an int or a sequence of 1 ints"),
    ("dilated_kernel_too_large", lambda: ops.conv(_X3, _K3, dilation=3, groups=2),
     r"dilated kernel size 7 \(k=3, dilation=3\) along D is larger than the padded input "
     r"6\+0\+0=6"),
    ("op_at_max_stride_dilation", lambda: ops.conv_transpose(_Y1, _K1, 2, 1, 3, dilation=3),
     r"output_padding=3 out of range: need 0 <= output_padding < max\(strides, dilation\)="
     r"\(3,\)"),
    ("op_same_uses_stride", lambda: ops.conv_transpose(_Y1, _K1, 2, "SAME", 2, dilation=3),
     r"output_padding=2 out of range: need 0 <= output_padding < strides=\(2,\)"),
    ("strides_wrong_length", lambda: ops.conv_transpose(_Y1, _K1, (2, 2)),
     r"strides must be an int or a sequence of 1 ints"),
    ("padding_1d_pair_ambiguous", lambda: ops.conv_transpose(_Y1, _K1, 2, (1, 2)),
     r"padding=\(1, 2\): allowed are an int, 1 ints \(one per axis\), 1 \(lo, hi\) pairs"),
    ("rank_mismatch", lambda: ops.conv_transpose(_Y1, _K3),
     r"y must have rank 5 \[N, D, H, W, C\] to match kernel .*; or kernel must have rank 3 "
     r"\[k, C_in, C_out\]"),
    ("rank_unsupported", lambda: ops.conv(jnp.ones((2, 3)), jnp.ones((3, 3))),
     r"x must have rank 3, 4 or 5"),
    ("ct_channels_1d", lambda: ops.conv_transpose(jnp.ones((2, 5, 3)), _K1),
     r"channel mismatch: y has C=3 but kernel \[k, C_in, C_out\] has C_out=4"),
]


@pytest.mark.parametrize("thunk,match", [c[1:] for c in ND_ERRORS], ids=[c[0] for c in ND_ERRORS])
def test_impossible_geometry_is_one_value_error_before_tracing(thunk, match, monkeypatch):
    """Each message names the argument; no convolution is traced before it (the lax entry
    point is replaced by one that fails the test if reached)."""

    def traced(*args, **kwargs):
        raise AssertionError("a convolution was traced before the argument check")

    monkeypatch.setattr(lax, "conv_general_dilated", traced)
    with pytest.raises(ValueError, match=match):
        thunk()


def test_padding_forms_per_axis():
    """Per-axis ints, per-axis (lo, hi) pairs and SAME with dilation (the dilated extent)."""
    assert ops.resolve_padding(1, (5,), (3,), 1) == ((1, 1),)
    assert ops.resolve_padding([(0, 2)], (5,), (3,), 1) == ((0, 2),)
    assert ops.resolve_padding((1, 2, 0), (5, 5, 5), (3, 3, 3), 1) == ((1, 1), (2, 2), (0, 0))
    assert ops.resolve_padding(((1, 0), (0, 2), (3, 3)), (5, 5, 5), (3, 3, 3), 1) == (
        (1, 0), (0, 2), (3, 3))
    # SAME, dilation 2: extent 5, stride 1 -> total 4 -> (2, 2); TF's rule, as lax's.
    assert ops.resolve_padding("SAME", (7,), (3,), 1, 2) == ((2, 2),)
    assert ops.output_padding_for((7, 8), (3, 3), 2, 1, dilation=2) == (0, 1)


def test_choose_impl_with_dilation_and_groups():
    assert ops.choose_impl((3, 8, 16), 2) == "subpixel"  # 1-D
    assert ops.choose_impl((4, 4, 4, 8, 16), 2) == "gemm"  # 3-D
    assert ops.choose_impl((3, 3, 3, 8, 16), 1, 2, out_shape=(8, 16, 16, 16, 8)) == "gemm"
    # ... unless its im2col (output size times prod(k)) exceeds 2^26 elements
    assert ops.choose_impl((4, 4, 4, 8, 16), 2, out_shape=(8, 64, 64, 64, 8)) == \
        "subpixel_phasewise"
    assert ops.choose_impl((3, 3, 8, 16), 2, dilation=2) == "zero_insertion"
    # 8 channels per group: the sub-pixel form where cae.train traces for its options, im2col
    # and GEMMs under a plain jit on the CPU
    plain = "gemm" if jax.default_backend() == "cpu" else "subpixel"
    assert ops.choose_impl((3, 3, 8, 16), 2, groups=2) == plain
    with cpu_speed.traced_for_compile_fast():
        assert ops.choose_impl((3, 3, 8, 16), 2, groups=2) == "subpixel"
    assert ops.choose_impl((3, 3, 4, 16), 2, groups=4) == "zero_insertion"
