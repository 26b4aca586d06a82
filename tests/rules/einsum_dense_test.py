"""The EinsumDense rule against per-example gradients, in each of its forms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.rules import einsum_dense
from tests.rules import harness

# Input shape (K = 2 views) and EinsumDense arguments.
EQUATIONS = {
    "dense": (
        (8, 5),
        dict(equation="ab,bc->ac", output_shape=3, bias_axes="c"),
    ),
    "sequence": (
        (8, 3, 5),
        dict(equation="abc,cd->abd", output_shape=(None, 3), bias_axes="d"),
    ),
    "attention_in": (  # MultiHeadAttention's query, key and value
        (8, 3, 5),
        dict(
            equation="abc,cde->abde", output_shape=(None, 2, 3), bias_axes="de"
        ),
    ),
    "attention_out": (  # MultiHeadAttention's output
        (8, 3, 2, 3),
        dict(equation="abcd,cde->abe", output_shape=(None, 4), bias_axes="e"),
    ),
    "groups": (  # c: a matmul per group, kernel indices out of order
        (8, 3, 2, 4),
        dict(
            equation="abcd,ecd->abce", output_shape=(None, 2, 3), bias_axes="ce"
        ),
    ),
    "summed_input_index": (  # b: summed away, not in the kernel
        (8, 3, 4),
        dict(equation="abc,cd->ad", output_shape=3),
    ),
    "position_bias": (  # a bias per position, broadcast over d
        (8, 3, 4),
        dict(equation="abc,cd->abd", output_shape=(3, 2), bias_axes="b"),
    ),
    "ellipsis": (
        (8, 3, 4),
        dict(equation="...b,bc->...c", output_shape=3, bias_axes="c"),
    ),
}


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def randomized(layer, x, seed=1):
    """`layer` built on `x` with a random bias (not zeros)."""
    layer(x)
    if layer.bias is not None:
        rng = np.random.default_rng(seed)
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_einsum_dense(form, name, monkeypatch):
    harness.force_form(monkeypatch, form)
    shape, kwargs = EQUATIONS[name]
    x = inputs(shape)
    layer = randomized(keras.layers.EinsumDense(activation="tanh", **kwargs), x)
    harness.check_rule(layer, x, views=2)


def test_rows_with_a_large_offset(monkeypatch):
    # Rows sharing a large part are what the centred Gram form is for.
    harness.force_form(monkeypatch, "gram")
    x = inputs((6, 4, 5)) + 100.0
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3))
    harness.check_rule(layer, x, rtol=1e-3)


def test_equation_roles():
    indices = einsum_dense.parse("abcd,ecd->abce", 4)
    assert indices.batch == "a"
    assert (indices.positions, indices.groups) == ("b", "c")
    assert (indices.fan_in, indices.out) == ("d", "e")
    elided = einsum_dense.parse("...b,bc->...c", 3)
    assert elided.inputs[-1] == "b" and len(elided.inputs) == 3
    assert elided.inputs[:2] == elided.outputs[:2]


@pytest.mark.parametrize(
    "equation, rank",
    [
        ("ab,ac->bc", 2),  # the batch index is in the kernel
        ("ab,bc->ca", 2),  # the output does not start with the batch
        ("b...,bc->c...", 3),  # the ellipsis holds the batch axis...
        ("...b,bc->c", 3),  # ...or only the input has one
        ("abb,bc->ac", 3),  # a repeated index
        ("ab,bcd->ac", 2),  # a kernel index in neither input nor output
    ],
)
def test_other_equations_are_not_covered(equation, rank):
    assert einsum_dense.parse(equation, rank) is None


def test_a_bias_over_the_batch_axis_is_not_covered():
    layer = keras.layers.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="a")
    x = tf.constant(inputs((4, 3)))
    layer.build(x.shape)
    assert rules.rule_for(layer).forward(layer, x) is None


def test_lora_is_not_for_this_rule():
    layer = keras.layers.EinsumDense("ab,bc->ac", output_shape=3)
    x = tf.constant(inputs((4, 3)))
    layer.build(x.shape)
    layer.enable_lora(2)
    assert einsum_dense.EinsumDenseRule().forward(layer, x) is None
