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

try:
    import cae  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cae import cli, config, experiment
from cae.data import DataError


def main(argv=None) -> int:
    ap = cli.CommandLineParser(description=__doc__.split("\n\n")[0])
    cli.add_config_flags(ap, config_help="YAML experiment config (configs/mnist_tied.yaml)",
                         set_help="override a config key (repeatable)",
                         config_default="configs/mnist_tied.yaml")
    args = ap.parse_args(argv)

    def measure() -> tuple:
        cfg = config.load_config(args.config, args.set)
        ds = experiment.load_data(cfg)
        # The run's initial parameters.
        state = experiment.create_train_state(cfg, ds.image_shape, 1)
        acc = experiment.probe_accuracy(cfg, state.params, ds)
        if acc is None:
            raise DataError(f"{ds.name} has no labels: no linear probe")
        return cfg, ds, acc

    code, result = cli.run_command(measure, "interrupted")
    if code:
        return code
    cfg, ds, acc = result
    print(f"{args.config} {' '.join(args.set)}: untrained model (train.seed={cfg.train.seed}), "
          f"linear probe on {len(ds.train)} train / {len(ds.test)} test codes: {acc:.4f}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
