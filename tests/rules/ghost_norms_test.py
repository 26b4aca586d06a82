"""Per-example norms without per-example gradients, against direct sums,
and the clipping bound through the DP step on adversarial inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale.rules import ghost_norms
from tests.conftest import compile_step


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


def test_centred_norms_add_up_to_the_norms():
    # ||v_o||^2 = ||v_o - mean(v_o)||^2 + (sum v_o)^2 / p, the first term
    # from the centred rows' Gram or from the uncentred rows' Gram.
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(3, 5, 4)) + 2.0).astype("float32")
    g = rng.normal(size=(3, 5, 6)).astype("float32")
    v = np.einsum("bnp,bnd->bpd", a.astype("float64"), g)
    centred = np.sum((v - v.mean(1, keepdims=True)) ** 2, axis=(1, 2))
    sums = a.sum(-1)
    from_centred_rows = ghost_norms.gram_sq_norms(
        ghost_norms.gram(ghost_norms.centred(a, sums)), g
    )
    from_gram = ghost_norms.centred_sq_norms(ghost_norms.gram(a), sums, g, 4)
    np.testing.assert_allclose(from_centred_rows, centred, 1e-5)
    np.testing.assert_allclose(from_gram, centred, 1e-4)
    totals = np.einsum("bn,bnd->bd", sums, g)
    np.testing.assert_allclose(
        ghost_norms.linear_sq_norms(from_centred_rows, totals, 4),
        direct_sq_norms(a, g),
        1e-5,
    )


def test_gram_allowance_bounds_cancellation_and_is_small_otherwise():
    rng = np.random.default_rng(2)
    n, p, d = 16, 27, 4
    g = rng.normal(size=(8, n, d))
    # Rows at large levels orthogonal to every column of g: the levels'
    # terms cancel in `sum_st (a_s . a_t)(g_s . g_t)` and leave rounding.
    levels = []
    for gi in g:
        null = np.linalg.svd(gi.T)[2][d:]
        levels.append(null.T @ rng.normal(size=n - d))
    levels = 1e3 * np.array(levels)[..., None]
    noise = 1e-2 * rng.normal(size=(8, n, p))
    for a in (levels + noise, rng.normal(size=(8, n, p))):
        exact = direct_sq_norms(a, g)  # float64
        a32, g32 = a.astype("float32"), g.astype("float32")
        computed = ghost_norms.gram_sq_norms(ghost_norms.gram(a32), g32)
        assert np.all(computed.numpy() >= exact)
    # Ordinary inputs: raised by less than 1e-5.
    np.testing.assert_allclose(computed, exact, rtol=1e-5)


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
def test_weight_standardized_gradients_and_norms_equal_autodiff(layer_class):
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
        expected.append(
            tape.gradient(unit, layer.kernel, output_gradients=vi).numpy()
        )
    expected = np.array(expected)
    unit, inv_std, dlog, var = (
        tf.reshape(t, [-1]) if i else t
        for i, t in enumerate(layer.standardization(layer.kernel))
    )
    grads = ghost_norms.ws_kernel_gradients(
        v, unit[None], inv_std, dlog, axes=[1, 2, 3]
    )
    np.testing.assert_allclose(grads, expected, rtol=1e-4, atol=1e-5)
    flat = v.reshape(4, -1, 5)
    centred = flat - flat.mean(1, keepdims=True)
    actual = ghost_norms.ws_kernel_sq_norms(
        np.sum(centred**2 * inv_std.numpy() ** 2, axis=(1, 2)),
        np.sum(flat * tf.reshape(unit, [-1, 5]).numpy(), 1),
        inv_std,
        dlog,
        var,
        3 * 3 * 4,
    )
    np.testing.assert_allclose(
        actual, np.sum(expected**2, axis=(1, 2, 3, 4)), rtol=1e-4
    )


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


# ---------------------------------------------------------------------------
# The bound C through the DP step: adding one example to a batch moves the
# clipped sum by at most C, whatever the example.

IMAGE = (8, 8, 3)


def ws_branches():
    """Every weight-standardized convolution ("valid" and "same", strides 1
    and 2) on the image, each with GroupNorm and pooling, one Dense head."""
    i = keras.Input(IMAGE)
    heads = []
    for layer in (kd.layers.WSConv2D, kd.layers.ScaledWSConv2D):
        for padding in ("valid", "same"):
            for strides in (1, 2):
                h = layer(4, 3, strides=strides, padding=padding)(i)
                h = keras.layers.GroupNormalization(2)(h)
                h = keras.layers.Activation("relu")(h)
                heads.append(keras.layers.GlobalAveragePooling2D()(h))
    h = keras.layers.Concatenate()(heads)
    return kd.DPModel(i, keras.layers.Dense(3)(h))


def adversarial_images(rng):
    """Images whose gradients cancel in naive float32 norms."""

    def near_constant():  # uint8, one level of noise, scaled to [-1, 1]
        return (200 + rng.integers(-1, 2, IMAGE)) / 127.5 - 1

    return {
        "ordinary": rng.normal(size=IMAGE),
        "constant": np.full(IMAGE, 0.6),
        "near_constant": near_constant(),
        "offset_30": near_constant() + 30,
        "offset_1e3": 1e3 + rng.normal(size=IMAGE),
        "tiny": 1e-4 * rng.normal(size=IMAGE),
        "huge": 1e3 * rng.normal(size=IMAGE),
    }


def moves_of_the_clipped_sum(model, x, y, clip):
    """`||S(D) - S(D')|| / C` for D' = D without example k, for each k."""
    compile_step(model, clip, clipping="fast", batch_size=len(x))
    step = tf.function(
        lambda x, y, m: model._dp_engine.clipped_gradient_sum(
            model, x, y, m, clip
        )[0],
        jit_compile=True,
    )

    def clipped_sum(mask):
        return [t.numpy().astype("float64") for t in step(x, y, mask)]

    everyone = clipped_sum(np.ones(len(x), "float32"))
    moves = []
    for k in range(len(x)):
        others = clipped_sum(np.float32(np.arange(len(x)) != k))
        moved = sum(np.sum((a - b) ** 2) for a, b in zip(everyone, others))
        moves.append(np.sqrt(moved) / clip)
    return np.array(moves)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("form", ["per_example", "gram", "input_gram"])
def test_one_example_moves_the_clipped_sum_by_at_most_c(
    form, policy, monkeypatch, request
):
    monkeypatch.setattr(
        ghost_norms,
        "cheapest",
        lambda costs: form if form in costs else "per_example",
    )
    if policy == "mixed_bfloat16":
        request.getfixturevalue("mixed_bfloat16")
    model = ws_branches()
    images = adversarial_images(np.random.default_rng(0))
    x = np.stack(list(images.values())).astype("float32")
    y = (np.arange(len(x)) % 3).astype("int32")
    # Every example's gradient norm is far above C: each one is clipped.
    moves = moves_of_the_clipped_sum(model, x, y, clip=1e-3)
    report = ", ".join(f"{k}: {m:.6f} C" for k, m in zip(images, moves))
    assert np.all(moves <= 1 + 1e-4), report
    assert np.all(moves > 0.99), report
