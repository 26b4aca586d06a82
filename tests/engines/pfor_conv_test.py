"""Vectorized per-example conv filter gradients against single examples."""

import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale._compat import tf_private
from keras_dpscale.engines import pfor_conv

REGISTRY = tf_private.pfor._pfor_converter_registry


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


def test_install_replaces_the_while_loop_converter_idempotently():
    pfor_conv.install()
    pfor_conv.install()
    assert REGISTRY["Conv2DBackpropFilter"] is pfor_conv._convert
    pfor_conv.uninstall()
    try:
        assert REGISTRY["Conv2DBackpropFilter"] is pfor_conv._original
        assert pfor_conv._original is not pfor_conv._convert
    finally:
        pfor_conv.install()


def test_importing_changes_nothing():
    code = (
        "from tensorflow.python.ops.parallel_for import pfor\n"
        "registry = pfor._pfor_converter_registry\n"
        "before = registry['Conv2DBackpropFilter']\n"
        "import keras_dpscale.engines.pfor_conv\n"
        "import keras_dpscale.engines.fast\n"
        "assert registry['Conv2DBackpropFilter'] is before\n"
    )
    root = pathlib.Path(__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
