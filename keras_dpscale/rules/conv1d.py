"""The rule of `Conv1D` (channels last): a `Conv2D` of height 1.

A 1D convolution of `[N, L, C]` with a kernel `[k, C, O]` is the 2D
convolution of `[N, 1, L, C]` with the kernel `[1, k, C, O]` (the same
entries): the rule records the input and output with a unit height axis
and `ConvRule` does the rest, in each of its forms ("per_example" for
grouped convolutions). The mixins `HeightOne` and `HeightOneConv` give the
1D layers of other families the rule of their 2D form the same way
(`DepthwiseConv1D`, `SeparableConv1D`, `Conv1DTranspose`).

Covered: `padding` "same" or "valid", channels last. Causal padding and
channels first return None from `forward` (the fallback takes them).
`Conv3D` has its own rule (`rules.conv3d`).
"""

import dataclasses

import keras
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import conv


class HeightOne:
    """Mixin of the rule of a 1D convolution on the rule of its 2D form:
    its geometry with a unit height, and its tensors `[N, L, C]` seen as
    `[N, 1, L, C]` (`planar`)."""

    def spatial(self, layer):
        """`conv.spatial` with a unit height first."""
        return tuple((1, *t) for t in conv.spatial(layer))

    def planar(self, t):
        """`[N, L, C]` as `[N, 1, L, C]`."""
        return ops.expand_dims(t, 1)


class HeightOneConv(HeightOne):
    """`HeightOne` for the rules of `linear.LinearRule`'s family: the 2D
    rule's forward pass records its input, `z` and `o` with a unit height
    axis, and its per-example kernel gradients lose it."""

    def recorded(self, layer, saved, o):
        saved = saved._replace(x=self.planar(saved.x), z=self.planar(saved.z))
        recorded = super().recorded(layer, saved, self.planar(o))
        return dataclasses.replace(
            recorded, outputs=ops.squeeze(recorded.outputs, 1)
        )

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        v, axis = super().per_example_gradients(layer, saved, x, g_lin, batch)
        return v[0], axis - 1  # [k, B, ...]


@rules.register_rule(keras.layers.Conv1D)
class Conv1DRule(HeightOneConv, conv.ConvRule):
    """`o = conv1d(x, kernel) + bias`, then the activation."""
