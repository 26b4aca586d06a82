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
        ({"microbatch_size": 8}, "model.compile"),
        ({"clipping": "fast"}, "model.compile"),
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


class FixedSums:
    """A clipping engine that returns a given clipped sum: the optimizer's
    half of the private step (accumulate, noise once, apply) is then tested
    through the real `train_step`, apart from the clipping engines."""

    clipping, microbatch_size = "fixed", None

    def __init__(self, size):
        self.current = tf.Variable(tf.zeros([1, size]))

    def clipped_gradient_sum(self, model, x, y, mask, l2_norm_clip):
        batch = tf.shape(x)[0]
        return [tf.identity(self.current)], tf.zeros([batch]), y


def private_model(opt, size):
    """A DP model with one `[1, size]` kernel, compiled with `opt`, whose
    clipped sums are set by hand (`model._dp_engine.current`)."""
    model = kd.DPSequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(
                size, use_bias=False, kernel_initializer="zeros"
            ),
        ]
    )
    model.compile(optimizer=opt, loss="mse")
    model._dp_engine = FixedSums(size)
    return model


def logical_steps(model):
    return sum(segment.steps for segment in model.privacy_ledger())


def private_update(
    opt, grad_sums, physical_batch_size, size=20000, padded=False
):
    """Runs the private step on the given clipped sums (one per physical
    batch) and returns the change of the weights after each."""
    model = private_model(opt, size)
    v = model.trainable_variables[0]
    x = np.zeros((physical_batch_size, 1), "float32")
    y = np.zeros((physical_batch_size, size), "float32")
    mask = {kd.sampling.MASK: np.ones(physical_batch_size, "float32")}
    changes = []
    for g in grad_sums:
        before = v.numpy().copy()
        model._dp_engine.current.assign(np.reshape(g, [1, size]))
        model.train_on_batch(x, y, sample_weight=mask if padded else None)
        changes.append((v.numpy() - before)[0])
    return changes, model


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
    changes, model = private_update(opt, [zeros] * accumulation_steps, physical)
    assert logical_steps(model) == 1  # recorded once, with the noise
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
    )[0][0]
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
    )[0][0]
    np.testing.assert_allclose(rescaled, -0.1 * g / 4 / 0.5, rtol=1e-6)


def test_explicit_batch_size_is_the_divisor():
    # With Poisson sampling the physical batch is a padded upper bound and
    # the expected batch size B is the divisor.
    g = np.ones(4, "float32")
    opt = dpsgd(learning_rate=1.0, noise_multiplier=0.0, batch_size=10)
    (change,), _ = private_update(opt, [g], 16, size=4, padded=True)
    np.testing.assert_allclose(change, -0.1, rtol=1e-6)
    # Unpadded batches hold B examples: a batch_size that disagrees raises.
    opt = dpsgd(learning_rate=1.0, noise_multiplier=0.0, batch_size=10)
    with pytest.raises(ValueError, match="Make them agree"):
        private_update(opt, [g], 16, size=4)


def test_batch_size_must_match_shuffled_batches():
    with pytest.raises(ValueError, match="Make them agree"):
        dpsgd(batch_size=10, accumulation_steps=2)._logical_batch_size(4, False)
    opt = dpsgd(batch_size=8, accumulation_steps=2)
    assert opt._logical_batch_size(4, False) == 8


def test_unknown_batch_size_raises():
    with pytest.raises(ValueError, match="drop_remainder=True"):
        dpsgd().prepare([], None, padded=False)


@pytest.mark.parametrize("cls", [kd.DPSGD, kd.DPAdam])
def test_config_round_trip(cls):
    opt = cls(
        learning_rate=0.5,
        l2_norm_clip=2.0,
        noise_multiplier=1.5,
        accumulation_steps=4,
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
    model = private_model(opt, 1000)
    x, y = np.zeros((10, 1), "float32"), np.zeros((10, 1000), "float32")
    model.train_on_batch(x, y)
    v = model.trainable_variables[0]
    assert np.std(v.numpy()) == pytest.approx(0.5, rel=0.1)
    opt.noise_multiplier = 0.0
    before = v.numpy().copy()
    model.train_on_batch(x, y)  # the same traced step
    np.testing.assert_array_equal(v.numpy(), before)


def test_sigma_calibrated_at_the_first_traced_step_is_the_one_that_runs():
    # train_on_batch builds the optimizer inside the first trace.
    opt = dpsgd(
        noise_multiplier=None,
        target_epsilon=2.0,
        target_delta=1e-5,
        num_examples=256,
        epochs=1,
    )
    model = private_model(opt, 3)
    model.train_on_batch(np.zeros((16, 1), "float32"), np.zeros((16, 3)))
    want = accounting.calibrate_noise_multiplier(2.0, 1e-5, 16, 256, epochs=1)
    assert opt.noise_multiplier == pytest.approx(want)
    (segment,) = model.privacy_ledger()
    assert segment.noise_multiplier == pytest.approx(want, rel=1e-6)


def test_every_new_sigma_reaches_the_variable_the_step_reads():
    # Whatever the variable held (restored optimizer weights, say), a new
    # config sets what the step adds, even when its sigma is unchanged.
    opt = dpsgd(noise_multiplier=2.0)
    model = private_model(opt, 3)
    model.train_on_batch(np.zeros((4, 1), "float32"), np.zeros((4, 3)))
    opt._noise_multiplier_var.assign(1.0)
    opt.dp_config = opt.dp_config.with_noise_multiplier(2.0)
    assert float(opt._noise_multiplier_var.numpy()) == 2.0
    opt.noise_multiplier = 3.5
    assert float(opt._noise_multiplier_var.numpy()) == 3.5


@pytest.mark.parametrize("arg", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_keras_gradient_clipping_after_noise_is_refused(arg):
    # Under replicas Keras would clip un-noised per-replica sums.
    with pytest.raises(ValueError, match=arg):
        kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, **{arg: 1.0})


def test_accumulated_clipped_sums_are_never_saved():
    # A fit that ends inside a logical batch leaves clipped, un-noised sums
    # in the accumulators: model.save and Keras' checkpoints must not
    # write them out.
    model = kd.DPSequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=kd.DPSGD(
            l2_norm_clip=1.0, noise_multiplier=1.0, accumulation_steps=2
        ),
        loss="mse",
    )
    model.train_on_batch(np.ones((4, 3), "float32"), np.ones((4, 2)))
    optimizer = model.optimizer
    store = {}
    optimizer.save_own_variables(store)
    accumulators = [
        i for i, v in enumerate(optimizer.variables) if "dp_grad_sum" in v.name
    ]
    assert len(accumulators) == 2
    for i in accumulators:
        assert np.any(optimizer.variables[i].numpy() != 0)
        np.testing.assert_array_equal(store[str(i)], 0.0)
