"""SkipInit gain: zero at initialization, learnable."""

import numpy as np
import tensorflow as tf

from keras_dpscale.layers import SkipInitGain


def test_starts_at_zero_and_learns():
    layer = SkipInitGain()
    x = tf.ones((2, 3))
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y)
    np.testing.assert_array_equal(y, np.zeros((2, 3)))
    assert float(tape.gradient(loss, layer.gain)) == 6.0


def test_initial_value_and_config():
    layer = SkipInitGain.from_config(SkipInitGain(0.25).get_config())
    np.testing.assert_allclose(layer(tf.ones((1, 2))), [[0.25, 0.25]])
