"""The fast engine (ghost norms, book-keeping) equals per-example clipping."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale.rules import ghost_norms
from tests.conftest import LOSS
from tests.conftest import compile_step
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum
from tests.conftest import tiny
from tests.conftest import tiny_models
from tests.rules.harness import assert_sums_close
from tests.rules.harness import bfloat16_errors
from tests.rules.harness import clipped_sum
from tests.engines.vectorized_test import frozen_batch_norm_model


def layer_zoo():
    """Every registered layer type, with strides, 'valid' padding, 1x1."""
    i = keras.Input((8, 8, 3))
    h = kd.layers.WSConv2D(4, 3, padding="same")(i)
    h = keras.layers.GroupNormalization(2)(h)
    h = keras.layers.Activation("relu")(h)
    h = kd.layers.ScaledWSConv2D(6, 3, strides=2, padding="same")(h)
    h = keras.layers.Conv2D(6, 1, activation="relu")(h)
    h = keras.layers.Conv2D(5, (3, 2), padding="valid", dilation_rate=1)(h)
    h = kd.layers.SkipInitGain(0.5)(h)
    h = keras.layers.Reshape((-1, 5))(h)
    h = keras.layers.Dense(4, activation="tanh")(h)  # on [B, n, 5]
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return kd.DPModel(i, keras.layers.Dense(3)(h))


def sequence_model():
    """Embedding with repeated ids in a sequence, then Dense."""
    tok = keras.Input((7,), dtype="int32")
    e = keras.layers.Embedding(5, 4)(tok)
    e = keras.layers.Dense(4, activation="relu")(e)
    e = keras.layers.GlobalAveragePooling1D()(e)
    return kd.DPModel(tok, keras.layers.Dense(3)(e))


MODELS = {
    "wide_resnet": lambda: tiny("wide_resnet"),
    "nf_resnet": lambda: tiny("nf_resnet"),
    "nfnet": lambda: tiny("nfnet"),
    "dpnasnet": lambda: tiny("dpnasnet"),  # depthwise convs, max-pools
    "dense": lambda: kd.make_private(tiny_models()[0]),
    "embedding": lambda: kd.make_private(tiny_models()[2]),
    "sequence": sequence_model,
    "layer_zoo": layer_zoo,
    "frozen_batch_norm": lambda: kd.make_private(frozen_batch_norm_model()),
}


def check_against_loop(model, x, y, caplog, **kwargs):
    expected, clip = reference_clipped_sum(model, x, y)  # half clipped
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = clipped_sum(model, x, y, clip, "fast", **kwargs)
    assert "vectorized" not in caplog.text  # no layer fell back
    vectorized = clipped_sum(model, x, y, clip, "vectorized", **kwargs)
    assert_sums_close(fast, vectorized)
    assert_sums_close(fast, expected)
    return fast


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fast_equals_vectorized_and_loop(name, caplog):
    model = MODELS[name]()
    x, y = inputs_for(model, 6)
    if name == "sequence":
        x = np.random.default_rng(0).integers(0, 5, (6, 7)).astype("int32")
    check_against_loop(model, x, y, caplog)


@pytest.mark.parametrize("form", ["per_example", "gram", "input_gram"])
def test_every_form_is_exact(form, monkeypatch, caplog):
    # Each layer forced to one form where it has it (per_example otherwise).
    monkeypatch.setattr(
        ghost_norms,
        "cheapest",
        lambda costs: form if form in costs else "per_example",
    )
    model = layer_zoo()
    x, y = inputs_for(model, 5)
    check_against_loop(model, x, y, caplog)


def test_augmult_views_make_one_gradient_per_example():
    model = layer_zoo()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 8, 8, 3)).astype("float32")  # K = 3 views
    y = rng.integers(0, 3, 4).astype("int32")
    fast = clipped_sum(model, x, y, 0.05, "fast")
    vectorized = clipped_sum(model, x, y, 0.05, "vectorized")
    assert_sums_close(fast, vectorized)


def test_microbatches_and_padding_mask():
    model = layer_zoo()
    x, y = inputs_for(model, 6)
    mask = np.array([1, 1, 0, 1, 0, 1], "float32")
    whole = clipped_sum(model, x, y, 0.05, "fast", mask=mask)
    chunked = clipped_sum(
        model, x, y, 0.05, "fast", mask=mask, microbatch_size=2
    )
    kept = clipped_sum(model, x[mask > 0], y[mask > 0], 0.05, "fast")
    assert_sums_close(chunked, whole)
    assert_sums_close(whole, kept)


def test_non_finite_example_contributes_nothing():
    model = kd.make_private(tiny_models()[1])
    x, y = inputs_for(model, 4)
    bad = x.copy()
    bad[2, 0, 0, 0] = np.inf
    with_bad = clipped_sum(model, bad, y, 0.1, "fast")
    without = clipped_sum(model, x[[0, 1, 3]], y[[0, 1, 3]], 0.1, "fast")
    assert all(np.all(np.isfinite(g)) for g in with_bad)
    assert_sums_close(with_bad, without)


def test_mixed_bfloat16():
    # Both engines in bfloat16 against the float32 sum of the same weights:
    # the fast engine is as accurate as the vectorized one.
    errors = bfloat16_errors(lambda: tiny("wide_resnet"))
    assert errors["fast"] < 1.5 * errors["vectorized"] + 0.01, errors


def test_accumulation_through_fit_equals_vectorized():
    x, y = inputs_for(layer_zoo(), 8)
    weights = {}
    for engine in ("fast", "vectorized"):
        keras.utils.set_random_seed(0)
        model = layer_zoo()
        model.compile(
            optimizer=kd.DPSGD(
                learning_rate=1.0,
                l2_norm_clip=0.05,
                noise_multiplier=0.0,
                accumulation_steps=2,
            ),
            loss=LOSS,
            clipping=engine,
        )
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, True)
        model.fit(data, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 1
        weights[engine] = [v.numpy() for v in model.trainable_variables]
    assert_sums_close(weights["fast"], weights["vectorized"])


@keras.saving.register_keras_serializable(package="tests")
class ChannelScale(keras.layers.Layer):
    """A layer type without a rule: falls back to the vectorized path."""

    mixes_examples = False

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, inputs):
        return inputs * self.scale**2


def test_unregistered_layer_falls_back_alone(caplog):
    i = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same")(i)
    h = ChannelScale(name="my_scale")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = kd.DPModel(i, keras.layers.Dense(3)(h))
    x, y = inputs_for(model, 5)
    expected, clip = reference_clipped_sum(model, x, y)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = clipped_sum(model, x, y, clip, "fast")
    assert_sums_close(fast, expected)
    lines = [
        r.getMessage() for r in caplog.records if "my_scale" in r.getMessage()
    ]
    assert len(lines) == 1 and "vectorized" in lines[0]
    assert "conv2d" not in lines[0]


class Tied(keras.layers.Layer):
    """Reads another layer's kernel: tied weights."""

    mixes_examples = False

    def __init__(self, other, **kwargs):
        super().__init__(**kwargs)
        self.other = other

    def call(self, inputs):
        return inputs @ keras.ops.transpose(self.other.kernel)


def shared_model():
    dense = keras.layers.Dense(6, activation="tanh")
    i = keras.Input((6,))
    return kd.DPModel(i, keras.layers.Dense(3)(dense(dense(i))))


def tied_model():
    i = keras.Input((6,))
    first = keras.layers.Dense(4)
    h = first(i)
    return kd.DPModel(i, keras.layers.Dense(3)(Tied(first)(h)))


class BatchCentering(keras.layers.Layer):
    """Mixes examples (subtracts the batch mean) and does not say so."""

    def call(self, inputs):
        return inputs - keras.ops.mean(inputs, axis=0)


def undeclared_layer_model():
    i = keras.Input((6,))
    h = BatchCentering()(keras.layers.Dense(4)(i))
    return kd.DPModel(i, keras.layers.Dense(3)(h))


def activity_regularized_model():
    i = keras.Input((6,))
    h = keras.layers.Dense(4, activity_regularizer="l2")(i)
    return kd.DPModel(i, keras.layers.Dense(3)(h))


@pytest.mark.parametrize(
    "build, reason",
    [
        (shared_model, "called more than once"),
        (tied_model, "does not own"),
        (activity_regularized_model, "adds losses"),
        (undeclared_layer_model, "reduces over the batch axis"),
    ],
)
def test_models_outside_the_fast_engine_fail_closed(build, reason, caplog):
    model = build()
    x, y = inputs_for(model, 4)
    with pytest.raises(ValueError, match=reason):
        clipped_sum(model, x, y, 0.1, "fast")
    # "auto" says so and uses the vectorized engine, which is exact.
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        auto = clipped_sum(model, x, y, 0.1, "auto")
    assert reason in caplog.text
    assert_sums_close(auto, clipped_sum(model, x, y, 0.1, "vectorized"))


def test_clipping_option_is_saved_and_checked():
    model = layer_zoo()
    clipped_sum(model, *inputs_for(model, 2), 0.1, "fast")
    assert model.get_compile_config()["clipping"] == "fast"
    with pytest.raises(ValueError, match="clipping"):
        clipped_sum(model, *inputs_for(model, 2), 0.1, "ghost")
    with pytest.raises(ValueError, match="clipping"):
        kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, clipping="fast")


def test_weight_regularizers_are_refused_by_both_engines():
    i = keras.Input((6,))
    model = kd.DPModel(i, keras.layers.Dense(3, kernel_regularizer="l2")(i))
    x, y = inputs_for(model, 4)
    for engine in ("fast", "vectorized"):
        with pytest.raises(ValueError, match="weight_decay"):
            clipped_sum(model, x, y, 0.1, engine)


def test_partly_frozen_layer_falls_back_exactly(caplog):
    model = layer_zoo()
    norm = next(
        l
        for l in model.layers
        if isinstance(l, keras.layers.GroupNormalization)
    )
    norm.beta.trainable = False
    x, y = inputs_for(model, 5)
    expected, clip = reference_clipped_sum(model, x, y)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = clipped_sum(model, x, y, clip, "fast")
    assert norm.name in caplog.text
    assert_sums_close(fast, expected)


def test_loss_without_batch_mean_uses_the_vectorized_engine(caplog):
    model = kd.make_private(tiny_models()[0])
    x, y = inputs_for(model, 4)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    for clipping in ("fast", "auto"):
        model.compile(
            optimizer=kd.DPSGD(l2_norm_clip=0.1, noise_multiplier=0.0),
            loss=loss,
            clipping=clipping,
        )
        step = tf.function(
            lambda x, y: model._dp_engine.clipped_gradient_sum(
                model, x, y, None, 0.1
            )
        )
        if clipping == "fast":
            with pytest.raises(ValueError, match="batch mean"):
                step(x, y)
        else:
            with caplog.at_level(logging.INFO, logger="keras_dpscale"):
                step(x, y)
            assert "batch mean" in caplog.text


class UsesKernelOf(keras.layers.Layer):
    """A layer that also owns another layer's kernel (assigned in build)."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self._dense = [dense]

    def build(self, input_shape):
        self.w = self._dense[0].kernel

    def call(self, x):
        return tf.matmul(x, self.w)


def test_a_variable_owned_by_two_layers_falls_back_exactly(caplog):
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(4, use_bias=False)
    model = kd.DPModel(inputs, UsesKernelOf(dense)(dense(inputs)))
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    y = np.arange(6) % 4
    with pytest.raises(ValueError, match="owned by more than one layer"):
        clipped_sum(model, x, y, 1.0, "fast")
    auto = clipped_sum(model, x, y, 1.0, "auto")
    assert model._dp_engine.chosen == "vectorized"
    assert_sums_close(auto, clipped_sum(model, x, y, 1.0, "vectorized"))


# -- A frozen BatchNormalization (transfer learning, issue 19). --------------


def fit_a_few_steps(model, clipping):
    x, y = inputs_for(model, 24, seed=3)
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.5, l2_norm_clip=0.1, noise_multiplier=1.0,
            batch_size=8,
        ),
        loss=LOSS,
        clipping=clipping,
    )  # fmt: skip
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
def test_dp_training_leaves_a_frozen_batch_normalization_as_it_was(clipping):
    model = kd.make_private(frozen_batch_norm_model())
    norm = model.get_layer("frozen_bn")
    stats = [v.numpy() for v in norm.weights]
    trained = [v.numpy() for v in model.trainable_variables]
    fit_a_few_steps(model, clipping)
    assert model._dp_engine.chosen == clipping
    for v, before in zip(norm.weights, stats):  # moving statistics too
        np.testing.assert_array_equal(v.numpy(), before)
    for v, before in zip(model.trainable_variables, trained):
        assert not np.array_equal(v.numpy(), before), v.path


@pytest.mark.parametrize("clipping", ["auto", "vectorized"])
def test_a_batch_normalization_unfrozen_after_compile_is_refused(clipping):
    # compile's check saw it frozen; the step itself refuses it (its
    # moving statistics are written from the data; the fast engine also
    # cannot prove that the batch statistics keep examples apart).
    model = kd.make_private(frozen_batch_norm_model())
    x, y = inputs_for(model, 8)
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1, l2_norm_clip=0.1, noise_multiplier=1.0
        ),
        loss=LOSS,
        clipping=clipping,
    )
    model.get_layer("frozen_bn").trainable = True
    with pytest.raises(ValueError, match="moving_mean"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
def test_a_frozen_batch_normalization_keeps_each_example_within_c(clipping):
    # The soundness test's adversary (tests/soundness_test.py): one crafted
    # example, removed from the batch (masked, or zeroed), moves the clipped
    # sum by at most C. Crafted: huge, constant, and a large offset.
    from tests.soundness_test import B
    from tests.soundness_test import influence

    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, 8, 8, 3)).astype("float32")
    x[0] = 1e3  # constant and huge
    x[1] += 50.0  # offset
    x[2] *= 1e-4  # tiny
    y = rng.integers(0, 3, B).astype("int32")
    model = compile_step(
        kd.make_private(frozen_batch_norm_model()), 0.01, clipping,
        batch_size=B,
    )  # fmt: skip
    for removed in (0, 1, 2):
        assert influence(model, x, y, removed) <= 1 + 1e-4
