"""The rule of `EinsumDense`: a matmul per group of kernel entries.

`EinsumDense` computes `o = einsum(equation, x, kernel) + bias`. With the
input's leading (batch) index b, every other index of the equation is one
of:

- a position s (input and output, not the kernel): a row of the matmul;
- a fan-in index p (input and kernel, not the output): contracted;
- an output index d (kernel and output, not the input);
- a group index q (input, kernel and output; attention heads): each value
  of q is a matmul of its own;
- an index of the input alone: summed away before the kernel sees it.

Example i's kernel gradient per group is `a^T g` on its rows (`matmul`),
with the rows `[n, p]` and output gradients `[n, d]` of its K views times
its positions; the bias's per-example gradient is G summed over the rows
and the axes the bias broadcasts over.

Covered: any equation whose input and output start with the same index
(the batch), which the kernel does not have, with no index repeated within
an operand, and every kernel index in the input or the output; an
ellipsis in the input and the output (the same axes), not in the kernel.
Anything else returns None from `forward` (the fallback takes it), and so
do quantized layers; layers with LoRA have their rule (`rules.lora`).

`MultiHeadAttention` owns no variables itself: its query, key, value and
output projections are `EinsumDense` layers, each recorded with this rule.
"""

import math
import string
from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import matmul
from keras_dpscale.rules import rows


class Indices(NamedTuple):
    """An `EinsumDense` equation, its ellipsis written out, by role.

    Attributes:
        inputs, kernel, outputs: the operands' index strings.
        batch: the batch index.
        positions, groups, fan_in, out: the other indices by role (module
            docstring), each a string in the order of the operand that
            first has them.
    """

    inputs: str
    kernel: str
    outputs: str
    batch: str
    positions: str
    groups: str
    fan_in: str
    out: str


class Saved(NamedTuple):
    """The forward pass's input and the equation's `Indices`."""

    x: Any
    indices: Indices


def parse(equation, rank):
    """The `Indices` of `equation` on an input of rank `rank`, or None where
    the rule does not cover it (module docstring)."""
    try:
        inputs, rest = equation.replace(" ", "").split(",")
        kernel, outputs = rest.split("->")
    except ValueError:
        return None
    if "..." in kernel or ("..." in inputs) != ("..." in outputs):
        return None
    if "..." in inputs:
        width = rank - (len(inputs) - 3)
        unused = [c for c in string.ascii_letters if c not in equation]
        if width < 0 or width > len(unused):
            return None
        elided = "".join(unused[:width])
        inputs = inputs.replace("...", elided)
        outputs = outputs.replace("...", elided)
    if len(inputs) != rank or not inputs or not outputs:
        return None
    if any(len(set(t)) != len(t) for t in (inputs, kernel, outputs)):
        return None
    batch = inputs[0]
    if outputs[0] != batch or batch in kernel:
        return None
    if any(c not in inputs and c not in outputs for c in kernel):
        return None
    if any(c not in inputs and c not in kernel for c in outputs):
        return None
    return Indices(
        inputs,
        kernel,
        outputs,
        batch,
        positions="".join(
            c for c in inputs[1:] if c in outputs and c not in kernel
        ),
        groups="".join(c for c in kernel if c in inputs and c in outputs),
        fan_in="".join(c for c in kernel if c in inputs and c not in outputs),
        out="".join(c for c in kernel if c in outputs and c not in inputs),
    )


@rules.register_rule(keras.layers.EinsumDense)
class EinsumDenseRule(rules.Rule):
    """`o = einsum(equation, x, kernel) + bias`, then the activation."""

    def forward(self, layer, inputs):
        if getattr(layer, "lora_enabled", False) or layer.quantization_mode:
            return None  # its kernel is not its variable (`rules.lora`)
        indices = parse(layer.equation, inputs.shape.rank)
        if indices is None or (
            layer.bias is not None
            and len(layer.bias.shape) >= len(indices.outputs)
        ):
            return None
        o = ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            o = ops.add(o, layer.bias)
        outputs = o if layer.activation is None else layer.activation(o)
        variables = [layer.kernel]
        if layer.bias is not None:
            variables.append(layer.bias)
        return rules.Recorded(outputs, variables, o, Saved(inputs, indices))

    def sq_norms(self, layer, recorded, grads, batch):
        x, indices = recorded.saved
        g = tf.cast(grads, tf.float32)
        x = tf.cast(rows.after(x, g), tf.float32)
        sq, kernel = kernel_sq_norms(x, g, indices, batch)
        bias = None
        if layer.bias is not None:
            bias = rows.per_example_sum(bias_rows(g, layer.bias.shape), batch)
            sq += tf.reduce_sum(tf.square(bias), 1)
        return sq, (kernel, bias)

    def clipped_sums(self, layer, recorded, grads, factors, state):
        kernel, bias = state
        indices = recorded.saved.indices
        sums = [kernel_sum(kernel, factors, indices, layer.kernel.shape)]
        if bias is not None:
            sums.append(
                tf.reshape(rows.weighted_sum(bias, factors), layer.bias.shape)
            )
        return sums


def kernel_sq_norms(x, g, indices, batch):
    """Each example's squared norm of its gradient of the kernel of
    `indices`, from the float32 input `x` and output gradient `g`: `([B],
    state)`, the state for `kernel_sum`."""
    a = _grouped_rows(x, indices, indices.fan_in, batch)
    g_rows = _grouped_rows(
        g, indices._replace(inputs=indices.outputs), indices.out, batch
    )
    sq, state = matmul.sq_norms(a, g_rows)
    return sq, (state, g_rows)


def kernel_sum(state, factors, indices, kernel_shape):
    """The clipped sum of the kernel's gradients, shaped `kernel_shape`,
    from `kernel_sq_norms`'s state."""
    kernel, g_rows = state
    total = matmul.clipped_sum(kernel, g_rows, factors)  # [q, p, d]
    sizes = dict(zip(indices.kernel, kernel_shape))
    order = indices.groups + indices.fan_in + indices.out
    total = tf.reshape(total, [sizes[c] for c in order])
    return tf.einsum(f"{order}->{indices.kernel}", total)


def _grouped_rows(t, indices, last, batch):
    """`t` (indexed by `indices.inputs`) as `[B, q, n, size(last)]`: each
    example's rows (its views times its positions) per group; the indices
    of `t` that are neither positions, groups nor `last` summed away."""
    order = indices.batch + indices.positions + indices.groups + last
    t = tf.einsum(f"{indices.inputs}->{order}", t)
    sizes = dict(zip(order, t.shape))
    groups = math.prod(sizes[c] for c in indices.groups)
    width = math.prod(sizes[c] for c in last)
    t = tf.reshape(t, [batch, -1, groups, width])
    return tf.transpose(t, [0, 2, 1, 3])


def bias_rows(g, bias_shape):
    """G `[rows, ...]` summed over what a bias of `bias_shape` (aligned
    with G's last axes) broadcasts over: `[rows, size(bias)]`."""
    lead = g.shape.rank - len(bias_shape)
    axes = list(range(1, lead)) + [
        lead + i
        for i, size in enumerate(bias_shape)
        if size == 1 and g.shape[lead + i] != 1
    ]
    if axes:
        g = tf.reduce_sum(g, axes, keepdims=True)
    return tf.reshape(g, [g.shape[0], -1])
