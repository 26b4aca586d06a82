"""The rule of layer scales: `o = x * gamma`, one scale per channel.

ConvNeXt's and CaiT's layer scale (Touvron et al. 2021) multiplies each
channel of a residual branch by a learned scale `gamma` `[C]`. Example
i's gradient of gamma is `G * x` summed over its rows (pixels, tokens,
augmult views): `[B, C]`, formed, normed and weighted into the clipped
sum.

Registered for `keras.applications`' ConvNeXt layer scale (so
`keras.applications.ConvNeXtTiny` and its siblings run on the fast engine)
and by `keras_dpscale.models.convnext.LayerScale`; both name the scale
`gamma` and compute `x * gamma`.
"""

import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale._compat import keras_private
from keras_dpscale.rules import rows


@rules.register_rule(keras_private.ApplicationsLayerScale)
class LayerScaleRule(rules.Rule):
    """`o = x * gamma` over the last axis."""

    def forward(self, layer, inputs):
        outputs = inputs * ops.cast(layer.gamma, inputs.dtype)
        return rules.Recorded(
            outputs, [layer.gamma], sources=outputs, saved=inputs
        )

    def sq_norms(self, layer, recorded, grads, batch):
        g_x = tf.cast(grads, tf.float32) * tf.cast(recorded.saved, tf.float32)
        per_example = rows.per_example_sum(g_x, batch)
        return tf.reduce_sum(tf.square(per_example), 1), per_example

    def clipped_sums(self, layer, recorded, grads, factors, state):
        return [rows.weighted_sum(state, factors)]
