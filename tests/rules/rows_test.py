"""Row helpers of the rules: ordering without changing values, exact zeros."""

import numpy as np
import tensorflow as tf

from keras_dpscale.rules import rows


def test_waiting_for_g_leaves_values_and_other_rows_alone():
    # `after` only orders work (XLA computes x's transposes and Grams once
    # the output gradient exists); it must not change any finite value, and a
    # non-finite row of g may only touch its own row.
    x = tf.random.normal([4, 3, 3, 2])
    g = tf.random.normal([4, 2, 2, 5]).numpy()
    np.testing.assert_array_equal(rows.after(x, g), x)
    g[1, 0, 0, 0] = np.inf
    out = rows.after(x, tf.constant(g)).numpy()
    assert np.all(np.isnan(out[1]))
    np.testing.assert_array_equal(np.delete(out, 1, 0), np.delete(x, 1, 0))


def test_a_zero_factor_leaves_nothing_of_a_non_finite_example():
    t = np.array([[1.0, 2.0], [np.nan, np.inf], [3.0, -1.0]], "float32")
    factors = np.array([0.5, 0.0, 2.0], "float32")
    np.testing.assert_array_equal(rows.weighted_sum(t, factors), [6.5, -1.0])
    scaled = rows.scale(tf.constant(t), factors).numpy()
    np.testing.assert_array_equal(scaled[1], [0.0, 0.0])
    # Examples along another axis (a conv kernel's per-example gradients).
    np.testing.assert_array_equal(
        rows.weighted_sum(t.T[None], factors, axis=2), [[6.5, -1.0]]
    )


def test_rows_keep_each_examples_views_together():
    t = np.arange(4 * 3 * 2, dtype="float32").reshape(4, 3, 2)  # B=2, K=2
    np.testing.assert_array_equal(
        rows.per_example_sum(t, 2), t.reshape(2, 6, 2).sum(1)
    )
    np.testing.assert_array_equal(
        rows.expand(tf.constant([1.0, 2.0]), 4), [1, 1, 2, 2]
    )
