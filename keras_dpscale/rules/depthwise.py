"""The rule of `DepthwiseConv2D` (channels last): each channel convolved
with its own filters.

A depthwise convolution with C input channels and depth multiplier M is a
grouped convolution with C groups of one input channel and M outputs each:
output channel `c * M + m` reads input channel c through filter `[:, :, c,
m]`. Its per-example filter gradients are `ghost_norms.
per_example_filter_gradient`'s with C groups, one batched matmul per kernel
offset, of the layer's own size per example (`kh * kw * C * M`, as large as
a bias of a few convolutions): the rule forms them ("per_example"), norms
them and weights them into the clipped sum. No Gram form is cheaper.

Covered: `padding` "same" or "valid", channels last. Channels first
returns None from `forward` (the fallback takes it).
"""

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import conv
from keras_dpscale.rules import ghost_norms


def filter_gradients(x, g, kernel_shape, batch, **geometry):
    """Per-example gradients of a depthwise kernel.

    Args:
        x: `[B*K, H, W, C]`: the convolution's input.
        g: `[B*K, H', W', C*M]`: the gradient of its output.
        kernel_shape: `(kh, kw, C, M)`.
        batch: B.
        **geometry: `kernel_size`, `strides`, `padding` and `dilations`
            (`ghost_norms.per_example_filter_gradient`).

    Returns:
        `[kh, kw, B, C, M]` float32: example i's gradient is `[:, :, i]`.
    """
    kh, kw, channels, multiplier = kernel_shape
    views = x.shape[0] // batch
    v = ghost_norms.per_example_filter_gradient(
        tf.reshape(x, [batch, views, *x.shape[1:]]),
        tf.reshape(g, [batch, views, *g.shape[1:]]),
        groups=channels,
        **geometry,
    )
    return tf.reshape(v, [kh, kw, batch, channels, multiplier])


@rules.register_rule(keras.layers.DepthwiseConv2D)
class DepthwiseConvRule(conv.ConvRule):
    """`o = depthwise_conv(x, kernel) + bias`, then the activation; the
    kernel's per-example gradients formed (`filter_gradients`)."""

    def forward(self, layer, inputs):
        return conv.plain_forward(self, layer, inputs, ops.depthwise_conv)

    def form(self, layer, saved, g_lin, batch):
        return "per_example"

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        geometry = self.geometry(layer, saved)
        del geometry["out_size"]
        kernel_shape = (*geometry["kernel_size"], *layer.kernel.shape[-2:])
        v = filter_gradients(x, g_lin, kernel_shape, batch, **geometry)
        return v, 2
