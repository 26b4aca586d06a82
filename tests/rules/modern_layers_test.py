"""A model of the layers of modern backbones on the fast engine: every
layer through its rule (no fallback), and the clipped sum equal to the
vectorized engine's and to a loop's."""

import keras
import numpy as np

import keras_dpscale as kd
from tests.conftest import inputs_for
from tests.rules.harness import assert_sums_close
from tests.rules.harness import bfloat16_errors
from tests.rules.harness import clipped_sum
from tests.rules.harness import fast_without_fallback


def backbone():
    """DepthwiseConv2D, SeparableConv2D, Conv1D, LayerNormalization with
    RMS scaling, MultiHeadAttention and EinsumDense, tiny."""
    i = keras.Input((6, 6, 3))
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(i)
    h = keras.layers.SeparableConv2D(4, 3, strides=2, padding="same")(h)
    h = keras.layers.Reshape((9, 4))(h)
    h = keras.layers.Conv1D(4, 2, padding="same", activation="tanh")(h)
    h = keras.layers.LayerNormalization(rms_scaling=True)(h)
    h = keras.layers.MultiHeadAttention(2, 3)(h, h)
    h = keras.layers.EinsumDense("abc,cd->abd", (None, 4), bias_axes="d")(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return kd.DPModel(i, keras.layers.Dense(3)(h))


def test_backbone_has_no_fallback_and_equals_per_example_clipping(caplog):
    model = backbone()
    fast, expected, (x, y, clip) = fast_without_fallback(model, caplog)
    vectorized = clipped_sum(model, x, y, clip, "vectorized")
    assert_sums_close(fast, vectorized, across=True)
    assert_sums_close(fast, expected, across=True)


def test_backbone_in_mixed_bfloat16():
    # Both engines in bfloat16 against the float32 sum of the same weights:
    # the fast engine is as accurate as the vectorized one.
    errors = bfloat16_errors(backbone)
    assert errors["fast"] < 1.5 * errors["vectorized"] + 0.01, errors


def test_non_finite_example_contributes_nothing():
    model = backbone()
    x, y = inputs_for(model, 4)
    bad = x.copy()
    bad[2, 0, 0, 0] = np.inf
    with_bad = clipped_sum(model, bad, y, 0.1, "fast")
    without = clipped_sum(model, x[[0, 1, 3]], y[[0, 1, 3]], 0.1, "fast")
    assert all(np.all(np.isfinite(g)) for g in with_bad)
    assert_sums_close(with_bad, without, across=True)


def lora_model():
    """Dense, EinsumDense and Embedding with LoRA: only the factors train."""
    tokens = keras.Input((4,), dtype="int32")
    embedding = keras.layers.Embedding(11, 6)
    h = embedding(tokens)
    einsum = keras.layers.EinsumDense("abc,cd->abd", (None, 5), bias_axes="d")
    h = einsum(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    dense = keras.layers.Dense(3)
    model = kd.DPModel(tokens, dense(h))
    for layer in (embedding, einsum, dense):
        layer.enable_lora(2)
        # LoRA's B starts at zero, which would leave A's gradient zero.
        b = getattr(layer, "lora_kernel_b", None)
        b = layer.lora_embeddings_b if b is None else b
        b.assign(np.random.default_rng(1).normal(size=b.shape))
    return model


def test_lora_layers_have_no_fallback_and_equal_per_example_clipping(caplog):
    model = lora_model()
    assert len(model.trainable_variables) == 8  # 3 x (A, B) + 2 biases
    fast, expected, (x, y, clip) = fast_without_fallback(model, caplog)
    assert_sums_close(
        fast, clipped_sum(model, x, y, clip, "vectorized"), across=True
    )
    assert_sums_close(fast, expected, across=True)


def conv_model():
    """Conv3D, Conv2DTranspose, DepthwiseConv1D, SeparableConv1D and
    Conv1DTranspose, tiny."""
    i = keras.Input((3, 4, 4, 2))
    h = keras.layers.Conv3D(2, 2, padding="same", activation="relu")(i)
    h = keras.layers.Reshape((4, 4, 6))(h)
    h = keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same")(h)
    h = keras.layers.Reshape((16, 8))(h)
    h = keras.layers.DepthwiseConv1D(3, padding="same", activation="tanh")(h)
    h = keras.layers.SeparableConv1D(3, 3, strides=2)(h)
    h = keras.layers.Conv1DTranspose(2, 2, activation="tanh")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return kd.DPModel(i, keras.layers.Dense(3)(h))


def test_conv_layers_have_no_fallback_and_equal_per_example_clipping(caplog):
    fast, expected, _ = fast_without_fallback(conv_model(), caplog)
    assert_sums_close(fast, expected, across=True)
