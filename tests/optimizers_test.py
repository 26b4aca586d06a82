"""DPSGD / DPAdam: settings, noise once per logical batch, serialization."""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import optimizers
from keras_dpscale import accounting


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


class Recorder:
    """Counts the logical steps that the optimizer records."""

    def __init__(self):
        self.steps = keras.Variable(0, dtype="int64")

    def __call__(self, sigma, batch_size, num_examples, rows):
        self.steps.assign_add(1)


def private_update(
    opt, grad_sums, physical_batch_size, size=20000, record=None
):
    """Runs apply_private_gradients and returns the change of a variable."""
    v = keras.Variable(np.zeros(size, "float32"))
    record = record or Recorder()
    step = tf.function(
        lambda g: opt.apply_private_gradients(
            [g], [v], physical_batch_size, record
        ),
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
    record = Recorder()
    changes = private_update(
        opt, [zeros] * accumulation_steps, physical, record=record
    )
    assert int(record.steps.numpy()) == 1  # recorded once, with the noise
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
    # With Poisson sampling the physical batch is a padded upper bound and
    # the expected batch size B is the divisor.
    g = np.ones(4, "float32")
    opt = dpsgd(learning_rate=1.0, noise_multiplier=0.0, batch_size=10)
    v = keras.Variable(np.zeros(4, "float32"))
    record = Recorder()
    tf.function(
        lambda: opt.apply_private_gradients(
            [tf.constant(g)], [v], 16, record, padded=True
        )
    )()
    np.testing.assert_allclose(v.numpy(), -0.1, rtol=1e-6)
    # Unpadded batches hold B examples: a batch_size that disagrees raises.
    with pytest.raises(ValueError, match="Make them agree"):
        private_update(opt, [g], 16, size=4)


def test_batch_size_must_match_shuffled_batches():
    with pytest.raises(ValueError, match="Make them agree"):
        dpsgd(batch_size=10, accumulation_steps=2).logical_batch_size(4)
    assert dpsgd(batch_size=8, accumulation_steps=2).logical_batch_size(4) == 8


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_multiplier=1.0, target_epsilon=1.0), "not both"),
        (dict(noise_multiplier=None), "Give noise_multiplier=sigma"),
        (
            dict(noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5),
            "needs num_examples",
        ),
        (
            dict(
                noise_multiplier=None,
                target_epsilon=1.0,
                target_delta=1e-5,
                num_examples=1000,
            ),
            "exactly one of steps and epochs",
        ),
        (dict(epochs=3), "only serve to calibrate"),
        (
            dict(epsilon_budget=3.0, target_delta=1e-5, num_examples=100),
            "needs batch_size",
        ),
        (dict(sampling="random"), "sampling must be one of"),
        (dict(accountant="moments"), "accountant must be one of"),
    ],
)
def test_missing_or_contradictory_privacy_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpsgd(**kwargs)


def test_sigma_from_budget_is_calibrated_and_serialized():
    opt = kd.DPSGD(
        l2_norm_clip=1.0,
        target_epsilon=8.0,
        target_delta=1e-5,
        num_examples=50_000,
        batch_size=4096,
        epochs=20,
        sampling="poisson",
        accountant="rdp",
    )
    want = accounting.calibrate_noise_multiplier(
        8.0, 1e-5, 4096, 50_000, epochs=20, accountant="rdp"
    )
    assert opt.noise_multiplier == pytest.approx(want)
    assert opt.epsilon_budget == 8.0
    config = opt.get_config()
    assert config["noise_multiplier"] == pytest.approx(want)
    restored = kd.DPSGD.from_config(config)
    assert restored.noise_multiplier == pytest.approx(want)


def test_setting_sigma_changes_the_noise():
    opt = dpsgd(learning_rate=1.0, noise_multiplier=5.0, noise_seed=1)
    v = keras.Variable(np.zeros(1000, "float32"))
    record = Recorder()
    step = tf.function(
        lambda: opt.apply_private_gradients([tf.zeros(1000)], [v], 10, record)
    )
    step()
    assert np.std(v.numpy()) == pytest.approx(0.5, rel=0.1)
    opt.noise_multiplier = 0.0
    before = v.numpy().copy()
    step()
    np.testing.assert_array_equal(v.numpy(), before)
