#!/usr/bin/env python3
"""The linear probe of an *untrained* model: the baseline that ``linear_probe_acc`` needs.

A linear classifier on the codes of a randomly initialised encoder already separates MNIST
well (random ReLU features); only the difference to this baseline is what autoencoder training
put into the code. Same probe as ``cae.train`` (``cae.probe.probe_dataset``), on the parameters
``cae.train`` would start from (the config's ``train.seed``).

Usage: ``python scripts/probe_baseline.py [--config configs/mnist_tied.yaml] [--set KEY=VALUE]``.
Data as for cae.train (``TFDS_DATA_DIR``, ``CAE_MANUAL_DIR``).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
try:
    import cae  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cae import config as config_lib
from cae import data as data_lib
from cae import probe, train


def main(argv=None) -> int:
    ap = config_lib.CommandLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mnist_tied.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = config_lib.load_config(args.config, args.set)
        ds = data_lib.load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.manual_dir,
                                   cfg.data.max_train_examples)
    except (config_lib.ConfigError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = train.create_train_state(cfg, ds.image_shape, 1)  # the run's initial parameters
    acc = probe.probe_dataset(train.build_model(cfg, ds.image_shape).apply, state.params, ds,
                              cfg.train.eval_batch_size, seed=cfg.train.seed)
    if acc is None:
        print(f"error: {ds.name} has no labels: no linear probe", file=sys.stderr)
        return 2
    print(f"{args.config} {' '.join(args.set)}: untrained model (train.seed={cfg.train.seed}), "
          f"linear probe on {len(ds.train)} train / {len(ds.test)} test codes: {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
