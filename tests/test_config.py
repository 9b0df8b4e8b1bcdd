"""Config schema: shipped configs parse, overrides work, each bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cae import config
from cae.config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"mnist_tied.yaml", "mnist_untied.yaml", "smoke.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_document_their_run_command(path):
    """Training configs run with cae.train; ablation configs (an ``ablation`` section) with
    cae.ablate. Each says its command and expected result at the top."""
    if path.name.startswith("ablation"):
        from cae import ablate

        cfg, _ = ablate.load_ablation_config(path, note=lambda _: None)
        tool = "cae.ablate"
    else:
        cfg, tool = config.load_config(path), "cae.train"
    head = path.read_text().splitlines()[:10]
    assert any(f"python -m {tool} --config configs/{path.name}" in line for line in head)
    assert any(line.startswith("# Expect") for line in head)
    assert cfg.data.name == "mnist"


def test_tied_and_untied_configs_differ_only_in_tied_and_output_dir():
    tied = config.to_dict(config.load_config(CONFIGS[0].parent / "mnist_tied.yaml"))
    untied = config.to_dict(config.load_config(CONFIGS[0].parent / "mnist_untied.yaml"))
    assert tied["model"]["tied"] is True and untied["model"]["tied"] is False
    tied["model"]["tied"] = False
    tied["output"]["dir"] = untied["output"]["dir"]
    assert tied == untied


def test_overrides_are_yaml_parsed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n")
    cfg = config.load_config(path, [
        "model.features=[8, 16, 4]", "train.epochs=3", "train.learning_rate=1e-3",
        "model.tied=false", "model.padding=SAME", "data.data_dir=/tmp/x", "data.manual_dir=",
        "model.kernel_size=[3, 5, 3]",
    ])
    assert cfg.model.features == [8, 16, 4]
    assert cfg.train.epochs == 3
    assert cfg.train.learning_rate == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.model.tied is False
    assert cfg.model.padding == "SAME"
    assert cfg.data.data_dir == "/tmp/x" and cfg.data.manual_dir is None
    assert cfg.model.kernel_size == [3, 5, 3]


def test_resolved_config_round_trips_through_yaml():
    cfg = config.load_config(CONFIGS[0].parent / "mnist_tied.yaml", ["train.epochs=5"])
    again = config.from_dict(yaml.safe_load(config.to_yaml(cfg)))
    assert again == cfg


def test_missing_keys_take_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert config.load_config(path) == config.Config()


BAD_OVERRIDES = [
    (["model.nope=1"], r"model\.nope.*allowed in model are"),
    (["nope.epochs=1"], r"nope\.epochs.*section one of"),
    (["epochs=1"], r"--set epochs: expected section\.key"),
    (["train.epochs"], r"expected section\.key=value"),
    (["train.epochs=[1,"], r"train\.epochs.*not valid YAML"),
    (["train.epochs=1.5"], r"train\.epochs=1\.5: expected int"),
    (["train.epochs=three"], r"train\.epochs='three': expected int"),
    (["train.epochs=0"], r"train\.epochs=0: must be >= 1"),
    (["train.epochs=-3"], r"train\.epochs=-3: must be >= 1"),
    (["train.batch_size=0"], r"train\.batch_size=0"),
    (["train.learning_rate=nan"], r"train\.learning_rate=nan: must be a finite number > 0"),
    (["train.learning_rate=.inf"], r"train\.learning_rate=inf: must be a finite"),
    (["train.learning_rate=-1"], r"train\.learning_rate=-1\.0: must be a finite number > 0"),
    (["train.learning_rate=fast"], r"train\.learning_rate='fast': expected float"),
    (["train.optimizer=lbfgs"], r"train\.optimizer='lbfgs': allowed are 'adam' \| 'adamw'"),
    (["train.loss=l1"], r"train\.loss='l1': allowed are 'bce' \| 'mse'"),
    (["model.tied=yes please"], r"model\.tied='yes please': expected bool"),
    (["model.tied=1"], r"model\.tied=1: expected bool"),
    (["model.features=abc"], r"model\.features='abc': expected list of \(int\)"),
    (["model.features=[]"], r"model\.features=\[\]: need at least one layer"),
    (["model.features=[8, 0]"], r"model\.features\[1\]=0: channel counts must be >= 1"),
    (["model.features=[8, 2.5]"], r"model\.features\[1\]=2\.5: expected int"),
    (["model.strides=0"], r"model\.strides=0: must be >= 1"),
    (["model.strides=[2, 2]"],
     r"model\.strides=\[2, 2\]: a list needs one value per layer \(3"),
    (["model.code_size=0"], r"model\.code_size=0: must be >= 1 \(numbers per image"),
    (["model.code_size=1.5"], r"model\.code_size=1\.5: expected int \| null"),
    (["model.strides=[2, -1, 2]"], r"model\.strides\[1\]=-1: must be >= 1"),
    (["model.kernel_size=0"], r"model\.kernel_size=0: must be >= 1"),
    (["model.padding=FULL"], r"model\.padding='FULL': allowed are an int >= 0, 'SAME' or 'VALID'"),
    (["model.padding=-1"], r"model\.padding=-1: allowed are an int >= 0"),
    (["model.activation=swish2"], r"model\.activation='swish2': allowed are 'relu'"),
    (["model.code_activation=sigmoid"],
     r"model\.code_activation='sigmoid': allowed are 'none' \| 'relu'"),
    (["model.conv_transpose_impl=fft"],
     r"model\.conv_transpose_impl='fft': allowed are 'auto' \| 'subpixel' \| "
     r"'subpixel_phasewise' \| 'zero_insertion' \| 'gemm' \| 'subpixel_phasewise_gemm'$"),
    (["model.conv_transpose_impl=lax"],  # comparison-only forms are not model options
     r"model\.conv_transpose_impl='lax': allowed are 'auto' \|"),
    (["train.code_lr_reference=0"], r"train\.code_lr_reference=0: must be >= 1 \(the code "),
    (["model.code_size=null"], r"train\.code_lr_reference=32: scales the fully connected "
                               r"code layer's learning rate: it needs model\.code_size"),
    (["data.name="], r"data\.name=None: expected str"),
    (["data.max_train_examples=0"], r"data\.max_train_examples=0: must be >= 1 or null"),
    (["output.overwrite=maybe"], r"output\.overwrite='maybe': expected bool"),
    (["output.progress=loud"], r"output\.progress='loud': expected bool \| 'auto'"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=lambda v: str(v))
def test_bad_overrides_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.load_config(CONFIGS[0].parent / "mnist_tied.yaml", overrides)
    assert "\n" not in str(info.value)


BAD_FILES = [
    ("train:\n  epochs: [1\n", r"malformed YAML \(line \d+, column \d+\)"),
    ("- a\n- b\n", r"expected a mapping of sections"),
    ("train: 3\n", r"train: expected a mapping of keys"),
    ("trian:\n  epochs: 1\n", r"unknown section 'trian': allowed are \['data', 'model'"),
    ("train:\n  epoch: 1\n", r"unknown key train\.epoch: allowed in train are \["),
    ("model:\n  features: 16\n", r"model\.features=16: expected list of \(int\)"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=lambda v: str(v)[:30])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        config.load_config(path)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: file not found"):
        config.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        config.load_config(tmp_path)


@pytest.mark.parametrize("override,message", [
    ("train.warmup_steps=3000000000", r"train\.warmup_steps=3000000000: must be <= 2147483647"),
    ("model.features=[8, 4294967296]", r"model\.features\[1\]=4294967296: must be <= 2147483647"),
    ("train.seed=2147483648", r"train\.seed=2147483648: must be <= 2147483647"),
    ("train.learning_rate=1e39", r"train\.learning_rate=1e\+39: must be a finite float32"),
])
def test_numbers_beyond_the_dtypes_the_run_uses_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load_config(CONFIGS[0].parent / "smoke.yaml", [override])
    config.load_config(CONFIGS[0].parent / "smoke.yaml", ["train.warmup_steps=2147483647"])


@pytest.mark.parametrize("code_size,scale", [(8, 1.0), (32, 1.0), (64, 0.5), (256, 0.125)])
def test_code_lr_reference_scales_only_the_code_layers_step(code_size, scale):
    """One Adam step from the same gradients: the code layer's (encoder_3: W and its bias,
    decoder_3: the bias after W^T) update is `scale` times the plain optimizer's, every other
    leaf's the same; never scaled up (K=8 < 32)."""
    import jax
    import numpy as np

    from cae import experiment

    cfg = config.load_config(CONFIGS[0].parent / "mnist_tied.yaml",
                             [f"model.code_size={code_size}"])
    plain = config.load_config(CONFIGS[0].parent / "mnist_tied.yaml",
                               [f"model.code_size={code_size}", "train.code_lr_reference=null"])
    assert experiment.code_lr_scale(cfg) == scale
    state = experiment.create_train_state(cfg, (28, 28, 1), 100)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape),
                         state.params)
    updates = {}
    for name, c in (("scaled", cfg), ("plain", plain)):
        tx = experiment.build_optimizer(c, 100)
        updates[name], _ = tx.update(grads, tx.init(state.params), state.params)
    code = experiment.code_layer_names(cfg)
    assert code == ("encoder_3", "decoder_3")
    for module in state.params:
        for leaf in state.params[module]:
            want = updates["plain"][module][leaf] * (scale if module in code else 1.0)
            np.testing.assert_allclose(updates["scaled"][module][leaf], want, rtol=1e-6,
                                       atol=1e-12)
    # not vacuous: the plain step moves the code layer's W by about the learning rate
    w = np.abs(np.asarray(updates["plain"]["encoder_3"]["kernel"]))
    assert 0.5 * cfg.train.learning_rate < w.mean() < 2 * cfg.train.learning_rate
