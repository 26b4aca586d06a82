"""The rules of `DepthwiseConv1D` and `SeparableConv1D` (channels last):
their 2D rules on height 1.

As `Conv1D` is a `Conv2D` of height 1 (`rules.conv1d`), a 1D depthwise
kernel `[k, C, M]` is the 2D one `[1, k, C, M]` on the input `[N, 1, L,
C]`: the rules of `DepthwiseConv2D` (`rules.depthwise`: per-example filter
gradients) and `SeparableConv2D` (`rules.separable`: depthwise per-example,
pointwise per-example or Gram) run on the 1D layers' tensors with a unit
height axis (`conv1d.HeightOne`).

Covered: `padding` "same" or "valid" (the layers have no other), channels
last. Channels first returns None from `forward` (the fallback takes it).
"""

import keras

from keras_dpscale import rules
from keras_dpscale.rules import conv1d
from keras_dpscale.rules import depthwise
from keras_dpscale.rules import separable


@rules.register_rule(keras.layers.DepthwiseConv1D)
class DepthwiseConv1DRule(conv1d.HeightOneConv, depthwise.DepthwiseConvRule):
    """`o = depthwise_conv1d(x, kernel) + bias`, then the activation."""


@rules.register_rule(keras.layers.SeparableConv1D)
class SeparableConv1DRule(conv1d.HeightOne, separable.SeparableConvRule):
    """`o = conv1d(depthwise_conv1d(x, depthwise), pointwise) + bias`, then
    the activation."""
