"""The DepthwiseConv2D and SeparableConv2D rules, and their 1D forms
(`rules.depthwise1d`), against per-example gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from tests.rules import harness

# Input size and the layers' arguments.
GEOMETRIES = {
    "3x3_same": (6, dict(kernel_size=3, padding="same")),
    "3x3_stride_2": (7, dict(kernel_size=3, strides=2, padding="same")),
    "3x2_valid": (6, dict(kernel_size=(3, 2))),
    "dilated": (7, dict(kernel_size=3, padding="same", dilation_rate=2)),
    "multiplier_2": (5, dict(kernel_size=2, depth_multiplier=2)),
}


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_depthwise_conv(geometry):
    size, kwargs = GEOMETRIES[geometry]
    layer = keras.layers.DepthwiseConv2D(activation="tanh", **kwargs)
    harness.check_rule(layer, inputs((8, size, size, 3)), views=2)


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_separable_conv(form, geometry, monkeypatch):
    harness.force_form(monkeypatch, form)  # of the pointwise kernel
    size, kwargs = GEOMETRIES[geometry]
    layer = keras.layers.SeparableConv2D(4, activation="tanh", **kwargs)
    harness.check_rule(layer, inputs((8, size, size, 3)), views=2)


def test_without_bias_on_a_large_offset(monkeypatch):
    harness.force_form(monkeypatch, "gram")
    x = 30.0 + 1e-2 * inputs((6, 5, 5, 2))
    for layer in (
        keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False),
        keras.layers.SeparableConv2D(3, 3, padding="same", use_bias=False),
    ):
        harness.check_rule(layer, x, rtol=1e-3)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (
            keras.layers.DepthwiseConv2D(3, data_format="channels_first"),
            (2, 2, 5, 5),
        ),
        (
            keras.layers.SeparableConv2D(2, 3, data_format="channels_first"),
            (2, 2, 5, 5),
        ),
        (
            keras.layers.DepthwiseConv1D(3, data_format="channels_first"),
            (2, 2, 5),
        ),
        (
            keras.layers.SeparableConv1D(2, 3, data_format="channels_first"),
            (2, 2, 5),
        ),
    ],
    ids=["depthwise", "separable", "depthwise_1d", "separable_1d"],
)
def test_channels_first_is_not_covered(layer, shape):
    x = tf.constant(inputs(shape))
    layer.build(x.shape)
    assert rules.rule_for(layer).forward(layer, x) is None


# Input length and the 1D layers' arguments.
GEOMETRIES_1D = {
    "3_same": (6, dict(kernel_size=3, padding="same")),
    "3_stride_2": (6, dict(kernel_size=3, strides=2, padding="same")),
    "dilated_multiplier_2": (
        6,
        dict(kernel_size=2, dilation_rate=2, depth_multiplier=2),
    ),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES_1D))
def test_depthwise_conv1d(geometry):
    size, kwargs = GEOMETRIES_1D[geometry]
    layer = keras.layers.DepthwiseConv1D(activation="tanh", **kwargs)
    harness.check_rule(layer, inputs((8, size, 3)), views=2)


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize("geometry", ["3_stride_2", "dilated_multiplier_2"])
def test_separable_conv1d(form, geometry, monkeypatch):
    harness.force_form(monkeypatch, form)  # of the pointwise kernel
    size, kwargs = GEOMETRIES_1D[geometry]
    layer = keras.layers.SeparableConv1D(4, activation="tanh", **kwargs)
    harness.check_rule(layer, inputs((8, size, 3)), views=2)
