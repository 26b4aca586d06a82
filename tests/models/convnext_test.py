"""The ConvNeXt: every layer on the fast engine."""

import logging

import keras
import numpy as np

import keras_dpscale as kd
from keras_dpscale import validators
from keras_dpscale.models.convnext import convnext
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum
from tests.rules import harness

# Every layer type, few layers (XLA compiles each engine's step); layer
# scale at 0.5, not 1e-6, so that the block's gradients are not tiny.
TINY = dict(
    widths=(4, 8),
    depths=(1, 0),  # the second stage: its downsampling only
    num_classes=3,
    input_shape=(8, 8, 3),
    kernel_size=3,
    layer_scale=0.5,
)


def test_builds_by_name_and_saves(tmp_path):
    model = kd.models.get("convnext", **TINY)
    assert isinstance(model, kd.DPModel)
    assert model.output.shape == (None, 3)
    validators.check_layers(model)  # no layer mixes examples
    x, _ = inputs_for(model, 2)
    path = str(tmp_path / "convnext.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )


def test_fast_engine_has_no_fallback_and_equals_per_example_clipping(caplog):
    model = convnext(**TINY)
    x, y = inputs_for(model, 4)
    expected, clip = reference_clipped_sum(model, x, y)  # half clipped
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, clip, "fast")
    assert "fast" in caplog.text  # the log is captured...
    assert "vectorized path" not in caplog.text  # ...and nothing fell back
    harness.assert_sums_close(fast, expected)
    harness.assert_sums_close(
        fast, harness.clipped_sum(model, x, y, clip, "vectorized")
    )
