"""DPSGD / DPAdam: settings, noise once per logical batch, serialization."""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import optimizers


def dpsgd(**kwargs):
    kwargs.setdefault("l2_norm_clip", 1.0)
    kwargs.setdefault("noise_multiplier", 1.0)
    return kd.DPSGD(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"l2_norm_clip": 0.0}, "l2_norm_clip must be > 0"),
        ({"l2_norm_clip": -1.0}, "l2_norm_clip must be > 0"),
        ({"noise_multiplier": -0.1}, "noise_multiplier must be >= 0"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"microbatch_size": 0}, "microbatch_size"),
        ({"gradient_accumulation_steps": 4}, "Use accumulation_steps"),
        ({"loss_scale_factor": 128.0}, "loss_scale_factor"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpsgd(**kwargs)


def test_plain_apply_raises():
    opt = dpsgd()
    v = keras.Variable(np.ones(3, "float32"))
    with pytest.raises(RuntimeError, match="make_private"):
        opt.apply_gradients([(tf.ones(3), v)])
    np.testing.assert_array_equal(v.numpy(), 1.0)


def private_update(opt, grad_sums, physical_batch_size, size=20000):
    """Runs apply_private_gradients and returns the change of a variable."""
    v = keras.Variable(np.zeros(size, "float32"))
    step = tf.function(
        lambda g: opt.apply_private_gradients([g], [v], physical_batch_size),
        jit_compile=True,
    )
    changes = []
    for g in grad_sums:
        before = v.numpy().copy()
        step(tf.constant(g, tf.float32))
        changes.append(v.numpy() - before)
    return changes


@pytest.mark.parametrize("accumulation_steps", [1, 4])
def test_noise_std_is_sigma_c_over_b_once_per_logical_batch(
    accumulation_steps,
):
    sigma, clip, physical = 2.0, 0.5, 8
    batch = physical * accumulation_steps
    opt = dpsgd(
        learning_rate=1.0,
        l2_norm_clip=clip,
        noise_multiplier=sigma,
        accumulation_steps=accumulation_steps,
        noise_seed=3,
    )
    zeros = np.zeros(20000, "float32")
    changes = private_update(opt, [zeros] * accumulation_steps, physical)
    for c in changes[:-1]:  # no update, and so no noise, before the last
        np.testing.assert_array_equal(c, 0.0)
    update = -changes[-1]
    std = sigma * clip / batch
    assert scipy.stats.kstest(update, "norm", args=(0, std)).pvalue > 0.01
    # Noise added on every physical batch would be sqrt(k) times larger.
    if accumulation_steps > 1:
        wrong = std * np.sqrt(accumulation_steps)
        assert scipy.stats.kstest(update, "norm", args=(0, wrong)).pvalue < 1e-6
    assert int(opt.iterations.numpy()) == 1


def test_zero_noise_gives_mean_of_sums_and_rescale_to_unit_norm():
    g = np.linspace(-1, 1, 6).astype("float32")
    plain = private_update(
        dpsgd(learning_rate=0.1, noise_multiplier=0.0), [g], 4, size=6
    )[0]
    np.testing.assert_allclose(plain, -0.1 * g / 4, rtol=1e-6)
    rescaled = private_update(
        dpsgd(
            learning_rate=0.1,
            noise_multiplier=0.0,
            l2_norm_clip=0.5,
            rescale_to_unit_norm=True,
        ),
        [g],
        4,
        size=6,
    )[0]
    np.testing.assert_allclose(rescaled, -0.1 * g / 4 / 0.5, rtol=1e-6)


def test_explicit_batch_size_is_the_divisor():
    g = np.ones(4, "float32")
    change = private_update(
        dpsgd(learning_rate=1.0, noise_multiplier=0.0, batch_size=10),
        [g],
        3,
        size=4,
    )[0]
    np.testing.assert_allclose(change, -0.1, rtol=1e-6)


def test_unknown_batch_size_raises():
    with pytest.raises(ValueError, match="drop_remainder=True"):
        dpsgd().logical_batch_size(None)


@pytest.mark.parametrize("cls", [kd.DPSGD, kd.DPAdam])
def test_config_round_trip(cls):
    opt = cls(
        learning_rate=0.5,
        l2_norm_clip=2.0,
        noise_multiplier=1.5,
        accumulation_steps=4,
        microbatch_size=8,
        batch_size=256,
        rescale_to_unit_norm=True,
        use_ema=True,
        ema_momentum=0.999,
    )
    config = keras.saving.serialize_keras_object(opt)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is cls
    assert restored.get_config() == opt.get_config()
    assert restored.noise_seed is None  # a secret seed is never serialized
    assert optimizers.is_private(restored)
