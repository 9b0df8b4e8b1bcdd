"""PyTorch for the cross-checks of ``cae.ops`` against ``torch.nn.functional``.

CI installs it (``.ci/run``: the ``torch`` extra, ``pip install -e ".[torch]"``, a CPU wheel), so
a missing torch is a failure, not a skip: a skipped cross-check passes silently. Set
``CAE_ALLOW_NO_TORCH=1`` to skip those tests on a machine without it (e.g. a user's quick run).
"""

from __future__ import annotations

import os

import pytest


def import_torch():
    """``import torch`` (2 threads, like the benchmarks' comparison); without torch: skip if
    ``CAE_ALLOW_NO_TORCH=1``, else fail naming the fix."""
    try:
        import torch
    except ImportError as err:
        if os.environ.get("CAE_ALLOW_NO_TORCH") == "1":
            pytest.skip("torch not installed and CAE_ALLOW_NO_TORCH=1")
        pytest.fail(f"torch is needed for the PyTorch cross-checks ({err}): "
                    'pip install -e ".[torch]", or set CAE_ALLOW_NO_TORCH=1 to skip them')
    return torch
