"""What every command shares about one experiment: a config becomes a model, a train state, data,
a code size, its baselines; the pictures of a run.

``cae.train`` (the loop), ``cae.visualize``, ``cae.ablate`` and the scripts import these; nothing
here trains. One name, one meaning: ``models.code_shape`` is the geometry's code shape,
:func:`model_code_shape` the config's; ``baselines.pca_baseline`` is PCA-k for any k,
:func:`linear_baseline` PCA with as many components as the config's code has numbers;
``probe.linear_probe`` fits codes, :func:`probe_accuracy` a model's codes of a dataset.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from matplotlib.figure import Figure

from cae import baselines, models, plots, probe, spectra
from cae import config as config_lib
from cae import data as data_lib
from cae.config import Config, ConfigError

__all__ = ["TrainState", "build_model", "build_optimizer", "code_layer_names", "code_lr_scale",
           "create_train_state", "state_tree",
           "load_data", "model_code_shape", "check_geometry", "reconstruct", "psnr",
           "linear_baseline", "pca_labels", "probe_accuracy", "test_reconstructions",
           "run_figures", "checkerboard_stride", "test_error_spectrum", "checkerboard"]


class TrainState(train_state.TrainState):
    loss: str = struct.field(pytree_node=False, default="bce")  # "bce" | "mse"
    compute_dtype: str = struct.field(pytree_node=False, default="float32")  # | "bfloat16"


# ----------------------------------------------------------------------------------------------
# Config -> model, optimizer, train state, data
# ----------------------------------------------------------------------------------------------


def build_model(cfg: Config, image_shape=None) -> models.ConvAutoencoder:
    """The model ``cfg.model`` describes: the one place a config becomes a model.
    ``image_shape`` (H, W, C) is needed only for ``decode`` (``method="decode"``)."""
    m = cfg.model
    n = len(m.features)
    return models.ConvAutoencoder(
        features=tuple(m.features),
        kernel_size=tuple(config_lib.per_layer(m.kernel_size, n, "model.kernel_size")),
        strides=tuple(config_lib.per_layer(m.strides, n, "model.strides")),
        padding=tuple(config_lib.per_layer(m.padding, n, "model.padding")),
        tied=m.tied, activation=m.activation, code_activation=m.code_activation,
        impl=m.conv_transpose_impl,
        image_shape=None if image_shape is None else tuple(int(v) for v in image_shape),
        code_size=m.code_size, decoder=m.decoder,
    )


def build_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    t = cfg.train
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, t.warmup_steps, max(total_steps, t.warmup_steps + 1))
    elif t.warmup_steps:
        lr = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    else:
        lr = t.learning_rate
    if t.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=t.weight_decay)
    elif t.optimizer == "sgd":
        tx = optax.sgd(lr, momentum=0.9, nesterov=True)
    else:
        tx = optax.adam(lr)
    scale = code_lr_scale(cfg)
    if scale == 1.0:
        return tx  # the same optimizer state as before the option existed: checkpoints resume
    # The code layer's step times `scale`: its weights (W, read by encoder and, tied, decoder)
    # and the biases on both sides of it. Scaling the update after Adam (and AdamW's decay, which
    # is part of its update) is scaling that layer's learning rate.
    code = code_layer_names(cfg)

    def in_code_layer(params):  # {module: {name: bool}}: True for the code layer's leaves
        return {module: jax.tree.map(lambda _, m=module: m in code, leaves)
                for module, leaves in params.items()}

    return optax.chain(tx, optax.masked(optax.scale(scale), in_code_layer))


def code_layer_names(cfg: Config) -> tuple[str, str]:
    """The fully connected code layer's two modules in the parameter tree: the encoder's last
    layer and the decoder layer that transposes it (see models.ConvAutoencoder)."""
    i = len(cfg.model.features)  # the code layer comes after the convs
    return f"encoder_{i}", f"decoder_{i}"


def code_lr_scale(cfg: Config) -> float:
    """How much the code layer's learning rate is scaled: ``min(1, train.code_lr_reference /
    model.code_size)`` (1.0 when the option is null). Only ever down: a code smaller than the
    reference trains at learning_rate (measured: K=8 with 4x the step, 0.0192 vs 0.0170 after
    3 epochs; docs/results.md)."""
    ref = cfg.train.code_lr_reference
    return 1.0 if ref is None else min(1.0, ref / cfg.model.code_size)


def create_train_state(cfg: Config, image_shape, total_steps: int) -> TrainState:
    """Initialise parameters for images of ``image_shape`` = (H, W, C) from ``train.seed``."""
    model = build_model(cfg)
    # JAX's default ("partitionable") threefry takes ~1.5 s *per parameter shape* to compile on
    # CPU; this one-off init does not need it, and the classic lowering compiles 5x faster.
    # Same seed -> same parameters, every run.
    with jax.threefry_partitionable(False):
        variables = jax.jit(model.init)(jax.random.key(cfg.train.seed),
                                        jnp.zeros((1, *image_shape)))
    params = variables["params"]
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=build_optimizer(cfg, total_steps), loss=cfg.train.loss,
                             compute_dtype=cfg.train.dtype)


def state_tree(state: TrainState) -> dict:
    """The part of the train state that is saved: arrays only, no functions."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def load_data(cfg: Config) -> data_lib.Dataset:
    """The splits ``cfg.data`` names, in memory: the one place a config becomes data (cae.train,
    cae.ablate, cae.visualize and the scripts). Raises DataError."""
    return data_lib.load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.manual_dir,
                                 cfg.data.max_train_examples)


def model_code_shape(cfg: Config, image_shape) -> tuple[int, int, int]:
    """The code's shape (h, w, C) of ``cfg``'s model for images of ``image_shape`` (H, W, C); its
    size h * w * C is the number of values per image the encoder keeps. Raises ValueError if a
    layer does not fit."""
    m = build_model(cfg)
    return models.code_shape(image_shape, m.features, m.kernel_size, m.strides, m.padding,
                             m.code_size)


def check_geometry(cfg: Config, image_shape, num_train: int, num_devices: int = 1) -> None:
    """What the config alone cannot check: the model against the images (H, W, C), the batch
    against the training split and the devices. Raises ConfigError."""
    try:
        model_code_shape(cfg, image_shape)
    except ValueError as e:
        raise ConfigError(f"model (images {image_shape[0]}x{image_shape[1]}): {e}") from None
    if cfg.train.batch_size > num_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: larger than the "
                          f"{num_train} training examples")
    total_steps = num_train // cfg.train.batch_size * cfg.train.epochs
    if total_steps > config_lib.INT_MAX:  # the step counter is an int32
        raise ConfigError(f"train.epochs={cfg.train.epochs}: {total_steps} steps in all, more "
                          f"than the step counter holds ({config_lib.INT_MAX})")
    if cfg.train.batch_size % num_devices:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be a multiple of the "
                          f"number of devices ({num_devices}); each device takes an equal share")


# ----------------------------------------------------------------------------------------------
# Reading a model: reconstructions, PSNR, the baselines of its code
# ----------------------------------------------------------------------------------------------


def reconstruct(apply_fn, params, images: jax.Array) -> jax.Array:
    """images: [B, H, W, C] uint8 -> reconstructions [B, H, W, C] in [0, 1] (sigmoid of the
    model's logits). ``apply_fn``: the model's ``apply``."""
    return jax.nn.sigmoid(apply_fn({"params": params}, data_lib.normalize(images)))


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]."""
    return float("inf") if mse <= 0 else float(10.0 * math.log10(1.0 / mse))


def linear_baseline(cfg: Config, ds: data_lib.Dataset, with_probe: bool = False):
    """-> (code_size, PCA with code_size components on the same splits, or None when the code is
    not smaller than an image: then nothing is compressed and there is no baseline). Cached per
    machine (``cae.baselines``); ``with_probe``: with the linear probe of the PCA codes."""
    code_size = int(np.prod(model_code_shape(cfg, ds.image_shape)))
    if code_size >= int(np.prod(ds.image_shape)):
        return code_size, None
    t0 = time.perf_counter()
    result = baselines.pca_baseline(ds, code_size, probe=with_probe)
    if time.perf_counter() - t0 > 1.0:  # computed, not read from the cache
        print(f"PCA baseline with {code_size} components in {time.perf_counter() - t0:.1f} s "
              f"(cached in {baselines.cache_dir()})", flush=True)
    return code_size, result


def pca_labels(code_size: int, pca) -> tuple[str, tuple[str, float] | None]:
    """``linear_baseline``'s result for the pictures: (a suffix for a title naming PCA's test
    MSE, ``plots.curves_figure``'s ``baseline``); ("", None) without a baseline."""
    if pca is None:
        return "", None
    return (f" (PCA with {code_size} components: {pca.test_mse:.4f})",
            (f"PCA, {code_size} components", pca.test_mse))


def probe_accuracy(cfg: Config, params, ds: data_lib.Dataset) -> float | None:
    """Frozen codes of the train split -> logistic regression -> its test accuracy (None for a
    dataset without labels)."""
    print(f"linear probe: logistic regression on the codes of {len(ds.train)} train images "
          "(train.linear_probe=false skips it)", flush=True)
    return probe.probe_dataset(build_model(cfg, ds.image_shape).apply, params, ds,
                               cfg.train.eval_batch_size, seed=cfg.train.seed)


_reconstruct = jax.jit(reconstruct, static_argnums=0)


def test_reconstructions(cfg: Config, ds: data_lib.Dataset, params
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``output.num_images`` test images and their reconstructions, both
    [n, H, W, C] in [0, 1]."""
    originals = ds.test[:min(cfg.output.num_images, len(ds.test))]
    recon = _reconstruct(build_model(cfg).apply, params, jnp.asarray(originals))
    return data_lib.normalize(originals), np.asarray(recon)


def run_figures(cfg: Config, ds: data_lib.Dataset, params, history: list[dict], *, epoch: int,
                code_size: int, pca, shown: tuple[np.ndarray, np.ndarray] | None = None
                ) -> dict[str, Figure]:
    """reconstructions.png and curves.png of a run at ``epoch`` (its metrics ``history``), each
    beside the PCA baseline (``pca``: ``linear_baseline``'s, None without one). ``shown``:
    :func:`test_reconstructions` done already. The one drawing of them, for cae.train's report
    and cae.visualize alike."""
    where = f"{ds.name}, {'tied' if cfg.model.tied else 'untied'}, epoch {epoch}"
    originals, recon = test_reconstructions(cfg, ds, params) if shown is None else shown
    against, baseline = pca_labels(code_size, pca)
    mse = f": test MSE {history[-1]['test_mse']:.4f}{against}" if history else ""
    return {
        "reconstructions.png": plots.reconstruction_figure(
            originals, recon,
            title=f"{where}, code of {code_size} numbers{mse}"),
        "curves.png": plots.curves_figure(
            history, loss_name=f"train loss ({cfg.train.loss.upper()})", title=where,
            baseline=baseline),
    }


# ----------------------------------------------------------------------------------------------
# Checkerboard artifacts: the score (summary.json) and its picture
# ----------------------------------------------------------------------------------------------


def checkerboard_stride(cfg: Config) -> int:
    """The stride of the decoder layer that writes the image (encoder layer 0's): the period of
    the pattern an uneven overlap there paints, the one the checkerboard score looks for."""
    return int(config_lib.per_layer(cfg.model.strides, len(cfg.model.features),
                                    "model.strides")[0])


def test_error_spectrum(cfg: Config, ds: data_lib.Dataset, params) -> np.ndarray:
    """The mean power spectrum [H, W] of the model's test reconstruction errors (sigmoid output
    minus image, every test image, channels averaged; ``spectra.power_spectrum``'s scaling, so
    it sums to the test MSE)."""
    apply_fn = build_model(cfg).apply
    total = np.zeros(ds.image_shape[:2])
    step = cfg.train.eval_batch_size
    for start in range(0, len(ds.test), step):
        images = ds.test[start:start + step]
        recon = np.asarray(_reconstruct(apply_fn, params, jnp.asarray(images)), np.float64)
        total += spectra.power_spectrum(recon - data_lib.normalize(images)) * len(images)
    return total / len(ds.test)


def checkerboard(cfg: Config, ds: data_lib.Dataset, params, code_size: int, pca
                 ) -> tuple[dict, Figure]:
    """The checkerboard score of the model's test errors beside PCA-``code_size``'s (``pca``:
    ``linear_baseline``'s, None without one) -> (summary.json's keys, checkerboard.png: each
    decoder layer's overlap map and both mean error spectra)."""
    stride = checkerboard_stride(cfg)
    spectrum = test_error_spectrum(cfg, ds, params)
    pca_spectrum = None if pca is None else baselines.pca_error_spectrum(ds, code_size)
    score = spectra.checkerboard_score(spectrum, stride)
    pca_score = (None if pca_spectrum is None
                 else spectra.checkerboard_score(pca_spectrum, stride))
    keys = {"decoder": cfg.model.decoder, "checkerboard_stride": stride,
            "checkerboard_score": score, "pca_checkerboard_score": pca_score,
            "checkerboard_chance": spectra.chance_score(ds.image_shape[:2], stride),
            # the same bins' power in MSE units: a share is read against the whole error
            "checkerboard_mse": spectra.alias_power(spectrum, stride),
            "pca_checkerboard_mse": (None if pca_spectrum is None
                                     else spectra.alias_power(pca_spectrum, stride))}
    m = build_model(cfg)
    overlaps = [(f"decoder layer {i}: {h}x{w}", overlap) for i, overlap in models.overlap_maps(
        ds.image_shape, m.features, m.kernel_size, m.strides, m.padding, m.code_size,
        m.decoder) for h, w in [overlap.shape]]
    shown = [(f"{cfg.model.decoder} decoder ({'tied' if cfg.model.tied else 'untied'})",
              spectrum, score)]
    if pca_spectrum is not None:
        shown.append((f"PCA, {code_size} components", pca_spectrum, pca_score))
    figure = plots.checkerboard_figure(
        overlaps, shown, spectra.alias_mask(ds.image_shape[:2], stride),
        title=f"{ds.name}, code of {code_size} numbers: checkerboard score = share of the "
              f"error's non-DC power at the stride-{stride} alias frequencies "
              f"(white noise: {keys['checkerboard_chance']:.3f})")
    return keys, figure
