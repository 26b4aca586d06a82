"""The rule of `SeparableConv2D` (channels last): a depthwise convolution,
then a pointwise (1x1) one, in one layer.

The rule records both the depthwise convolution's output `h` and the
layer's output before its activation `o` as sources, and gets G for each:

- the depthwise kernel's per-example gradients from the input and G of
  `h` (`depthwise.filter_gradients`), formed;
- the pointwise kernel `[1, 1, C*M, O]` is a matmul on the rows of `h` (one
  per position), normed by `matmul`'s cheaper form;
- the bias's from G of `o`.

Covered: `padding` "same" or "valid", channels last. Channels first
returns None from `forward` (the fallback takes it).
"""

from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import conv
from keras_dpscale.rules import depthwise
from keras_dpscale.rules import matmul
from keras_dpscale.rules import rows


class Sources(NamedTuple):
    """The recorded tensors: the depthwise output `h`, and the output `o`
    before the activation."""

    h: Any
    o: Any


@rules.register_rule(keras.layers.SeparableConv2D)
class SeparableConvRule(rules.Rule):
    """`o = conv1x1(depthwise_conv(x, depthwise), pointwise) + bias`, then
    the activation."""

    def forward(self, layer, inputs):
        if not conv.covered(layer):
            return None
        h = conv.convolve(
            layer, ops.depthwise_conv, inputs, layer.depthwise_kernel
        )
        o = ops.conv(
            h,
            layer.pointwise_kernel,
            padding="valid",
            data_format="channels_last",
        )
        variables = [layer.depthwise_kernel, layer.pointwise_kernel]
        if layer.use_bias:
            o = ops.add(o, ops.cast(layer.bias, o.dtype))
            variables.append(layer.bias)
        outputs = o if layer.activation is None else layer.activation(o)
        return rules.Recorded(outputs, variables, Sources(h, o), inputs)

    def spatial(self, layer):
        """`(kernel_size, strides, dilations)` of the depthwise convolution
        (`SeparableConv1DRule` sees a 1D one as one of height 1)."""
        return conv.spatial(layer)

    def planar(self, t):
        """The layer's input, or `h`'s gradient, as 2D images."""
        return t

    def sq_norms(self, layer, recorded, grads, batch):
        g_h = tf.cast(grads.h, tf.float32)
        g_o = tf.cast(grads.o, tf.float32)
        x = tf.cast(rows.after(recorded.saved, g_h), tf.float32)
        h = tf.cast(rows.after(recorded.sources.h, g_o), tf.float32)
        kernel_size, strides, dilations = self.spatial(layer)
        geometry = dict(
            kernel_size=kernel_size,
            strides=strides,
            padding=layer.padding.upper(),
            dilations=dilations,
        )
        kernel_shape = (*kernel_size, *layer.depthwise_kernel.shape[-2:])
        v = depthwise.filter_gradients(
            self.planar(x), self.planar(g_h), kernel_shape, batch, **geometry
        )
        sq = tf.reduce_sum(tf.square(v), [0, 1, 3, 4])
        a, g = rows.rows(h, batch)[:, None], rows.rows(g_o, batch)[:, None]
        pointwise_sq, pointwise = matmul.sq_norms(a, g)
        sq += pointwise_sq
        bias = None
        if layer.use_bias:
            bias = rows.per_example_sum(g_o, batch)
            sq += tf.reduce_sum(tf.square(bias), 1)
        return sq, (v, pointwise, g, bias)

    def clipped_sums(self, layer, recorded, grads, factors, state):
        v, pointwise, g, bias = state
        pointwise_sum = matmul.clipped_sum(pointwise, g, factors)
        depthwise_sum = rows.weighted_sum(v, factors, axis=2)
        sums = [
            tf.reshape(depthwise_sum, layer.depthwise_kernel.shape),
            tf.reshape(pointwise_sum, layer.pointwise_kernel.shape),
        ]
        if bias is not None:
            sums.append(rows.weighted_sum(bias, factors))
        return sums
