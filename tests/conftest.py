"""Shared test setup: quiet TensorFlow, fixed seeds, tiny models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


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
