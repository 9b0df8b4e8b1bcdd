#!/usr/bin/env python3
"""Training-step time with the fully connected code as one GEMM vs as XLA convolutions.

A conv whose kernel covers its whole input (``model.code_size``'s layer) is a matrix product;
``cae.ops`` runs it (and its transpose, and both gradients) as GEMMs. This A/B measures what
that buys in ``cae.train``'s own program (``train.train_epoch_steps`` compiled with
``cpu_speed.compile_fast``), in one process: ``gemm`` is the shipped path, ``conv`` the same model
with the GEMM path switched off (``ops.gemm_for_covering_kernels(False)``, so the layer goes to
``lax.conv_general_dilated`` and ``choose_impl``'s transposed conv). Rounds alternate the two,
each timed call after an untimed one of the same program; the figure is the median ms/step and
the conv / gemm ratio paired by round (median [min-max]).

Usage: ``python scripts/bench_fc_code.py [--config configs/mnist_tied.yaml] [--steps 20]
[--rounds 7] [--set KEY=VALUE ...]``. Random uint8 images of the config's MNIST shape (the
speed does not depend on the pixel values).
"""

from __future__ import annotations

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

from cae import cli, cpu_speed, experiment, ops, train


def compile_step(cfg, images, batches, gemm: bool):
    """(program, initial state) of ``len(batches)`` training steps, with or without the GEMM
    path for a conv that covers its input."""
    with ops.gemm_for_covering_kernels(gemm):  # traced now: the program keeps the path
        state = experiment.create_train_state(cfg, images.shape[1:], 1000)
        program = cpu_speed.lower_and_compile_fast(train.train_epoch_steps, state, images,
                                                   batches, np.int32(0), len(batches))
    return program, state


def main(argv=None) -> int:
    ap = cli.CommandLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed call (20)")
    ap.add_argument("--rounds", type=int, default=7, help="timed calls per method (7)")
    args, cfg = config_from_command_line(ap, argv)
    if cfg.model.code_size is None:
        print("note: model.code_size is null: unless a layer's kernel covers its input, both "
              "programs are the same")
    b = cfg.train.batch_size
    images = np.random.default_rng(0).integers(0, 256, (max(4 * b, 1024), 28, 28, 1), np.uint8)
    batches = (np.arange(args.steps * b, dtype=np.int32) % len(images)).reshape(args.steps, b)
    runs = {name: compile_step(cfg, images, batches, gemm=name == "gemm")
            for name in ("gemm", "conv")}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (program, state) in runs.items():
            for timed in (False, True):  # an untimed lead-in call, then the timed one
                fresh = jax.tree.map(jnp.array, state)  # a copy: the program donates it
                t0 = time.perf_counter()
                jax.block_until_ready(program(fresh, images, batches, np.int32(0)))
                if timed:
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    print(f"# machine: {cpu_model()}, JAX {jax.__version__}, {args.config} {' '.join(args.set)}")
    for name, ms in times.items():
        med = statistics.median(ms)
        print(f"{name:5s} {med:8.2f} ms/step  {b / med * 1e3:8.0f} img/s")
    ratios = [c / g for c, g in zip(times["conv"], times["gemm"])]
    print(f"conv / gemm, paired by round: {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}] over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
