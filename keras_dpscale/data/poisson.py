"""Poisson sampling: the pipeline that the privacy analysis assumes.

Every logical step, each of the N examples joins the batch independently
with probability q = B/N, so the batch size is Binomial(N, q) with mean B.
For XLA's static shapes the batch is padded to a fixed `max_batch_size` m
rows, with a mask that gives padding rows exactly zero gradient and loss
(`DPModel` reads it from `(x, y, {"dp_mask": mask})`).

Overflow. m is the smallest size with P[Binomial(N, q) > m] <=
`overflow_probability` (default 1e-18). In the rare step that samples more
than m examples, a uniformly random m of them are kept. The privacy
statement accounts for it: this pipeline differs from exact Poisson
sampling with probability at most T * overflow_probability over T steps,
which adds (1 + e^epsilon) times that to delta
(`accounting.truncation_delta`, shown by `privacy_statement()`).

Train with `DPSGD(sampling="poisson", batch_size=B, num_examples=N, ...)`.
The examples are held in memory (CIFAR, Fashion-MNIST); ImageNet-sized
sets need random access from disk, which this pipeline does not do.
"""

import math

import numpy as np
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale.dp_model import MASK
from keras_dpscale.data import augment as augment_lib
from keras_dpscale.data import pipeline


def poisson_dataset(
    images,
    labels,
    batch_size,
    seed,
    steps=None,
    accumulation_steps=1,
    num_views=None,
    augment=augment_lib.random_crop_flip,
    overflow_probability=1e-18,
    mean=0.5,
    std=0.5,
):
    """Poisson-sampled, padded, optionally augmented batches.

    Args:
        images: `[N, H, W, C]` uint8 array.
        labels: `[N]` integer labels.
        batch_size: B, the expected logical batch size (q = B/N).
        seed: the sampling and augmentation seed.
        steps: logical steps (None: forever).
        accumulation_steps: k; each padded logical batch of m rows is cut
            into k physical batches of m/k rows (m is rounded up to a
            multiple of k).
        num_views: K for augmult (`[b, K, H, W, C]` batches), or None.
        augment: the augmentation of `augment.augmult`.
        overflow_probability: the bound on P[a step samples more than m].
        mean, std: normalization.

    Returns:
        A `tf.data.Dataset` of `(x, y, {"dp_mask": mask})` physical batches.
    """
    num_examples = len(labels)
    accounting.check_arguments(batch_size, num_examples)
    rows = accounting.poisson_max_batch_size(
        num_examples, batch_size, overflow_probability
    )
    rows = accumulation_steps * math.ceil(rows / accumulation_steps)
    q = batch_size / num_examples
    images = tf.constant(images)
    labels = tf.constant(np.asarray(labels).astype(np.int64))
    base = tf.constant([seed, 1], tf.int64)

    def sample(step):
        step_seed = tf.random.experimental.stateless_fold_in(base, step)
        include_seed, order_seed, view_seed = tf.unstack(
            tf.random.experimental.stateless_split(step_seed, 3)
        )
        include = tf.random.stateless_uniform([num_examples], include_seed) < q
        chosen = tf.where(include)[:, 0]
        # On overflow keep a uniformly random `rows` of the chosen examples.
        chosen = tf.random.experimental.stateless_shuffle(chosen, order_seed)
        chosen = chosen[:rows]
        count = tf.shape(chosen)[0]
        x = pipeline.normalize(tf.gather(images, chosen), mean, std)
        if num_views is not None:
            x = augment_lib.augmult(x, num_views, view_seed, augment)
        pad = rows - count
        x = tf.concat([x, tf.zeros(tf.concat([[pad], tf.shape(x)[1:]], 0))], 0)
        y = tf.concat([tf.gather(labels, chosen), tf.zeros([pad], tf.int64)], 0)
        mask = tf.concat([tf.ones([count]), tf.zeros([pad])], 0)
        x = tf.ensure_shape(x, [rows] + x.shape[1:].as_list())
        return (
            x,
            tf.ensure_shape(y, [rows]),
            {MASK: tf.ensure_shape(mask, [rows])},
        )

    steps_ds = (
        tf.data.Dataset.range(steps) if steps else tf.data.Dataset.counter()
    )
    ds = steps_ds.map(sample, num_parallel_calls=tf.data.AUTOTUNE)
    if accumulation_steps > 1:
        ds = ds.unbatch().batch(rows // accumulation_steps, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)
