"""Shuffled-batch training pipeline, evaluation pipeline, normalization.

`shuffled_dataset` yields `(views [b, K, H, W, C] float32, labels [b])` with K
augmented views per example (or `[b, H, W, C]` without augmult), from
shuffled fixed-size batches. Each pass over the data holds every example
once (shuffle, then repeat, then batch), so the dataset is marked
`sampling.Sampling("shuffle")`: epsilon counts one release per pass, with no
amplification by sampling (calibrate with `DPSGD(sampling="shuffle")`).
Deterministic under `seed`; `input_context` (from
`strategy.distribute_datasets_from_function`) shards the examples per host
and gives each replica its share of the batch.
"""

import tensorflow as tf

from keras_dpscale import sampling as sampling_lib
from keras_dpscale.data import augment as augment_lib


def normalize(images, mean=0.5, std=0.5):
    """uint8 `[0, 255]` images to float32 `(x / 255 - mean) / std`.

    Float inputs are taken as the model's inputs already (features computed
    once by a fixed map, `experiment.featurize`): returned as float32,
    unchanged (`mean` and `std` do not apply). Other dtypes are refused.
    """
    if images.dtype != tf.uint8:
        if not images.dtype.is_floating:
            raise ValueError(
                f"normalize takes uint8 images or float features, got "
                f"{images.dtype.name}."
            )
        return tf.cast(images, tf.float32)
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def shuffled_dataset(
    examples,
    batch_size,
    num_views=None,
    seed=0,
    augment=augment_lib.random_crop_flip,
    input_context=None,
    mean=0.5,
    std=0.5,
    shuffle_buffer=50_000,
    preprocess=None,
    accumulation_steps=1,
):
    """Shuffled, batched, augmented training data (repeats forever).

    Args:
        examples: a `tf.data.Dataset` of `(uint8 image, label)` (`load`),
            or of float features (`experiment.featurize`), taken as they are.
        batch_size: global physical batch size.
        num_views: K for augmentation multiplicity; None: one unaugmented
            view and `[b, H, W, C]` batches.
        seed: the seed of the shuffle and of the augmentations.
        augment: the augmentation of `augmult.augmult`.
        input_context: a `tf.distribute.InputContext`, or None.
        mean, std: normalization.
        shuffle_buffer: examples in the shuffle buffer.
        preprocess: `preprocess(uint8 image) -> float32 image` for each
            example before batching (images of different sizes, e.g.
            `imagenet.preprocess`); replaces the normalization.
        accumulation_steps: k physical batches per logical batch: a
            logical batch is drawn from one pass over the data.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` with static shapes. Each
        logical batch holds distinct examples of one pass (the sensitivity
        that "shuffle" sampling is accounted for with).
    """
    if input_context is not None:
        examples = examples.shard(
            input_context.num_input_pipelines, input_context.input_pipeline_id
        )
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = examples.shuffle(
        shuffle_buffer, seed=seed, reshuffle_each_iteration=True
    )
    # Batched within each pass, then repeated: a batch that spanned two
    # passes could hold an example twice.
    ds = _preprocessed(ds, preprocess)
    ds = ds.batch(batch_size * accumulation_steps, drop_remainder=True)
    ds = ds.repeat()
    if accumulation_steps > 1:
        ds = ds.unbatch().batch(batch_size, drop_remainder=True)
    ds = ds.enumerate()

    def prepare(step, batch):
        images, labels = batch
        if preprocess is None:
            images = normalize(images, mean, std)
        if num_views is not None:
            step_seed = tf.random.experimental.stateless_fold_in(
                tf.constant([seed, 0], tf.int64), step
            )
            images = augment_lib.augmult(images, num_views, step_seed, augment)
        return images, labels

    return sampling_lib.attach(
        ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
            tf.data.AUTOTUNE
        ),
        sampling_lib.Sampling("shuffle", accumulation_steps=accumulation_steps),
    )


def _preprocessed(examples, preprocess):
    if preprocess is None:
        return examples
    return examples.map(
        lambda x, y: (preprocess(x), y), num_parallel_calls=tf.data.AUTOTUNE
    )


def eval_dataset(examples, batch_size, mean=0.5, std=0.5, preprocess=None):
    """Normalized (or `preprocess`ed) evaluation batches, in order.

    The last batch may be smaller.
    """
    if preprocess is not None:
        return (
            _preprocessed(examples, preprocess)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    return (
        examples.batch(batch_size)
        .map(lambda x, y: (normalize(x, mean, std), y), tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
