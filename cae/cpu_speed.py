"""Speed devices for XLA:CPU: what makes the same math run faster on a CPU, kept apart from the
math in :mod:`cae.ops`. Each changes only speed (the tests check values and gradients against
the plain expressions). BENCHMARKS.md, "Fast training on CPU", has one row per device with its
figure.

* :func:`compile_fast`: compile with XLA's own convolutions instead of YNNPACK's, which are
  slower at our shapes; :func:`lower_and_compile_fast` also traces the program knowing it
  (:func:`tracing_for_compile_fast`), so ``ops``' ``impl="auto"`` picks the forms fastest
  under those options, and under XLA's defaults (a user's plain ``jax.jit``) the others.
* :func:`jit`: ``jax.jit`` with those options, for a user's own function (e.g. a model built
  from ``cae.ops`` / ``cae.nn``): what ``cae.train`` gets, in one line.
* :func:`add_bias`: ``x + bias`` whose bias gradient is summed along rows XLA:CPU vectorises.
* :func:`materialize`: an identity 1x1 conv that keeps XLA:CPU from fusing a recomputed
  activation into the transpose feeding a kernel cotangent.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["add_bias", "compile_fast", "jit", "lower_and_compile_fast", "materialize",
           "traced_for_compile_fast", "tracing_for_compile_fast", "xla_compiler_options"]


def materialize(x: jax.Array) -> jax.Array:
    """x itself, as the output of a 1x1 identity convolution [N, H, W, C] -> same (CPU only).

    Why: a conv layer's input is usually an activation, ``relu(z + b)``, that XLA does not keep
    for the backward pass but recomputes inside whatever consumes it. ``ops``' kernel cotangent
    transposes it ([N, H, W, C] -> [C, H, W, N]); XLA:CPU fuses the recomputation into that
    transpose and then cannot use its fast tiled transpose. XLA never fuses an elementwise
    producer into a convolution's *output*, so an identity conv hands the transpose a
    materialised array (BENCHMARKS.md, "Fast training on CPU"). ``ops.conv``'s backward uses it
    for its input; on the transposed conv's input it made the training step slower
    (BENCHMARKS.md, "Issues 5 and 6, second pass", item 4), so ``ops.conv_transpose_cotangents``
    does not.
    Exact for finite x: each output is ``x * 1`` plus zeros (a non-finite entry would spread
    NaN along its pixel's channels; the loss is then non-finite anyway).
    """
    if x.shape[-1] < 8 or jax.default_backend() != "cpu":  # thin inputs: not worth a conv
        return x
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)[None, None]
    return lax.conv_general_dilated(x, eye, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


# Sum [M, C] over M by summing rows of about this many floats first: XLA:CPU vectorises a
# reduction along its contiguous (minor) axis, and C = 32 floats there is too short a row.
_ROW = 256


def _sum_over_leading(g: jax.Array) -> jax.Array:
    """g: [..., C] -> [C], the sum over all leading axes (the cotangent of a broadcast bias)."""
    c = g.shape[-1]
    m = g.size // c
    k = max((d for d in range(1, max(_ROW // c, 1) + 1) if m % d == 0), default=1)
    return g.reshape(m // k, k * c).sum(0).reshape(k, c).sum(0)


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + bias`` for x: [..., C], bias: [C]. Same values and gradients as the plain ``+``; the
    bias gradient is summed in an order XLA:CPU runs faster (``_sum_over_leading``)."""
    return x + bias


def _add_bias_fwd(x, bias):
    # Empty arrays carry the input dtypes to the backward (x + bias may have promoted them).
    return x + bias, (jnp.zeros((0,), x.dtype), jnp.zeros((0,), bias.dtype))


def _add_bias_bwd(dtypes, g):
    x_dtype, bias_dtype = (d.dtype for d in dtypes)
    return g.astype(x_dtype), _sum_over_leading(g).astype(bias_dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# XLA:CPU (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK ("ynn_fusion" in the
# compiled HLO) by default; at our shapes its convolutions are slower than XLA's own (Eigen).
# An empty fusion-type list turns YNNPACK off for the program compiled with it.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def xla_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options we compile training programs with on ``backend`` (default: JAX's default
    backend): on CPU, convolutions by XLA's own emitter instead of YNNPACK; elsewhere none."""
    backend = jax.default_backend() if backend is None else backend
    return dict(_CPU_OPTIONS) if backend == "cpu" else {}


def _rejects_options(err: Exception, options: dict[str, str]) -> bool:
    """Whether a compile error is jaxlib refusing one of our (experimental) options by name."""
    return any(name in str(err) for name in options)


def compile_fast(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """``lowered.compile()`` with :func:`xla_compiler_options`.

    A jaxlib that does not know an option (it is an experimental XLA flag) rejects it; the
    program is then compiled with XLA's defaults: same results, only the speed differs.
    """
    options = xla_compiler_options()
    if options:
        try:
            return lowered.compile(options)
        except Exception as err:  # noqa: BLE001 - jaxlib raises a generic runtime error
            if not _rejects_options(err, options):
                raise
    return lowered.compile()


_TRACING_FOR_FAST = contextvars.ContextVar("cae_tracing_for_compile_fast", default=False)


def tracing_for_compile_fast() -> bool:
    """True while :func:`lower_and_compile_fast` traces a program that :func:`compile_fast` will
    compile with :func:`xla_compiler_options` (non-empty: on CPU). Read at trace time by
    ``ops.choose_impl``: which form of a layer is fastest depends on the convolutions the
    compiler will use."""
    return _TRACING_FOR_FAST.get()


@contextlib.contextmanager
def traced_for_compile_fast():
    """Within the block, :func:`tracing_for_compile_fast` is true when :func:`compile_fast` has
    options to apply (on CPU): trace there what :func:`compile_fast` will compile."""
    token = _TRACING_FOR_FAST.set(bool(xla_compiler_options()))
    try:
        yield
    finally:
        _TRACING_FOR_FAST.reset(token)


def lower_and_compile_fast(jitted, *args, **kwargs) -> jax.stages.Compiled:
    """``compile_fast(jitted.lower(*args, **kwargs))``, traced knowing it
    (:func:`traced_for_compile_fast`)."""
    with traced_for_compile_fast():
        lowered = jitted.lower(*args, **kwargs)
    return compile_fast(lowered)


def jit(fun, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`xla_compiler_options` and traced for
    them (:func:`traced_for_compile_fast`): the speed ``cae.train`` gets, for a user's own
    function. On 2 CPU cores the default decoder's transposed convs (forward + gradients) take
    0.77x PyTorch's time this way, 1.2-1.5x under a plain ``jax.jit`` (BENCHMARKS.md, "Plain
    jax.jit vs PyTorch"). Same numbers as ``jax.jit(fun)`` up to float rounding (the forms
    ``cae.ops`` picks may differ). A jaxlib that does not know the options compiles with its
    defaults."""
    options = xla_compiler_options()
    jitted = jax.jit(fun, compiler_options=options or None, **jit_kwargs)
    plain = jax.jit(fun, **jit_kwargs) if options else jitted
    state = {"options_ok": True}

    @functools.wraps(fun)
    def call(*args, **kwargs):
        if state["options_ok"]:
            try:
                with traced_for_compile_fast():
                    return jitted(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - jaxlib raises a generic runtime error
                if not _rejects_options(err, options):
                    raise
                state["options_ok"] = False
        return plain(*args, **kwargs)

    return call
