"""The rule of `Conv1D` (channels last): a `Conv2D` of height 1.

A 1D convolution of `[N, L, C]` with a kernel `[k, C, O]` is the 2D
convolution of `[N, 1, L, C]` with the kernel `[1, k, C, O]` (the same
entries): the rule records the input and output with a unit height axis
and `ConvRule` does the rest, in each of its forms ("per_example" for
grouped convolutions).

Covered: `padding` "same" or "valid", channels last. Causal padding and
channels first return None from `forward` (the fallback takes them).
`Conv3D` has no rule.
"""

import dataclasses

import keras
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import conv
from keras_dpscale.rules import linear


@rules.register_rule(keras.layers.Conv1D)
class Conv1DRule(conv.ConvRule):
    """`o = conv1d(x, kernel) + bias`, then the activation."""

    def spatial(self, layer):
        return (
            (1, layer.kernel.shape[0]),
            (1, layer.strides[0]),
            (1, layer.dilation_rate[0]),
        )

    def forward(self, layer, inputs):
        if layer.data_format != "channels_last" or layer.padding not in (
            "same",
            "valid",
        ):
            return None
        z = keras.layers.Conv1D.convolution_op(layer, inputs, layer.kernel)
        z = ops.expand_dims(z, 1)  # [N, 1, L', O]
        o = z
        if layer.use_bias:
            o = ops.add(z, ops.cast(layer.bias, z.dtype))
        saved = linear.Saved(ops.expand_dims(inputs, 1), z)
        recorded = self.recorded(layer, saved, o)
        return dataclasses.replace(
            recorded, outputs=ops.squeeze(recorded.outputs, 1)
        )

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        v, axis = super().per_example_gradients(layer, saved, x, g_lin, batch)
        return v[0], axis - 1  # [k, B, C / groups, O]
