import numpy as np
import pytest
import tensorflow as tf
import keras

from keras_dpscale import layers
from keras_dpscale.layers import scattering


def kymatio_scattering(J, L, shape, monkeypatch):
    """Kymatio's numpy frontend, when installed (not a dependency)."""
    import scipy.special

    # Kymatio 0.3 imports names that SciPy >= 1.15 removed, for its 3-D
    # transform only.
    for name in ("sph_harm", "factorial"):
        if not hasattr(scipy.special, name):
            monkeypatch.setattr(scipy.special, name, None, raising=False)
    try:
        from kymatio.numpy import Scattering2D
    except ImportError:
        return None
    return Scattering2D(J=J, shape=shape, L=L)


@pytest.mark.parametrize(
    "J, L, shape, out",
    [
        (1, 8, (28, 28), (14, 14, 9)),
        (2, 8, (28, 28), (7, 7, 81)),
        (2, 4, (32, 30), (8, 7, 25)),
        (3, 4, (28, 28), (3, 3, 61)),
    ],
)
def test_output_shape_and_channel_count(J, L, shape, out):
    layer = layers.Scattering2D(J=J, L=L)
    x = np.random.RandomState(0).rand(2, *shape, 3).astype(np.float32)
    y = layer(x)
    assert tuple(y.shape) == (2, out[0], out[1], 3 * out[2])
    assert layer.compute_output_shape((2, *shape, 3)) == tuple(y.shape)
    assert scattering.num_coefficients(J, L) == out[2]
    assert not layer.weights


def test_wavelets_have_zero_mean_and_the_low_pass_unit_gain():
    phi, psi = scattering.filter_bank((36, 36), J=2, L=8)
    # In Fourier, the value at frequency 0 is the filter's sum in space.
    assert phi[0][0, 0] == pytest.approx(1.0, abs=1e-3)
    for j in range(2):
        assert np.abs(psi[j][0][:, 0, 0]).max() < 1e-6
        assert psi[j][0].shape == (8, 36, 36)


def test_a_constant_image_has_only_its_order_zero_coefficient():
    y = layers.Scattering2D(J=2)(np.full((1, 28, 28, 1), 0.3, np.float32))
    y = y.numpy()
    np.testing.assert_allclose(y[..., 0], 0.3, rtol=1e-4)
    assert np.abs(y[..., 1:]).max() < 1e-4


def test_coefficients_are_stable_to_a_small_translation():
    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 8:20, 10:18] = 1.0
    layer = layers.Scattering2D(J=2)
    y = layer(image).numpy()
    shifted = layer(np.roll(image, 1, axis=2)).numpy()
    # The coefficients average over 2^J = 4 pixels: a one-pixel shift
    # moves them by a fraction of their norm (the pixels move by 100%).
    assert np.linalg.norm(shifted - y) < 0.3 * np.linalg.norm(y)
    assert np.linalg.norm(np.roll(image, 1, axis=2) - image) > 0.3 * (
        np.linalg.norm(image)
    )


def test_each_example_and_channel_is_transformed_alone():
    rng = np.random.RandomState(1)
    x = rng.rand(4, 16, 16, 2).astype(np.float32)
    layer = layers.Scattering2D(J=2, L=4)
    y = layer(x).numpy()
    k = scattering.num_coefficients(2, 4)
    for i in range(4):
        for c in range(2):
            alone = layer(x[i : i + 1, :, :, c : c + 1]).numpy()
            np.testing.assert_allclose(
                y[i : i + 1, :, :, c * k : (c + 1) * k], alone, atol=1e-5
            )
    changed = x.copy()
    changed[0] = rng.rand(16, 16, 2)
    np.testing.assert_array_equal(layer(changed).numpy()[1:], y[1:])


def test_xla_and_eager_agree_and_the_layer_serializes():
    x = np.random.RandomState(2).rand(3, 28, 28, 1).astype(np.float32)
    layer = layers.Scattering2D(J=2)
    eager = layer(x).numpy()
    compiled = tf.function(layer.__call__, jit_compile=True)(x).numpy()
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert (clone.J, clone.L) == (2, 8)
    np.testing.assert_allclose(clone(x).numpy(), eager, atol=1e-6)


@pytest.mark.parametrize("J, L", [(1, 8), (2, 8), (3, 4)])
def test_matches_kymatio_when_installed(J, L, monkeypatch):
    reference = kymatio_scattering(J, L, (28, 28), monkeypatch)
    if reference is None:
        pytest.skip("kymatio is not importable here")
    x = np.random.RandomState(3).rand(2, 28, 28).astype(np.float32)
    expected = reference(x)  # [n, K, H', W']
    ours = layers.Scattering2D(J=J, L=L)(x[..., None]).numpy()
    np.testing.assert_allclose(
        np.transpose(ours, [0, 3, 1, 2]), expected, atol=1e-4
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="J and L"):
        layers.Scattering2D(J=0)
    with pytest.raises(ValueError, match="static"):
        layers.Scattering2D(J=2).build((None, None, None, 1))


def test_an_image_too_small_to_pad_by_reflection_is_refused():
    with pytest.raises(ValueError, match="larger image"):
        layers.Scattering2D(J=3).build((None, 4, 4, 1))
    layers.Scattering2D(J=1).build((None, 4, 4, 1))  # pads 4 to 8: fine
