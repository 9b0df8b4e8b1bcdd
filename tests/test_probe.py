"""cae.probe: codes of every image, and a logistic-regression probe checked against an
independent NumPy gradient descent, on data whose answer is known (separable, random labels);
plus the labels cae.data reads, checked against the original MNIST archives."""

from __future__ import annotations

import gzip
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MANUAL_DIR, manual_dir_available

from cae import data, models, probe

# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------


def _idx(path, offset):
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=offset)


def test_labels_belong_to_their_images(mnist, mnist_dirs):
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert mnist.train_labels.dtype == np.int32
    assert set(np.unique(mnist.test_labels)) == set(range(10))
    # max_train_examples slices labels and images alike.
    head = data.load_dataset("mnist", **mnist_dirs, max_train_examples=500)
    np.testing.assert_array_equal(head.train_labels, mnist.train_labels[:500])
    np.testing.assert_array_equal(head.train, mnist.train[:500])
    if not manual_dir_available():
        pytest.skip("original archives not available to compare with")
    # TFDS reorders examples: compare the multisets of (image, label) pairs with the idx files.
    images = _idx(MANUAL_DIR / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    labels = _idx(MANUAL_DIR / "t10k-labels-idx1-ubyte.gz", 8)

    def pairs(ims, ys):
        return sorted(hashlib.sha1(im.tobytes()).digest() + bytes([y]) for im, y in zip(ims, ys))

    assert pairs(mnist.test, mnist.test_labels) == pairs(images, labels)


# ----------------------------------------------------------------------------------------------
# Codes
# ----------------------------------------------------------------------------------------------


def test_encode_images_gives_every_example_its_code_in_order():
    model = models.ConvAutoencoder((4, 3), (3, 3), (2, 2), (1, 1), image_shape=(12, 12, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 12, 12, 1)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)
    images = rng.integers(0, 256, (37, 12, 12, 1), dtype=np.uint8)
    codes = probe.encode_images(model.apply, params, images, batch_size=16)  # 16 + 16 + 5
    assert codes.shape == (37, 3 * 3 * 3) and codes.dtype == np.float32
    for i in (0, 15, 16, 31, 32, 36):  # one at a time: no batching, no padding
        one = model.apply({"params": params}, images[i:i + 1] / np.float32(255.0),
                          method="encode")
        np.testing.assert_allclose(codes[i], np.asarray(one).reshape(-1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------


def _blobs(n, d, k, separation, seed):
    """k Gaussian classes in d dimensions, at random centres ``separation`` apart (roughly)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * separation / np.sqrt(2 * d)
    y = rng.integers(0, k, n)
    scales = rng.uniform(0.1, 20.0, d)  # very different feature scales: standardisation matters
    return ((centres[y] + rng.normal(size=(n, d))) * scales).astype(np.float32), y, scales


def test_standardize_uses_the_train_statistics_only():
    rng = np.random.default_rng(1)
    train = rng.normal(5.0, 3.0, (400, 3))
    train[:, 2] = 7.0  # a dead unit: constant
    test = rng.normal(5.0, 3.0, (100, 3)) + 10.0
    z_train, z_test = probe.standardize(train, test)
    np.testing.assert_allclose(z_train[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z_train[:, :2].std(0), 1, rtol=1e-5)
    np.testing.assert_array_equal(z_train[:, 2], 0)  # centred, not divided by 0
    expected = (test[:, :2] - train[:, :2].mean(0)) / train[:, :2].std(0)
    np.testing.assert_allclose(z_test[:, :2], expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(z_test))


def test_standardize_copy_false_overwrites_float32_train_codes_with_the_same_result():
    rng = np.random.default_rng(2)
    train = rng.normal(3.0, 2.0, (3000, 5)).astype(np.float32)  # > one 1024-row chunk
    test = rng.normal(3.0, 2.0, (10, 5)).astype(np.float32)
    kept = train.copy()
    z_train, z_test = probe.standardize(train, test)
    np.testing.assert_array_equal(train, kept)  # the default leaves its input alone
    z_in_place, z_test2 = probe.standardize(train, test, copy=False)
    assert np.shares_memory(z_in_place, train)
    np.testing.assert_array_equal(z_in_place, z_train)
    np.testing.assert_array_equal(z_test2, z_test)
    as_f64 = kept.astype(np.float64)  # not float32: copy=False cannot reuse it, and does not
    z64, _ = probe.standardize(as_f64, test, copy=False)
    assert not np.shares_memory(z64, as_f64) and z64.dtype == np.float32
    np.testing.assert_array_equal(as_f64, kept.astype(np.float64))


@pytest.mark.parametrize("rows_per_chunk", [1, 64, 1000, 5000])
def test_column_stats_by_chunks_equal_float64_numpy(rows_per_chunk):
    """The chunked float64 mean/std equal NumPy's float64 ones for any chunking (1000 rows:
    chunks that do not divide it, one chunk, a chunk larger than the array), also with a large
    offset where a one-pass E[x^2] - E[x]^2 in float32 would lose the variance."""
    rng = np.random.default_rng(4)
    x = (rng.normal(0.0, 1.0, (1000, 6)) * [1, 2, 3, 1e-2, 5, 1] + [0, 1e3, -5, 1e4, 0, 0])
    x = x.astype(np.float32)
    mean, std = probe._column_stats(x, rows_per_chunk)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(std, x.astype(np.float64).std(0), rtol=1e-9)


def test_separable_classes_are_found():
    x, y, _ = _blobs(3000, 20, 5, separation=40.0, seed=2)
    acc = probe.linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], steps=100, seed=0)
    assert acc >= 0.99


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6000, 20)).astype(np.float32)
    y = rng.integers(0, 10, 6000)
    acc = probe.linear_probe(x[:4000], y[:4000], x[4000:], y[4000:], steps=100, seed=0)
    assert abs(acc - 0.1) < 0.03  # 2000 test points: chance +- 0.007 (1 sd)


def _numpy_gradient_descent(x, y, k, l2, iters):
    """Independent reference: plain full-batch gradient descent in float64 NumPy on
    mean CE + l2/2 |W|^2 (convex, L-smooth with L <= |x|^2_max / 2 + l2)."""
    n, d = x.shape
    w, b = np.zeros((d, k)), np.zeros(k)
    onehot = np.eye(k)[y]
    xa = np.hstack([x, np.ones((n, 1))])
    lr = 1.0 / (0.5 * np.linalg.norm(xa, 2) ** 2 / n + l2)
    for _ in range(iters):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


def test_fit_agrees_with_numpy_gradient_descent_and_accuracy_is_recomputed():
    x, y, _ = _blobs(600, 6, 4, separation=4.0, seed=4)  # overlapping classes: a unique optimum
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    ztr, zte = probe.standardize(xtr, xte)
    l2 = 1e-2
    w, b, values = probe.fit_logistic_regression(ztr, ytr, 4, steps=100, l2=l2)
    assert values[-1] <= values[0] and np.all(np.isfinite(values))
    w_ref, b_ref = _numpy_gradient_descent(ztr.astype(np.float64), ytr, 4, l2, iters=20000)
    np.testing.assert_allclose(w, w_ref, atol=2e-3)
    # b is determined only up to a constant shift (softmax); compare the centred biases.
    np.testing.assert_allclose(b - b.mean(), b_ref - b_ref.mean(), atol=2e-3)
    # The probe's accuracy is the test accuracy of these weights, recomputed here in NumPy.
    acc = probe.linear_probe(xtr, ytr, xte, yte, steps=100, seed=0, l2=l2)
    mean, std = xtr.astype(np.float64).mean(0), xtr.astype(np.float64).std(0)
    ref_acc = np.mean(np.argmax(((xte - mean) / std) @ w_ref + b_ref, axis=1) == yte)
    assert acc == pytest.approx(ref_acc, abs=1 / 200)  # at most one borderline point differs
    assert 0.5 < acc < 0.99  # overlapping classes: informative, not trivial


def test_objective_gradient_through_the_transposed_copy_equals_autodiff():
    """The fit's objective takes its w-gradient from a transposed copy of the features
    (probe._features_times); it must equal JAX's autodiff of the plain ``x @ w`` objective."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((50, 7)), jnp.float32)
    y_onehot = jax.nn.one_hot(jnp.asarray(rng.integers(0, 3, 50)), 3)
    params = {"w": jnp.asarray(rng.standard_normal((7, 3)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}

    def reference(p):
        logits = x @ p["w"] + p["b"]
        return -jnp.mean(jnp.sum(y_onehot * jax.nn.log_softmax(logits), -1)) + 0.5 * 0.1 * jnp.sum(
            p["w"] ** 2)

    value, grad = jax.value_and_grad(probe._objective)(params, x, probe._transposed(x), y_onehot,
                                                        0.1)
    ref_value, ref_grad = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for key in ("w", "b"):
        np.testing.assert_allclose(grad[key], ref_grad[key], rtol=1e-5, atol=1e-7)


def test_mismatched_codes_and_labels_are_an_error():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="differ in length"):
        probe.linear_probe(x, np.zeros(9, int), x, np.zeros(10, int))
