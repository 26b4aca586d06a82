"""Per-example gradients and per-example L2 clipping: the first half of DP-SGD.

The path of one private step is:

1. `per_example_gradients`: one gradient per example, computed with
   `tf.vectorized_map` over the batch (conv filter gradients through
   `pfor_conv`, not a while_loop), optionally in chunks of
   `microbatch_size` examples (chunks trade speed for memory and change
   nothing else).
2. `clip_by_global_norm`: every example's gradient, over all variables
   together, is scaled to L2 norm at most `l2_norm_clip`.
3. `clipped_gradient_sum`: the clipped gradients are summed over the batch.

The noise is added by the optimizer (`keras_dpscale.noise`,
`keras_dpscale.optimizers`), once per logical batch.

Non-finite gradients: an example whose gradient has a NaN or an infinite
entry (or whose squared norm overflows float32) contributes exactly zero to
the sum. Zero has norm 0 <= C, so the sensitivity bound, and with it the
privacy guarantee, still holds, and one bad example cannot turn the model's
weights into NaN. The training loss shown by Keras still reports NaN/Inf if
the loss itself is not finite.
"""

import tensorflow as tf

from keras_dpscale.engines import clip
from keras_dpscale.engines import pfor_conv
from keras_dpscale.engines import separability


def per_example_gradients(loss_fn, variables, inputs, microbatch_size=None):
    """Per-example gradients of `loss_fn` with respect to `variables`.

    Args:
        loss_fn: `loss_fn(example) -> (loss, aux)` for ONE example (no batch
            dimension). `loss` is a scalar; `aux` is any nest of tensors returned
            alongside it (for example the model's prediction).
        variables: list of variables to differentiate with respect to.
        inputs: a nest of tensors whose leading dimension is the batch.
        microbatch_size: if set, examples are processed `microbatch_size` at a
            time; the batch size must be a multiple of it.

    Returns:
        `(grads, losses, aux)`: `grads[i]` has shape `[B] + variables[i].shape`,
        `losses` has shape `[B]`, `aux` is `aux` stacked over the batch.
    """

    pfor_conv.install()  # conv filter gradients without a while_loop

    def one_example(example):
        with tf.GradientTape() as tape:
            loss, aux = separability.call_alone(
                loss_fn, example, "The per-example computation"
            )
        grads = tape.gradient(
            loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return grads, loss, aux

    return clip.map_in_chunks(
        lambda chunk: tf.vectorized_map(one_example, chunk),
        inputs,
        microbatch_size,
        reduce=None,
    )


def global_norms(grads):
    """Per-example L2 norms over all variables: `grads[i]` is `[B, ...]`."""
    squares = [
        tf.reduce_sum(
            tf.reshape(tf.square(tf.cast(g, tf.float32)), [tf.shape(g)[0], -1]),
            axis=1,
        )
        for g in grads
    ]
    return tf.sqrt(tf.add_n(squares))


def clip_by_global_norm(grads, l2_norm_clip, mask=None):
    """Clips each example's gradient (all variables together) to norm <= C.

    Args:
        grads: list of per-example gradients, each `[B, ...]`.
        l2_norm_clip: the clipping norm C > 0.
        mask: optional `[B]` 0/1 weights; rows with 0 (padding of a Poisson
            batch) become exactly zero.

    Returns:
        `(clipped, norms)`: the clipped per-example gradients (same shapes) and
        the per-example norms before clipping.
    """
    norms = global_norms(grads)
    factors = clip.clip_factors(norms, l2_norm_clip)
    if mask is not None:
        factors = factors * tf.cast(mask, factors.dtype)
    clipped = []
    for g in grads:
        f = tf.reshape(
            tf.cast(factors, g.dtype), [-1] + [1] * (g.shape.rank - 1)
        )
        # multiply_no_nan gives exactly 0 where the factor is 0, even for NaN/Inf.
        clipped.append(tf.math.multiply_no_nan(g, f))
    return clipped, norms


def clipped_gradient_sum(
    loss_fn, variables, inputs, l2_norm_clip, microbatch_size=None, mask=None
):
    """Sum over the batch of per-example gradients clipped to norm <= C.

    With `microbatch_size`, per-example gradients exist for one chunk at a time,
    so peak memory is about `microbatch_size * num_params` instead of
    `batch_size * num_params`; the result is the same.

    Args:
        loss_fn: as in `per_example_gradients`.
        variables: list of variables.
        inputs: a nest of batched tensors.
        l2_norm_clip: the clipping norm C.
        microbatch_size: optional chunk size (must divide the batch size).
        mask: optional `[B]` 0/1 weights: rows with 0 contribute nothing.

    Returns:
        `(grad_sum, losses, aux)`: a list with one summed clipped gradient per
        variable (float32), the per-example losses `[B]`, and the stacked `aux`.
    """

    def chunk_sum(chunk):
        examples, chunk_mask = chunk
        grads, losses, aux = per_example_gradients(loss_fn, variables, examples)
        clipped, _ = clip_by_global_norm(grads, l2_norm_clip, chunk_mask)
        return (
            [tf.reduce_sum(tf.cast(g, tf.float32), axis=0) for g in clipped],
            losses,
            aux,
        )

    if mask is None:
        mask = tf.ones(tf.shape(tf.nest.flatten(inputs)[0])[:1])
    return clip.map_in_chunks(
        chunk_sum, (inputs, mask), microbatch_size, reduce="sum"
    )
