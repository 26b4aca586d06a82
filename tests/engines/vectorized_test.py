"""Per-example gradients and clipping against direct computation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale.engines import vectorized
from tests.conftest import LOSS
from tests.conftest import inputs_for
from tests.conftest import loop_gradients
from tests.conftest import reference_clipped_sum
from tests.conftest import tiny_models


def loss_fn_for(model):
    def loss_fn(example):
        x, y = example
        pred = model(x[None], training=True)
        return LOSS(y[None], pred), pred[0]

    return loss_fn


@pytest.mark.parametrize("index", range(3), ids=["dense", "conv_gn", "emb"])
@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_per_example_gradients_match_loop(index, microbatch_size):
    model = tiny_models()[index]
    x, y = inputs_for(model, 6)
    expected = loop_gradients(model, x, y)

    @tf.function(jit_compile=True)
    def compute(x, y):
        return vectorized.per_example_gradients(
            loss_fn_for(model),
            model.trainable_variables,
            (x, y),
            microbatch_size,
        )

    grads, losses, preds = compute(x, y)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    want_losses = [LOSS(y[i : i + 1], model(x[i : i + 1])) for i in range(6)]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_allclose(preds, model(x), rtol=1e-5, atol=1e-6)


def test_clipped_norms_are_bounded_and_small_ones_untouched():
    rng = np.random.default_rng(1)
    scales = np.array([1e-3, 0.5, 0.999, 1.0, 1.001, 3.0, 1e4], "float32")
    grads = [
        tf.constant(rng.normal(size=(7, 4, 3)).astype("float32")),
        tf.constant(rng.normal(size=(7, 5)).astype("float32")),
    ]
    norms = vectorized.global_norms(grads).numpy()
    grads = [
        g * (scales / norms).reshape((7,) + (1,) * (g.ndim - 1)) for g in grads
    ]
    clip = 1.0
    clipped, before = vectorized.clip_by_global_norm(grads, clip)
    np.testing.assert_allclose(before, scales, rtol=1e-5)
    after = np.sqrt(
        sum(
            np.sum(np.asarray(g, np.float64).reshape(7, -1) ** 2, axis=1)
            for g in clipped
        )
    )
    assert np.all(after <= clip * (1 + 1e-6)), after
    np.testing.assert_allclose(after, np.minimum(scales, clip), rtol=1e-5)
    small = scales < clip
    for g, c in zip(grads, clipped):
        np.testing.assert_array_equal(
            np.asarray(c)[small], np.asarray(g)[small]
        )


def test_non_finite_example_contributes_zero():
    grads = [
        tf.constant([[1.0, 2.0], [np.nan, 1.0], [np.inf, 0.0], [3.0, 4.0]])
    ]
    clipped, _ = vectorized.clip_by_global_norm(grads, 1.0)
    c = clipped[0].numpy()
    np.testing.assert_array_equal(c[1:3], 0.0)
    np.testing.assert_allclose(c[3], [0.6, 0.8], rtol=1e-6)
    assert np.all(np.isfinite(c))


@pytest.mark.parametrize("microbatch_size", [None, 1, 3])
def test_clipped_sum_matches_loop_and_microbatch_size(microbatch_size):
    model = tiny_models()[1]
    x, y = inputs_for(model, 6)
    want, clip = reference_clipped_sum(model, x, y)

    @tf.function(jit_compile=True)
    def compute(x, y):
        return vectorized.clipped_gradient_sum(
            loss_fn_for(model),
            model.trainable_variables,
            (x, y),
            clip,
            microbatch_size,
        )

    got, losses, _ = compute(x, y)
    assert losses.shape == (6,)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_microbatch_size_must_divide_batch():
    model = tiny_models()[0]
    x, y = inputs_for(model, 6)
    with pytest.raises(ValueError, match="not a multiple of microbatch_size"):
        vectorized.clipped_gradient_sum(
            loss_fn_for(model), model.trainable_variables, (x, y), 1.0, 4
        )


def frozen_batch_norm_model():
    """Conv -> frozen BatchNormalization (public statistics, not the
    defaults) -> ReLU -> Conv -> pooling -> Dense; the BatchNormalization
    is the layer named "frozen_bn". Also used by `tests/engines/fast_test.py`."""
    i = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(i)
    norm = keras.layers.BatchNormalization(name="frozen_bn")
    h = keras.layers.Activation("relu")(norm(h))
    h = keras.layers.Conv2D(5, 3, strides=2)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(i, keras.layers.Dense(3)(h))
    rng = np.random.default_rng(7)
    norm.moving_mean.assign(rng.normal(size=4))
    norm.moving_variance.assign(rng.uniform(0.05, 3.0, size=4))
    norm.gamma.assign(rng.normal(size=4))
    norm.beta.assign(rng.normal(size=4))
    norm.trainable = False
    return model


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_frozen_batch_normalization_gives_per_example_gradients(
    microbatch_size,
):
    # Each example's gradient through a frozen BatchNormalization is the one
    # computed with that example alone (a trainable one would differ: it
    # normalizes by the batch's statistics).
    model = frozen_batch_norm_model()
    norm = model.get_layer("frozen_bn")
    stats = [v.numpy() for v in norm.weights]
    assert len(model.trainable_variables) == 6  # conv, conv, dense
    x, y = inputs_for(model, 6)
    expected = loop_gradients(model, x, y)

    @tf.function(jit_compile=True)
    def compute(x, y):
        return vectorized.per_example_gradients(
            loss_fn_for(model), model.trainable_variables, (x, y),
            microbatch_size,
        )  # fmt: skip

    grads, _, _ = compute(x, y)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for v, before in zip(norm.weights, stats):
        np.testing.assert_array_equal(v.numpy(), before)
