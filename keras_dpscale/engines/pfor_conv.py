"""Vectorized per-example Conv2D filter gradients for `tf.vectorized_map`.

TensorFlow's `pfor` converts `Conv2DBackpropFilter` with per-example inputs
into a `tf.while_loop` over the examples ("Conv2DBackpropFilter uses a
while_loop. Fix that!" in `parallel_for/pfor.py`; tensorflow issue 34496).
On a GroupNorm WRN-16-4 that loop is about 97% of the DP step's time.

`install()` registers a vectorized converter for that op: the filter
gradients of all examples are kh*kw batched matmuls, one per kernel offset
(`ghost_norms.per_example_filter_gradient`, also the conv rule's per-example
form). Cases it does not cover (NCHW, explicit padding, unknown shapes) keep
TensorFlow's own converter.

Importing this module changes nothing: the engines that run
`tf.vectorized_map` over convolutions call `install()` (the vectorized
engine, and the fast engine for the layers it falls back on).
"""

import tensorflow as tf

from keras_dpscale._compat import tf_private
from keras_dpscale.rules.ghost_norms import per_example_filter_gradient

__all__ = ["install", "per_example_filter_gradient", "uninstall"]

_OP = "Conv2DBackpropFilter"
_REGISTRY = tf_private.pfor_converter_registry()
_original = _REGISTRY.get(_OP)  # TensorFlow's own converter


def _convert(pfor_input):
    inputs, inputs_stacked, _ = pfor_input.input(0)
    filter_sizes = tf_private.tensor_util.constant_value(
        pfor_input.unstacked_input(1)
    )
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
    return tf_private.pfor.wrap(tf.transpose(grads, [2, 0, 1, 3, 4]), True)


def install():
    """Makes `tf.vectorized_map` compute conv filter gradients vectorized.

    Idempotent: calling it again changes nothing.
    """
    _REGISTRY[_OP] = _convert


def uninstall():
    """Restores TensorFlow's own converter (for benchmarks and tests)."""
    _REGISTRY[_OP] = _original
