"""The layer-scale rule, for the model zoo's ConvNeXt and for
keras.applications' (whose whole model is in tests/transfer_test.py)."""

import numpy as np
import pytest

from keras_dpscale._compat import keras_private
from keras_dpscale.models.convnext import LayerScale
from tests.rules import harness


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize(
    "layer",
    [
        LayerScale(0.5),
        keras_private.ApplicationsLayerScale(0.5, projection_dim=4),
    ],
    ids=["models", "applications"],
)
def test_layer_scale(layer):
    harness.check_rule(layer, inputs((6, 3, 3, 4)), views=2)
