"""Vectorized per-example conv filter gradients against single examples."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import pfor_conv


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, strides=1, padding="same"),
        dict(kernel_size=3, strides=2, padding="same"),
        dict(kernel_size=3, strides=2, padding="valid"),
        dict(kernel_size=3, padding="valid", dilation_rate=2),
        dict(kernel_size=3, padding="same", dilation_rate=2),
        dict(kernel_size=1, strides=2),
        dict(kernel_size=(3, 2), strides=(2, 1), padding="same"),
        dict(kernel_size=4, strides=3, padding="same"),
        dict(kernel_size=3, padding="same", groups=3),
        dict(kernel_size=3, strides=2, padding="same", groups=2),
    ],
)
@pytest.mark.parametrize("jit_compile", [True, False])
def test_matches_single_example_gradients(kwargs, jit_compile):
    conv = keras.layers.Conv2D(6, **kwargs)
    x = tf.random.stateless_normal((4, 9, 8, 6), seed=[1, 2])
    conv(x)

    def grad(xi):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(conv(xi[None])))
        return tape.gradient(loss, conv.kernel)

    want = np.stack([grad(x[i]) for i in range(4)])
    pfor_conv.install()
    got = tf.function(
        lambda x: tf.vectorized_map(grad, x), jit_compile=jit_compile
    )(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_install_replaces_the_while_loop_converter():
    pfor_conv.install()
    from tensorflow.python.ops.parallel_for import pfor

    assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is (
        pfor_conv._convert
    )
    pfor_conv.uninstall()
    try:
        assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is (
            pfor_conv._original
        )
    finally:
        pfor_conv.install()
