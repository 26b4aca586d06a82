"""LoRA: the rules of `Dense`, `EinsumDense` and `Embedding` layers, with
or without LoRA.

`layer.enable_lora(rank)` freezes the kernel W and trains two factors: the
layer uses the kernel `W + s * A @ B` (`s = lora_alpha / rank`, A `[p, r]`,
B `[r, d]`). With G the gradient of the output before the activation and
`a` the input's rows, example i's gradients are

- `dA_i = s * a_i^T (g_i B^T)`: a matmul on the rows `a` with the output
  gradients `s g B^T` (`[n, r]`);
- `dB_i = (s a_i A)^T g_i`: a matmul on the rows `s a A` (`[n, r]`) with
  G;
- the bias's, G summed over the rows;

each normed by `matmul`'s cheaper form and summed as normed. The rule
clips the layer's trainable variables among A, B and the bias.

An `Embedding` with LoRA looks up rows of `W + s * A @ B` (A `[V, r]`): its
lookup s of id `k_s` adds `s g_s B^T` to row `k_s` of dA (the `Embedding`
rule's norm, `ghost_norms.embedding_sq_norms`, on those rows), and dB is a
matmul on the looked-up rows `s A[k_s]` with G.

An `EinsumDense` with LoRA uses `W + s * A @ B` with A `kernel.shape[:-1] +
(r,)`, B `[r, l]` for the kernel's last index l. Where l is an output index
(in the kernel and the output, not the input), A is the kernel of the
`EinsumDense` equation with l renamed r (`u = einsum(x, A)`) whose output
gradient is `s g B^T`, and B the kernel of `u -> o` (`s u` times B): both
normed and summed by `einsum_dense`'s kernel forms. Other equations with
LoRA return None from `forward` (the fallback takes them).

Layers without LoRA go to `DenseRule`, `EinsumDenseRule` and
`EmbeddingRule`, which these rules extend and replace in the registry.
Convolutions with LoRA have no rule: their variables differ from what the
convolution rules record, so they take the (exact) fallback.
"""

import string
from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import dense
from keras_dpscale.rules import einsum_dense
from keras_dpscale.rules import embedding
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import matmul
from keras_dpscale.rules import rows


class LoraSaved(NamedTuple):
    """The input `x`, and the variables clipped: `(name, variable)` for
    each trainable one of "a", "b" and "bias"."""

    x: Any
    clipped: tuple


def kernel_recorded(layer, o, x):
    """The `Recorded` of a LoRA `Dense`/`EinsumDense` call: outputs from the
    pre-activation `o` (bias added), G taken at `o`, and the trainable ones
    of the factors and the bias, saved with `x`."""
    outputs = o if layer.activation is None else layer.activation(o)
    named = (
        ("a", layer.lora_kernel_a),
        ("b", layer.lora_kernel_b),
        ("bias", layer.bias),
    )
    clipped = tuple((n, v) for n, v in named if v is not None and v.trainable)
    return rules.Recorded(
        outputs, [v for _, v in clipped], o, LoraSaved(x, clipped)
    )


@rules.register_rule(keras.layers.Dense)
class LoraDenseRule(dense.DenseRule):
    """`o = x @ (W + s A @ B) + bias`, then the activation; `DenseRule`
    without LoRA."""

    def forward(self, layer, inputs):
        if not getattr(layer, "lora_enabled", False):
            return super().forward(layer, inputs)
        if layer.quantization_mode is not None:
            return None
        o = ops.matmul(inputs, layer.kernel)  # the kernel with LoRA
        if layer.bias is not None:
            o = ops.add(o, layer.bias)
        return kernel_recorded(layer, o, inputs)

    def sq_norms(self, layer, recorded, grads, batch):
        if not isinstance(recorded.saved, LoraSaved):
            return super().sq_norms(layer, recorded, grads, batch)
        g = tf.cast(grads, tf.float32)
        x = tf.cast(rows.after(recorded.saved.x, g), tf.float32)
        s = layer.lora_alpha / layer.lora_rank
        lora_a = tf.cast(layer.lora_kernel_a, tf.float32)
        lora_b = tf.cast(layer.lora_kernel_b, tf.float32)
        # Rank-3 matmuls, then the group axis: a broadcasting matmul of
        # `[B, 1, n, d]` by a matrix is wrong on some CPUs (sharp edges).
        g_rows = rows.rows(g, batch)  # [B, n, d]
        x_rows = rows.rows(x, batch)
        sq = tf.zeros([batch])
        states = []
        for name, _ in recorded.saved.clipped:
            if name == "a":
                a = x_rows[:, None]
                out = s * tf.matmul(g_rows, lora_b, transpose_b=True)[:, None]
            elif name == "b":
                a = s * tf.matmul(x_rows, lora_a)[:, None]
                out = g_rows[:, None]
            else:
                bias = rows.per_example_sum(g, batch)
                sq += tf.reduce_sum(tf.square(bias), 1)
                states.append(bias)
                continue
            part, state = matmul.sq_norms(a, out)
            sq += part
            states.append((state, out))
        return sq, states

    def clipped_sums(self, layer, recorded, grads, factors, state):
        if not isinstance(recorded.saved, LoraSaved):
            return super().clipped_sums(layer, recorded, grads, factors, state)
        sums = []
        for (_, variable), part in zip(recorded.saved.clipped, state):
            if isinstance(part, tuple):
                total = matmul.clipped_sum(*part, factors)
            else:
                total = rows.weighted_sum(part, factors)
            sums.append(tf.reshape(total, variable.shape))
        return sums


@rules.register_rule(keras.layers.Embedding)
class LoraEmbeddingRule(embedding.EmbeddingRule):
    """`o = take(W + s A @ B, ids)`; `EmbeddingRule` without LoRA."""

    def forward(self, layer, inputs):
        recorded = super().forward(layer, inputs)  # the table with LoRA
        if not getattr(layer, "lora_enabled", False):
            return recorded
        if layer.quantization_mode is not None:
            return None
        named = (("a", layer.lora_embeddings_a), ("b", layer.lora_embeddings_b))
        clipped = tuple((n, v) for n, v in named if v.trainable)
        return rules.Recorded(
            recorded.outputs,
            [v for _, v in clipped],
            recorded.sources,
            LoraSaved(recorded.saved, clipped),  # the ids
        )

    def sq_norms(self, layer, recorded, grads, batch):
        if not isinstance(recorded.saved, LoraSaved):
            return super().sq_norms(layer, recorded, grads, batch)
        s = layer.lora_alpha / layer.lora_rank
        ids = tf.reshape(recorded.saved.x, [batch, -1])
        g = rows.rows(tf.cast(grads, tf.float32), batch)  # [B, n, d]
        sq = tf.zeros([batch])
        states = []
        for name, _ in recorded.saved.clipped:
            if name == "a":
                lora_b = tf.cast(layer.lora_embeddings_b, tf.float32)
                g_a = s * tf.matmul(g, lora_b, transpose_b=True)  # [B, n, r]
                sq += ghost_norms.embedding_sq_norms(ids, g_a)
                states.append(g_a)
            else:
                lora_a = tf.cast(layer.lora_embeddings_a, tf.float32)
                a = s * tf.gather(lora_a, ids)  # [B, n, r]
                part, state = matmul.sq_norms(a[:, None], g[:, None])
                sq += part
                states.append((state, g[:, None]))
        return sq, states

    def clipped_sums(self, layer, recorded, grads, factors, state):
        if not isinstance(recorded.saved, LoraSaved):
            return super().clipped_sums(layer, recorded, grads, factors, state)
        ids = tf.reshape(recorded.saved.x, [-1])
        sums = []
        for (_, variable), part in zip(recorded.saved.clipped, state):
            if isinstance(part, tuple):
                total = matmul.clipped_sum(*part, factors)
            else:  # rows of dA, scattered to their ids
                scaled = rows.scale(part, factors)
                total = tf.math.unsorted_segment_sum(
                    tf.reshape(scaled, [-1, part.shape[-1]]),
                    ids,
                    variable.shape[0],
                )
            sums.append(tf.reshape(total, variable.shape))
        return sums


class LoraEquations(NamedTuple):
    """The `einsum_dense.Indices` of the two matmuls of an `EinsumDense`
    with LoRA: `a`: `x -> u` with the kernel A, `b`: `u -> o` with B; and
    the equations that form `u` and B's product with G."""

    a: Any
    b: Any
    u: str
    g_a: str


def lora_equations(indices):
    """`LoraEquations` of an `EinsumDense` of `indices` with LoRA, or None
    where the kernel's last index is not an output index."""
    last = indices.kernel[-1]
    if last not in indices.out:
        return None
    used = indices.inputs + indices.kernel + indices.outputs
    rank = next(c for c in string.ascii_letters if c not in used)
    u = indices.outputs.replace(last, rank)
    eq_u = f"{indices.inputs},{indices.kernel[:-1]}{rank}->{u}"
    return LoraEquations(
        a=einsum_dense.parse(eq_u, len(indices.inputs)),
        b=einsum_dense.parse(f"{u},{rank}{last}->{indices.outputs}", len(u)),
        u=eq_u,
        g_a=f"{indices.outputs},{rank}{last}->{u}",
    )


@rules.register_rule(keras.layers.EinsumDense)
class LoraEinsumDenseRule(einsum_dense.EinsumDenseRule):
    """`o = einsum(equation, x, W + s A @ B) + bias`, then the activation;
    `EinsumDenseRule` without LoRA."""

    def forward(self, layer, inputs):
        if not getattr(layer, "lora_enabled", False):
            return super().forward(layer, inputs)
        indices = einsum_dense.parse(layer.equation, inputs.shape.rank)
        if (
            layer.quantization_mode is not None
            or indices is None
            or lora_equations(indices) is None
            or (
                layer.bias is not None
                and len(layer.bias.shape) >= len(indices.outputs)
            )
        ):
            return None
        o = ops.einsum(layer.equation, inputs, layer.kernel)  # with LoRA
        if layer.bias is not None:
            o = ops.add(o, layer.bias)
        return kernel_recorded(layer, o, einsum_dense.Saved(inputs, indices))

    def sq_norms(self, layer, recorded, grads, batch):
        if not isinstance(recorded.saved, LoraSaved):
            return super().sq_norms(layer, recorded, grads, batch)
        x, indices = recorded.saved.x
        equations = lora_equations(indices)
        s = layer.lora_alpha / layer.lora_rank
        g = tf.cast(grads, tf.float32)
        x = tf.cast(rows.after(x, g), tf.float32)
        lora_a = tf.cast(layer.lora_kernel_a, tf.float32)
        lora_b = tf.cast(layer.lora_kernel_b, tf.float32)
        sq = tf.zeros([batch])
        states = []
        for name, _ in recorded.saved.clipped:
            if name == "a":
                g_a = s * tf.einsum(equations.g_a, g, lora_b)
                part, state = einsum_dense.kernel_sq_norms(
                    x, g_a, equations.a, batch
                )
            elif name == "b":
                u = s * tf.einsum(equations.u, x, lora_a)
                part, state = einsum_dense.kernel_sq_norms(
                    u, g, equations.b, batch
                )
            else:
                bias_g = einsum_dense.bias_rows(g, layer.bias.shape)
                state = rows.per_example_sum(bias_g, batch)
                part = tf.reduce_sum(tf.square(state), 1)
            sq += part
            states.append(state)
        return sq, states

    def clipped_sums(self, layer, recorded, grads, factors, state):
        if not isinstance(recorded.saved, LoraSaved):
            return super().clipped_sums(layer, recorded, grads, factors, state)
        equations = lora_equations(recorded.saved.x.indices)
        sums = []
        for (name, variable), part in zip(recorded.saved.clipped, state):
            if name == "bias":
                total = rows.weighted_sum(part, factors)
            else:
                total = einsum_dense.kernel_sum(
                    part, factors, getattr(equations, name), variable.shape
                )
            sums.append(tf.reshape(total, variable.shape))
        return sums
