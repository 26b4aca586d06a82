"""The rule of Dense layers with LoRA against per-example gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.rules import dense
from keras_dpscale.rules import einsum_dense
from keras_dpscale.rules import embedding
from keras_dpscale.rules import lora
from tests.rules import harness


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def lora_dense(x, rank=2, use_bias=True, seed=1):
    """A Dense layer built on `x` with LoRA, B not zero (its initializer's
    zeros would leave A without gradient)."""
    layer = keras.layers.Dense(3, activation="tanh", use_bias=use_bias)
    layer(x)
    layer.enable_lora(rank, lora_alpha=3.0)
    b = layer.lora_kernel_b
    b.assign(np.random.default_rng(seed).normal(size=b.shape))
    return layer


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize(
    "shape, views", [((8, 5), 2), ((8, 3, 5), 2)], ids=["vectors", "sequence"]
)
def test_lora_dense(form, shape, views, monkeypatch):
    harness.force_form(monkeypatch, form)
    x = inputs(shape)
    layer = lora_dense(x)
    assert {v.name for v in layer.trainable_variables} == {
        "lora_kernel_a",
        "lora_kernel_b",
        "bias",
    }
    harness.check_rule(layer, x, views)


def test_lora_dense_with_a_frozen_bias_and_without_bias():
    x = inputs((6, 4, 5))
    layer = lora_dense(x)
    layer.bias.trainable = False
    harness.check_rule(layer, x)
    harness.check_rule(lora_dense(x, use_bias=False), x)


def test_dense_without_lora_is_dense_rule():
    rule = rules.rule_for(keras.layers.Dense(2))
    assert isinstance(rule, lora.LoraDenseRule)
    assert isinstance(rule, dense.DenseRule)
    x = inputs((6, 5))
    harness.check_rule(keras.layers.Dense(3), x)


def lora_embedding(ids, seed=1):
    layer = keras.layers.Embedding(4, 3)
    layer(ids)
    layer.enable_lora(2, lora_alpha=3.0)
    b = layer.lora_embeddings_b
    b.assign(np.random.default_rng(seed).normal(size=b.shape))
    return layer


@pytest.mark.parametrize("form", ["per_example", "gram"])
def test_lora_embedding_with_repeated_and_negative_ids(form, monkeypatch):
    harness.force_form(monkeypatch, form)
    # 4 ids in sequences of 7: most examples look some id up twice.
    ids = np.random.default_rng(0).integers(-4, 4, (12, 7)).astype("int32")
    layer = lora_embedding(ids)
    assert {v.name for v in layer.trainable_variables} == {
        "lora_embeddings_a",
        "lora_embeddings_b",
    }
    harness.check_rule(layer, ids, views=2)


def test_lora_embedding_with_a_frozen_factor():
    ids = np.random.default_rng(0).integers(0, 4, (6, 5)).astype("int32")
    layer = lora_embedding(ids)
    layer.lora_embeddings_a.trainable = False
    harness.check_rule(layer, ids)


def test_embedding_without_lora_is_embedding_rule():
    rule = rules.rule_for(keras.layers.Embedding(4, 3))
    assert isinstance(rule, lora.LoraEmbeddingRule)
    assert isinstance(rule, embedding.EmbeddingRule)
    ids = np.random.default_rng(0).integers(0, 4, (6, 5)).astype("int32")
    harness.check_rule(keras.layers.Embedding(4, 3), ids)


# EinsumDense arguments and input shapes (K = 2 views).
EQUATIONS = {
    "dense": ((8, 5), ("ab,bc->ac", 3, "c")),
    "attention_in": ((8, 3, 5), ("abc,cde->abde", (None, 2, 3), "de")),
    "attention_out": ((8, 3, 2, 3), ("abcd,cde->abe", (None, 4), "e")),
    "ellipsis": ((8, 3, 4), ("...b,bc->...c", 3, None)),
}


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_lora_einsum_dense(form, name, monkeypatch):
    harness.force_form(monkeypatch, form)
    shape, (equation, output_shape, bias_axes) = EQUATIONS[name]
    x = inputs(shape)
    layer = keras.layers.EinsumDense(
        equation, output_shape, activation="tanh", bias_axes=bias_axes
    )
    layer(x)
    layer.enable_lora(2, lora_alpha=3.0)
    b = layer.lora_kernel_b
    b.assign(np.random.default_rng(1).normal(size=b.shape))
    harness.check_rule(layer, x, views=2)


def test_lora_einsum_dense_with_another_last_kernel_index_falls_back():
    # The kernel's last index c is a fan-in index: not covered.
    layer = keras.layers.EinsumDense("abc,dc->abd", output_shape=(None, 3))
    x = tf.constant(inputs((4, 2, 5)))
    layer(x)
    layer.enable_lora(2)
    assert rules.rule_for(layer).forward(layer, x) is None
    rule = rules.rule_for(keras.layers.EinsumDense("ab,bc->ac", 2))
    assert isinstance(rule, einsum_dense.EinsumDenseRule)
