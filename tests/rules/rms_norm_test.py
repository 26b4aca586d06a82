"""The RMSNormalization rule against per-example gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from tests.rules import harness


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("shape", [(8, 5), (8, 3, 5)])
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_rms_norm(shape, epsilon):
    x = inputs(shape) + 1.0
    layer = keras.layers.RMSNormalization(epsilon=epsilon)
    layer(x)
    layer.scale.assign(inputs(layer.scale.shape, seed=1))
    harness.check_rule(layer, x, views=2)


def test_other_axes_are_not_covered():
    layer = keras.layers.RMSNormalization(axis=1)
    x = tf.constant(inputs((4, 4, 4)))
    layer(x)
    assert rules.rule_for(layer).forward(layer, x) is None
