"""Gamma-scaled activations: the published constants and the layer."""

import math

import keras
import numpy as np
import pytest

from keras_dpscale.layers import ScaledActivation
from keras_dpscale.layers import scaled_activation


def test_relu_gamma_is_exact():
    want = 1 / math.sqrt(0.5 - 1 / (2 * math.pi))  # Var[relu(x)], N(0, 1)
    assert scaled_activation.gamma("relu") == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("name", sorted(scaled_activation.GAMMAS))
def test_published_gammas_are_inverse_standard_deviations(name):
    # The published values were estimated by sampling: 4th-digit accuracy.
    assert scaled_activation.GAMMAS[name] == pytest.approx(
        scaled_activation.gamma(name), rel=1e-3
    )


def test_scaled_activation_has_unit_variance_on_normal_inputs():
    x = np.random.default_rng(0).normal(size=200_000).astype("float32")
    for name in ("relu", "gelu", "selu"):  # selu: gamma by quadrature
        y = ScaledActivation(name)(x).numpy()
        assert np.std(y) == pytest.approx(1.0, abs=0.01)


def test_layer_is_gamma_times_activation_and_serializes():
    layer = ScaledActivation("gelu")
    x = np.linspace(-3, 3, 7).astype("float32")
    want = scaled_activation.GAMMAS["gelu"] * keras.activations.gelu(
        x, approximate=True
    )
    np.testing.assert_allclose(layer(x), want, rtol=1e-6)
    clone = ScaledActivation.from_config(layer.get_config())
    np.testing.assert_allclose(clone(x), want, rtol=1e-6)
