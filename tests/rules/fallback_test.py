"""The fallback rule against per-example gradients, on any layer."""

import keras
import numpy as np
import pytest

from keras_dpscale import rules
from keras_dpscale.rules import fallback
from tests.rules import harness


class ChannelScale(keras.layers.Layer):
    """A layer without a rule, with a non-linear use of its variable."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, inputs):
        return inputs * self.scale**2


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_a_layer_without_a_rule():
    layer = ChannelScale()
    assert rules.rule_for(layer) is None
    harness.check_rule(layer, inputs((8, 3, 3, 2)), views=2, rule=fallback.RULE)


def test_a_convolution_by_the_fallback():
    harness.check_rule(
        keras.layers.Conv2D(3, 3, strides=2, padding="same"),
        inputs((6, 5, 5, 2)),
        rule=fallback.RULE,
    )


def test_random_layers_are_refused():
    layer = keras.Sequential([keras.layers.Dense(3), keras.layers.Dropout(0.5)])
    layer.build((None, 4))
    with pytest.raises(rules.Unsupported, match="random"):
        fallback.RULE.record(
            layer, layer.trainable_variables, layer.call, (inputs((4, 4)),), {}
        )
