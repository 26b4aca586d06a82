"""The rule of `Conv3D` (channels last): 2D convolutions of depth slices.

A 3D convolution of `[N, D, H, W, C]` with a kernel `[kd, kh, kw, C, O]`
adds, for each depth offset i of the kernel, the 2D convolution with
`kernel[i]` of the input's depth slices that offset meets: slice `t * sd
+ i * dd` of the depth-padded input for output depth t. Folded into the
rows (an example's depth slices as more rows, like augmult views), each
offset is a `Conv2D` of `[N * D', H, W, C]`, and `ConvRule` runs on its
geometry (`ConvRule.geometry`, in-plane) in two of its forms:

- "per_example": per depth offset, `ghost_norms.
  per_example_filter_gradient` (one batched matmul per in-plane offset, as
  the layer's own filter gradient), stacked `[kd, kh, kw, B, C, O]`;
  grouped convolutions take this form;
- "gram": the patches of the depth offsets, concatenated in the kernel's
  order (`[kd, kh, kw, C]`), as the rows.

"input_gram" is not used (it would need the Gram of 3D pixels).

Covered: `padding` "same" or "valid", channels last. Channels first
returns None from `forward` (the fallback takes it).
"""

import math

import keras
import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.rules import conv
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import rows


@rules.register_rule(keras.layers.Conv3D)
class Conv3DRule(conv.ConvRule):
    """`o = conv3d(x, kernel) + bias`, then the activation."""

    def spatial(self, layer):
        """The in-plane (height, width) geometry of each depth slice's 2D
        convolution."""
        return tuple(t[1:] for t in conv.spatial(layer))

    def form(self, layer, saved, g_lin, batch):
        if layer.groups != 1:
            return "per_example"
        n = g_lin.shape[0] // batch * math.prod(g_lin.shape[1:-1])
        fan_in, d = math.prod(layer.kernel.shape[:-1]), layer.kernel.shape[-1]
        return ghost_norms.cheapest(ghost_norms.matmul_costs(n, fan_in, d))

    def depth_slices(self, layer, saved, x):
        """What each depth offset of the kernel meets: kd tensors `[N, D',
        H, W, C]`, the depth-padded input's slices `t * sd + i * dd`."""
        size, out = x.shape[1], saved.z.shape[1]
        kd, sd, dd = (
            layer.kernel_size[0],
            layer.strides[0],
            layer.dilation_rate[0],
        )
        pads = ghost_norms.conv_padding(size, out, kd, sd, dd, layer.padding)
        x = tf.pad(x, [[0, 0], pads, [0, 0], [0, 0], [0, 0]])
        return [
            x[:, i * dd : i * dd + (out - 1) * sd + 1 : sd] for i in range(kd)
        ]

    def patch_rows(self, layer, saved, x, batch):
        geometry = self.geometry(layer, saved)
        patches = [
            ghost_norms.patches(tf.reshape(s, [-1, *s.shape[2:]]), **geometry)
            for s in self.depth_slices(layer, saved, x)
        ]
        return rows.rows(tf.concat(patches, -1), batch)

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        geometry = self.geometry(layer, saved)
        del geometry["out_size"]
        # An example's rows: its views' depth slices.
        g = tf.reshape(g_lin, [batch, -1, *g_lin.shape[2:]])
        v = [
            ghost_norms.per_example_filter_gradient(
                tf.reshape(s, [batch, -1, *s.shape[2:]]),
                g,
                groups=layer.groups,
                **geometry,
            )
            for s in self.depth_slices(layer, saved, x)
        ]
        return tf.stack(v), 3  # [kd, kh, kw, B, C / groups, O]
