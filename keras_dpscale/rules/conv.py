"""The rule of `Conv2D` (channels last): a linear layer on image patches.

The rows of a convolution are its input's patches (`ghost_norms.patches`),
one per output position. Besides "per_example" (one batched matmul per
kernel offset, `ghost_norms.per_example_filter_gradient`) and "gram" (the
patches' Gram), the rule has the "input_gram" form: the patches' Gram
summed from the Gram of the input's pixels, which is kh*kw times smaller
(`ghost_norms.input_gram`), on the input shifted by its mean.

Weight-standardized convolutions (`keras_dpscale.layers.WSConv2D`) register
a subclass that says how their kernel is standardized (`kernel_used`).
"""

import math

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import linear
from keras_dpscale.rules import rows


def covered(layer):
    """Whether the convolution rules cover the layer's configuration:
    `padding` "same" or "valid", channels last."""
    return layer.data_format == "channels_last" and layer.padding in (
        "same",
        "valid",
    )


def spatial(layer):
    """`(kernel_size, strides, dilations)` of a convolution layer, each a
    tuple over its spatial axes."""
    return (
        tuple(layer.kernel_size),
        tuple(layer.strides),
        tuple(layer.dilation_rate),
    )


def convolve(layer, op, inputs, kernel, **kwargs):
    """`op` (`ops.conv`, `ops.depthwise_conv`, ...) of `inputs` and
    `kernel` with the layer's strides, padding, dilations and format."""
    return op(
        inputs,
        kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
        **kwargs,
    )


def plain_forward(rule, layer, inputs, op, **kwargs):
    """A `forward` of a convolution without gain: `op` (`ops.
    depthwise_conv`, `ops.conv_transpose`, ...) of the inputs with the
    layer's kernel and geometry, plus its bias; `rule.recorded` of it, or
    None if the layer is not `covered`."""
    if not covered(layer):
        return None
    z = convolve(layer, op, inputs, layer.kernel, **kwargs)
    o = z
    if layer.use_bias:
        o = ops.add(z, ops.cast(layer.bias, z.dtype))
    return rule.recorded(layer, linear.Saved(inputs, z), o)


@rules.register_rule(keras.layers.Conv2D)
class ConvRule(linear.LinearRule):
    """`o = conv(x, U) * gain + bias`, then the activation."""

    def kernel_used(self, layer):
        """`(standardization, gain)` of the kernel U that the layer uses
        (`linear.Saved`); `(None, None)`: U is the kernel variable."""
        return None, None

    def forward(self, layer, inputs):
        if not covered(layer):
            return None
        standardization, gain = self.kernel_used(layer)
        if standardization is None:
            kernel = layer.kernel
        else:
            kernel = ops.cast(standardization[0], inputs.dtype)
        z = o = keras.layers.Conv2D.convolution_op(layer, inputs, kernel)
        if gain is not None:
            o = z * ops.cast(gain, z.dtype)
        if layer.use_bias:
            o = o + ops.cast(layer.bias, o.dtype)
        saved = linear.Saved(inputs, z, standardization, gain)
        return self.recorded(layer, saved, o)

    def geometry(self, layer, saved, padded=False):
        """The convolution's geometry (`ghost_norms`), on its input, or on
        its input already padded ("VALID"); its output size is that of the
        last two spatial axes (`Conv3DRule` convolves depth slices)."""
        kernel_size, strides, dilations = self.spatial(layer)
        return dict(
            kernel_size=kernel_size,
            strides=strides,
            padding="VALID" if padded else layer.padding.upper(),
            dilations=dilations,
            out_size=tuple(saved.z.shape[-3:-1]),
        )

    def spatial(self, layer):
        """`(kernel_size, strides, dilations)` of the layer seen as a 2D
        convolution (`Conv1DRule` sees a 1D one as one of height 1)."""
        return spatial(layer)

    def z32(self, layer, saved, x):
        if saved.z.dtype == tf.float32:
            return saved.z
        # Rounded to a lower precision by the forward pass: recomputed.
        unit = saved.standardization[0]
        return keras.layers.Conv2D.convolution_op(layer, x, unit)

    def form(self, layer, saved, g_lin, batch):
        (kh, kw), _, _ = self.spatial(layer)
        c_in, d = layer.kernel.shape[-2:]
        num_rows, height, width, _ = saved.x.shape
        _, out_h, out_w, _ = g_lin.shape
        views = num_rows // batch
        if layer.groups != 1:
            return "per_example"
        in_positions = views * ghost_norms.padded_positions(
            height, width, **self.geometry(layer, saved)
        )
        n = views * out_h * out_w
        return ghost_norms.cheapest(
            ghost_norms.conv_costs(
                n, kh * kw * c_in, d, in_positions, c_in, kh * kw
            )
        )

    def patch_rows(self, layer, saved, x, batch):
        patches = ghost_norms.patches(x, **self.geometry(layer, saved))
        return rows.rows(patches, batch)

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        conv = self.geometry(layer, saved)
        del conv["out_size"]
        views = x.shape[0] // batch
        # [kh, kw, B, C_in, O]: example i's gradient is [:, :, i].
        v = ghost_norms.per_example_filter_gradient(
            tf.reshape(x, [batch, views, *x.shape[1:]]),
            tf.reshape(g_lin, [batch, views, *g_lin.shape[1:]]),
            groups=layer.groups,
            **conv,
        )
        return v, 2

    def input_gram_sq_norms(self, layer, saved, x, g, batch):
        """The patches' Gram from the pixels of the padded input, shifted by
        its mean (`ghost_norms.shift`), kept for the clipped sum."""
        padded = ghost_norms.pad(x, **self.geometry(layer, saved))
        shifted, shift = ghost_norms.shift(padded)
        fan_in = math.prod(layer.kernel.shape[:-1])
        shifted_sums = self._patch_sums(layer, saved, shifted, batch)
        # The patches' own sums: their shifted sums and p times the shift.
        positions = math.prod(saved.z.shape[1:3])
        shift_rows = tf.reshape(tf.repeat(shift, positions), [batch, -1])
        sums = shifted_sums + fan_in * shift_rows
        a_gram = ghost_norms.input_gram(
            shifted, batch, **self.geometry(layer, saved, padded=True)
        )
        centred_rows_sq = tf.linalg.diag_part(a_gram) - (
            tf.square(shifted_sums) / fan_in
        )
        return (
            ghost_norms.centred_sq_norms(a_gram, shifted_sums, g, fan_in),
            sums,
            ghost_norms.row_norms(centred_rows_sq, sums, fan_in),
            linear.KernelState("input_gram", shifted=shifted, shift=shift),
        )

    def _patch_sums(self, layer, saved, x, batch):
        """Each patch's sum over its entries, `[B, n]`, for the padded
        input `x`: the patches of `x` summed over its channels."""
        channel_sums = tf.reduce_sum(x, -1, keepdims=True)
        patches = ghost_norms.patches(
            channel_sums, **self.geometry(layer, saved, padded=True)
        )
        return tf.reduce_sum(rows.rows(patches, batch), -1)

    def shifted_sum(self, layer, saved, kernel, g_lin, factors, keep):
        """The "input_gram" form's parts: the weight gradient on the shifted
        input with G scaled by c, and the shift's `tau` (per example)."""
        num_rows = g_lin.shape[0]
        x = rows.scale(kernel.shifted, rows.expand(keep, num_rows))
        kernel_size, strides, dilations = self.spatial(layer)
        # The convolution is linear in its kernel: the gradient at zero.
        zero = tf.zeros(kernel_size + tuple(layer.kernel.shape[-2:]))
        with tf.GradientTape() as tape:
            tape.watch(zero)
            z = ops.conv(
                x,
                zero,
                strides=strides,
                padding="valid",
                data_format="channels_last",
                dilation_rate=dilations,
            )
        g = rows.scale(g_lin, rows.expand(factors, num_rows))
        total = tape.gradient(z, zero, output_gradients=g)
        if saved.standardization is not None:
            return total, None
        shift = tf.reshape(kernel.shift, [-1, 1, 1, 1])
        return total, rows.per_example_sum(g_lin * shift, factors.shape[0])
