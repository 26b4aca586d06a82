"""Rules for variables with small per-example gradients: normalization
scales and offsets, and scalar gains.

Their per-example gradients (`[B, size]`) are formed, normed and summed
with the clip factors: the sum adds exactly the tensors that were normed.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale._compat import keras_private
from keras_dpscale.rules import rows


class SmallRule(rules.Rule):
    """A rule that forms its variables' per-example gradients (`[B, size]`
    each, in the order of `recorded.variables`) with `per_example`."""

    def per_example(self, layer, recorded, grads, batch):
        raise NotImplementedError

    def sq_norms(self, layer, recorded, grads, batch):
        per_example = self.per_example(layer, recorded, grads, batch)
        sq_norms = tf.add_n(
            [tf.reduce_sum(tf.square(t), axis=[1]) for t in per_example]
        )
        return sq_norms, per_example

    def clipped_sums(self, layer, recorded, grads, factors, state):
        return [
            tf.reshape(rows.weighted_sum(t, factors), v.shape)
            for v, t in zip(recorded.variables, state)
        ]


class NormalizationRule(SmallRule):
    """`o = xhat * gamma + beta` (float32) on the normalized input `xhat`:
    the gradients of gamma and beta are G times xhat and G, summed over an
    example's rows. Subclasses compute `xhat`, or None where they do not
    cover the layer's configuration."""

    def normalized(self, layer, x):
        raise NotImplementedError

    def scale_and_offset(self, layer):
        """`(gamma, beta)` that the layer applies (None where it has none)."""
        return (
            layer.gamma if layer.scale else None,
            layer.beta if layer.center else None,
        )

    def forward(self, layer, inputs):
        xhat = self.normalized(layer, inputs)
        if xhat is None:
            return None
        shape = [1] * (inputs.shape.rank - 1) + [inputs.shape[-1]]
        gamma, beta = self.scale_and_offset(layer)
        o = xhat
        variables, multipliers = [], []
        if gamma is not None:
            o = o * tf.reshape(tf.cast(gamma, tf.float32), shape)
            variables.append(gamma)
            multipliers.append(xhat)
        if beta is not None:
            o = o + tf.reshape(tf.cast(beta, tf.float32), shape)
            variables.append(beta)
            multipliers.append(None)
        outputs = ops.cast(o, layer.compute_dtype)
        return rules.Recorded(outputs, variables, o, tuple(multipliers))

    def per_example(self, layer, recorded, grads, batch):
        return [
            rows.per_example_sum(grads if m is None else grads * m, batch)
            for m in recorded.saved
        ]


@rules.register_rule(keras.layers.GroupNormalization)
class GroupNormRule(NormalizationRule):
    """`GroupNormalization` over the last axis."""

    def normalized(self, layer, x):
        if layer.axis not in (-1, x.shape.rank - 1):
            return None
        grouped = tf.cast(
            keras_private.reshape_into_groups(layer, x), "float32"
        )
        rank = grouped.shape.rank
        axes = list(range(1, rank - 2)) + [rank - 1]
        mean, var = tf.nn.moments(grouped, axes=axes, keepdims=True)
        xhat = (grouped - mean) * tf.math.rsqrt(var + layer.epsilon)
        return tf.reshape(xhat, [-1, *x.shape[1:]])


@rules.register_rule(keras.layers.LayerNormalization)
class LayerNormRule(NormalizationRule):
    """`LayerNormalization` over the last axis.

    With `rms_scaling=True`, Keras divides the input by the square root of
    its variance plus epsilon (`ops.layer_normalization`: the variance,
    not the mean square) without subtracting the mean, and applies gamma
    only (it has gamma even with `scale=False`, and no beta).
    """

    def scale_and_offset(self, layer):
        return layer.gamma, layer.beta  # None where the layer has none

    def normalized(self, layer, x):
        if list(layer.axis) not in ([-1], [x.shape.rank - 1]):
            return None
        x32 = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x32, axes=[-1], keepdims=True)
        inv = tf.math.rsqrt(var + layer.epsilon)
        return x32 * inv if layer.rms_scaling else (x32 - mean) * inv


class ScalarGainRule(SmallRule):
    """`o = x * gain` with one scalar `layer.gain` (SkipInit): its gradient
    is G times x summed over an example's rows. Registered by the layers
    that have this form (`keras_dpscale.layers.SkipInitGain`)."""

    def forward(self, layer, inputs):
        outputs = inputs * ops.cast(layer.gain, inputs.dtype)
        return rules.Recorded(outputs, [layer.gain], outputs, inputs)

    def per_example(self, layer, recorded, grads, batch):
        g_x = tf.reshape(
            tf.cast(grads * recorded.saved, tf.float32), [batch, -1]
        )
        return [tf.reduce_sum(g_x, axis=1, keepdims=True)]
