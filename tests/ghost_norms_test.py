"""Per-example norms without per-example gradients, against direct sums."""

import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import ghost_norms


def direct_sq_norms(a, g):
    return np.array([np.sum((ai.T @ gi) ** 2) for ai, gi in zip(a, g)])


@pytest.mark.parametrize("n", [1, 5])
def test_gram_and_per_example_forms_equal_direct_norms(n):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, n, 4)).astype("float32")
    g = rng.normal(size=(3, n, 6)).astype("float32")
    expected = direct_sq_norms(a, g)
    gram = ghost_norms.gram(a)
    np.testing.assert_allclose(
        ghost_norms.gram_sq_norms(gram, g), expected, 1e-5
    )
    per_example = np.sum(ghost_norms.outer(a, g).numpy() ** 2, axis=(1, 2))
    np.testing.assert_allclose(per_example, expected, 1e-5)
    np.testing.assert_allclose(
        ghost_norms.matmul_sq_norms(a, g), expected, 1e-5
    )


def test_the_cheapest_form_is_chosen():
    def conv(size, c_in, d, out=None):  # 3x3 'same' convolution
        out = out or size
        costs = ghost_norms.conv_costs(
            out * out, 9 * c_in, d, (size + 2) ** 2, c_in, 9
        )
        return ghost_norms.cheapest(costs)

    cheapest = ghost_norms.cheapest
    assert cheapest(ghost_norms.matmul_costs(1, 10, 10)) == "gram"  # one row
    assert cheapest(ghost_norms.matmul_costs(64, 10, 10)) == "per_example"
    # WRN-16-4 on 32x32: per-example at 32x32, input Gram at 16x16 and 8x8.
    assert conv(32, 64, 64) == "per_example"
    assert conv(16, 128, 128) == "input_gram"
    assert conv(8, 256, 256) == "input_gram"
    # A 1x1 convolution with stride 2 reads a quarter of its input.
    costs = ghost_norms.conv_costs(64, 128, 256, 256, 128, 1)
    assert cheapest(costs) == "gram"


# Input size, kernel, strides, padding, dilations.
CONVS = pytest.mark.parametrize(
    "size, kernel, strides, padding, dilations",
    [
        (7, (3, 3), (1, 1), "SAME", (1, 1)),
        (7, (3, 3), (2, 2), "SAME", (1, 1)),
        (8, (3, 3), (2, 2), "SAME", (1, 1)),
        (7, (3, 2), (1, 2), "VALID", (1, 1)),
        (9, (3, 3), (1, 1), "SAME", (2, 2)),
        (6, (1, 1), (2, 2), "VALID", (1, 1)),
    ],
)


@CONVS
def test_patches_times_kernel_is_the_convolution(
    size, kernel, strides, padding, dilations
):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    w = rng.normal(size=(*kernel, 3, 4)).astype("float32")
    conv = tf.nn.conv2d(x, w, strides, padding, dilations=dilations)
    patches = ghost_norms.patches(
        x, kernel, strides, padding, dilations, tuple(conv.shape[1:3])
    )
    np.testing.assert_allclose(
        patches @ w.reshape(-1, 4), conv, rtol=1e-4, atol=1e-4
    )


@CONVS
@pytest.mark.parametrize("views", [1, 2])
def test_input_gram_is_the_patches_gram(
    size, kernel, strides, padding, dilations, views
):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3 * views, size, size, 4)).astype("float32")
    out = tf.nn.conv2d(
        x,
        np.zeros((*kernel, 4, 1), "float32"),
        strides,
        padding,
        dilations=dilations,
    ).shape[1:3]
    conv = dict(
        kernel_size=kernel,
        strides=strides,
        padding=padding,
        dilations=dilations,
        out_size=tuple(out),
    )
    a = tf.reshape(ghost_norms.patches(x, **conv), [3, -1, np.prod(kernel) * 4])
    np.testing.assert_allclose(
        ghost_norms.input_gram(x, 3, **conv),
        ghost_norms.gram(a),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("layer_class", ["WSConv2D", "ScaledWSConv2D"])
def test_weight_standardized_norms_equal_autodiff(layer_class):
    layer = getattr(kd.layers, layer_class)(5, 3)
    layer.build((None, 6, 6, 4))
    kernel = np.random.default_rng(2).normal(size=(3, 3, 4, 5))
    if layer_class == "ScaledWSConv2D":
        kernel[..., 0] = 0.3 + 1e-5 * kernel[..., 0]  # N var < epsilon
    layer.kernel.assign(kernel.astype("float32"))
    rng = np.random.default_rng(3)
    v = rng.normal(size=(4, 3, 3, 4, 5)).astype("float32")  # d loss / d U
    expected = []
    for vi in v:
        with tf.GradientTape() as tape:
            unit = layer.standardization(layer.kernel)[0]
        grad = tape.gradient(unit, layer.kernel, output_gradients=vi)
        expected.append(np.sum(grad.numpy() ** 2))
    unit, inv_std, dlog, var = (
        tf.reshape(t, [-1]) if i else t
        for i, t in enumerate(layer.standardization(layer.kernel))
    )
    flat = v.reshape(4, -1, 5)
    actual = ghost_norms.ws_kernel_sq_norms(
        np.sum(flat**2 * inv_std.numpy() ** 2, axis=(1, 2)),
        flat.sum(1),
        np.sum(flat * tf.reshape(unit, [-1, 5]).numpy(), 1),
        inv_std,
        dlog,
        var,
        3 * 3 * 4,
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


def test_embedding_norms_add_up_repeated_ids():
    rng = np.random.default_rng(4)
    ids = np.array([[1, 2, 1, 1], [0, 3, 4, 2]])
    g = rng.normal(size=(2, 4, 3)).astype("float32")
    expected = []
    for i in range(2):
        table = np.zeros((5, 3))
        np.add.at(table, ids[i], g[i])
        expected.append(np.sum(table**2))
    np.testing.assert_allclose(
        ghost_norms.embedding_sq_norms(ids, g), expected, rtol=1e-5
    )
