"""Kernel norms and clipped sums of a plain matmul on rows, per group.

Example i's gradient of a kernel `[q, p, d]` used as q independent matmuls
`o_q = a_q @ W_q` on its rows (`a` `[B, q, n, p]`, n rows per example and
group, output gradient `g` `[B, q, n, d]`) is `v_iq = a_iq^T g_iq`. A
`Dense` kernel is one group (q = 1); an `EinsumDense` kernel has a group
per index that the input, the kernel and the output share (attention
heads, for example).

The norms take the cheaper of two exact forms (`ghost_norms.cheapest` on
`ghost_norms.matmul_costs`), as `rules.linear` does for `Dense`:

- "per_example": `v_iq` formed in float32, normed, and weighted into the
  clipped sum (which adds exactly the tensors normed);
- "gram": the centred rows' Gram (`ghost_norms.centred`,
  `ghost_norms.gram_sq_norms`, with its rounding allowance) and each output
  channel's total over its fan-in (`ghost_norms.linear_sq_norms`); the
  clipped sum adds the centred rows' `a^T g` and the totals spread over
  the fan-in, which is `a^T g` again.

Everything is computed in float32.
"""

from typing import Any
from typing import NamedTuple

import tensorflow as tf

from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import rows


class State(NamedTuple):
    """What the norm formed, for the clipped sum.

    Attributes:
        form: "per_example" or "gram".
        per_example: "per_example": `v`, `[B, q, p, d]`.
        centred: "gram": the centred rows, `[B, q, n, p]`.
        totals: "gram": each output channel's total over its fan-in,
            `[B, q, d]`.
    """

    form: str
    per_example: Any = None
    centred: Any = None
    totals: Any = None


def sq_norms(a, g):
    """Each example's squared norm of its kernel gradient, summed over the
    groups.

    Args:
        a: `[B, q, n, p]`: the rows of each example and group.
        g: `[B, q, n, d]`: the gradient of the outputs of those rows.

    Returns:
        `(sq_norms, state)`: `[B]` float32, and the `State` for
        `clipped_sum`.
    """
    a = tf.cast(a, tf.float32)
    g = tf.cast(g, tf.float32)
    batch, groups, n, p = a.shape
    d = g.shape[-1]
    form = ghost_norms.cheapest(ghost_norms.matmul_costs(n, p, d))
    if form == "per_example":
        v = tf.einsum("bqnp,bqnd->bqpd", a, g)
        return tf.reduce_sum(tf.square(v), [1, 2, 3]), State(form, v)
    sums = tf.reduce_sum(a, -1)
    # Kept: the clipped sum adds the very rows normed here.
    centred = ghost_norms.centred(a, sums)
    flat = [batch * groups, n]
    a_gram = ghost_norms.gram(tf.reshape(centred, flat + [p]))
    centred_sq = ghost_norms.gram_sq_norms(a_gram, tf.reshape(g, flat + [d]))
    totals = tf.einsum("bqn,bqnd->bqd", sums, g)
    sq = ghost_norms.linear_sq_norms(
        centred_sq, tf.reshape(totals, [batch * groups, d]), p
    )
    state = State(form, centred=centred, totals=totals)
    return tf.reduce_sum(tf.reshape(sq, [batch, groups]), 1), state


def clipped_sum(state, g, factors):
    """`sum_i factors[i] * v_i`: `[q, p, d]` float32.

    Args:
        state: what `sq_norms` returned.
        g: `[B, q, n, d]`, as given to `sq_norms`.
        factors: `[B]` clip factors; a factor of 0 adds nothing, even
            where its example's gradient is not finite.
    """
    if state.form == "per_example":
        return rows.weighted_sum(state.per_example, factors)
    keep = tf.cast(factors > 0, tf.float32)  # 0 * a non-finite row: 0
    scaled = rows.scale(tf.cast(g, tf.float32), factors)
    total = tf.einsum("bqnp,bqnd->qpd", rows.scale(state.centred, keep), scaled)
    p = state.centred.shape[-1]
    removed = rows.weighted_sum(state.totals / p, factors)  # [q, d]
    return total + removed[:, None, :]
