"""Shared test setup: quiet TensorFlow, fixed seeds, tiny models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Tests compile many tiny XLA programs: compile time, not run time, is what
# counts, and LLVM's optimizations only add to it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_dpscale as kd  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# The modules with the longest tests (one to two minutes each: subprocesses
# that start TensorFlow and compile real models) run first, so that no long
# test starts late and ends the run alone. Under `pytest -n 2` (CI's 2
# cores) xdist's load scheduling hands them all to the first worker in its
# first chunk of consecutive tests while the other runs short ones; both
# then share out the rest.
SLOW_MODULES_FIRST = ("tools_test.py", "sweep_tool_test.py")


def pytest_collection_modifyitems(items):
    """Moves `SLOW_MODULES_FIRST` to the front: whole modules, in order, so
    that a module-scoped fixture is still set up once."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


@pytest.fixture
def mixed_bfloat16():
    """Runs a test under Keras' `mixed_bfloat16` policy."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def tiny_models():
    """Small models covering Dense, Conv2D, GroupNormalization, Embedding."""
    dense_in = keras.Input((6,))
    dense = keras.Model(
        dense_in,
        keras.layers.Dense(3)(
            keras.layers.Dense(5, activation="tanh")(dense_in)
        ),
        name="dense",
    )
    img = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same")(img)
    h = keras.layers.GroupNormalization(2)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Conv2D(4, 1)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    conv = keras.Model(img, keras.layers.Dense(3)(h), name="conv_groupnorm")
    tok = keras.Input((5,), dtype="int32")
    e = keras.layers.Embedding(11, 4)(tok)
    e = keras.layers.GlobalAveragePooling1D()(e)
    emb = keras.Model(tok, keras.layers.Dense(3)(e), name="embedding")
    return [dense, conv, emb]


def inputs_for(model, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch_size,) + tuple(model.inputs[0].shape[1:])
    if model.inputs[0].dtype == "int32":
        x = rng.integers(0, 11, size=shape).astype("int32")
    else:
        x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 3, size=(batch_size,)).astype("int32")
    return x, y


def loop_gradients(model, x, y):
    """Single-example gradients, one Python iteration per example.

    Returns one array per trainable variable, shaped `[B] + variable.shape`.
    """
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i : i + 1], model(x[i : i + 1], training=True))
        grads.append(
            [
                tf.convert_to_tensor(g)
                for g in tape.gradient(loss, model.trainable_variables)
            ]
        )
    return [np.stack([g[v] for g in grads]) for v in range(len(grads[0]))]


def reference_clipped_sum(model, x, y):
    """Clipped per-example gradient sum by a loop, with C = median norm.

    Returns `(grad_sum, clip)`; half of the examples are clipped.
    """
    per_example = loop_gradients(model, x, y)
    n = len(x)
    norms = np.sqrt(sum(np.sum(g.reshape(n, -1) ** 2, 1) for g in per_example))
    clip = float(np.median(norms))
    factors = np.minimum(1.0, clip / norms)
    return [np.tensordot(factors, g, axes=1) for g in per_example], clip


# Tiny versions of each architecture (every layer type kept), 3 classes.
TINY = {
    "wide_resnet": dict(depth=10, width=1, input_shape=(8, 8, 3), groups=4),
    "nf_resnet": dict(width=0.25, depth=(1, 1, 1, 1), input_shape=(16, 16, 3)),
    "nfnet": dict(
        width=1 / 16, group_size=8, depth=(1, 1, 1, 1), input_shape=(16, 16, 3)
    ),
    "scatternet_linear": dict(input_shape=(4, 4, 9), groups=3),
    # 2x2 after the three pools: each GroupNorm group of the head holds 8
    # values (with 1, it would output zeros and pass no gradient back).
    "dpnasnet": dict(input_shape=(16, 16, 1), width=4, head_width=16),
}


def tiny(name, **kwargs):
    """A tiny model; deterministic (no stochastic depth, no dropout)."""
    if name.startswith("nf"):
        kwargs.setdefault("stochdepth_rate", 0.0)
        kwargs.setdefault("dropout_rate", 0.0)
    builder = getattr(kd.models, name)
    model = builder(num_classes=3, **TINY[name], **kwargs)
    # SkipInit gains start at zero, which would leave the residual branches
    # without gradient; open them so every layer is exercised.
    for layer in model.layers:
        if isinstance(layer, kd.layers.SkipInitGain):
            layer.gain.assign(0.5)
    return model


# A DP step with sigma = 0 and learning rate 1 (its update is -S/B, the sum S
# of the clipped gradients), for the tests of the C bound.
def compile_step(
    model, clip, clipping="auto", loss=LOSS, jit_compile=True, batch_size=6
):
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=1.0,
            momentum=0.0,
            l2_norm_clip=clip,
            noise_multiplier=0.0,
            batch_size=batch_size,
        ),
        loss=loss,
        clipping=clipping,
        jit_compile=jit_compile,
    )
    return model
