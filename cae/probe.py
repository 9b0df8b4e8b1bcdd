"""Linear probe: how linearly separable are the classes in the (frozen) code?

A multinomial logistic regression is fitted on the codes of the train split and scored on the
codes of the test split. The autoencoder never sees a label, so this measures what unsupervised
training put into the code; it is the usual "representation quality" figure.

The codes are standardised with the train split's mean and standard deviation (a code's units
have very different scales, which a first-order or quasi-Newton solver converges slowly on).
The fit minimises mean cross-entropy plus ``l2 / 2 * |W|^2`` with full-batch L-BFGS
(``optax.lbfgs``, zoom line search) inside one ``jit``-compiled ``lax.scan``; the objective is
strictly convex, so the result does not depend on the start point and is a deterministic
function of the codes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cae import cpu_speed
from cae import data as data_lib

__all__ = ["encode_images", "standardize", "fit_logistic_regression", "predict",
           "linear_probe", "probe_dataset", "DEFAULT_STEPS", "DEFAULT_L2"]

DEFAULT_STEPS = 100  # L-BFGS iterations; on 60k MNIST codes the accuracy is flat beyond ~100
DEFAULT_L2 = 1e-4  # on W only; keeps the problem strictly convex when classes are separable


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(apply_fn, params, images: jax.Array) -> jax.Array:
    code = apply_fn({"params": params}, data_lib.normalize(images), method="encode")
    return code.reshape(code.shape[0], -1)


def encode_images(apply_fn, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """images: [N, H, W, C] uint8 -> codes [N, D] float32, D = h * w * features[-1].

    ``apply_fn`` is the autoencoder's ``model.apply`` (e.g. ``TrainState.apply_fn``); it is
    called with ``method="encode"``. The last batch is zero-padded to ``batch_size`` (one
    compiled shape) and the padding dropped: every example gets its code.
    """
    n = len(images)
    batch_size = max(1, min(batch_size, n))
    if n == 0:
        return np.zeros((0, 0), np.float32)
    # One program for every batch, compiled as cae.train compiles its own (cpu_speed.compile_fast).
    encode = cpu_speed.lower_and_compile_fast(_encode_batch, apply_fn, params,
                                              images[:batch_size])
    codes = None
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        m = len(batch)
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m, *batch.shape[1:]),
                                                    batch.dtype)])
        code = np.asarray(encode(params, batch))
        if codes is None:  # written in place: no list of batches to concatenate (1.5 GB for
            codes = np.empty((n, code.shape[1]), np.float32)  # mnist_tied_wide's train split)
        codes[start:start + m] = code[:m]
    return codes


def _column_stats(x: np.ndarray, rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every column of x [N, D], accumulated in float64 over
    chunks of rows (a float64 copy of a 60000 x 6272 code matrix would be 3 GB and ~10x slower).
    Two passes (mean, then squared deviations from it), so there is no cancellation."""
    n = len(x)
    total = np.zeros(x.shape[1], np.float64)
    for start in range(0, n, rows_per_chunk):
        total += x[start:start + rows_per_chunk].sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    squares = np.zeros(x.shape[1], np.float64)
    for start in range(0, n, rows_per_chunk):
        squares += np.square(x[start:start + rows_per_chunk] - mean).sum(axis=0)
    return mean, np.sqrt(squares / max(n, 1))


def standardize(train_x: np.ndarray, *others: np.ndarray, copy: bool = True
                ) -> tuple[np.ndarray, ...]:
    """Scale every column to zero mean, unit variance *on the train split*; apply the same
    affine map to ``others`` (the test split). Constant columns (dead units) are only centred.

    train_x: [N, D]; others: [M, D] each -> the same shapes, float32. ``copy=False`` lets it
    overwrite a float32 ``train_x`` with its result (saves one more array of its size: on this
    project's 2-vCPU VMs, first-touching a fresh 1.5 GB array costs seconds).
    """
    train_x = np.asarray(train_x)
    mean, std = _column_stats(train_x)
    std = np.where(std > 1e-8 * max(1.0, float(np.abs(mean).max(initial=0.0))), std, 1.0)
    mean32, scale32 = mean.astype(np.float32), (1.0 / std).astype(np.float32)
    in_place = not copy and train_x.dtype == np.float32 and train_x.flags.writeable
    return (_affine(train_x, mean32, scale32, out=train_x if in_place else None),
            *(_affine(np.asarray(x), mean32, scale32) for x in others))


def _affine(x: np.ndarray, mean32: np.ndarray, scale32: np.ndarray, out: np.ndarray | None = None,
            rows_per_chunk: int = 1024) -> np.ndarray:
    """``(x - mean32) * scale32`` as float32 [N, D], written chunk by chunk into one new array.
    The one-line form makes two full-size temporaries: on 60000 x 6272 codes it took 9.3 s
    (mostly page faults), this 0.4 s. ``out``: where to write (may be x itself)."""
    out = np.empty(x.shape, np.float32) if out is None else out
    for start in range(0, len(x), rows_per_chunk):
        part = out[start:start + rows_per_chunk]
        np.subtract(x[start:start + rows_per_chunk], mean32, out=part, casting="unsafe")
        part *= scale32
    return out


@jax.custom_vjp
def _features_times(x, xt, w):
    """x [N, D] @ w [D, K] -> [N, K], whose w-cotangent is computed as ``xt @ g`` from the
    transposed copy xt [D, N] of x (x and xt are constants: no cotangent for them).

    Why: the solver's every step is one forward and one backward product with the features, and
    the backward's ``x.T @ g`` reads x against its row-major layout. XLA:CPU ran that ~3.3x
    slower than the same product with x stored transposed (60000 x 6272 codes, 2 cores:
    x.T @ g 506 ms, xt @ g 160 ms, x @ w 134 ms). One transpose of x (~1.5 s) pays for itself
    in the first few of a fit's ~100 objective evaluations: 100 L-BFGS steps on those codes took
    33 s instead of 63 s. xt must be a materialised array (made outside the program that uses
    it): inside one program XLA folds a transpose back into the product."""
    return x @ w


_features_times.defvjp(lambda x, xt, w: (x @ w, xt), lambda xt, g: (None, None, xt @ g))
_transposed = jax.jit(jnp.transpose)  # [N, D] -> [D, N], materialised


def _objective(params, x, xt, y_onehot, l2):
    logits = _features_times(x, xt, params["w"]) + params["b"]
    ce = optax.softmax_cross_entropy(logits, y_onehot).mean()
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, xt, y, *, num_classes: int, steps: int, l2: float):
    y_onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    params = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
              "b": jnp.zeros((num_classes,), x.dtype)}
    fn = functools.partial(_objective, x=x, xt=xt, y_onehot=y_onehot, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fn)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fn)
        return (optax.apply_updates(params, updates), state), value

    (params, _), values = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params, values


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, *,
                            steps: int = DEFAULT_STEPS, l2: float = DEFAULT_L2
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch L-BFGS from zero weights.

    x: [N, D] float; y: [N] int in [0, num_classes). Minimises
    ``mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * |W|^2``.
    Returns (W [D, K], b [K], objective before each step [steps]).
    """
    x = jnp.asarray(x, jnp.float32)
    # The transposed copy is made by its own program: inside _fit, XLA would fold the transpose
    # back into the product (see _features_times).
    params, values = _fit(x, _transposed(x), jnp.asarray(y, jnp.int32),
                          num_classes=int(num_classes), steps=int(steps), l2=float(l2))
    return np.asarray(params["w"]), np.asarray(params["b"]), np.asarray(values)


def predict(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x: [N, D] -> predicted class [N] (argmax of the logits ``x W + b``)."""
    return np.asarray(jnp.argmax(jnp.asarray(x) @ w + b, axis=-1))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, steps: int = DEFAULT_STEPS, seed: int = 0,
                 l2: float = DEFAULT_L2, copy: bool = True) -> float:
    """Fit on (train_x [N, D], train_y [N]), return the accuracy in [0, 1] on (test_x [M, D],
    test_y [M]). Features are standardised with train-split statistics only (``copy=False``:
    in place in a float32 train_x, see ``standardize``).

    ``seed`` is accepted for a uniform interface; the fit (convex, from zeros, full batch) uses
    no randomness.
    """
    del seed
    train_y = np.asarray(train_y)
    test_y = np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"codes and labels differ in length: train {len(train_x)} vs "
                         f"{len(train_y)}, test {len(test_x)} vs {len(test_y)}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_z, test_z = standardize(train_x, test_x, copy=copy)
    w, b, _ = fit_logistic_regression(train_z, train_y, num_classes, steps=steps, l2=l2)
    return float(np.mean(predict(w, b, test_z) == test_y))


def probe_dataset(apply_fn, params, ds: data_lib.Dataset, batch_size: int, *,
                  steps: int = DEFAULT_STEPS, seed: int = 0) -> float | None:
    """Linear-probe accuracy of the autoencoder ``apply_fn``/``params`` on ``ds``: encode both
    splits, fit on the train codes, score on the test codes. None if ``ds`` has no labels."""
    if ds.train_labels is None or ds.test_labels is None:
        return None
    train_x = encode_images(apply_fn, params, ds.train, batch_size)
    test_x = encode_images(apply_fn, params, ds.test, batch_size)
    return linear_probe(train_x, ds.train_labels, test_x, ds.test_labels, steps=steps, seed=seed,
                        copy=False)  # the codes are ours: standardise them in place
