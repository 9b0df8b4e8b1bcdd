"""Typed experiment configuration: dataclasses, YAML files, strict ``--set`` overrides.

A config is a YAML file with four sections (``data``, ``model``, ``train``, ``output``) whose keys
are exactly the fields below. Unknown keys, wrong types and out-of-range values are rejected with
a one-line :class:`ConfigError` naming the dotted key, the bad value and what is allowed.
``--set model.features=[32,64,16]`` values are parsed as YAML, then checked like the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal, Union

import yaml

from cae import models, ops
from cae.errors import ConfigError

__all__ = [
    "Config", "DataConfig", "ModelConfig", "TrainConfig", "OutputConfig", "AblationConfig",
    "ABLATION_VARIANTS", "ConfigError", "shown_value",
    "load_config", "apply_overrides", "parse_overrides", "from_dict", "to_dict", "to_yaml",
    "per_layer", "read_yaml_file", "SECTIONS",
]

# Allowed names, read from where they are defined (the Literal types below list them).
_ACTIVATIONS = tuple(models.ACTIVATIONS)
_IMPLS = (ops.AUTO, *ops.IMPLEMENTATIONS)


@dataclasses.dataclass
class DataConfig:
    name: str = "mnist"  # any TFDS image dataset: mnist, fashion_mnist, kmnist, emnist/letters...
    data_dir: str | None = None  # None: TFDS's default (honors TFDS_DATA_DIR)
    manual_dir: str | None = None  # None: $CAE_MANUAL_DIR; folder with the original archives
    max_train_examples: int | None = None  # None: the whole train split (smaller for smoke runs)


@dataclasses.dataclass
class ModelConfig:
    """The field defaults are the *key defaults*, what a config file leaves out: the 3-conv
    model of configs/mnist_tied_bottleneck.yaml (a 4x4x16 code, 256 numbers). The *shipped
    default model*, "the default" of the README, is configs/mnist_tied.yaml (code_size 32)."""

    features: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 16])
    # Each of these is one value for every layer or a list with one value per layer.
    kernel_size: int | list[int] = 3
    strides: int | list[int] = 2
    padding: int | str | list[int | str] = 1  # ints, "SAME" or "VALID"
    tied: bool = True  # decoder layer i reuses encoder layer i's kernel array
    # How the decoder upsamples: "mirror" (the encoder's exact transposes, tied or untied),
    # "resize_conv" (nearest-neighbour upsampling, then a stride-1 conv) or "resize_conv_deep"
    # (the same plus a residual conv at each coarser size). Only "mirror" can be tied.
    decoder: Literal[models.DECODERS] = "mirror"
    activation: Literal[_ACTIVATIONS] = "relu"
    # On the code (the last encoder layer's output): "none" keeps it linear in the last conv.
    code_activation: Literal[("none", *_ACTIVATIONS)] = "none"
    # A fully connected bottleneck after the convs: the code is code_size numbers per image (a
    # VALID stride-1 conv whose kernel covers the last conv's output map; its transpose is W^T).
    # null: the code is the last conv's output map, h * w * features[-1] numbers.
    code_size: int | None = None
    conv_transpose_impl: Literal[_IMPLS] = "auto"


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    eval_batch_size: int = 1000
    learning_rate: float = 2e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0  # adamw only
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    loss: Literal["bce", "mse"] = "bce"  # bce on logits, or mse on sigmoid outputs
    seed: int = 0
    linear_probe: bool = True  # fit a linear classifier on the codes at the end (summary.json)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    # The fully connected code layer's learning rate is learning_rate * min(1, code_lr_reference
    # / model.code_size) (null: learning_rate, as every other layer). Adam moves every weight by
    # about the learning rate, so the decoder's W^T (fan-in code_size) changes its output in
    # proportion to code_size: the 1/fan-in rule (muP) keeps a recipe tuned at code_lr_reference
    # numbers stable at any code size. docs/results.md: why the rate-distortion curve was flat.
    code_lr_reference: int | None = None


@dataclasses.dataclass
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False  # allow replacing a *finished* run in output.dir
    num_images: int = 8  # test images shown in reconstructions.png
    progress: bool | Literal["auto"] = "auto"  # "auto": a progress bar only on a terminal


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # {"data": DataConfig, ...}


# What an ablation trains, by name -> (model.decoder, model.tied): "tied" and "untied" are the
# decoder that can be tied (the mirror), every other decoder is named as itself and untied.
(_TIEABLE,) = models.TIEABLE_DECODERS  # "tied"/"untied" name one decoder: the mirror
ABLATION_VARIANTS: dict[str, tuple[str, bool]] = {
    "tied": (_TIEABLE, True), "untied": (_TIEABLE, False),
    **{d: (d, False) for d in models.DECODERS if d != _TIEABLE}}


@dataclasses.dataclass
class AblationConfig:
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # Rate-distortion: every size is trained as every variant for every seed (model.code_size: a
    # fully connected code of that many numbers). null: the base config's code only.
    code_sizes: list[int] | None = None
    # What each (seed, size) is trained as, in this order (ABLATION_VARIANTS: the mirror tied or
    # untied, or another decoder, untied).
    variants: list[Literal[tuple(ABLATION_VARIANTS)]] = dataclasses.field(
        default_factory=lambda: ["tied", "untied"])


# ----------------------------------------------------------------------------------------------
# Type checking against the dataclass annotations
# ----------------------------------------------------------------------------------------------


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of ({_describe(typing.get_args(tp)[0])})"
    return tp.__name__


def _coerce(value, tp, key: str):
    """Return ``value`` checked against (and lightly normalised to) type ``tp``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}={shown_value(value)}: expected {_describe(tp)}")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r}: allowed are {_describe(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any spelling float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_section(name: str, cls, values: Any):
    """One config section: the mapping ``values`` (None: all defaults) -> dataclass ``cls``,
    every key known and type-checked (errors name ``name.key``)."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    types_ = _section_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]}: allowed in {name} are {sorted(types_)}"
        )
    return cls(**{k: _coerce(v, types_[k], f"{name}.{k}") for k, v in values.items()})


def from_dict(raw: Any) -> Config:
    """Nested dict (e.g. from YAML) -> validated :class:`Config`. Missing keys take defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = SECTIONS
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}: allowed are {sorted(sections)}")
    cfg = Config(**{name: build_section(name, cls, raw.get(name))
                     for name, cls in sections.items()})
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------
# Ranges
# ----------------------------------------------------------------------------------------------


def per_layer(value, n: int, key: str) -> list:
    """A scalar or an n-long list -> an n-long list (one value per encoder layer)."""
    if isinstance(value, list):
        if len(value) != n:
            raise ConfigError(
                f"{key}={value!r}: a list needs one value per layer ({n} = len(model.features)), "
                "or give a single value"
            )
        return list(value)
    return [value] * n


def _layer_values(value, n: int, key: str):
    """(dotted key, value) for each of the n layers: ``key[i]`` where ``value`` is a list (the
    error names the entry), ``key`` where one value serves every layer."""
    for i, v in enumerate(per_layer(value, n, key)):
        yield (f"{key}[{i}]" if isinstance(value, list) else key), v


def _require(ok: bool, key: str, value, allowed: str):
    if not ok:
        raise ConfigError(f"{key}={shown_value(value)}: {allowed}")


def shown_value(value) -> str:
    """A value as the user wrote it: a bool in YAML's spelling (true), the rest as repr."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


# Step counts, sizes and seeds become int32 scalars inside the compiled programs (and in orbax
# and optax); a larger value would overflow there, after the run dir was written.
INT_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # learning rates and weight decay are float32 in the step


def _integers(value, key: str):
    """(dotted key, int) for every integer in a config section's value (lists included)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield key, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _integers(v, f"{key}[{i}]")


def _check_limits(cfg: Config) -> None:
    for section, keys in to_dict(cfg).items():
        for name, value in keys.items():
            for key, v in _integers(value, f"{section}.{name}"):
                _require(v <= INT_MAX, key, v, f"must be <= {INT_MAX} (int32)")
    t = cfg.train
    for key, v in (("train.learning_rate", t.learning_rate),
                   ("train.weight_decay", t.weight_decay)):
        _require(not math.isfinite(v) or abs(v) <= FLOAT32_MAX, key, v,
                 "must be a finite float32 number (<= 3.4e38)")


def validate(cfg: Config) -> None:
    m, t, d, o = cfg.model, cfg.train, cfg.data, cfg.output
    _check_limits(cfg)
    _require(bool(d.name.strip()), "data.name", d.name, "must be a TFDS dataset name")
    _require(d.max_train_examples is None or d.max_train_examples >= 1,
             "data.max_train_examples", d.max_train_examples, "must be >= 1 or null")
    _require(len(m.features) >= 1, "model.features", m.features, "need at least one layer")
    for i, f in enumerate(m.features):
        _require(f >= 1, f"model.features[{i}]", f, "channel counts must be >= 1")
    _require(m.code_size is None or m.code_size >= 1, "model.code_size", m.code_size,
             "must be >= 1 (numbers per image in the fully connected code) or null (no such "
             "layer: the code is the last conv's output map)")
    _require(not m.tied or m.decoder in models.TIEABLE_DECODERS, "model.tied", m.tied,
             f"model.decoder={m.decoder!r} has no encoder kernel to share (its layers are "
             "stride-1 convs of the upsampled map, not the encoder's transposes); set "
             "model.tied=false, or model.decoder=mirror to tie")
    n = len(m.features)
    for key, k in _layer_values(m.kernel_size, n, "model.kernel_size"):
        _require(k >= 1, key, k, "must be >= 1")
    for key, s in _layer_values(m.strides, n, "model.strides"):
        _require(s >= 1, key, s, "must be >= 1")
    for key, p in _layer_values(m.padding, n, "model.padding"):
        ok = p.upper() in ("SAME", "VALID") if isinstance(p, str) else p >= 0
        _require(ok, key, p, "allowed are an int >= 0, 'SAME' or 'VALID'")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "must be >= 1")
    _require(math.isfinite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate",
             t.learning_rate, "must be a finite number > 0")
    _require(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
             t.weight_decay, "must be a finite number >= 0")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _require(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    _require(t.code_lr_reference is None or t.code_lr_reference >= 1, "train.code_lr_reference",
             t.code_lr_reference, "must be >= 1 (the code size the learning rate was tuned at) "
             "or null")
    _require(t.code_lr_reference is None or m.code_size is not None, "train.code_lr_reference",
             t.code_lr_reference, "scales the fully connected code layer's learning rate: it "
             "needs model.code_size (now null); set it to null")
    _require(bool(o.dir.strip()), "output.dir", o.dir, "must be a directory path")
    _require(o.num_images >= 1, "output.num_images", o.num_images, "must be >= 1")


# ----------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------


def read_yaml_file(path: str | os.PathLike, label: str | None = None) -> dict:
    """A config file's sections as a plain dict ({} for an empty file). Raises ConfigError
    naming the file as ``label`` (default ``--config PATH``): the one reader of config YAML,
    for --config files and the config.yaml a run dir saves alike."""
    label = f"--config {path}" if label is None else label
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{label}: malformed YAML{where}: {problem}") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read: {e.strerror}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping of sections (data, model, ...)")
    return raw or {}


def parse_overrides(overrides: list[str], sections: dict[str, type] | None = None
                    ) -> dict[tuple[str, str], Any]:
    """``--set section.key=value`` strings -> {(section, key): value parsed as YAML}.

    ``sections``: {name: dataclass} the keys may name (default :data:`SECTIONS`); the key must
    be a field of its section's dataclass. The value's type is checked later, with the file's.
    """
    sections = SECTIONS if sections is None else sections
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=3")
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(
                f"--set {key}: expected section.key with section one of {sorted(sections)}"
            )
        section, name = parts
        allowed = _section_types(sections[section])
        if name not in allowed:
            raise ConfigError(f"--set {key}: unknown key; allowed in {section} are "
                              f"{sorted(allowed)}")
        try:
            parsed[section, name] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}={text!r}: value is not valid YAML") from None
    return parsed


def apply_overrides(raw: dict, overrides: dict[tuple[str, str], Any]) -> dict:
    """A copy of the raw config dict with ``overrides`` (:func:`parse_overrides`'s) applied."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for (section, name), value in overrides.items():
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {target!r}")
        target[name] = value
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate. Raises :class:`ConfigError`."""
    return from_dict(apply_overrides(read_yaml_file(path), parse_overrides(list(overrides or []))))
