"""Vectorized per-example Conv2D filter gradients for `tf.vectorized_map`.

TensorFlow's `pfor` converts `Conv2DBackpropFilter` with per-example inputs
into a `tf.while_loop` over the examples ("Conv2DBackpropFilter uses a
while_loop. Fix that!" in `parallel_for/pfor.py`; tensorflow issue 34496).
On a GroupNorm WRN-16-4 that loop is about 97% of the DP step's time.

`install()` registers a vectorized converter for that op: the filter
gradients of all examples are one grouped convolution (one group per
example), about as fast as the non-private filter gradient of the batch.
Grouped convolutions get one such convolution per group. Cases it does
not cover (NCHW, explicit padding, unknown shapes) keep
TensorFlow's own converter.
"""

import tensorflow as tf
from tensorflow.python.framework import tensor_util
from tensorflow.python.ops.parallel_for import pfor

from keras_dpscale import ghost_norms

_OP = "Conv2DBackpropFilter"
_original = pfor._pfor_converter_registry.get(_OP)


def per_example_filter_gradient(
    inputs, out_grads, kernel_size, strides, padding, dilations
):
    """Per-example gradients of a 2D convolution's filter (NHWC).

    The filter gradient `dW[i, j, c, o] = sum_{h, w} x[h*s + i*d, w*s + j*d,
    c] * g[h, w, o]` is itself a convolution: of the padded input (its
    channels as the batch) with the output gradient as the filter, with the
    roles of stride and dilation swapped. One grouped convolution, one group
    per example, computes all examples at once.

    Args:
        inputs: `[N, b, H, W, C_in]`: the convolution's inputs, per example.
        out_grads: `[N, b, H', W', C_out]`: gradients of its outputs.
        kernel_size: `(kh, kw)`.
        strides: `(sh, sw)`.
        padding: "SAME" or "VALID".
        dilations: `(dh, dw)`.

    Returns:
        `[C_in, kh, kw, N, C_out]`: example n's filter gradient (summed over
        its `b` rows) is `[:, :, :, n, :]`, in the layout the convolution
        produces (no transpose of this large tensor).
    """
    _, b, height, width, c_in = inputs.shape
    _, _, out_h, out_w, c_out = out_grads.shape
    # [N, b, H, W, C] -> [C, H, W, N*b]: the input channels become the batch.
    x = ghost_norms.pad(
        tf.reshape(inputs, [-1, height, width, c_in]),
        kernel_size,
        strides,
        padding,
        dilations,
        (out_h, out_w),
    )
    x = tf.transpose(x, [3, 1, 2, 0])
    # [N, b, H', W', O] -> [H', W', 1, N*b*O]: one group per row.
    g = tf.transpose(
        tf.reshape(out_grads, [-1, out_h, out_w, c_out]), [1, 2, 0, 3]
    )
    g = tf.reshape(g, [out_h, out_w, 1, -1])
    grads = tf.nn.conv2d(
        x,
        g,
        strides=list(dilations),
        dilations=list(strides),
        padding="VALID",
    )[:, : kernel_size[0], : kernel_size[1], :]
    grads = tf.reshape(grads, [c_in, *kernel_size, -1, b, c_out])
    return tf.reduce_sum(grads, axis=4)


def grouped_filter_gradient(inputs, out_grads, groups, **conv):
    """`per_example_filter_gradient` of a grouped convolution (NFNets).

    Group g maps input channels `[g*c, (g+1)*c)` to output channels
    `[g*o, (g+1)*o)`; one grouped convolution per group.
    """
    c = inputs.shape[-1] // groups
    o = out_grads.shape[-1] // groups
    return tf.concat(
        [
            per_example_filter_gradient(
                inputs[..., g * c : (g + 1) * c],
                out_grads[..., g * o : (g + 1) * o],
                **conv,
            )
            for g in range(groups)
        ],
        axis=-1,
    )


def _convert(pfor_input):
    inputs, inputs_stacked, _ = pfor_input.input(0)
    filter_sizes = tensor_util.constant_value(pfor_input.unstacked_input(1))
    padding = pfor_input.get_attr("padding")
    padding = padding.decode() if isinstance(padding, bytes) else padding
    data_format = pfor_input.get_attr("data_format")
    data_format = (
        data_format.decode() if isinstance(data_format, bytes) else data_format
    )
    if (
        not inputs_stacked
        or filter_sizes is None
        or not inputs.shape[1:].is_fully_defined()
        or padding not in ("SAME", "VALID")
        or data_format != "NHWC"
    ):
        return _original(pfor_input)
    pfor_input.stack_inputs(stack_indices=[2])
    out_grads = pfor_input.stacked_input(2)
    strides = pfor_input.get_attr("strides")
    dilations = pfor_input.get_attr("dilations")
    conv = dict(
        kernel_size=tuple(int(s) for s in filter_sizes[:2]),
        strides=tuple(strides[1:3]),
        padding=padding,
        dilations=tuple(dilations[1:3]),
    )
    groups = inputs.shape[-1] // int(filter_sizes[2])
    grads = grouped_filter_gradient(inputs, out_grads, groups, **conv)
    return pfor.wrap(tf.transpose(grads, [3, 1, 2, 0, 4]), True)


def install():
    """Makes `tf.vectorized_map` compute conv filter gradients vectorized."""
    pfor._pfor_converter_registry[_OP] = _convert


def uninstall():
    """Restores TensorFlow's own converter (for benchmarks and tests)."""
    pfor._pfor_converter_registry[_OP] = _original
