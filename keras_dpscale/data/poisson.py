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
`poisson_dataset` holds the examples in memory (CIFAR, Fashion-MNIST);
`poisson_source_dataset` reads each sampled example by index from a
random-access source, such as `tfds.data_source("imagenet2012", ...)` (tfds
datasets prepared in the ArrayRecord format), so ImageNet needs no memory.

Several hosts or replicas (`input_context` of
`strategy.distribute_datasets_from_function`). Every input pipeline draws
the same global sample of the step (the seed is shared) and keeps its share
of the padded logical batch: its replicas' rows of each physical batch.
Together the replicas see exactly the single-host batch, so the accounting
(q = B/N, the padded size m, the overflow bound) is that of one host.
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
    input_context=None,
):
    """Poisson-sampled, padded, optionally augmented batches, from memory.

    Args:
        images: `[N, H, W, C]` uint8 array.
        labels: `[N]` integer labels.
        batch_size: B, the expected logical batch size (q = B/N).
        seed: the sampling and augmentation seed (the same on all hosts).
        steps: logical steps (None: forever).
        accumulation_steps: k; each padded logical batch of m rows is cut
            into k physical batches (m is rounded up to a multiple of k
            times the number of replicas).
        num_views: K for augmult (`[b, K, H, W, C]` batches), or None.
        augment: the augmentation of `augment.augmult`.
        overflow_probability: the bound on P[a step samples more than m].
        mean, std: normalization.
        input_context: a `tf.distribute.InputContext`: yield this input
            pipeline's per-replica batches.

    Returns:
        A `tf.data.Dataset` of `(x, y, {"dp_mask": mask})` physical batches
        (per replica with an `input_context`).
    """
    images = tf.constant(images)
    labels = tf.constant(np.asarray(labels).astype(np.int64))
    sampler = _Sampler(
        len(labels),
        batch_size,
        seed,
        accumulation_steps,
        overflow_probability,
        input_context,
    )

    def fetch(indices, view_seed):
        rows = tf.maximum(indices, 0)
        x = pipeline.normalize(tf.gather(images, rows), mean, std)
        y = tf.gather(labels, rows)
        return _mask_and_augment(x, y, indices, view_seed, num_views, augment)

    return (
        sampler.index_batches(steps)
        .map(fetch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def poisson_source_dataset(
    source,
    batch_size,
    seed,
    preprocess=None,
    steps=None,
    accumulation_steps=1,
    num_views=None,
    augment=augment_lib.random_crop_flip,
    overflow_probability=1e-18,
    input_context=None,
):
    """Poisson-sampled batches read by index from a random-access source.

    Only the sampled examples are read, in parallel, so the dataset can be
    far larger than memory (ImageNet).

    Args:
        source: `len(source)` = N and `source[i]`, the example i: a dict
            with "image" and "label" (`tfds.data_source`) or a pair
            `(image, label)`; images uint8 `[H, W, C]` of any size.
        batch_size: B, the expected logical batch size (q = B/N).
        seed: the sampling and augmentation seed (the same on all hosts).
        preprocess: one uint8 image to a float32 image of a fixed shape
            (e.g. `imagenet.preprocess`); default: `pipeline.normalize`.
        steps, accumulation_steps, num_views, augment, overflow_probability,
            input_context: as `poisson_dataset`.

    Returns:
        A `tf.data.Dataset` of `(x, y, {"dp_mask": mask})` physical batches.
    """
    sampler = _Sampler(
        len(source),
        batch_size,
        seed,
        accumulation_steps,
        overflow_probability,
        input_context,
    )
    preprocess = preprocess or pipeline.normalize

    def read(index):
        example = source[int(index)]
        if isinstance(example, dict):
            example = (example["image"], example["label"])
        image, label = example
        return np.asarray(image, np.uint8), np.int64(label)

    # Padding rows (index -1) get example 0, read once here: any image of
    # the right kind will do, since the mask zeroes them.
    placeholder = read(0)
    channels = placeholder[0].shape[-1]

    def read_or_pad(index):
        return placeholder if index < 0 else read(index)

    def fetch_one(index):
        image, label = tf.numpy_function(
            read_or_pad, [index], (tf.uint8, tf.int64), stateful=False
        )
        image.set_shape([None, None, channels])
        return preprocess(image), tf.reshape(label, []), index

    batches = sampler.index_batches(steps)
    rows = sampler.rows_per_batch
    examples = (
        batches.map(lambda indices, _: indices)
        .unbatch()
        .map(fetch_one, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(rows, drop_remainder=True)
    )
    view_seeds = batches.map(lambda _, view_seed: view_seed)
    return (
        tf.data.Dataset.zip(examples, view_seeds)
        .map(
            lambda e, view_seed: _mask_and_augment(
                *e, view_seed, num_views, augment
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def _mask_and_augment(x, y, indices, view_seed, num_views, augment):
    """Zeroes padding rows (index -1), adds their mask, draws the views."""
    mask = indices >= 0
    x = tf.where(tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1)), x, 0.0)
    if num_views is not None:
        x = augment_lib.augmult(x, num_views, view_seed, augment)
    y = tf.where(mask, y, tf.zeros_like(y))
    return x, y, {MASK: tf.cast(mask, tf.float32)}


class _Sampler:
    """The Poisson sample of each step, padded, shuffled, cut into batches.

    Step t's sample: each of the N examples with probability q, the same on
    every host (stateless, from the shared seed). On overflow a uniformly
    random m of them are kept. The m rows (indices, -1 for padding) are put
    in a random order, so that padding spreads over the physical batches,
    and cut into `accumulation_steps` physical batches of `replicas` equal
    parts; this input pipeline keeps the parts of its own replicas.
    """

    def __init__(
        self,
        num_examples,
        batch_size,
        seed,
        accumulation_steps,
        overflow_probability,
        input_context,
    ):
        accounting.check_arguments(batch_size, num_examples)
        replicas, pipelines, pipeline_id = 1, 1, 0
        if input_context is not None:
            replicas = input_context.num_replicas_in_sync
            pipelines = input_context.num_input_pipelines
            pipeline_id = input_context.input_pipeline_id
        if replicas % pipelines:
            raise ValueError(
                f"{replicas} replicas do not divide among {pipelines} input "
                "pipelines."
            )
        parts = accumulation_steps * replicas
        rows = accounting.poisson_max_batch_size(
            num_examples, batch_size, overflow_probability
        )
        self.num_examples = num_examples
        self.q = batch_size / num_examples
        self.rows = parts * math.ceil(rows / parts)  # m, the padded size
        self.rows_per_batch = self.rows // parts
        self.accumulation_steps = accumulation_steps
        self.replicas = replicas
        local = replicas // pipelines
        self.local = (pipeline_id * local, (pipeline_id + 1) * local)
        self.base = tf.constant([seed, 1], tf.int64)

    def sample(self, step):
        """`([m] indices, -1 for padding; view seed)` of logical step `step`."""
        step_seed = tf.random.experimental.stateless_fold_in(self.base, step)
        include_seed, order_seed, pad_seed, view_seed = tf.unstack(
            tf.random.experimental.stateless_split(step_seed, 4)
        )
        include = (
            tf.random.stateless_uniform([self.num_examples], include_seed)
            < self.q
        )
        chosen = tf.where(include)[:, 0]
        chosen = tf.random.experimental.stateless_shuffle(chosen, order_seed)
        chosen = chosen[: self.rows]
        pad = self.rows - tf.shape(chosen)[0]
        indices = tf.concat([chosen, -tf.ones([pad], tf.int64)], 0)
        indices = tf.random.experimental.stateless_shuffle(indices, pad_seed)
        return tf.ensure_shape(indices, [self.rows]), view_seed

    def index_batches(self, steps):
        """`(indices, view seed)` of this pipeline's batches, in order."""

        def batches(step):
            indices, view_seed = self.sample(step)
            parts = tf.reshape(
                indices,
                [self.accumulation_steps, self.replicas, self.rows_per_batch],
            )
            mine = parts[:, self.local[0] : self.local[1]]
            mine = tf.reshape(mine, [-1, self.rows_per_batch])
            seeds = tf.random.experimental.stateless_split(
                view_seed, self.accumulation_steps * self.replicas
            )
            seeds = tf.reshape(
                seeds, [self.accumulation_steps, self.replicas, 2]
            )
            seeds = tf.reshape(seeds[:, self.local[0] : self.local[1]], [-1, 2])
            return tf.data.Dataset.from_tensor_slices((mine, seeds))

        steps_ds = (
            tf.data.Dataset.range(steps) if steps else tf.data.Dataset.counter()
        )
        return steps_ds.flat_map(batches)
