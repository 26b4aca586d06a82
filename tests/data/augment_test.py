"""Augmentation multiplicity: the views, and one clipped gradient per example."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import data
from tests.conftest import LOSS

SEED = tf.constant([3, 4], tf.int64)


def images(n=4, size=8):
    rng = np.random.default_rng(0)
    return tf.constant(rng.normal(size=(n, size, size, 3)).astype("float32"))


def test_views_are_crops_of_the_mirror_padded_image_or_their_flips():
    x = images()
    views = data.augmult(x, 5, SEED).numpy()
    assert views.shape == (4, 5, 8, 8, 3)
    padded = np.pad(x.numpy(), [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect")
    for b in range(4):
        crops = [
            c
            for i in range(9)
            for j in range(9)
            for c in (
                padded[b, i : i + 8, j : j + 8],
                padded[b, i : i + 8, j : j + 8][:, ::-1],
            )
        ]
        for k in range(5):
            assert any(np.array_equal(views[b, k], c) for c in crops)
    # The K views of an example are not all the same.
    assert not np.array_equal(views[0, 0], views[0, 1])


def test_same_seed_same_views_eagerly_and_in_tf_data():
    x = images()
    eager = data.augmult(x, 3, SEED)
    ds = tf.data.Dataset.from_tensors(x).map(lambda t: data.augmult(t, 3, SEED))
    np.testing.assert_array_equal(next(iter(ds)), eager)
    other = data.augmult(x, 3, tf.constant([5, 6], tf.int64))
    assert not np.array_equal(other, eager)


def test_bad_num_views_raises():
    with pytest.raises(ValueError, match="num_views >= 1"):
        data.augmult(images(), 0, SEED)


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, strides=2)(inputs)
    h = keras.layers.GroupNormalization(2)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return kd.DPModel(inputs, keras.layers.Dense(3)(h))


def mean_view_gradient(model, views, label):
    """The gradient of the mean of the K single-view losses, by a loop."""
    grads = []
    for k in range(views.shape[0]):
        with tf.GradientTape() as tape:
            loss = LOSS(label[None], model(views[k : k + 1], training=True))
        grads.append(tape.gradient(loss, model.trainable_variables))
    return [np.mean([g[v] for g in grads], 0) for v in range(len(grads[0]))]


@pytest.mark.parametrize("clip", [1e3, 1e-2])
def test_one_clipped_gradient_per_example_from_its_mean_view_loss(clip):
    model = tiny_model()
    views = data.augmult(images(), 4, SEED)
    y = tf.constant([0, 1, 2, 1])
    per_example = [mean_view_gradient(model, views[b], y[b]) for b in range(4)]
    norms = [np.sqrt(sum(np.sum(g**2) for g in grads)) for grads in per_example]
    factors = np.minimum(1.0, clip / np.array(norms))
    want = [
        sum(f * grads[v] for f, grads in zip(factors, per_example)) / 4
        for v in range(len(per_example[0]))
    ]
    initial = [v.numpy() for v in model.trainable_variables]
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=1.0, l2_norm_clip=clip, noise_multiplier=0.0
        ),
        loss=LOSS,
    )
    model.fit(tf.data.Dataset.from_tensors((views, y)), verbose=0)
    for w0, g, w in zip(initial, want, model.trainable_variables):
        np.testing.assert_allclose(w.numpy(), w0 - g, rtol=1e-4, atol=1e-7)
    if clip < min(norms):  # every example clipped: the step has norm C
        step = np.sqrt(
            sum(
                np.sum((w.numpy() - w0) ** 2)
                for w0, w in zip(initial, model.trainable_variables)
            )
        )
        assert step <= clip * (1 + 1e-5)
