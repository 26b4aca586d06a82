"""Gaussian noise for DP-SGD: one draw per logical batch.

The optimizer calls `add_gaussian_noise` once per logical batch, on the sum
of clipped per-example gradients (after accumulation over physical batches),
with standard deviation `noise_multiplier * l2_norm_clip`. With several
replicas, only the first adds it (the others add zero) before the update
sums the replicas' gradients: one draw per logical batch.

Seeds. The noise of logical step `t` is a function of `(noise_seed, t)`:
`step_seed(noise_seed, t)`. A user-given `noise_seed` makes runs
reproducible (tests); it must never be published with a model, because who
knows the seed knows the noise. Without one, the optimizer draws a fresh
seed from the operating system's entropy in every process, and never
stores it.
"""

import secrets

import tensorflow as tf


def fresh_seed():
    """A seed from the operating system's entropy source (not reproducible)."""
    return secrets.randbits(62)


def step_seed(noise_seed, step):
    """The `[2]` int64 stateless-RNG seed of logical step `step`."""
    base = tf.constant([noise_seed >> 31, noise_seed & 0x7FFFFFFF], tf.int64)
    return tf.random.experimental.stateless_fold_in(
        base, tf.cast(step, tf.int64)
    )


def add_gaussian_noise(grads, stddev, seed):
    """Adds independent N(0, stddev^2) noise to every entry of `grads`.

    Args:
        grads: list of float tensors (the clipped gradient sum).
        stddev: the noise standard deviation, `noise_multiplier * C`.
        seed: `[2]` int64 stateless-RNG seed, one per logical step.

    Returns:
        The noisy gradients, in float32, one per input.
    """
    # One draw for all entries, split: one random-number kernel for XLA to
    # compile instead of one per variable.
    sizes = [g.shape.num_elements() for g in grads]
    draw = tf.random.stateless_normal(
        [sum(sizes)], seed=seed, stddev=stddev, dtype=tf.float32
    )
    return [
        tf.cast(g, tf.float32) + tf.reshape(z, g.shape)
        for g, z in zip(grads, tf.split(draw, sizes))
    ]
