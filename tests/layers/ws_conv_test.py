"""Weight-standardized convolutions against NumPy references."""

import keras
import numpy as np
import pytest

from keras_dpscale import rules
from keras_dpscale.layers import ScaledWSConv2D
from keras_dpscale.layers import WSConv2D
from keras_dpscale.layers.ws_conv import WSConvRule
from tests.rules import harness


def conv_with_kernel(x, kernel, groups=1):
    """Keras' own convolution with a given kernel ("same", stride 1)."""
    layer = keras.layers.Conv2D(
        kernel.shape[-1],
        kernel.shape[:2],
        padding="same",
        groups=groups,
        use_bias=False,
    )
    layer.build(x.shape)
    layer.kernel.assign(kernel)
    return layer(x).numpy()


def test_ws_conv_standardizes_each_output_channel():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32")
    layer = WSConv2D(4, 3, padding="same", use_bias=False)
    y = layer(x).numpy()
    w = layer.kernel.numpy() * 3.0 + 1.0  # any scale and shift
    layer.kernel.assign(w)
    mean = w.mean(axis=(0, 1, 2))
    std = np.sqrt(w.var(axis=(0, 1, 2)) + 1e-5)
    want = (w - mean) / std
    np.testing.assert_allclose(
        layer.standardized_kernel(layer.kernel), want, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        layer(x).numpy(), conv_with_kernel(x, want), rtol=1e-4, atol=1e-5
    )
    # Standardization removes scale and shift (up to epsilon's share).
    np.testing.assert_allclose(layer(x).numpy(), y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_scaled_ws_conv_matches_the_nfnet_formula(groups):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    layer = ScaledWSConv2D(6, 3, padding="same", groups=groups)
    layer.build(x.shape)
    layer.gain.assign(rng.uniform(0.5, 2.0, size=6).astype("float32"))
    layer.bias.assign(rng.normal(size=6).astype("float32"))
    w = layer.kernel.numpy()
    fan_in = 3 * 3 * (4 // groups)
    scale = 1 / np.sqrt(np.maximum(w.var(axis=(0, 1, 2)) * fan_in, 1e-4))
    want = (w - w.mean(axis=(0, 1, 2))) * scale * layer.gain.numpy()
    np.testing.assert_allclose(
        layer(x).numpy(),
        conv_with_kernel(x, want, groups) + layer.bias.numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_scaled_ws_conv_preserves_unit_variance_at_init():
    x = np.random.default_rng(2).normal(size=(64, 8, 8, 32))
    layer = ScaledWSConv2D(64, 1, kernel_initializer="he_normal")
    assert abs(float(np.var(layer(x.astype("float32")).numpy())) - 1) < 0.1


def test_config_round_trip_and_saving(tmp_path):
    inputs = keras.Input((6, 6, 4))
    h = WSConv2D(4, 3, epsilon=1e-3)(inputs)
    h = ScaledWSConv2D(6, 1, groups=2, gain_initializer="zeros")(h)
    model = keras.Model(inputs, h)
    model.layers[-1].gain.assign(np.arange(6, dtype="float32"))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[1].epsilon == 1e-3
    assert loaded.layers[2].groups == 2
    np.testing.assert_array_equal(loaded.layers[2].gain.numpy(), np.arange(6))
    x = np.random.default_rng(3).normal(size=(1, 6, 6, 4)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def test_standardization_in_float32_under_mixed_precision(mixed_bfloat16):
    layer = ScaledWSConv2D(4, 3, padding="same")
    x = np.random.default_rng(4).normal(size=(1, 5, 5, 3)).astype("float32")
    assert layer(x).dtype == "bfloat16"
    assert layer.kernel.dtype == "float32"
    assert layer.standardized_kernel(layer.kernel).dtype == "float32"


@pytest.mark.parametrize("form", ["per_example", "gram", "input_gram"])
@pytest.mark.parametrize("layer_class", [WSConv2D, ScaledWSConv2D])
def test_fast_clipping_rule(layer_class, form, monkeypatch):
    # The registered rule against per-example gradients (tests/rules).
    harness.force_form(monkeypatch, form)
    layer = layer_class(3, 3, strides=2, padding="same")
    x = np.random.default_rng(5).normal(size=(8, 7, 7, 2)).astype("float32")
    layer(x)
    if layer_class is ScaledWSConv2D:
        layer.gain.assign(np.array([0.5, 1.0, 2.0], "float32"))
    assert isinstance(rules.rule_for(layer), WSConvRule)
    harness.check_rule(layer, x, views=2)
