"""The rules of `Conv2DTranspose` and `Conv1DTranspose` (channels last).

A transposed convolution is the gradient of a convolution with respect to
its input: its output `y` (`[N, H_o, W_o, O]`) is what the convolution
with the same kernel `[kh, kw, O, C]`, strides, padding and dilations
would map to the layer's input `x` (`[N, H, W, C]`). Its kernel gradient
is that convolution's filter gradient with the roles swapped: the
transposed convolution's output gradient as the input, and its input as
the output's gradient. The rule forms it per example
(`ghost_norms.per_example_filter_gradient`, one batched matmul per kernel
offset, as the layer's own kernel gradient), already in the layout of the
kernel `[kh, kw, O, C]` ("per_example"; no Gram form). `Conv1DTranspose`
runs it on height 1 (`conv1d.HeightOneConv`).

Covered: `padding` "same" or "valid" (with any `output_padding`),
channels last. Channels first returns None from `forward` (the fallback
takes it). `Conv3DTranspose` has no rule.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import conv
from keras_dpscale.rules import conv1d
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import linear


@rules.register_rule(keras.layers.Conv2DTranspose)
class ConvTransposeRule(linear.LinearRule):
    """`o = conv_transpose(x, kernel) + bias`, then the activation."""

    def forward(self, layer, inputs):
        return conv.plain_forward(
            self,
            layer,
            inputs,
            ops.conv_transpose,
            output_padding=layer.output_padding,
        )

    def spatial(self, layer):
        """`(kernel_size, strides, dilations)` of the layer as a 2D one."""
        return conv.spatial(layer)

    def form(self, layer, saved, g_lin, batch):
        return "per_example"

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        kernel_size, strides, dilations = self.spatial(layer)
        views = x.shape[0] // batch
        # The convolution's filter gradient, of input g and output x.
        v = ghost_norms.per_example_filter_gradient(
            tf.reshape(g_lin, [batch, views, *g_lin.shape[1:]]),
            tf.reshape(x, [batch, views, *x.shape[1:]]),
            kernel_size=kernel_size,
            strides=strides,
            padding=layer.padding.upper(),
            dilations=dilations,
        )
        return v, 2  # [kh, kw, B, O, C]


@rules.register_rule(keras.layers.Conv1DTranspose)
class Conv1DTransposeRule(conv1d.HeightOneConv, ConvTransposeRule):
    """`o = conv_transpose1d(x, kernel) + bias`, then the activation."""
