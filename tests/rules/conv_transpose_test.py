"""The Conv2DTranspose and Conv1DTranspose rules against per-example
gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from tests.rules import harness

# Conv2DTranspose arguments (Conv1DTranspose: their first entries).
GEOMETRIES = {
    "3_same": dict(kernel_size=3, padding="same"),
    "3_stride_2_valid": dict(kernel_size=3, strides=2),
    "output_padding": dict(
        kernel_size=3, strides=2, padding="same", output_padding=1
    ),
    "dilated": dict(kernel_size=2, dilation_rate=2),
}


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_conv2d_transpose(geometry):
    kwargs = GEOMETRIES[geometry]
    layer = keras.layers.Conv2DTranspose(3, activation="tanh", **kwargs)
    harness.check_rule(layer, inputs((8, 4, 5, 2)), views=2)


def test_conv2d_transpose_rectangular_kernel():
    layer = keras.layers.Conv2DTranspose(
        3, (3, 2), strides=(2, 1), padding="same", use_bias=False
    )
    harness.check_rule(layer, inputs((6, 4, 5, 2)))


@pytest.mark.parametrize("geometry", ["output_padding", "dilated"])
def test_conv1d_transpose(geometry):
    layer = keras.layers.Conv1DTranspose(
        3, activation="tanh", **GEOMETRIES[geometry]
    )
    harness.check_rule(layer, inputs((8, 5, 2)), views=2)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (
            keras.layers.Conv2DTranspose(3, 3, data_format="channels_first"),
            (2, 2, 4, 4),
        ),
        (
            keras.layers.Conv1DTranspose(3, 3, data_format="channels_first"),
            (2, 2, 4),
        ),
    ],
    ids=["2d", "1d"],
)
def test_channels_first_is_not_covered(layer, shape):
    x = tf.constant(inputs(shape))
    layer.build(x.shape)
    assert rules.rule_for(layer).forward(layer, x) is None
