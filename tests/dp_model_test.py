"""The private train_step through `model.fit`: exactness, noise, failing closed."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import accounting
from keras_dpscale.data import poisson
from tests.conftest import LOSS
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum
from tests.conftest import tiny_models


def conv_dp_model():
    return kd.make_private(tiny_models()[1])


def compile_dp(model, **kwargs):
    kwargs.setdefault("learning_rate", 0.1)
    kwargs.setdefault("l2_norm_clip", 1.0)
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("noise_seed", 11)
    step = {
        k: kwargs.pop(k) for k in ("clipping", "microbatch_size") if k in kwargs
    }
    model.compile(
        optimizer=kd.DPSGD(**kwargs), loss=LOSS, metrics=["accuracy"], **step
    )
    return model


def dataset(x, y, batch_size):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(
        batch_size, drop_remainder=True
    )


def weights_after(model_fn, x, y, physical_batch_size, **kwargs):
    model = compile_dp(model_fn(), **kwargs)
    model.fit(dataset(x, y, physical_batch_size), epochs=1, verbose=0)
    return [v.numpy() for v in model.trainable_variables], model


def test_zero_noise_step_is_clipped_sgd():
    model = conv_dp_model()
    x, y = inputs_for(model, 8)
    initial = [v.numpy() for v in model.trainable_variables]
    grad_sum, clip = reference_clipped_sum(model, x, y)
    mean = [g / 8 for g in grad_sum]
    compile_dp(model, learning_rate=0.3, l2_norm_clip=clip, noise_multiplier=0)
    model.fit(dataset(x, y, 8), epochs=1, verbose=0)
    for w0, g, w in zip(initial, mean, model.trainable_variables):
        np.testing.assert_allclose(
            w.numpy(), w0 - 0.3 * g, rtol=1e-5, atol=1e-7
        )


def test_microbatch_size_does_not_change_the_step():
    x, y = inputs_for(tiny_models()[1], 16)
    keras.utils.set_random_seed(1)
    whole, _ = weights_after(conv_dp_model, x, y, 16)
    keras.utils.set_random_seed(1)
    chunked, _ = weights_after(conv_dp_model, x, y, 16, microbatch_size=4)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_accumulation_equals_one_large_batch():
    x, y = inputs_for(tiny_models()[1], 16)
    keras.utils.set_random_seed(2)
    one, m1 = weights_after(conv_dp_model, x, y, 16, momentum=0.9)
    keras.utils.set_random_seed(2)
    four, m4 = weights_after(
        conv_dp_model, x, y, 4, momentum=0.9, accumulation_steps=4
    )
    for a, b in zip(one, four):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(m1.optimizer.iterations) == int(m4.optimizer.iterations) == 1


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_noise_std_through_fit_with_accumulation(policy):
    # Zero inputs and no bias: every per-example gradient is exactly zero,
    # so the update is the noise alone.
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = kd.DPSequential(
            [
                keras.Input((100,)),
                keras.layers.Dense(
                    100, use_bias=False, kernel_initializer="zeros"
                ),
            ]
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = np.zeros((16, 100), "float32")
    y = np.zeros((16,), "int32")
    sigma, clip = 3.0, 0.5
    compile_dp(
        model,
        learning_rate=1.0,
        l2_norm_clip=clip,
        noise_multiplier=sigma,
        accumulation_steps=4,
    )
    before = model.trainable_variables[0].numpy()
    model.fit(dataset(x, y, 4), epochs=1, verbose=0)
    update = (model.trainable_variables[0].numpy() - before).ravel()
    std = sigma * clip / 16
    assert scipy.stats.kstest(update, "norm", args=(0, std)).pvalue > 0.01
    assert scipy.stats.kstest(update, "norm", args=(0, 2 * std)).pvalue < 1e-6
    # The noise is drawn in float32, also under mixed precision: a bfloat16
    # draw would make (almost) every entry a bfloat16 number.
    as_bf16 = tf.cast(tf.cast(update, tf.bfloat16), tf.float32).numpy()
    assert np.mean(as_bf16 == update) < 0.01
    assert int(model.optimizer.iterations) == 1


def test_dp_training_learns():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, size=1024).astype("int32")
    x = (centers[y] + rng.normal(size=(1024, 8))).astype("float32")
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = kd.DPModel(inputs, keras.layers.Dense(3)(hidden))
    compile_dp(model, learning_rate=0.5, noise_multiplier=1.0, noise_seed=None)
    history = model.fit(dataset(x, y, 64), epochs=4, verbose=0)
    assert model.jit_compile  # DPModel compiles with XLA by default
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]
    assert history.history["accuracy"][-1] > 0.8  # chance is 1/3
    assert int(model.optimizer.iterations) == 4 * 16


def test_dropout_masks_differ_between_examples():
    model = kd.DPSequential(
        [
            keras.Input((64,)),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones"),
        ]
    )
    spread = keras.metrics.MeanMetricWrapper(
        lambda y_true, y_pred: tf.math.reduce_std(y_pred) + 0 * y_pred[:, 0],
        name="spread",
    )
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.0, l2_norm_clip=1.0, noise_multiplier=0.0
        ),
        loss="mse",
        metrics=[spread],
    )
    x = np.ones((16, 64), "float32")
    logs = model.fit(dataset(x, np.zeros(16, "float32"), 16), verbose=0)
    # Same mask for all examples would give identical predictions.
    assert logs.history["spread"][0] > 1.0


def test_plain_keras_model_with_dpsgd_never_trains():
    model = tiny_models()[0]
    model.compile(
        optimizer=kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=LOSS
    )
    x, y = inputs_for(model, 8)
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="make_private"):
        model.fit(x, y, batch_size=8, verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_dp_model_rejects_non_private_optimizer():
    with pytest.raises(ValueError, match="needs a DP optimizer"):
        conv_dp_model().compile(optimizer="sgd", loss=LOSS)


def test_batch_normalization_raises():
    model = kd.DPSequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="GroupNormalization"):
        compile_dp(model)


class RunningMean(keras.layers.Layer):
    """Keeps a running mean of its inputs: state learned from the data."""

    def build(self, input_shape):
        self.mean = self.add_weight(
            shape=input_shape[1:], initializer="zeros", trainable=False
        )

    def call(self, x, training=False):
        if training:
            self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(x, 0))
        return x - self.mean


def test_layer_updating_state_from_data_raises():
    model = kd.DPSequential(
        [keras.Input((4,)), RunningMean(), keras.layers.Dense(2)]
    )
    compile_dp(model)
    x = np.ones((8, 4), "float32")
    with pytest.raises(ValueError, match="updates the variable"):
        model.fit(x, np.zeros(8, "int32"), batch_size=8, verbose=0)


def test_sample_and_class_weights_raise():
    model = compile_dp(conv_dp_model())
    x, y = inputs_for(model, 8)
    with pytest.raises(ValueError, match="sample_weight and class_weight"):
        model.fit(x, y, sample_weight=np.ones(8), batch_size=8, verbose=0)
    with pytest.raises(ValueError, match="sample_weight and class_weight"):
        model.fit(
            x, y, class_weight={0: 1.0, 1: 2.0, 2: 1.0}, batch_size=8, verbose=0
        )


def test_fit_on_arrays_samples_poisson_batches_and_accounts_for_them():
    # The first thing a Keras user types: the library draws the batches
    # (Poisson, secret) and the ledger records exactly that.
    model = compile_dp(conv_dp_model(), target_delta=1e-5)
    x, y = inputs_for(model, 40)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    opt = model.optimizer
    assert (opt.batch_size, opt.num_examples) == (8, 40)
    (segment,) = model.privacy_ledger()
    assert (segment.sampling, segment.steps, segment.batch_size) == (
        "poisson",
        10,
        8,
    )
    assert segment.max_batch_size > 8 and segment.num_examples == 40
    want = accounting.compute_epsilon(1.0, 8, 40, 10, 1e-5)
    assert history.history["epsilon"][-1] == pytest.approx(want)
    # Arrays that contradict the optimizer's settings raise.
    with pytest.raises(ValueError, match="num_examples=40"):
        model.fit(x[:20], y[:20], batch_size=8, verbose=0)
    with pytest.raises(ValueError, match="batch_size=8"):
        model.fit(x, y, batch_size=4, verbose=0)


def test_save_and_load_round_trip(tmp_path):
    model = compile_dp(
        conv_dp_model(),
        momentum=0.9,
        use_ema=True,
        num_examples=16,
        target_delta=1e-3,
        accountant="rdp",
    )
    x, y = inputs_for(model, 16)
    model.fit(dataset(x, y, 8), epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kd.DPModel)
    assert isinstance(loaded.optimizer, kd.DPSGD)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(loaded.optimizer.iterations) == 2
    assert loaded.privacy_ledger() == model.privacy_ledger()
    assert loaded.epsilon() == model.epsilon() > 0
    loaded.fit(dataset(x, y, 8), epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations) == 4


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


class SubclassedDP(kd.DPModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: kd.make_private(tiny_models()[0]),
        lambda: kd.make_private(
            keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        ),
        lambda: kd.make_private(Subclassed()),
        lambda: SubclassedDP(),
        lambda: kd.DPSequential([keras.Input((6,)), keras.layers.Dense(3)]),
    ],
    ids=["functional", "sequential", "subclassed", "dp_subclass", "dp_seq"],
)
def test_every_way_to_build_a_dp_model_trains_privately(build):
    model = build()
    assert isinstance(model, (kd.DPModel, kd.DPSequential))
    compile_dp(
        model, noise_multiplier=0.0, l2_norm_clip=1e-3, learning_rate=1.0
    )
    x, y = inputs_for(tiny_models()[0], 8)
    model(x)
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(dataset(x, y, 8), verbose=0)
    # With C = 1e-3 and lr = 1, each step moves the weights by <= 1e-3.
    moved = np.sqrt(
        sum(
            np.sum((v.numpy() - b) ** 2)
            for b, v in zip(before, model.trainable_variables)
        )
    )
    assert 0 < moved <= 1e-3 * (1 + 1e-5)


def test_make_private_shares_weights():
    base = tiny_models()[0]
    private = kd.make_private(base)
    assert {id(v) for v in private.trainable_variables} == {
        id(v) for v in base.trainable_variables
    }


MULTI_REPLICA = """
import dataclasses, json, sys
import tensorflow as tf
R = int(sys.argv[1])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * R)
import keras, numpy as np, scipy.stats
import keras_dpscale as kd

def train(strategy, model_fn, x, y, sigma, clip, accumulation_steps=1,
          clipping="auto"):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = model_fn()
        model.compile(
            optimizer=kd.DPSGD(learning_rate=1.0, l2_norm_clip=clip,
                               noise_multiplier=sigma, noise_seed=3,
                               accumulation_steps=accumulation_steps),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            clipping=clipping)
    before = [v.numpy() for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        len(x) // accumulation_steps, drop_remainder=True)
    model.fit(ds, verbose=0)
    update = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
    return update, model

single = tf.distribute.OneDeviceStrategy("CPU:0")
multi = tf.distribute.MirroredStrategy([f"CPU:{i}" for i in range(R)])
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.integers(0, 3, size=16)
mlp = lambda: kd.DPSequential([keras.Input((6,)),
    keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
out = {}
# The clipped part (sigma = 0; C below most norms so that clipping acts).
one, _ = train(single, mlp, x, y, 0.0, 0.05)
many, dp = train(multi, mlp, x, y, 0.0, 0.05)
opt = dp.optimizer
out["clipped_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(one, many))
out["clipped_scale"] = max(float(np.max(np.abs(a))) for a in one)
out["ledger"] = [dataclasses.asdict(s) for s in dp.privacy_ledger()]
out["iterations"] = int(opt.iterations.numpy())
# Both clipping engines, replicated, on a conv model with GroupNorm.
convnet = lambda: kd.DPSequential([keras.Input((6, 6, 2)),
    keras.layers.Conv2D(4, 3, strides=2, padding="same"),
    keras.layers.GroupNormalization(2), keras.layers.Activation("relu"),
    keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
images = rng.normal(size=(16, 6, 6, 2)).astype("float32")
fast, _ = train(multi, convnet, images, y, 0.0, 0.05, clipping="fast")
vec, _ = train(single, convnet, images, y, 0.0, 0.05, clipping="vectorized")
out["engines_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(fast, vec))
out["engines_scale"] = max(float(np.max(np.abs(a))) for a in vec)
# The noise alone: zero inputs and a zero, bias-free layer.
noise_model = lambda: kd.DPSequential([keras.Input((100,)),
    keras.layers.Dense(100, use_bias=False, kernel_initializer="zeros")])
sigma, clip = 3.0, 0.5
zeros = np.zeros((16, 100), "float32")
noise, _ = train(multi, noise_model, zeros, np.zeros(16, "int32"), sigma, clip)
noise = noise[0].ravel()
std = sigma * clip / 16
out["ks_p"] = float(scipy.stats.kstest(noise, "norm", args=(0, std)).pvalue)
out["ks_p_sqrt_r"] = float(scipy.stats.kstest(
    noise, "norm", args=(0, std * R ** 0.5)).pvalue)
# Poisson batches from one pipeline per host (distribute_datasets_from_function).
from keras_dpscale import accounting, data
images = rng.integers(0, 256, (200, 8, 8, 1)).astype(np.uint8)
poisson = multi.distribute_datasets_from_function(
    lambda ctx: data.poisson_dataset(images, np.arange(200) % 3, 20,
                                     steps=3, num_views=2, input_context=ctx))
drawn = data.poisson_dataset(images, np.arange(200) % 3, 20, steps=3)
kd.sampling.attach(poisson, kd.sampling.of(drawn))
with multi.scope():
    model = kd.DPSequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(3)])
    model.compile(optimizer=kd.DPSGD(
        learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0,
        batch_size=20, num_examples=200, sampling="poisson",
        target_delta=1e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(poisson, steps_per_epoch=3, verbose=0)
out["poisson_ledger"] = [dataclasses.asdict(s)
                         for s in model.privacy_ledger()]
m = accounting.poisson_max_batch_size(200, 20, 1e-18)
out["poisson_rows"] = R * -(-m // R)
out["poisson_overflow"] = accounting.poisson_overflow_probability(
    200, 20, out["poisson_rows"])
# Accumulation across replicas: 2 physical batches per logical batch, each
# replica accumulating its share; one all-reduce and one noise draw.
acc, dp = train(multi, mlp, x, y, 0.0, 0.05, accumulation_steps=2)
out["accumulated_max_diff"] = max(
    float(np.max(np.abs(a - b))) for a, b in zip(one, acc))
out["accumulated_iterations"] = int(dp.optimizer.iterations.numpy())
out["accumulated_ledger"] = [dataclasses.asdict(s)
                             for s in dp.privacy_ledger()]
noise, _ = train(multi, noise_model, zeros, np.zeros(16, "int32"), sigma,
                 clip, accumulation_steps=2)
noise = noise[0].ravel()
out["accumulated_ks_p"] = float(
    scipy.stats.kstest(noise, "norm", args=(0, std)).pvalue)
out["accumulated_ks_p_sqrt_r"] = float(scipy.stats.kstest(
    noise, "norm", args=(0, std * R ** 0.5)).pvalue)
out["accumulated_ks_p_sqrt_2"] = float(scipy.stats.kstest(
    noise, "norm", args=(0, std * 2 ** 0.5)).pvalue)
# Poisson batches with augmult, accumulated across replicas: sigma = 0 and
# a public sample give the single-device update.
def poisson_run(strategy, k):
    def make(ctx=None):
        return data.poisson_dataset(
            images, np.arange(200) % 3, 20, steps=2, num_views=2,
            accumulation_steps=k, augment=lambda v, seed: v, input_context=ctx,
            public_sampling_seed=5)
    ds = make()
    if strategy is multi:
        ds = multi.distribute_datasets_from_function(make)
        kd.sampling.attach(ds, kd.sampling.of(make()))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = kd.DPSequential([keras.Input((8, 8, 1)),
            keras.layers.Flatten(), keras.layers.Dense(3)])
        model.compile(optimizer=kd.DPSGD(
            learning_rate=1.0, l2_norm_clip=0.05, noise_multiplier=0.0,
            batch_size=20, num_examples=200, accumulation_steps=k),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(ds, steps_per_epoch=2 * k, verbose=0)
    update = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
    return update, model
ref, _ = poisson_run(single, 1)
pacc, dp = poisson_run(multi, 2)
out["poisson_accumulated_max_diff"] = max(
    float(np.max(np.abs(a - b))) for a, b in zip(ref, pacc))
out["poisson_accumulated_scale"] = max(float(np.max(np.abs(a))) for a in ref)
out["poisson_accumulated_steps"] = int(dp.optimizer.iterations.numpy())
# Keras 3 fails with steps_per_execution > 1 under Mirrored strategies.
try:
    with multi.scope():
        mlp().compile(optimizer=kd.DPSGD(l2_norm_clip=1.0,
            noise_multiplier=1.0), loss="mse", steps_per_execution=2)
    out["steps_per_execution"] = "compiled"
except ValueError as e:
    out["steps_per_execution"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_replicas_share_one_noise_draw():
    # Four replicas, not two: R = 2 would pass a hard-coded /2 or a seed
    # that only replicas 0 and 1 share (two counts took 2 minutes of CI).
    replicas = 4
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", MULTI_REPLICA, str(replicas)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, run.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    # The clipped update of R replicas equals the single-device one.
    assert out["clipped_scale"] > 1e-3
    assert out["clipped_max_diff"] < 1e-6
    # The fast engine on R replicas equals the vectorized one on one device.
    assert out["engines_scale"] > 1e-3
    assert out["engines_max_diff"] < 1e-5 * out["engines_scale"] * 10
    # One step of the global batch of 16 in the ledger.
    assert out["iterations"] == 1
    assert out["ledger"] == [
        dict(
            noise_multiplier=0.0,
            batch_size=16,
            sampling="unknown",  # a pipeline of the test's own
            steps=1,
            max_batch_size=16,
            num_examples=None,
            overflow_probability=0.0,
            declared=False,
        )
    ]
    # Poisson: the ledger holds the padded size of the global batch.
    assert out["poisson_ledger"] == [
        dict(
            noise_multiplier=1.0,
            batch_size=20,
            sampling="poisson",
            steps=3,
            max_batch_size=out["poisson_rows"],
            num_examples=200,
            overflow_probability=pytest.approx(out["poisson_overflow"]),
            declared=False,
        )
    ]
    # Noise std sigma*C/B, once: not R draws (sqrt(R) times larger).
    assert out["ks_p"] > 0.01
    assert out["ks_p_sqrt_r"] < 1e-6
    # Accumulated over 2 physical batches on R replicas: the same update,
    # one logical step in the ledger, one noise draw of sigma*C/B.
    assert out["accumulated_max_diff"] < 1e-6
    assert out["accumulated_iterations"] == 1
    assert out["accumulated_ledger"] == out["ledger"]
    assert out["accumulated_ks_p"] > 0.01
    assert out["accumulated_ks_p_sqrt_r"] < 1e-6
    assert out["accumulated_ks_p_sqrt_2"] < 1e-6
    # Poisson masks and augmult views still hold under accumulation.
    assert out["poisson_accumulated_scale"] > 1e-3
    assert out["poisson_accumulated_max_diff"] < 1e-5
    assert out["poisson_accumulated_steps"] == 2
    assert "19246" in out["steps_per_execution"]


def masked(x, y, mask):
    return tf.data.Dataset.from_tensors((x, y, {"dp_mask": mask}))


def test_padded_rows_of_a_poisson_batch_contribute_nothing():
    x, y = inputs_for(tiny_models()[1], 8)
    garbage = x.copy()
    garbage[4:] = 1e6  # padding rows; their gradients must not count
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], "float32")
    kwargs = dict(noise_multiplier=0.0, batch_size=4, learning_rate=0.5)
    keras.utils.set_random_seed(5)
    padded = compile_dp(conv_dp_model(), sampling="poisson", **kwargs)
    padded.fit(masked(garbage, y, mask), verbose=0)
    keras.utils.set_random_seed(5)
    plain = compile_dp(conv_dp_model(), **kwargs)
    plain.fit(dataset(x[:4], y[:4], 4), verbose=0)
    for a, b in zip(padded.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_masked_batches_need_a_public_batch_size():
    x, y = inputs_for(tiny_models()[1], 8)
    model = compile_dp(conv_dp_model())
    with pytest.raises(ValueError, match="need batch_size=B"):
        model.fit(masked(x, y, np.ones(8, "float32")), verbose=0)


def test_mask_values_other_than_zero_and_one_are_refused():
    # A mask of 2 would be a per-example weight applied after clipping.
    x, y = inputs_for(tiny_models()[1], 8)
    model = compile_dp(conv_dp_model(), noise_multiplier=0.0, batch_size=8)
    before = [v.numpy() for v in model.trainable_variables]
    weights = np.array([2, 1, 1, 1, 1, 1, 1, 0.5], "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="0 .padding."):
        model.fit(masked(x, y, weights), verbose=0)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    # Where fit cannot see the data (train_on_batch), a row counts only if
    # its mask is exactly 1: the weighted rows are dropped, not scaled.
    model.train_on_batch(x, y, sample_weight={"dp_mask": weights})
    keep = weights == 1
    reference = compile_dp(conv_dp_model(), noise_multiplier=0.0, batch_size=8)
    for v, b in zip(reference.trainable_variables, before):
        v.assign(b)
    reference.train_on_batch(
        x, y, sample_weight={"dp_mask": keep.astype("float32")}
    )
    for a, b in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


class BatchMean(keras.layers.Layer):
    """Subtracts the batch mean: declares that it mixes examples."""

    mixes_examples = True

    def call(self, x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True)


def test_layer_declaring_it_mixes_examples_raises():
    model = kd.DPSequential(
        [keras.Input((4,)), BatchMean(), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="other examples of the batch"):
        compile_dp(model)


COMPILE_COUNT = """
import keras, numpy as np
import keras_dpscale as kd
model = kd.DPSequential([keras.Input((4,)), keras.layers.Dense(3)])
model.compile(optimizer=kd.DPSGD(learning_rate=0.1, l2_norm_clip=1.0,
                                 noise_multiplier=1.0),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
for _ in range(3):  # the privacy ledger's size goes 0, 1, 1
    model.train_on_batch(rng.normal(size=(8, 4)).astype("float32"),
                         rng.integers(0, 3, 8))
"""


def test_the_dp_step_compiles_once(tmp_path):
    # A value read as a compile-time constant (the ledger's size as a slice
    # bound did) makes XLA compile the step again for each new value.
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_dump_to={tmp_path} "
        "--xla_backend_optimization_level=0",
    )
    subprocess.run(
        [sys.executable, "-c", COMPILE_COUNT],
        env=env,
        check=True,
        capture_output=True,
    )
    steps = {
        p.name.split(".")[0]
        for p in tmp_path.iterdir()
        if "one_step_on_data" in p.name
    }
    assert len(steps) == 1, sorted(steps)


@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
def test_metrics_count_only_the_real_rows_of_a_padded_batch(clipping):
    model = kd.make_private(tiny_models()[0])
    x, y = inputs_for(model, 12)
    mask = np.array([1.0] * 5 + [0.0] * 7, "float32")
    y = np.where(mask == 1, y, 0)  # padding rows that would often be "right"
    compile_dp(
        model,
        learning_rate=0.0,
        noise_multiplier=0.0,
        batch_size=5,
        clipping=clipping,
    )
    pred = np.argmax(model(x), -1)
    real = np.mean((pred == y)[mask == 1])
    logs = model.train_on_batch(
        x, y, sample_weight={kd.sampling.MASK: mask}, return_dict=True
    )
    assert logs["accuracy"] == pytest.approx(real)


def test_a_calibrated_sigma_is_the_sigma_that_runs_when_built_early():
    # The optimizer built before fit (as load_model or a failed fit leave
    # it): the sigma calibrated by fit on arrays must reach the step.
    model = kd.make_private(tiny_models()[0])
    x, y = inputs_for(model, 64)
    opt = kd.DPSGD(
        learning_rate=0.1,
        l2_norm_clip=1.0,
        target_epsilon=2.0,
        target_delta=1e-5,
        num_examples=64,
        epochs=1,
    )
    model.compile(optimizer=opt, loss=LOSS)
    opt.build(model.trainable_variables)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    (segment,) = model.privacy_ledger()
    assert opt.noise_multiplier > 0.5
    assert segment.noise_multiplier == pytest.approx(opt.noise_multiplier)


def test_a_poisson_dataset_gives_or_checks_b_and_n():
    model = kd.make_private(tiny_models()[0])
    x, y = inputs_for(model, 64)
    data = poisson.arrays_dataset(x, y, 16)
    compile_dp(model, noise_multiplier=1.0, batch_size=8, num_examples=64)
    with pytest.raises(ValueError, match="batch_size=8, but the data give"):
        model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    compile_dp(model, noise_multiplier=1.0)
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0)
    assert (model.optimizer.batch_size, model.optimizer.num_examples) == (
        16,
        64,
    )
    assert model.privacy_ledger()[-1].batch_size == 16


def test_a_second_fit_with_another_batch_size_is_refused():
    # Keras retraces the step with an unknown batch dimension: the ledger's
    # B could no longer be checked against the rows of a step.
    model = conv_dp_model()
    x, y = inputs_for(model, 32)
    compile_dp(model, batch_size=8, num_examples=32, target_delta=1e-5)
    model.fit(kd.sampling.declare(dataset(x, y, 8), "shuffle"), verbose=0)
    bigger = kd.sampling.declare(dataset(x, y, 16), "shuffle")
    with pytest.raises(ValueError, match="Make them agree"):
        model.fit(bigger, verbose=0)
    with pytest.raises(ValueError, match="Make them agree"):
        model.train_on_batch(x[:16], y[:16])


def test_metrics_given_by_position_are_weighted_by_the_mask():
    model = kd.make_private(tiny_models()[0])
    opt = kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=0.0, batch_size=5)
    model.compile(opt, LOSS, None, ["accuracy"])
    assert model.get_compile_config()["weighted_metrics"] == ["accuracy"]
    assert model.get_compile_config()["metrics"] is None


def test_a_logical_batch_cannot_run_over_an_epoch_end():
    # 3 physical batches per epoch with k = 2: the second logical batch
    # would join this pass's last batch to the next pass's first.
    model = kd.DPSequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=kd.DPSGD(
            l2_norm_clip=1.0, noise_multiplier=1.0, accumulation_steps=2
        ),
        loss=LOSS,
    )
    x, y = np.ones((20, 6), "float32"), np.zeros(20, "int32")
    ds = kd.sampling.declare(
        tf.data.Dataset.from_tensor_slices((x[:12], y[:12])).batch(4),
        "shuffle",
    )
    with pytest.raises(ValueError, match="whole"):
        model.fit(ds, epochs=2, verbose=0)
    # A multiple of k steps per epoch, but 5 batches: the second epoch's
    # data would run out after one batch of a logical batch.
    five = kd.sampling.declare(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(4), "shuffle"
    )
    with pytest.raises(ValueError, match="got 5"):
        model.fit(five, steps_per_epoch=4, epochs=3, verbose=0)
    # A length nobody knows could run out anywhere.
    unknown = five.filter(lambda x, y: True)
    with pytest.raises(ValueError, match="unknown"):
        model.fit(unknown, steps_per_epoch=4, verbose=0)
    assert int(model.optimizer.iterations) == 0


def test_a_pipeline_cut_for_other_accumulation_steps_is_refused():
    # Poisson samples cut into 1 physical batch each, accumulated by 2: one
    # noised sum would hold two samples (an example in it twice).
    model = kd.DPSequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=kd.DPSGD(
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            accumulation_steps=2,
            batch_size=4,
            num_examples=20,
        ),
        loss=LOSS,
    )
    x, y = np.ones((20, 6), "float32"), np.zeros(20, "int32")
    ds = kd.data.poisson.arrays_dataset(x, y, 4, steps=4, accumulation_steps=1)
    with pytest.raises(ValueError, match="cuts each sample into 1"):
        model.fit(ds, verbose=0)
    assert int(model.optimizer.iterations) == 0


def test_accumulation_under_a_one_replica_mirrored_strategy():
    # MirroredStrategy synchronizes through merge_call even with one
    # replica: the update must not sit inside a conditional there.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)

    def update(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = kd.DPSequential([keras.Input((6,)), keras.layers.Dense(3)])
            model.compile(
                optimizer=kd.DPSGD(
                    learning_rate=1.0,
                    l2_norm_clip=0.05,
                    noise_multiplier=0.0,
                    accumulation_steps=2,
                    batch_size=16,
                ),
                loss=LOSS,
            )
        before = [v.numpy() for v in model.trainable_variables]
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model.fit(kd.sampling.declare(ds, "shuffle"), verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 1
        return [
            v.numpy() - b for v, b in zip(model.trainable_variables, before)
        ]

    one = update(tf.distribute.get_strategy())
    mirrored = update(tf.distribute.MirroredStrategy())
    assert max(np.abs(a).max() for a in one) > 1e-3
    for a, b in zip(one, mirrored):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
