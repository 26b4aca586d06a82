"""Rows of a batch: per-example sums and clip-factor weighting for rules.

A tensor of the forward pass holds `B * K` rows along axis 0: K rows per
example (augmult views), each example's rows together (`keras_dpscale.rules`).
"""

import tensorflow as tf


def rows(t, batch):
    """`[B*K, ..., d]` -> `[B, K*..., d]`: an example's rows together."""
    return tf.reshape(t, [batch, -1, t.shape[-1]])


def per_example_sum(t, batch):
    """`[B*K, ..., d]` -> `[B, d]`: summed over an example's rows, float32."""
    return tf.reduce_sum(rows(tf.cast(t, tf.float32), batch), axis=1)


def scale(t, factors):
    """Row i of `t` (`[B, ...]`) times `factors[i]`; exactly 0 where it is 0."""
    f = tf.reshape(tf.cast(factors, t.dtype), [-1] + [1] * (t.shape.rank - 1))
    return tf.math.multiply_no_nan(t, f)


def weighted_sum(per_example, factors, axis=0):
    """`sum_i factors[i] * per_example[i]` over the examples' `axis`
    (float32); exactly 0 where a factor is 0."""
    t = tf.cast(per_example, tf.float32)
    shape = [1] * t.shape.rank
    shape[axis] = -1
    f = tf.reshape(tf.cast(factors, t.dtype), shape)
    return tf.reduce_sum(tf.math.multiply_no_nan(t, f), axis)


def expand(factors, num_rows):
    """Per-example factors `[B]` -> per-row `[B*K]`."""
    return tf.repeat(factors, num_rows // factors.shape[0])


def after(x, g):
    """`x`, for XLA computed no earlier than `g` (both `[rows, ...]`).

    XLA schedules work that needs only a layer's input (a transpose, a
    Gram) as soon as the forward pass made it, and then holds the result
    through the whole backward pass. Adding zero times an entry of each
    row's `g` makes the work wait for that row's `g`. A non-finite `g`
    makes its own row's norm non-finite, as it would anyway.
    """
    first = tf.reshape(g, [g.shape[0], -1])[:, :1]
    zero = tf.reshape(
        tf.cast(first, x.dtype) * 0, [-1] + [1] * (x.shape.rank - 1)
    )
    return x + zero
