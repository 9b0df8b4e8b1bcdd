#!/usr/bin/env python3
"""Training throughput of a config: our per-step path, our compiled-epoch path, and PyTorch.

Measured in one run, interleaved (each round runs every method for ``--steps`` steps, so load
on the machine hits all alike; the figure is the median over ``--rounds``):

* ``jax per-step``   ``cae.train.train_step``: one jitted call per batch, the batch copied from
                     host memory each step (what most JAX examples do);
* ``jax scan``       ``cae.train.train_epoch_steps``: the data on the device, ``--steps`` steps
                     as one compiled ``lax.scan`` program, compiled with
                     ``cae.cpu_speed.compile_fast`` (on CPU: XLA's own convolutions, not
                     YNNPACK's); what ``cae.train`` runs;
* ``jax scan, XLA default``  the same program compiled with XLA's default options (on CPU
                     only; shows what ``compile_fast`` buys);
* ``torch``          the same architecture, initial weights, batch size, loss and optimizer
                     (Adam) in PyTorch eager on CPU, data as an in-memory uint8 tensor indexed
                     per batch; only if ``import torch`` works (torch is not a dependency).

Then one whole epoch as a single compiled program (its compile time and its time), the
achieved GFLOP/s (XLA's flop count of one step) against this machine's float32 matmul GFLOP/s,
and the ratio jax scan / torch images per second.

Usage: ``python scripts/bench.py [--config configs/mnist_tied.yaml] [--steps 100] [--rounds 3]
[--no-torch]``. MNIST comes from TFDS (``TFDS_DATA_DIR``/``CAE_MANUAL_DIR`` as for cae.train);
without it, random images of MNIST's shape (the speed does not depend on the pixel values).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

try:
    import cae  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from bench_ops import config_from_command_line, cpu_model

from cae import cli, cluster, cpu_speed, experiment, models, ops, train
from cae import data as data_lib


def load_images(cfg) -> tuple[np.ndarray, str]:
    try:
        ds = experiment.load_data(cfg)
        return ds.train, f"{ds.name} train split, {len(ds.train)} images"
    except data_lib.DataError as e:
        rng = np.random.default_rng(0)
        return (rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8),
                f"random 28x28x1 images ({e})")


def matmul_gflops(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(10))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def torch_trainer(torch, cfg, params, images: np.ndarray, batch: int, seed: int):
    """The same autoencoder in PyTorch, initialised from our parameters. Returns
    ``run(steps) -> last loss`` and ``first_loss`` (loss of the first batch before training)."""
    f = torch.nn.functional
    m = cfg.model
    model = experiment.build_model(cfg)  # its layers, with model.code_size's fully connected one
    _, ks, ss, ps = models.layer_plan(images.shape[1:], model.features, model.kernel_size,
                                      model.strides, model.padding, model.code_size)
    n = len(ks)
    ks = [models.kernel_hw(k) for k in ks]
    if not all(isinstance(p, int) for p in ps):
        raise SystemExit("the torch baseline needs int padding")

    def tensor(a):  # our HWIO [kh, kw, C_in, C_out] is torch's conv weight [C_out, C_in, kh, kw]
        a = np.asarray(a)
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
        return torch.tensor(np.ascontiguousarray(a), requires_grad=True)

    enc = [(tensor(params[f"encoder_{i}"]["kernel"]), tensor(params[f"encoder_{i}"]["bias"]))
           for i in range(n)]
    dec = [(tensor(params[f"decoder_{i}"]["kernel"]) if not m.tied else None,
            tensor(params[f"decoder_{i}"]["bias"])) for i in range(n)]
    leaves = [t for pair in enc + dec for t in pair if t is not None]
    act = getattr(f, m.activation)  # same names in torch.nn.functional
    opt = torch.optim.Adam(leaves, lr=cfg.train.learning_rate)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 [N, C, H, W]
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(data), generator=gen), 0

    def forward(x):
        sizes = []
        for i in range(n):
            sizes.append(x.shape[-2:])
            x = f.conv2d(x, enc[i][0], enc[i][1], stride=ss[i], padding=ps[i])
            if i < n - 1:
                x = act(x)
            elif m.code_activation != "none":
                x = getattr(f, m.code_activation)(x)
        for i in reversed(range(n)):
            kernel = enc[i][0] if m.tied else dec[i][0]
            op = [size - ops.conv_transpose_output_size(h, k, ss[i], (ps[i], ps[i]))
                  for size, h, k in zip(sizes[i], x.shape[-2:], ks[i])]
            x = f.conv_transpose2d(x, kernel, dec[i][1], stride=ss[i], padding=ps[i],
                                   output_padding=tuple(op))
            x = act(x) if i > 0 else x
        return x

    def loss_of(x):
        return f.binary_cross_entropy_with_logits(forward(x), x)

    def run(steps: int) -> float:
        nonlocal perm, pos
        for _ in range(steps):
            if pos + batch > len(data):
                perm, pos = torch.randperm(len(data), generator=gen), 0
            x = data[perm[pos:pos + batch]].float() / 255.0
            pos += batch
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x)
            loss.backward()
            opt.step()
        return float(loss.detach())

    with torch.no_grad():
        first = float(loss_of(data[:batch].float() / 255.0))
    return run, first


def main(argv=None) -> int:
    ap = cli.CommandLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="steps per method per round (100)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args, cfg = config_from_command_line(ap, argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("# torch not importable: no PyTorch baseline")
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch is not None:
        torch.set_num_threads(n_cores)

    images, source = load_images(cfg)
    batch = cfg.train.batch_size
    steps_per_epoch = len(images) // batch
    steps = min(args.steps, steps_per_epoch)
    mesh = cluster.make_mesh()
    print(f"# machine: {cpu_model()} ({n_cores} cores); JAX {jax.__version__} on "
          f"{mesh.size} x {jax.devices()[0].device_kind}"
          + (f"; torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ""))
    print(f"# config {args.config} {' '.join(args.set)}: batch {batch}, tied={cfg.model.tied}, "
          f"impl={cfg.model.conv_transpose_impl}, dtype={cfg.train.dtype}; data: {source}")
    print(f"# {args.rounds} interleaved rounds of {steps} steps per method; median")

    state = experiment.create_train_state(cfg, images.shape[1:], steps_per_epoch)
    params0 = jax.device_get(state.params)
    train_images = cluster.put(images, mesh)
    batch_sharding = cluster.sharding(mesh, train.BATCHES)
    batches = jax.device_put(train.epoch_batches(jax.random.key(0), len(images), batch),
                             batch_sharding)
    state = jax.device_put(state, cluster.sharding(mesh))
    host_perm = np.asarray(batches)

    t0 = time.perf_counter()
    scan_prog = cpu_speed.lower_and_compile_fast(train.train_epoch_steps, state, train_images,
                                                 batches, np.int32(0), steps)
    compile_chunk = time.perf_counter() - t0
    progs = {"jax scan": scan_prog}
    if cpu_speed.xla_compiler_options():  # what a plain jax.jit of the same function gets
        progs["jax scan, XLA default"] = train.train_epoch_steps.lower(
            state, train_images, batches, np.int32(0), steps).compile()
    t0 = time.perf_counter()
    step_prog = train.train_step.lower(state, images[host_perm[0]]).compile()
    compile_step = time.perf_counter() - t0
    cost = step_prog.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_step = float(cost.get("flops", 0.0)) if cost else 0.0

    states = {"jax per-step": state}
    position = {"jax per-step": 0}

    def run_step(n):
        s = states["jax per-step"]
        for _ in range(n):
            i = position["jax per-step"] % steps_per_epoch
            s, loss = step_prog(s, images[host_perm[i]])
            position["jax per-step"] += 1
        jax.block_until_ready(loss)
        states["jax per-step"] = s

    def run_scan(n, name):
        assert n == steps
        s, losses = progs[name](states[name], train_images, batches, np.int32(0))
        jax.block_until_ready(losses)
        states[name] = s

    methods = {"jax per-step": run_step}
    for name in progs:
        states[name] = jax.tree.map(jnp.copy, state)  # same start, own buffers (donated)
        methods[name] = functools.partial(run_scan, name=name)
    if torch is not None:
        run_torch, first_torch = torch_trainer(torch, cfg, params0, images, batch,
                                               cfg.train.seed)
        first_jax = float(train.loss_fn(params0, state.apply_fn, images[:batch], cfg.train.loss))
        print(f"# same model check: first-batch loss jax {first_jax:.6f}, torch "
              f"{first_torch:.6f}")
        methods["torch"] = run_torch
    for run in methods.values():  # warm-up (allocations, torch's first-call overheads)
        run(steps)
    rates = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            rates[name].append(steps * batch / _timed(lambda run=run: run(steps)))

    # One whole epoch as one compiled program.
    t0 = time.perf_counter()
    epoch_prog = cpu_speed.lower_and_compile_fast(
        train.train_epoch_steps, states["jax scan"], train_images, batches, np.int32(0),
        steps_per_epoch)
    compile_epoch = time.perf_counter() - t0
    epoch_s = _timed(lambda: jax.block_until_ready(
        epoch_prog(states["jax scan"], train_images, batches, np.int32(0))))

    peak = matmul_gflops()
    print(f"\n{'method':<22} {'images/s':>10} {'ms/step':>9} {'GFLOP/s':>9}")
    for name, r in rates.items():
        ips = statistics.median(r)
        gflops = f"{flops_per_step * ips / batch / 1e9:9.1f}" if flops_per_step else "      n/a"
        print(f"{name:<22} {ips:10.0f} {1000 * batch / ips:9.2f} {gflops}")
    print(f"\nwhole epoch as one program: {steps_per_epoch} steps in {epoch_s:.2f} s "
          f"({steps_per_epoch * batch / epoch_s:.0f} images/s); compile {compile_epoch:.1f} s")
    print(f"compile: train_step {compile_step:.1f} s, {steps}-step scan {compile_chunk:.1f} s")
    print(f"XLA flops per step: {flops_per_step / 1e9:.3f} GFLOP; float32 matmul peak here: "
          f"{peak:.0f} GFLOP/s")
    if torch is not None:
        ratio = statistics.median(rates["jax scan"]) / statistics.median(rates["torch"])
        print(f"ratio jax scan / torch images per second: {ratio:.2f}x")
    if "jax scan, XLA default" in rates:
        gain = statistics.median(rates["jax scan"]) / statistics.median(
            rates["jax scan, XLA default"])
        print(f"ratio jax scan / jax scan with XLA's default options: {gain:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
