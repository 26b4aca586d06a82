"""The normalization and scalar-gain rules against per-example gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import rules
from tests.rules import harness


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def init_randomly(layer, x, seed=1):
    """Builds `layer` with random (not 1 and 0) scales and offsets."""
    layer(x)
    rng = np.random.default_rng(seed)
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return layer


@pytest.mark.parametrize(
    "scale, center", [(True, True), (True, False), (False, True)]
)
def test_group_norm(scale, center):
    x = inputs((8, 3, 3, 4))
    layer = keras.layers.GroupNormalization(2, scale=scale, center=center)
    harness.check_rule(init_randomly(layer, x), x, views=2)


@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 5)])
def test_layer_norm(shape):
    x = inputs(shape)
    harness.check_rule(init_randomly(keras.layers.LayerNormalization(), x), x)


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(scale=False), dict(center=False)],
    ids=["default", "scale_false", "center_false"],
)
def test_layer_norm_with_rms_scaling(kwargs):
    # Keras keeps gamma (and has no beta) whatever scale and center say.
    x = inputs((8, 3, 5)) + 2.0  # a mean that RMS scaling does not remove
    layer = keras.layers.LayerNormalization(rms_scaling=True, **kwargs)
    harness.check_rule(init_randomly(layer, x), x, views=2)
    assert [v.name for v in layer.trainable_variables] == ["gamma"]


def test_layer_norm_with_rms_scaling_in_bfloat16(mixed_bfloat16):
    x = tf.constant(inputs((6, 4, 5)), tf.bfloat16)
    layer = init_randomly(keras.layers.LayerNormalization(rms_scaling=True), x)
    recorded = rules.rule_for(layer).forward(layer, x)
    assert recorded.outputs.dtype == tf.bfloat16
    np.testing.assert_allclose(
        tf.cast(recorded.outputs, tf.float32),
        tf.cast(layer(x), tf.float32),
        rtol=1e-2,
    )


def test_skip_init_gain():
    x = inputs((8, 3, 3, 2))
    harness.check_rule(kd.layers.SkipInitGain(0.5), x, views=2)


@pytest.mark.parametrize(
    "layer",
    [
        keras.layers.GroupNormalization(2, axis=1),
        keras.layers.LayerNormalization(axis=1),
        keras.layers.LayerNormalization(axis=1, rms_scaling=True),
    ],
    ids=["group_norm_axis_1", "layer_norm_axis_1", "rms_scaling_axis_1"],
)
def test_other_configurations_are_not_covered(layer):
    x = tf.constant(inputs((4, 4, 4)))
    layer(x)
    assert rules.rule_for(layer).forward(layer, x) is None
