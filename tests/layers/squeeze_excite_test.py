"""Squeeze-Excite: NumPy reference, and no mixing between examples."""

import numpy as np

from keras_dpscale.layers import SqueezeExcite


def test_matches_numpy_reference():
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 8)).astype("float32")
    layer = SqueezeExcite(se_ratio=0.5)
    y = layer(x).numpy()
    assert layer.fc0.units == 4
    w0, b0 = layer.fc0.get_weights()
    w1, b1 = layer.fc1.get_weights()
    h = np.maximum(x.mean(axis=(1, 2)) @ w0 + b0, 0) @ w1 + b1
    want = x * 2 / (1 + np.exp(-h))[:, None, None, :]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_examples_do_not_mix():
    x = np.random.default_rng(1).normal(size=(4, 3, 3, 6)).astype("float32")
    layer = SqueezeExcite()
    together = layer(x).numpy()
    alone = np.concatenate([layer(x[i : i + 1]).numpy() for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=1e-6)


def test_config_round_trip():
    layer = SqueezeExcite(hidden_channels=3, scale=1.0)
    clone = SqueezeExcite.from_config(layer.get_config())
    assert (clone.hidden_channels, clone.scale) == (3, 1.0)
