"""The fast training path: data on the device, epochs as compiled ``lax.scan`` programs, one-call
evaluation, data parallelism over a device mesh, bfloat16 compute.

Multi-device runs use ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in a child process
(the flag must be set before JAX starts).
"""

from __future__ import annotations

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PYTHON, REPO

from cae import cluster, config, cpu_speed, data, experiment, ops, train

SMOKE = REPO / "configs" / "smoke.yaml"
SMALL = ["data.max_train_examples=4096", "train.batch_size=64"]  # 64 steps: chunks of 50 + 14


def _cfg(mnist_dirs, run_dir, *overrides):
    sets = [f"data.data_dir={mnist_dirs['data_dir']}", f"output.dir={run_dir}",
            "output.progress=off", "train.linear_probe=false", *SMALL]
    if mnist_dirs["manual_dir"]:
        sets.append(f"data.manual_dir={mnist_dirs['manual_dir']}")
    return config.load_config(SMOKE, [*sets, *overrides])


def _count_compiles(fn) -> int:
    events = []

    def listener(name, secs, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(secs)

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


@pytest.mark.slow
def test_no_compilation_after_the_first_epoch(mnist_dirs, tmp_path):
    """Three epochs compile exactly what one epoch compiles: nothing is recompiled per epoch
    (each run starts from empty JIT caches)."""
    one = _count_compiles(lambda: train.train_and_evaluate(_cfg(mnist_dirs, tmp_path / "a")))
    three = _count_compiles(lambda: train.train_and_evaluate(
        _cfg(mnist_dirs, tmp_path / "b", "train.epochs=3")))
    assert one > 0
    assert three == one
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["images_per_sec"] > 0 for r in records)  # every epoch is timed


def test_epoch_batches_are_a_fresh_partition_each_epoch():
    """[S, B] indices: distinct within an epoch, only the last N % B left out, and a different
    shuffle (so a different left-out remainder) each epoch."""
    key = jax.random.key(0)
    a = np.asarray(train.epoch_batches(jax.random.fold_in(key, 1), 1000, 64))
    b = np.asarray(train.epoch_batches(jax.random.fold_in(key, 2), 1000, 64))
    assert a.shape == b.shape == (15, 64)
    assert len(np.unique(a)) == a.size and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(np.sort(a.ravel()), np.sort(b.ravel()))
    seen = set()
    for epoch in range(1, 40):
        seen |= set(np.asarray(train.epoch_batches(jax.random.fold_in(key, epoch), 1000, 64))
                    .ravel())
    assert len(seen) == 1000  # nobody is left out for good


def test_train_epoch_steps_equals_the_per_step_path(synthetic_mnist):
    """``length`` steps of the compiled scan == the same batches through ``train_step`` one by
    one (same parameters and losses up to float reassociation)."""
    cfg = config.load_config(SMOKE, ["train.batch_size=32"])
    images = synthetic_mnist.train[:32 * 6]
    batches = jnp.arange(32 * 6, dtype=jnp.int32).reshape(6, 32)[::-1]  # any order
    state = experiment.create_train_state(cfg, synthetic_mnist.image_shape, 100)
    scan_state, scan_losses = train.train_epoch_steps(state, jnp.asarray(images), batches, 1, 4)
    state = experiment.create_train_state(cfg, synthetic_mnist.image_shape, 100)
    losses = []
    for row in np.asarray(batches)[1:5]:
        state, loss = train.train_step(state, images[row])
        losses.append(float(loss))
    np.testing.assert_allclose(np.asarray(scan_losses), losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scan_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert int(scan_state.step) == 4


def test_compile_fast_changes_speed_not_results(synthetic_mnist):
    """``cpu_speed.compile_fast`` (what cae.train compiles its programs with) gives the same
    losses and parameters as XLA's default compilation."""
    cfg = config.load_config(SMOKE, ["train.batch_size=32"])
    images = jnp.asarray(synthetic_mnist.train[:32 * 4])
    batches = jnp.arange(32 * 4, dtype=jnp.int32).reshape(4, 32)
    state = experiment.create_train_state(cfg, synthetic_mnist.image_shape, 100)
    lowered = train.train_epoch_steps.lower(state, images, batches, np.int32(0), 4)
    default, fast = lowered.compile(), cpu_speed.compile_fast(lowered)
    out = {}
    for name, program in (("default", default), ("fast", fast)):
        out[name] = program(jax.tree.map(jnp.copy, state), images, batches, np.int32(0))
    np.testing.assert_allclose(np.asarray(out["fast"][1]), np.asarray(out["default"][1]),
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["fast"][0].params),
                    jax.tree.leaves(out["default"][0].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_compile_fast_turns_ynnpack_off_on_cpu():
    """compile_fast's premise and effect, on a conv layer's gradient program.

    On CPU, a jaxlib that knows the YNNPACK switch (0.10.x) hands convolutions to YNNPACK by
    default ("ynn_fusion" in the compiled HLO: if a jaxlib stops doing so, the switch is moot and
    this test fails to say so) and compile_fast's program has none left; a jaxlib that rejects
    the switch has no YNNPACK fusions to turn off. Other backends get no options at all."""
    if jax.default_backend() != "cpu":
        assert cpu_speed.xla_compiler_options() == {}
        return
    options = cpu_speed.xla_compiler_options()
    assert options
    x, kernel = jnp.ones((8, 14, 14, 32)), jnp.ones((3, 3, 32, 64))
    lowered = jax.jit(jax.grad(lambda x, k: jnp.sum(ops.conv(x, k, 2, 1) ** 2), (0, 1))).lower(
        x, kernel)
    default = lowered.compile().as_text()
    try:
        lowered.compile(options)
    except jax.errors.JaxRuntimeError as err:  # this jaxlib has no such switch
        assert any(name in str(err) for name in options), err
        assert "ynn_fusion" not in default
        return
    assert "ynn_fusion" in default
    assert "ynn_fusion" not in cpu_speed.compile_fast(lowered).as_text()


def test_compiler_options_only_on_cpu():
    assert cpu_speed.xla_compiler_options("cpu")
    assert cpu_speed.xla_compiler_options("gpu") == cpu_speed.xla_compiler_options("tpu") == {}


@pytest.mark.parametrize("eval_batch_size", [1000, 384, 7])
def test_evaluate_covers_every_test_example(synthetic_mnist, eval_batch_size):
    """One-call evaluation over padded, masked batches == the plain mean of per-example errors
    computed one example at a time in NumPy-land (no example dropped or double counted)."""
    cfg = config.load_config(SMOKE)
    state = experiment.create_train_state(cfg, synthetic_mnist.image_shape, 1)
    test = synthetic_mnist.test[:1003]  # not a multiple of any batch size above
    got = train.evaluate(state, train.EvalSet(test, eval_batch_size, cluster.make_mesh()))
    x = data.normalize(test)
    recon = np.concatenate([np.asarray(train.eval_step(state, test[i:i + 500])[1])
                            for i in range(0, len(test), 500)])
    want = np.mean((recon.astype(np.float64) - x) ** 2)
    assert abs(got - want) <= 1e-6 * want


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_parameters(mnist_dirs, tmp_path):
    f32 = train.train_and_evaluate(_cfg(mnist_dirs, tmp_path / "f32"))
    bf16 = train.train_and_evaluate(_cfg(mnist_dirs, tmp_path / "bf16", "train.dtype=bfloat16"))
    assert bf16["test_mse"] < 0.5 * bf16["initial_test_mse"]
    assert abs(bf16["test_mse"] - f32["test_mse"]) <= 0.25 * f32["test_mse"]
    cfg = _cfg(mnist_dirs, tmp_path / "bf16", "train.dtype=bfloat16")
    state = experiment.create_train_state(cfg, (28, 28, 1), 1)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


def _run_cli(env, run_dir, mnist_dirs, *overrides):
    argv = [PYTHON, "-m", "cae.train", "--config", str(SMOKE)]
    for s in [f"output.dir={run_dir}", f"data.data_dir={mnist_dirs['data_dir']}",
              "output.progress=off", "train.linear_probe=false", *SMALL, *overrides]:
        argv += ["--set", s]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_four_cpu_devices_match_one_device(mnist_dirs, subprocess_env, tmp_path):
    """Same command, 4 devices: each batch split over a 4-device mesh, parameters replicated.
    Same global batch and seed -> the same training up to float reassociation, so the test MSE
    is within 10% of the 1-device run's; summary.json says 4 devices."""
    env4 = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    four = _run_cli(env4, tmp_path / "four", mnist_dirs)
    assert four.returncode == 0, four.stderr[-2000:]
    assert "4 devices" in four.stdout
    one = _run_cli(subprocess_env, tmp_path / "one", mnist_dirs)
    assert one.returncode == 0, one.stderr[-2000:]
    s4 = json.loads((tmp_path / "four" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s4["num_devices"] == 4 and s1["num_devices"] == 1
    assert abs(s4["test_mse"] - s1["test_mse"]) <= 0.10 * s1["test_mse"], (s4, s1)
    assert s4["test_mse"] < 0.5 * s4["initial_test_mse"]

    # A batch that cannot be split evenly is a user mistake: one line, exit 2, no run dir.
    bad = _run_cli(env4, tmp_path / "bad", mnist_dirs, "train.batch_size=66")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: train.batch_size=66")
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


def test_multi_host_initialisation_only_in_a_cluster(monkeypatch):
    """``jax.distributed.initialize`` is called only where a cluster environment says so."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
    for var in cluster.CLUSTER_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert cluster.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert cluster.maybe_initialize_distributed() is True
    assert calls == [("10.0.0.1:1234", 2, 1)]
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task Slurm job is not a cluster
    assert cluster.maybe_initialize_distributed() is False and len(calls) == 1
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert cluster.maybe_initialize_distributed() is True and len(calls) == 2


def test_loss_is_summed_accurately_whatever_the_xla_options(synthetic_mnist):
    """loss_fn's mean over 128 x 784 per-pixel terms stays within 2e-6 (relative) of the same
    mean taken in float64 from the same logits, compiled either way (one long float32 sum in
    XLA:CPU's own reduction order was 4e-5 off)."""
    cfg = config.load_config(REPO / "configs" / "mnist_tied.yaml")
    state = experiment.create_train_state(cfg, synthetic_mnist.image_shape, 100)
    images = jnp.asarray(synthetic_mnist.train[:128])
    logits = np.asarray(state.apply_fn({"params": state.params}, data.normalize(images)),
                        np.float64)
    x = np.asarray(data.normalize(images), np.float64)
    want = np.mean(np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits))))
    lowered = jax.jit(lambda p, im: train.loss_fn(p, state.apply_fn, im, "bce")).lower(
        state.params, images)
    for program in (lowered.compile(), cpu_speed.compile_fast(lowered)):
        got = float(program(state.params, images))
        assert abs(got - want) / want < 2e-6, (got, want)
