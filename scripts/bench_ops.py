#!/usr/bin/env python3
"""Forward+backward timing of ``cae.ops.conv_transpose``: custom VJPs vs JAX autodiff.

For each layer, the timed step is ``value_and_grad`` of ``loss = sum(conv_transpose(y, K) * g)``
w.r.t. ``(y, K)``, ``jit``-compiled. ``value_and_grad`` (not ``grad``) so the forward conv is
really computed: the gradients of this linear loss do not need the forward output, and XLA would
otherwise drop it. Methods:

* ``auto``      ``ops.conv_transpose(...)``, the default: ``ops.choose_impl`` per layer
* ``lax``       ``conv_transpose_variants.LAX``  (lax.conv_transpose + the shared custom VJP)
* ``subpixel``  ``ops.conv_transpose(..., impl="subpixel")``  (phase decomposition + custom VJP)
* ``subpixel_phasewise``  the same forward, differentiated phase by phase (s*s stride-1 convs
                in the backward; ``auto``'s pick where the stride divides the kernel)
* ``phase``     ``conv_transpose_variants.PHASE``  (all phases as one im2col GEMM
                + custom VJP whose backward is two GEMMs)
* ``zero_insertion``  ``ops.conv_transpose(..., impl="zero_insertion")`` (explicit zero
                insertion by lax.pad, one stride-1 conv + the shared custom VJP)
* ``autodiff``  ``conv_transpose_variants.AUTODIFF``: plain lax.conv_transpose, JAX's own autodiff
                (the baseline; ratios are time / autodiff time, measured in the same run)
* ``vjp_conv``  the transposed conv defined as ``jax.vjp`` of ``ops.conv`` w.r.t. its input,
                differentiated by ``jax.value_and_grad`` like the others
* ``torch``     ``torch.nn.functional.conv_transpose2d`` forward + ``backward()`` on CPU (NCHW),
                if ``import torch`` works and ``--no-torch`` is not given; threads = JAX's cores

Shapes (NHWC, kernels HWIO = the forward conv's ``[kh, kw, C_in, C_out]``), kernel 3, stride 2,
padding 1 unless said, 28x28x1 MNIST, at ``--batch`` B: the decoder of the default model
(``configs/mnist_tied.yaml``, features [32, 64, 128] and a 32-number fully connected code), of
the wide model (``configs/mnist_tied_wide.yaml``, features [32, 128]: 28 -> 14 -> 7), of the
bottleneck model (``configs/mnist_tied_bottleneck.yaml``, features [32, 64, 16]:
28 -> 14 -> 7 -> 4), and a larger layer:

* wide2 y [B, 7, 7, 128],  K [3, 3, 32, 128] -> [B, 14, 14, 32] (output_padding 1; wide model)
* dec1  y [B, 4, 4, 16],   K [3, 3, 64, 16] -> [B, 7, 7, 64]    (output_padding 0; bottleneck)
* dec2  y [B, 7, 7, 64],   K [3, 3, 32, 64] -> [B, 14, 14, 32]  (output_padding 1; 2 models)
* dec3  y [B, 14, 14, 32], K [3, 3, 1, 32]  -> [B, 28, 28, 1]   (output_padding 1; all 3)
* large y [B/4, 16, 16, 64], K [4, 4, 64, 64] -> [B/4, 32, 32, 64] (k=4, s=2, p=1)
* fc32  y [B, 1, 1, 32],    K [4, 4, 128, 32] -> [B, 4, 4, 128]  (the default's code: W^T)
* deep3 y [B, 4, 4, 128],  K [3, 3, 64, 128] -> [B, 7, 7, 64]   (output_padding 0; default)
* decoder      fc32 -> relu -> deep3 -> relu -> dec2 -> relu -> dec3 as one jitted step (the
               default model's decoder, ``configs/mnist_tied.yaml``)
* decoder_wide wide2 -> relu -> dec3 (``configs/mnist_tied_wide.yaml``'s decoder)
* decoder_bn   dec1 -> relu -> dec2 -> relu -> dec3

Every JAX method is compiled with ``cae.cpu_speed.compile_fast`` (on CPU: XLA's own convolutions
instead of YNNPACK's, as ``cae.train`` compiles its programs); ``--xla-default`` compiles them
with XLA's default options instead. Each method's gradients are checked against autodiff
before timing. Timing: warm-up calls
(compile), then ``--reps`` rounds; in each round every method runs once (interleaved, so machine
noise hits all alike), each call ``jax.block_until_ready``'d; the figure is the median. Each
timed call comes right after an untimed call of the same method, so it runs in the steady state
of a training loop. Why: after a parallel region both XLA's and torch's worker threads keep
spinning for a while, and a call right after the *other* library's ran slower (large layer, 2
vCPUs: torch 39.8 ms right after a JAX call vs 32.6 ms right after itself, JAX 33.2 vs 28.6 ms);
timed straight after each other, the first method of a round (the baseline) and torch (the
last) paid that and the methods between them did not, which skewed the paired ratios in JAX's
favour (the two timings A/B in one session: wide2 0.77x -> 0.85x, dec2 0.77x -> 0.83x, large
0.93x -> 0.94x torch). A pause before each call is no cure: torch's dec3 took 29.7 ms after a
50 ms sleep vs 15.4 ms back to back.
With torch, a second table gives each JAX method's time / torch's time *paired by round* (both
measured back to back, so a slow spell of the machine hits both): the median ratio and its
interquartile range over the rounds. On a shared 2-vCPU VM (steal time) single medians drift by
+-20 % between runs; the paired ratio is the figure to compare against 1.0.

Usage: ``python3 scripts/bench_ops.py [--batch 128] [--reps 30] [--impls lax,subpixel,phase,...]
[--problems large,decoder,...] [--no-torch] [--json PATH]``

``--plain-jit`` (issue 21) times what a user who imports ``cae.ops`` gets: a plain
``jax.jit(jax.grad(lambda y, k: jnp.sum(ops.conv_transpose(y, k, ...) ** 2), argnums=(0, 1)))``
with XLA's default options (no ``compile_fast``), best of ``--reps`` (default 20 in this mode),
against PyTorch's ``conv_transpose{1,2,3}d`` forward + ``backward()`` with
``torch.set_num_threads(2)`` in the same process, at ``PLAIN_JIT_PROBLEMS``: the default
decoder's three layers, a 16x16x64 k=4 layer (batch 128), a 1-D and a 3-D layer. Columns: each
``impl`` under plain jit, ``autodiff`` (JAX's own gradient of the ``lhs_dilation`` conv),
``auto+fast`` (``auto`` compiled with ``cpu_speed.compile_fast``: our options), ``torch_1t``
(torch on one thread: context on a loaded machine) and ``torch``; every figure's ratio is to
torch's best in the same run. Gradients are checked against torch's before timing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import sys
import time

try:
    import cae  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from conv_transpose_variants import VARIANTS  # next to this script: the comparison-only forms

from cae import cli, cpu_speed, ops

JAX_METHODS = ("auto", "lax", "subpixel", "subpixel_phasewise", "phase", "zero_insertion",
               "autodiff", "vjp_conv")
ALL_METHODS = (*JAX_METHODS, "torch")
BASELINE = "autodiff"


# ----------------------------------------------------------------------------------------------
# Problem definitions
# ----------------------------------------------------------------------------------------------


def layer(name, batch, in_hw, c_in, c_out, k, s, p):
    """A decoder layer as the transpose of the forward conv  x [B, *in_hw, c_in] -> y.
    Returns a dict with y's shape, the kernel's shape and the output_padding restoring x."""
    pads = ops.resolve_padding(p, in_hw, (k, k), s)
    y_hw = tuple(ops.conv_output_size(h, k, s, pp) for h, pp in zip(in_hw, pads))
    op = ops.output_padding_for(in_hw, (k, k), s, p)
    return dict(name=name, y_shape=(batch, *y_hw, c_out), k_shape=(k, k, c_in, c_out),
                x_shape=(batch, *in_hw, c_in), strides=s, padding=p, output_padding=op)


def problems(batch):
    """The layers timed, by name, and the multi-layer decoder steps (name -> layer names)."""
    layers = {
        # configs/mnist_tied.yaml (features [32, 128], the default): 7x7x128 -> 14x14x32 -> 28.
        "wide2": layer("wide2", batch, (14, 14), 32, 128, 3, 2, 1),
        # configs/mnist_tied_bottleneck.yaml (features [32, 64, 16]): 4x4x16 -> 7 -> 14 -> 28.
        "dec1": layer("dec1", batch, (7, 7), 64, 16, 3, 2, 1),
        "dec2": layer("dec2", batch, (14, 14), 32, 64, 3, 2, 1),
        "dec3": layer("dec3", batch, (28, 28), 1, 32, 3, 2, 1),  # the last layer of both
        "large": layer("large", max(1, batch // 4), (32, 32), 64, 64, 4, 2, 1),
        # configs/mnist_tied.yaml (features [32, 64, 128], code_size 32): the code's W^T, a
        # 4x4 kernel covering its 4x4x128 input ("auto" runs it as one GEMM), then 4 -> 7.
        "fc32": layer("fc32", batch, (4, 4), 128, 32, 4, 1, 0),
        "deep3": layer("deep3", batch, (7, 7), 64, 128, 3, 2, 1),
    }
    steps = {"decoder_wide": ("wide2", "dec3"), "decoder_bn": ("dec1", "dec2", "dec3"),
             "decoder": ("fc32", "deep3", "dec2", "dec3")}
    return layers, steps


def describe(lay):
    return (f"y {list(lay['y_shape'])} K {list(lay['k_shape'])} -> {list(lay['x_shape'])} "
            f"s={lay['strides']} p={lay['padding']} op={lay['output_padding'][0]}")


# ----------------------------------------------------------------------------------------------
# JAX steps
# ----------------------------------------------------------------------------------------------


def transpose_fn(method, lay):
    """(y, K) -> x for one layer with the given JAX method."""
    kw = dict(strides=lay["strides"], padding=lay["padding"],
              output_padding=lay["output_padding"])
    if method in ops.IMPLEMENTATIONS or method == ops.AUTO:
        return lambda y, k: ops.conv_transpose(y, k, **kw, impl=method)
    if method in VARIANTS:  # lax, phase, autodiff
        return lambda y, k: ops.conv_transpose(y, k, **kw, impl=VARIANTS[method])
    if method == "vjp_conv":
        x_shape = lay["x_shape"]

        def via_vjp(y, k):
            x0 = jnp.zeros(x_shape, y.dtype)
            _, vjp = jax.vjp(lambda x: ops.conv(x, k, lay["strides"], lay["padding"]), x0)
            return vjp(y)[0]

        return via_vjp
    raise ValueError(f"unknown JAX method {method!r}")


def jax_step(method, layers):
    """jit(value_and_grad) of sum(decoder(y, K...) * g) w.r.t. (y, K1, ..., Kn); relu between
    layers. Signature: step(y, g, kernels) -> (loss, (dy, dK1, ..., dKn))."""
    fns = [transpose_fn(method, lay) for lay in layers]

    def loss(y, kernels, g):
        h = y
        for i, (fn, k) in enumerate(zip(fns, kernels)):
            h = fn(h, k)
            if i + 1 < len(fns):
                h = jax.nn.relu(h)
        return jnp.sum(h * g)

    @jax.jit
    def step(y, g, kernels):
        val, (dy, dks) = jax.value_and_grad(loss, argnums=(0, 1))(y, kernels, g)
        return val, (dy, *dks)

    return step


def make_inputs(layers, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(layers[0]["y_shape"]).astype(np.float32)
    kernels = [(rng.standard_normal(lay["k_shape"]) / np.sqrt(np.prod(lay["k_shape"][:2])
                                                             * lay["k_shape"][3]))
               .astype(np.float32) for lay in layers]
    g = rng.standard_normal(layers[-1]["x_shape"]).astype(np.float32)
    return y, kernels, g


# ----------------------------------------------------------------------------------------------
# PyTorch step
# ----------------------------------------------------------------------------------------------


def torch_step(torch, layers, y, kernels, g):
    """Returns a thunk running fwd + bwd of the same loss in NCHW; and the gradients (NHWC/HWIO)
    of one call for checking."""
    f = torch.nn.functional
    ty = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2))).requires_grad_()
    # Our HWIO kernel [kh, kw, C_in, C_out] is torch's [C_out(=in of transpose), C_in, kh, kw].
    tks = [torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).requires_grad_()
           for k in kernels]
    tg = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
    for lay in layers:
        if not isinstance(lay["padding"], int):
            raise ValueError("the torch step needs symmetric int padding")

    def run():
        for t in (ty, *tks):
            t.grad = None
        h = ty
        for i, (lay, k) in enumerate(zip(layers, tks)):
            h = f.conv_transpose2d(h, k, stride=lay["strides"], padding=lay["padding"],
                                   output_padding=lay["output_padding"][0])
            if i + 1 < len(layers):
                h = torch.relu(h)
        loss = (h * tg).sum()
        loss.backward()
        return loss

    run()
    grads = [ty.grad.numpy().transpose(0, 2, 3, 1)]
    grads += [k.grad.numpy().transpose(2, 3, 1, 0) for k in tks]
    return run, grads


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def check_grads(name, method, grads, ref, rtol=1e-3):
    for i, (a, b) in enumerate(zip(grads, ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        if not err < rtol:
            raise SystemExit(f"{name}/{method}: gradient {i} differs from autodiff "
                             f"(max rel err {err:.2e})")


def run_jax(step, y, g, kernels):
    return jax.block_until_ready(step(y, g, kernels))


def cell(ms, ratio):
    return f"{f'{ms:.2f} ms ({ratio:.2f}x)':>22}"


def bench(name, layers, methods, reps, torch, xla_default=False):
    y, kernels, g = make_inputs(layers)
    yj, gj, kj = jnp.asarray(y), jnp.asarray(g), [jnp.asarray(k) for k in kernels]
    thunks = {}
    ref = None
    for m in methods:
        if m == "torch":
            run, grads = torch_step(torch, layers, y, kernels, g)
            thunks[m] = run
        else:
            step = (jax_step(m, layers).lower(yj, gj, kj).compile() if xla_default
                    else cpu_speed.lower_and_compile_fast(jax_step(m, layers), yj, gj, kj))
            grads = jax.block_until_ready(step(yj, gj, kj))[1]  # compile
            thunks[m] = functools.partial(run_jax, step, yj, gj, kj)
        if m == BASELINE:
            ref = grads
        thunks[m]()  # one more warm-up call
        if m != BASELINE:
            check_grads(name, m, grads, ref)
    times = {m: [] for m in methods}
    for _ in range(reps):
        for m in methods:
            thunks[m]()  # untimed lead-in: the timed call follows its own method, not another
            t0 = time.perf_counter()
            thunks[m]()
            times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: statistics.median(v) for m, v in times.items()}, times


def quartiles(values):
    """(25th, 50th, 75th) percentiles of a list of numbers."""
    q1, q2, q3 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def paired_ratios(raw, method, reference="torch"):
    """Per-round time ratios ``method / reference`` (same round, run back to back)."""
    return [a / b for a, b in zip(raw[method], raw[reference])]


def config_from_command_line(ap, argv):
    """Add ``--config``/``--set`` to ``ap``, parse ``argv`` -> (args, validated Config); a bad
    config is one ``error:`` line and exit 2 (as every ``cae`` command, :mod:`cae.cli`)."""
    from cae import cli
    from cae import config as config_lib

    cli.add_config_flags(ap, config_help="training config whose model is timed",
                         set_help="override a config key (repeatable)",
                         config_default="configs/mnist_tied.yaml")
    args = ap.parse_args(argv)
    code, cfg = cli.run_command(lambda: config_lib.load_config(args.config, args.set),
                                "interrupted")
    if code:
        raise SystemExit(code)
    return args, cfg


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# --plain-jit: what a user's own jax.jit gets, against PyTorch (issue 21)
# ----------------------------------------------------------------------------------------------

# name: (y shape [N, *spatial', C_out], kernel [*k, C_in, C_out], stride, padding,
# output_padding). The decoder's output_padding is what cae.models uses: 4 -> 7 is 0,
# 7 -> 14 and 14 -> 28 are 1.
PLAIN_JIT_PROBLEMS = {
    "dec_4to7": ((128, 4, 4, 128), (3, 3, 64, 128), 2, 1, 0),
    "dec_7to14": ((128, 7, 7, 64), (3, 3, 32, 64), 2, 1, 1),
    "dec_14to28": ((128, 14, 14, 32), (3, 3, 1, 32), 2, 1, 1),
    "k4_16to32": ((128, 16, 16, 64), (4, 4, 64, 64), 2, 1, 0),
    "1d_512": ((32, 512, 128), (4, 64, 128), 2, 1, 0),
    "3d_8": ((8, 8, 8, 8, 64), (3, 3, 3, 32, 64), 2, 1, 1),
}
PLAIN_JIT_METHODS = ("auto", *sorted(ops.IMPLEMENTATIONS), "autodiff", "auto+fast", "torch_1t",
                     "torch")


def _plain_jit_step(method, s, p, op, y, k):
    impl = VARIANTS["autodiff"] if method == "autodiff" else method.removesuffix("+fast")

    def loss(y, k):
        return jnp.sum(ops.conv_transpose(y, k, s, p, op, impl=impl) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    if method.endswith("+fast"):
        step = cpu_speed.lower_and_compile_fast(step, y, k)
    return lambda: jax.block_until_ready(step(y, k))


def _plain_jit_torch(torch, s, p, op, y, k):
    nd = y.ndim - 2
    f = getattr(torch.nn.functional, f"conv_transpose{nd}d")
    ty = torch.from_numpy(np.ascontiguousarray(np.moveaxis(y, -1, 1))).requires_grad_()
    # Our [*k, C_in, C_out] is torch's weight [C_out (the transpose's input), C_in, *k].
    tk = torch.from_numpy(np.ascontiguousarray(
        np.transpose(k, (nd + 1, nd, *range(nd))))).requires_grad_()

    def run():
        ty.grad = tk.grad = None
        (f(ty, tk, stride=s, padding=p, output_padding=op) ** 2).sum().backward()

    run()
    grads = (np.moveaxis(ty.grad.numpy(), 1, -1),
             np.transpose(tk.grad.numpy(), (*range(2, nd + 2), 1, 0)))
    return run, grads


def _torch_one_thread(torch, run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run()
    finally:
        torch.set_num_threads(threads)


def plain_jit_main(args, torch):
    methods = [m for m in PLAIN_JIT_METHODS if not m.startswith("torch") or torch is not None]
    if args.impls != ",".join(ALL_METHODS):  # --impls given: a subset of this mode's methods
        wanted = {m.strip() for m in args.impls.split(",")}
        methods = [m for m in methods if m in wanted or m.startswith("torch")]
    problems_ = PLAIN_JIT_PROBLEMS
    if args.problems:
        problems_ = {k: v for k, v in problems_.items() if k in args.problems.split(",")}
    print(f"# fwd+bwd: jax.jit(jax.grad(sum(conv_transpose(y, k)**2), (y, k))), XLA default "
          f"options unless '+fast'; best of {args.reps} rounds (each method once per round, "
          f"after an untimed call of its own); ratio = best / torch's best")
    print(f"{'problem':<12}" + "".join(f"{m:>20}" for m in methods))
    results = []
    for name, (ys, ks, s, p, op) in problems_.items():
        rng = np.random.default_rng(0)
        y = rng.standard_normal(ys).astype(np.float32)
        k = (rng.standard_normal(ks) / np.sqrt(np.prod(ks[:-2]) * ks[-1])).astype(np.float32)
        thunks, ref = {}, None
        if torch is not None:
            thunks["torch"], ref = _plain_jit_torch(torch, s, p, op, y, k)
            if "torch_1t" in methods:
                # The same torch step on one thread: on a loaded 2-vCPU machine torch's two
                # OpenMP threads wait on each other at every barrier, so its 2-thread time can
                # exceed its 1-thread time; this column shows when that happened.
                thunks["torch_1t"] = functools.partial(_torch_one_thread, torch,
                                                       thunks["torch"])
        yj, kj = jnp.asarray(y), jnp.asarray(k)
        for m in methods:
            if m.startswith("torch"):
                continue
            thunks[m] = _plain_jit_step(m, s, p, op, yj, kj)
            grads = thunks[m]()  # compiles; the gradients (dy, dk)
            if ref is not None:
                check_grads(name, m, grads, ref)
        times = {m: [] for m in methods}
        for _ in range(args.reps):
            for m in methods:
                thunks[m]()
                t0 = time.perf_counter()
                thunks[m]()
                times[m].append((time.perf_counter() - t0) * 1e3)
        best = {m: min(v) for m, v in times.items()}
        base = best.get("torch")
        print(f"{name:<12}" + "".join(
            f"{f'{best[m]:.2f} ms' + (f' ({best[m] / base:.2f}x)' if base else ''):>20}"
            for m in methods), flush=True)
        results.append({"problem": name, "y": ys, "kernel": ks, "stride": s, "padding": p,
                        "output_padding": op, "best_ms": best, "all_ms": times,
                        "chosen_impl": ops.choose_impl(ks, s, out_shape=None if len(ys) != 5
                                                       else (ys[0], *[0] * 3, ks[-2]))})
    return results


def _best_ms(fn, reps):
    """Best of ``reps`` calls of ``fn``, each right after an untimed call of its own (ms)."""
    fn()
    best = math.inf
    for _ in range(reps):
        fn()
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def profile_main(args, torch):
    """--profile: the plain-jit step cut into its three convolutions, each timed alone under
    XLA's defaults beside PyTorch's same piece (2 threads): the forward ``x = C^T y``, the
    y-gradient ``C g`` (a strided conv) and the kernel gradient (a backward-filter conv, or
    im2col + one GEMM), so a miss shows which piece is slow."""
    problems_ = PLAIN_JIT_PROBLEMS
    if args.problems:
        problems_ = {k: v for k, v in problems_.items() if k in args.problems.split(",")}
    cols = ["step", "fwd", "dy", "dk_conv", "dk_gemm"]  # jax's; torch's: step fwd dy dk
    print(f"# plain jax.jit (XLA defaults) vs torch ({torch.get_num_threads()} threads), ms, "
          f"best of {args.reps}; jax 'step' = auto's fwd+bwd, torch 'dk' = "
          f"torch.nn.grad.conv{{N}}d_weight")
    print(f"{'problem':<12}{'impl':>26}" + "".join(f"{'jax ' + c:>14}" for c in cols)
          + "".join(f"{'torch ' + c:>14}" for c in ("step", "fwd", "dy", "dk")))
    results = []
    for name, (ys, ks, s, p, op) in problems_.items():
        impl, jax_ms, torch_ms = _profile_problem(torch, ys, ks, s, p, op, args.reps)
        print(f"{name:<12}{impl:>26}" + "".join(f"{jax_ms[c]:>14.2f}" for c in jax_ms)
              + "".join(f"{torch_ms[c]:>14.2f}" for c in torch_ms), flush=True)
        results.append({"problem": name, "impl": impl, "jax_ms": jax_ms, "torch_ms": torch_ms})
    return results


def _profile_problem(torch, ys, ks, s, p, op, reps):
    """One --profile problem -> (auto's impl, {jax piece: ms}, {torch piece: ms})."""
    nd = len(ys) - 2
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal(ys), jnp.float32)
    k = jnp.asarray(rng.standard_normal(ks) / np.sqrt(np.prod(ks[:-2]) * ks[-1]), jnp.float32)
    x = ops.conv_transpose(y, k, s, p, op)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    sn = ops._strides(s, nd)
    pads, _ = ops._transpose_geometry(ys[1:-1], ks[:nd], sn, p, op, (1,) * nd)
    pieces = {  # name: (jitted function, its arguments)
        "fwd": (jax.jit(lambda y, k: ops.conv_transpose(y, k, s, p, op)), (y, k)),
        "dy": (jax.jit(lambda g, k: ops.conv(g, k, s, p)), (g, k)),
        "dk_conv": (jax.jit(lambda g, y: ops._kernel_cotangent(
            g, y, ks[:nd], sn, pads, jnp.float32)), (g, y)),
        "dk_gemm": (jax.jit(lambda g, y: ops._kernel_cotangent_gemm(
            g, y, ks[:nd], sn, pads, jnp.float32)), (g, y)),
    }
    np.testing.assert_allclose(pieces["dk_conv"][0](g, y), pieces["dk_gemm"][0](g, y),
                               rtol=1e-3, atol=1e-3)
    jax_ms = {"step": _best_ms(_plain_jit_step("auto", s, p, op, y, k), reps)}
    for piece, (fn, piece_args) in pieces.items():
        jax_ms[piece] = _best_ms(functools.partial(_blocked, fn, piece_args), reps)
    # torch, NC* layout, the same pieces
    ty = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(y), -1, 1)))
    tg = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(g), -1, 1)))
    tw = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(k),
                                                            (nd + 1, nd, *range(nd)))))
    F = torch.nn.functional
    ct, cv = getattr(F, f"conv_transpose{nd}d"), getattr(F, f"conv{nd}d")
    wgrad = getattr(torch.nn.grad, f"conv{nd}d_weight")
    step_run, _ = _plain_jit_torch(torch, s, p, op, np.asarray(y), np.asarray(k))
    torch_ms = {"step": _best_ms(step_run, reps)}
    with torch.no_grad():
        torch_ms["fwd"] = _best_ms(lambda: ct(ty, tw, stride=s, padding=p, output_padding=op),
                                   reps)
        torch_ms["dy"] = _best_ms(lambda: cv(tg, tw, stride=s, padding=p), reps)
        torch_ms["dk"] = _best_ms(lambda: wgrad(tg, tw.shape, ty, stride=s, padding=p), reps)
    return ops.choose_impl(ks, s, out_shape=x.shape), jax_ms, torch_ms


def _blocked(fn, args):
    return jax.block_until_ready(fn(*args))


def main(argv=None):
    ap = cli.CommandLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128, help="batch of the decoder layers (128)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed rounds per problem (30; 20 with --plain-jit)")
    ap.add_argument("--impls", default=",".join(ALL_METHODS),
                    help=f"comma-separated subset of {','.join(ALL_METHODS)}; "
                         f"'{BASELINE}' is always run (ratios are relative to it)")
    ap.add_argument("--problems", default=None,
                    help="comma-separated subset of the problems (layers and decoder steps) to "
                         "time; default: all")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--profile", action="store_true",
                    help="with --plain-jit: time the step's three convolutions (forward, "
                         "y-gradient, kernel gradient as a conv and as a GEMM) alone, beside "
                         "torch's same pieces")
    ap.add_argument("--plain-jit", action="store_true",
                    help="issue 21's comparison: plain jax.jit (XLA defaults), best of --reps "
                         "(default 20), vs PyTorch at PLAIN_JIT_PROBLEMS")
    ap.add_argument("--xla-default", action="store_true",
                    help="compile with XLA's default options, not cae.cpu_speed.compile_fast's")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 20 if args.plain_jit else 30

    methods = [m.strip() for m in args.impls.split(",") if m.strip()]
    allowed = PLAIN_JIT_METHODS if args.plain_jit else ALL_METHODS
    unknown = sorted(set(methods) - set(allowed))
    if unknown:
        ap.error(f"unknown --impls {unknown}; allowed: {', '.join(allowed)}")
    if BASELINE not in methods:
        methods.append(BASELINE)
    # Baseline first: the others are checked against its gradients.
    methods = [BASELINE] + [m for m in ALL_METHODS if m in methods and m != BASELINE]
    torch = None
    if args.plain_jit and not args.no_torch:  # --plain-jit's --impls name JAX methods only
        methods.append("torch")
    if "torch" in methods:
        if args.no_torch:
            methods.remove("torch")
        else:
            try:
                import torch
            except ImportError:
                print("# torch not importable: skipping the PyTorch comparison")
                methods.remove("torch")
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch is not None:
        torch.set_num_threads(2 if args.plain_jit else n_cores)  # issue 21 fixes 2 threads

    info = {
        "cpu": cpu_model(),
        "cores": n_cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "devices": [str(d) for d in jax.devices()],
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "batch": args.batch,
        "reps": args.reps,
        "xla_options": ("defaults (plain jax.jit); '+fast' columns: compile_fast"
                        if args.plain_jit else
                        {} if args.xla_default else cpu_speed.xla_compiler_options()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(f"# machine: {info['cpu']} ({info['cores']} cores), {info['platform']}")
    print(f"# JAX {info['jax']} (jaxlib {info['jaxlib']}), devices: {info['devices']}, "
          f"XLA options: {info['xla_options'] or 'defaults'}")
    if torch is not None:
        print(f"# torch {info['torch']} ({info['torch_threads']} threads)")
    if args.plain_jit:
        info["load_average"] = os.getloadavg()  # timings on a shared machine: say how shared
        print(f"# load average (1, 5, 15 min): {info['load_average']}")
        if args.profile and torch is None:
            ap.error("--profile compares with torch's pieces: it needs torch (pip install -e "
                     "'.[torch]') and no --no-torch")
        results = (profile_main(args, torch) if args.profile
                   else plain_jit_main(args, torch))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"info": info, "results": results}, f, indent=2)
            print(f"# wrote {args.json}")
        return
    print(f"# fwd+bwd (value_and_grad w.r.t. y and kernel), ms per call, median of {args.reps}; "
          f"ratio = time / {BASELINE} time")

    layers, steps = problems(args.batch)
    cases = [(name, [lay]) for name, lay in layers.items()]
    cases += [(name, [layers[n] for n in names]) for name, names in steps.items()]
    if args.problems is not None:
        wanted = [p.strip() for p in args.problems.split(",") if p.strip()]
        known = [name for name, _ in cases]
        bad = sorted(set(wanted) - set(known))
        if bad or not wanted:
            ap.error(f"--problems {args.problems!r}: unknown {bad}; allowed: {', '.join(known)}")
        cases = [(name, lays) for name, lays in cases if name in wanted]
        steps = {name: names for name, names in steps.items()
                 if name in wanted and all(n in wanted for n in names)}
    results = []
    header = f"{'problem':<12}" + "".join(f"{m:>22}" for m in methods)
    print(header)
    for name, layers in cases:
        med, raw = bench(name, layers, methods, args.reps, torch, args.xla_default)
        base = med[BASELINE]
        row = f"{name:<12}" + "".join(cell(med[m], med[m] / base) for m in methods)
        print(row, flush=True)
        results.append({
            "problem": name,
            "layers": [describe(lay) for lay in layers],
            "median_ms": med,
            "ratio_vs_autodiff": {m: med[m] / base for m in methods},
            "all_ms": raw,
        })
        if "torch" in methods:
            results[-1]["paired_ratio_vs_torch_quartiles"] = {
                m: quartiles(paired_ratios(raw, m)) for m in methods if m != "torch"}
    sums = {}
    for name, names in steps.items():  # each decoder step against the sum of its layers alone
        sums[name] = {m: sum(r["median_ms"][m] for r in results if r["problem"] in names)
                      for m in methods}
        print(f"{name + ' sum':<12}" + "".join(
            cell(sums[name][m], sums[name][m] / sums[name][BASELINE]) for m in methods))
    if "torch" in methods:
        jax_methods = [m for m in methods if m != "torch"]
        print(f"# time / torch time, paired by round: median [25th-75th percentile] "
              f"of {args.reps} rounds")
        print(f"{'problem':<12}" + "".join(f"{m:>22}" for m in jax_methods))
        for r in results:
            q = r["paired_ratio_vs_torch_quartiles"]
            print(f"{r['problem']:<12}" + "".join(
                f"{f'{q[m][1]:.2f}x [{q[m][0]:.2f}-{q[m][2]:.2f}]':>22}" for m in jax_methods))
    for name, layers in cases:
        print(f"#   {name}: " + "; ".join(describe(lay) for lay in layers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "decoder_layer_sum_ms": sums},
                      f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
