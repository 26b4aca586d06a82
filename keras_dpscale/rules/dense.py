"""The rule of `Dense`: a linear layer on the rows of its input.

The rows of an input `[B*K, ..., p]` are its vectors along the last axis
(`n` per example: K views times the positions of a sequence).
"""

import keras
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import linear
from keras_dpscale.rules import rows


@rules.register_rule(keras.layers.Dense)
class DenseRule(linear.LinearRule):
    """`o = x @ kernel + bias`, then the activation."""

    def forward(self, layer, inputs):
        z = ops.matmul(inputs, layer.kernel)
        o = z if layer.bias is None else ops.add(z, layer.bias)
        return self.recorded(layer, linear.Saved(inputs, z), o)

    def form(self, layer, saved, g_lin, batch):
        _, n, d = rows.rows(g_lin, batch).shape
        return ghost_norms.cheapest(
            ghost_norms.matmul_costs(n, layer.kernel.shape[0], d)
        )

    def patch_rows(self, layer, saved, x, batch):
        return rows.rows(x, batch)

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        v = ghost_norms.outer(rows.rows(x, batch), rows.rows(g_lin, batch))
        return v, 0
