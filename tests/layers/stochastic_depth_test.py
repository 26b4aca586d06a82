"""Stochastic depth: per-example drops, also inside the DP train step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale.layers import StochasticDepth


def test_identity_at_inference_and_rate_validated():
    x = np.ones((4, 2, 2, 3), "float32")
    np.testing.assert_array_equal(StochasticDepth(0.5)(x), x)
    with pytest.raises(ValueError, match="rate"):
        StochasticDepth(1.0)


def test_drops_whole_examples_at_the_rate_and_rescales():
    x = np.ones((4000, 2, 2, 3), "float32")
    y = StochasticDepth(0.3, seed=1)(x, training=True).numpy()
    per_example = y.reshape(4000, -1)
    # Each example is all dropped or all kept (scaled by 1 / 0.7).
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
    kept = per_example[:, 0] > 0
    np.testing.assert_allclose(per_example[kept], 1 / 0.7, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.03


def test_each_example_draws_its_own_drop_in_the_dp_step():
    # Identical examples: a per-batch draw keeps 0 or all 64 of them. Each
    # kept example's gradient is clipped to exactly C, in one direction, so
    # the update's norm counts the kept ones.
    inputs = keras.Input((4,))
    branch = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
    outputs = StochasticDepth(0.5, seed=3)(branch(inputs))
    model = kd.DPModel(inputs, outputs)
    clip, lr, batch = 1e-3, 1.0, 64
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=lr, l2_norm_clip=clip, noise_multiplier=0.0
        ),
        loss="mse",
    )
    x = np.ones((batch, 4), "float32")
    y = np.full((batch, 1), 10.0, "float32")
    before = branch.kernel.numpy()
    model.fit(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, True),
        verbose=0,
    )
    kept = np.linalg.norm(branch.kernel.numpy() - before) * batch / (lr * clip)
    assert 10 < round(kept) < 54
