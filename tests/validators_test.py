"""What `validators.check_layers` allows and refuses: BatchNormalization
frozen (allowed) or not (refused), and the Keras 3 behaviour the rule
relies on, pinned here so that a Keras upgrade that changes it fails."""

import keras
import numpy as np
import pytest

import keras_dpscale as kd
from keras_dpscale import validators


def bn_model(norm, inner=None):
    """Input -> Dense -> `norm` -> Dense head (a functional model)."""
    i = keras.Input((4,))
    h = keras.layers.Dense(3)(i)
    h = norm(h) if inner is None else inner(h)
    return keras.Model(i, keras.layers.Dense(2)(h))


def frozen(layer):
    layer.trainable = False
    return layer


def test_trainable_batch_normalization_is_refused():
    with pytest.raises(ValueError, match="GroupNormalization.*freeze it"):
        validators.check_layers(bn_model(keras.layers.BatchNormalization()))


def test_batch_normalization_without_variables_is_still_refused():
    # No trainable variables, but trainable: it uses the batch's statistics.
    norm = keras.layers.BatchNormalization(center=False, scale=False)
    model = bn_model(norm)
    assert not norm.trainable_variables
    with pytest.raises(ValueError, match="other examples of the batch"):
        validators.check_layers(model)


def test_frozen_batch_normalization_is_allowed():
    norm = frozen(keras.layers.BatchNormalization())
    model = bn_model(norm)
    validators.check_layers(model)  # no error
    assert validators.frozen_batch_normalization(norm)
    # Inside an otherwise trainable model, and in a frozen nested backbone.
    assert len(model.trainable_variables) == 4
    inner = keras.Sequential([keras.layers.BatchNormalization()])
    inner.trainable = False  # sets it on every sublayer (Keras 3)
    assert not inner.layers[0].trainable
    validators.check_layers(bn_model(None, inner=inner))


def test_batch_normalization_trainable_inside_a_frozen_parent_is_refused():
    inner = keras.Sequential([keras.layers.BatchNormalization()])
    model = bn_model(None, inner=inner)
    inner.trainable = False
    inner.layers[0].trainable = True  # the layer's own flag decides
    with pytest.raises(ValueError, match="GroupNormalization"):
        validators.check_layers(model)
    # Keras runs it in training mode: its moving mean learns from the data.
    norm = inner.layers[0]
    before = norm.moving_mean.numpy().copy()
    model(np.ones((3, 4), "float32") * 5, training=True)
    assert not np.allclose(before, norm.moving_mean.numpy())


class CustomNorm(keras.layers.BatchNormalization):
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=True, mask=mask)


def test_frozen_subclass_with_its_own_call_is_refused():
    with pytest.raises(ValueError, match="replaces BatchNormalization's call"):
        validators.check_layers(bn_model(frozen(CustomNorm())))
    norm = frozen(keras.layers.BatchNormalization())
    model = bn_model(norm)
    norm.call = lambda inputs, **kw: inputs  # an instance's own call
    with pytest.raises(ValueError, match="replaces"):
        validators.check_layers(model)


def test_frozen_mixing_layers_stay_refused():
    norm = frozen(keras.layers.BatchNormalization())
    norm.mixes_examples = True  # declared: refused whatever else holds
    with pytest.raises(ValueError, match="declares `mixes_examples"):
        validators.check_layers(bn_model(norm))
    i = keras.Input((8, 8, 3))
    mixup = frozen(keras.layers.MixUp())
    model = keras.Model(i, keras.layers.Flatten()(mixup(i)))
    with pytest.raises(ValueError, match="MixUp"):
        validators.check_layers(model)


def test_dp_model_compiles_with_a_frozen_batch_normalization():
    norm = frozen(keras.layers.BatchNormalization())
    model = kd.make_private(bn_model(norm))
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.raises(ValueError, match="GroupNormalization"):
        kd.make_private(bn_model(keras.layers.BatchNormalization())).compile(
            optimizer=kd.DPSGD(
                learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0
            ),
            loss="mse",
        )


def test_keras_runs_a_frozen_batch_normalization_in_inference_mode():
    """The Keras 3 semantics the rule relies on: with `trainable = False`,
    `training=True` normalizes each example by the moving statistics (no
    example moves another's output) and updates nothing."""
    norm = frozen(keras.layers.BatchNormalization())
    norm.build((None, 3))
    norm.moving_mean.assign([1.0, -2.0, 0.5])
    norm.moving_variance.assign([4.0, 0.25, 1.0])
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    out = norm(x, training=True).numpy()
    np.testing.assert_allclose(out, norm(x, training=False), rtol=1e-6)
    alone = np.concatenate(
        [norm(x[i : i + 1], training=True) for i in range(5)]
    )
    np.testing.assert_allclose(out, alone, rtol=1e-6)
    np.testing.assert_array_equal(norm.moving_mean, [1.0, -2.0, 0.5])
    np.testing.assert_array_equal(norm.moving_variance, [4.0, 0.25, 1.0])
    # Trainable, it mixes: example 0's output depends on example 1.
    norm.trainable = True
    y = x.copy()
    y[1] += 10.0
    assert not np.allclose(norm(x, training=True)[0], norm(y, training=True)[0])
