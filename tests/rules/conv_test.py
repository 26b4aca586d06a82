"""The Conv2D rule against per-example gradients, in each of its forms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from tests.rules import harness

# Input size and Conv2D arguments.
GEOMETRIES = {
    "3x3_same": (7, dict(kernel_size=3, padding="same")),
    "3x3_stride_2": (8, dict(kernel_size=3, strides=2, padding="same")),
    "3x2_valid": (7, dict(kernel_size=(3, 2), strides=(1, 2))),
    "dilated": (9, dict(kernel_size=3, padding="same", dilation_rate=2)),
    "1x1_stride_2": (6, dict(kernel_size=1, strides=2)),
}


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("form", ["per_example", "gram", "input_gram"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_conv(form, geometry, monkeypatch):
    harness.force_form(monkeypatch, form)
    size, kwargs = GEOMETRIES[geometry]
    layer = keras.layers.Conv2D(3, activation="relu", **kwargs)
    harness.check_rule(layer, inputs((8, size, size, 2)), views=2)


@pytest.mark.parametrize("form", ["gram", "input_gram"])
def test_conv_on_images_with_a_large_offset(form, monkeypatch):
    # Near-constant images are what the centred and shifted forms are for.
    harness.force_form(monkeypatch, form)
    x = 30.0 + 1e-2 * inputs((6, 5, 5, 2))
    layer = keras.layers.Conv2D(3, 3, padding="same", use_bias=False)
    harness.check_rule(layer, x, rtol=1e-3)


def test_grouped_conv():
    layer = keras.layers.Conv2D(4, 3, padding="same", groups=2)
    harness.check_rule(layer, inputs((6, 5, 5, 4)))


def test_channels_first_is_not_covered():
    layer = keras.layers.Conv2D(3, 3, data_format="channels_first")
    x = tf.constant(inputs((2, 2, 5, 5)))
    layer.build(x.shape)  # (NCHW convolutions do not run on CPUs)
    assert rules.rule_for(layer).forward(layer, x) is None
