"""Vectorized per-example Conv2D filter gradients for `tf.vectorized_map`.

TensorFlow's `pfor` converts `Conv2DBackpropFilter` with per-example inputs
into a `tf.while_loop` over the examples ("Conv2DBackpropFilter uses a
while_loop. Fix that!" in `parallel_for/pfor.py`; tensorflow issue 34496).
On a GroupNorm WRN-16-4 that loop is about 97% of the DP step's time.

`install()` registers a vectorized converter for that op: the filter
gradients of all examples are kh*kw batched matmuls, one per kernel offset
(`per_example_filter_gradient`, also the fast engine's per-example form).
Cases it does not cover (NCHW, explicit padding, unknown shapes) keep
TensorFlow's own converter.
"""

import tensorflow as tf
from tensorflow.python.framework import tensor_util
from tensorflow.python.ops.parallel_for import pfor

from keras_dpscale import ghost_norms

_OP = "Conv2DBackpropFilter"
_original = pfor._pfor_converter_registry.get(_OP)


def per_example_filter_gradient(
    inputs, out_grads, kernel_size, strides, padding, dilations, groups=1
):
    """Per-example gradients of a 2D convolution's filter (NHWC).

    The filter gradient at kernel offset k, `dW[k, c, o] = sum_s x[s*stride +
    k*dilation, c] g[s, o]`, is a matmul of the input window that offset k
    sees with the output gradient; one matmul per offset, batched over the
    examples (and the groups of a grouped convolution), gives all examples'
    gradients at that offset.

    The offsets run in a loop (`tf.map_fn`), so that one window exists at a
    time: unrolled, XLA slices all kh*kw windows (each as large as the
    output gradient) before the first matmul and holds them together.

    Args:
        inputs: `[N, b, H, W, C_in]`: the convolution's inputs, per example.
        out_grads: `[N, b, H', W', C_out]`: gradients of its outputs.
        kernel_size: `(kh, kw)`.
        strides: `(sh, sw)`.
        padding: "SAME" or "VALID".
        dilations: `(dh, dw)`.
        groups: the convolution's groups: group j maps input channels
            `[j*c, (j+1)*c)` to output channels `[j*o, (j+1)*o)`.

    Returns:
        `[kh, kw, N, C_in / groups, C_out]`: example n's filter gradient
        (summed over its `b` rows) is `[:, :, n]`.
    """
    n, b, height, width, c_in = inputs.shape
    _, _, out_h, out_w, c_out = out_grads.shape
    c, o = c_in // groups, c_out // groups
    x = ghost_norms.pad(
        tf.reshape(inputs, [-1, height, width, c_in]),
        kernel_size,
        strides,
        padding,
        dilations,
        (out_h, out_w),
    )
    rows = b * out_h * out_w  # per example
    batch = -1 if n is None else n  # unknown in a partial last batch
    g = tf.reshape(out_grads, [batch, rows, groups, o])
    (sh, sw), (dh, dw) = strides, dilations
    extent = [x.shape[0] or -1, (out_h - 1) * sh + 1, (out_w - 1) * sw + 1]
    extent += [c_in]
    starts = tf.constant(
        [
            [0, i * dh, j * dw, 0]
            for i in range(kernel_size[0])
            for j in range(kernel_size[1])
        ],
        tf.int32,
    )

    def offset_gradient(k):
        window = tf.slice(x, starts[k], extent)[:, ::sh, ::sw, :]
        window = tf.reshape(window, [batch, rows, groups, c])
        return tf.einsum("bngc,bngo->bcgo", window, g)

    grads = tf.map_fn(
        offset_gradient,
        tf.range(kernel_size[0] * kernel_size[1]),
        fn_output_signature=tf.TensorSpec([n, c, groups, o], x.dtype),
    )
    return tf.reshape(grads, [*kernel_size, batch, c, c_out])


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
    grads = per_example_filter_gradient(
        inputs, out_grads, groups=groups, **conv
    )
    return pfor.wrap(tf.transpose(grads, [2, 0, 1, 3, 4]), True)


def install():
    """Makes `tf.vectorized_map` compute conv filter gradients vectorized."""
    pfor._pfor_converter_registry[_OP] = _convert


def uninstall():
    """Restores TensorFlow's own converter (for benchmarks and tests)."""
    pfor._pfor_converter_registry[_OP] = _original
