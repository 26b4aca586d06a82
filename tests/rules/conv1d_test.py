"""The Conv1D rule against per-example gradients, in each of its forms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from tests.rules import harness

# Input length and Conv1D arguments.
GEOMETRIES = {
    "3_same": (7, dict(kernel_size=3, padding="same")),
    "3_stride_2": (8, dict(kernel_size=3, strides=2, padding="same")),
    "2_valid": (7, dict(kernel_size=2)),
    "dilated": (9, dict(kernel_size=3, padding="same", dilation_rate=2)),
    "1_stride_2": (6, dict(kernel_size=1, strides=2)),
}


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("form", ["per_example", "gram", "input_gram"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_conv1d(form, geometry, monkeypatch):
    harness.force_form(monkeypatch, form)
    size, kwargs = GEOMETRIES[geometry]
    layer = keras.layers.Conv1D(3, activation="relu", **kwargs)
    harness.check_rule(layer, inputs((8, size, 2)), views=2)


@pytest.mark.parametrize("form", ["gram", "input_gram"])
def test_conv1d_on_a_large_offset(form, monkeypatch):
    harness.force_form(monkeypatch, form)
    x = 30.0 + 1e-2 * inputs((6, 5, 2))
    layer = keras.layers.Conv1D(3, 3, padding="same", use_bias=False)
    harness.check_rule(layer, x, rtol=1e-3)


def test_grouped_conv1d():
    layer = keras.layers.Conv1D(4, 3, padding="same", groups=2)
    harness.check_rule(layer, inputs((6, 5, 4)))


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(padding="causal"), (2, 5, 2)),
        (dict(data_format="channels_first"), (2, 2, 5)),
    ],
    ids=["causal", "channels_first"],
)
def test_other_configurations_are_not_covered(kwargs, shape):
    layer = keras.layers.Conv1D(3, 3, **kwargs)
    x = tf.constant(inputs(shape))
    layer.build(x.shape)
    assert rules.rule_for(layer).forward(layer, x) is None
