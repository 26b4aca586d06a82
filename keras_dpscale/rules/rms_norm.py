"""The rule of `RMSNormalization`: the input over its root mean square,
times a scale.

`o = x / sqrt(mean(x^2) + epsilon) * scale` over the last axis (float32,
as `ops.rms_normalization` computes it): a normalization with a scale and
no offset (`normalization.NormalizationRule`), whose scale's per-example
gradient is G times the normalized input, summed over an example's rows.

Covered: the last axis. Other axes return None from `forward` (the
fallback takes them).
"""

import keras
import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.rules import normalization


@rules.register_rule(keras.layers.RMSNormalization)
class RMSNormRule(normalization.NormalizationRule):
    """`RMSNormalization` over the last axis."""

    def scale_and_offset(self, layer):
        return layer.scale, None  # `scale` is its variable

    def normalized(self, layer, x):
        if list(layer.axis) not in ([-1], [x.shape.rank - 1]):
            return None
        epsilon = layer.epsilon
        if epsilon is None:
            epsilon = keras.config.epsilon()
        x32 = tf.cast(x, tf.float32)
        mean_square = tf.reduce_mean(tf.square(x32), -1, keepdims=True)
        return x32 * tf.math.rsqrt(mean_square + epsilon)
