"""What both clipping engines share: the clip factors and the microbatch loop.

`clip_factors` is the one place where an example's scale `min(1, C / norm)`
is computed. Non-finite gradients: an example whose gradient has a NaN or an
infinite entry (or whose squared norm overflows float32) gets factor 0, so
it contributes exactly zero to the sum. Zero has norm 0 <= C, so the
sensitivity bound, and with it the privacy guarantee, still holds, and one
bad example cannot turn the model's weights into NaN.
"""

import tensorflow as tf


def clip_factors(norms, l2_norm_clip):
    """Scale factors `min(1, C / norm)`; 0 where the norm is not finite."""
    factors = l2_norm_clip / tf.maximum(norms, l2_norm_clip)
    return tf.where(tf.math.is_finite(norms), factors, tf.zeros_like(factors))


def map_in_chunks(fn, inputs, chunk_size, reduce):
    """Applies `fn` to consecutive chunks of the batch and joins the results.

    `fn(chunk) -> (first, losses, aux)`. `losses` and `aux` are concatenated
    over chunks. `first` is summed over chunks when `reduce == "sum"`, and
    concatenated otherwise.
    """
    batch_size = tf.nest.flatten(inputs)[0].shape[0]
    if chunk_size is None or (
        batch_size is not None and chunk_size >= batch_size
    ):
        return fn(inputs)
    if batch_size is None:
        raise ValueError(
            "microbatch_size needs a static batch dimension; batch the dataset "
            "with drop_remainder=True."
        )
    if batch_size % chunk_size:
        raise ValueError(
            f"The batch size {batch_size} is not a multiple of microbatch_size="
            f"{chunk_size}. Choose a microbatch_size that divides it."
        )
    num_chunks = batch_size // chunk_size
    chunked = tf.nest.map_structure(
        lambda t: tf.reshape(t, [num_chunks, chunk_size] + t.shape[1:]), inputs
    )

    def take(i):
        return tf.nest.map_structure(lambda t: t[i], chunked)

    # Trace once on the first chunk to learn the output structure.
    first, losses, aux = fn(take(0))

    def body(i, acc, loss_ta, aux_ta):
        f, l, a = fn(take(i))
        acc = (
            [x + y for x, y in zip(acc, f)]
            if reduce == "sum"
            else [ta.write(i, y) for ta, y in zip(acc, f)]
        )
        loss_ta = loss_ta.write(i, l)
        aux_ta = [ta.write(i, y) for ta, y in zip(aux_ta, tf.nest.flatten(a))]
        return i + 1, acc, loss_ta, aux_ta

    def array_for(t):
        return tf.TensorArray(t.dtype, size=num_chunks, element_shape=t.shape)

    def seeded(t):
        return array_for(t).write(0, t)

    acc0 = list(first) if reduce == "sum" else [seeded(t) for t in first]
    _, acc, loss_ta, aux_ta = tf.while_loop(
        lambda i, *_: i < num_chunks,
        body,
        (
            tf.constant(1),
            acc0,
            seeded(losses),
            [seeded(t) for t in tf.nest.flatten(aux)],
        ),
    )

    def unchunk(ta):
        t = ta.stack()
        return tf.reshape(t, [batch_size] + t.shape[2:])

    if reduce != "sum":
        acc = [unchunk(ta) for ta in acc]
    aux = tf.nest.pack_sequence_as(aux, [unchunk(ta) for ta in aux_ta])
    return acc, unchunk(loss_ta), aux
