"""The Conv3D rule against per-example gradients, in each of its forms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from tests.rules import harness

# Input size (depth, height, width) and Conv3D arguments.
GEOMETRIES = {
    "3_same": ((4, 5, 5), dict(kernel_size=3, padding="same")),
    "strided_same": (
        (5, 4, 5),
        dict(kernel_size=(2, 3, 2), strides=(2, 1, 2), padding="same"),
    ),
    "dilated_valid": ((5, 4, 5), dict(kernel_size=2, dilation_rate=(2, 1, 2))),
}


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_conv3d(form, geometry, monkeypatch):
    harness.force_form(monkeypatch, form)
    size, kwargs = GEOMETRIES[geometry]
    layer = keras.layers.Conv3D(3, activation="relu", **kwargs)
    harness.check_rule(layer, inputs((8, *size, 2)), views=2)


def test_conv3d_on_a_large_offset(monkeypatch):
    harness.force_form(monkeypatch, "gram")
    x = 30.0 + 1e-2 * inputs((6, 3, 4, 4, 2))
    layer = keras.layers.Conv3D(3, 3, padding="same", use_bias=False)
    harness.check_rule(layer, x, rtol=1e-3)


def test_grouped_conv3d():
    layer = keras.layers.Conv3D(4, 2, padding="same", groups=2)
    harness.check_rule(layer, inputs((6, 3, 4, 4, 4)))


def test_channels_first_is_not_covered():
    layer = keras.layers.Conv3D(3, 3, data_format="channels_first")
    x = tf.constant(inputs((2, 2, 4, 4, 4)))
    layer.build(x.shape)
    assert rules.rule_for(layer).forward(layer, x) is None
