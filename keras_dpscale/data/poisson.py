"""Poisson sampling: the pipeline that the privacy analysis assumes.

Every logical step, each of the N examples joins the batch independently
with probability q = B/N, so the batch size is Binomial(N, q) with mean B.
For XLA's static shapes the batch is padded to a fixed `max_batch_size` m
rows, with a mask that gives padding rows exactly zero gradient and loss
(`DPModel` reads it from `(x, y, {"dp_mask": mask})`).

The sample is secret and fresh. Amplification by sampling holds only if
nobody can tell which steps hold an example, so the sample is drawn from
the operating system's entropy (`secrets`) when the dataset is iterated,
afresh for every iteration (a second `fit`, another epoch over the same
stream, a resumed run): it is never derived from the public `seed`, never
written anywhere, and never replayed. `seed` governs the augmentations
only. `public_sampling_seed=` gives a reproducible sample for tests; the
dataset is then marked as sampled from a public seed, and the privacy
statement drops amplification and says so.

Overflow. m is the smallest size with P[Binomial(N, q) > m] <=
`overflow_probability` (default 1e-18). In the rare step that samples more
than m examples, a uniformly random m of them are kept. The privacy
statement accounts for it: this pipeline differs from exact Poisson
sampling with probability at most T * overflow_probability over T steps,
which adds (1 + e^epsilon) times that to delta
(`accounting.truncation_delta`, shown by `privacy_statement()`).

`poisson_dataset` holds images in memory (CIFAR, Fashion-MNIST),
`arrays_dataset` any arrays (what `DPModel.fit` uses on arrays), and
`poisson_source_dataset` reads each sampled example by index from a
random-access source, such as `tfds.data_source("imagenet2012", ...)`
(tfds datasets prepared in the ArrayRecord format), so ImageNet needs no
memory. Each returned dataset carries its `sampling.Sampling`.

Several hosts or replicas (`input_context` of
`strategy.distribute_datasets_from_function`). Input pipeline p owns the
examples i with i mod P = p and samples them itself, each with probability
q, from its own secret entropy: the union of the pipelines' samples is a
Poisson sample of the whole dataset, and no secret needs to be shared. Each
pipeline pads its sample to the same m_p rows (m_p from the largest shard,
with overflow probability at most `overflow_probability / P`, so the step's
total is at most `overflow_probability`) and cuts it among its replicas and
accumulation steps.
"""

import logging
import math
import secrets

import numpy as np
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale import sampling as sampling_lib
from keras_dpscale.data import augment as augment_lib
from keras_dpscale.data import pipeline

_log = logging.getLogger("keras_dpscale")


def arrays_dataset(
    x,
    y,
    batch_size,
    steps=None,
    accumulation_steps=1,
    overflow_probability=1e-18,
    input_context=None,
    public_sampling_seed=None,
):
    """Poisson-sampled, padded batches of in-memory arrays.

    Args:
        x: an array `[N, ...]` or a nest of them (the model's inputs).
        y: `[N, ...]` targets, or None.
        batch_size: B, the expected logical batch size (q = B/N).
        steps: logical steps (None: forever).
        accumulation_steps, overflow_probability, input_context,
            public_sampling_seed: as `poisson_dataset`.

    Returns:
        A `tf.data.Dataset` of `(x, y, {"dp_mask": mask})` physical batches;
        padding rows are zeros.
    """
    x = tf.nest.map_structure(tf.constant, x)
    y = None if y is None else tf.nest.map_structure(tf.constant, y)
    num_examples = int(tf.nest.flatten(x)[0].shape[0])
    sampler = _Sampler(
        num_examples,
        batch_size,
        accumulation_steps,
        overflow_probability,
        input_context,
        public_sampling_seed,
    )

    def fetch(indices, _):
        mask = indices >= 0
        rows = tf.maximum(indices, 0)

        def take(t):
            t = tf.gather(t, rows)
            keep = tf.reshape(mask, [-1] + [1] * (t.shape.rank - 1))
            return tf.where(keep, t, tf.zeros_like(t))

        batch_x = tf.nest.map_structure(take, x)
        batch_y = None if y is None else tf.nest.map_structure(take, y)
        return batch_x, batch_y, {sampling_lib.MASK: tf.cast(mask, tf.float32)}

    return sampler.attach(
        sampler.index_batches(steps)
        .map(fetch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE),
        steps,
    )


def poisson_dataset(
    images,
    labels,
    batch_size,
    seed=0,
    steps=None,
    accumulation_steps=1,
    num_views=None,
    augment=augment_lib.random_crop_flip,
    overflow_probability=1e-18,
    mean=0.5,
    std=0.5,
    input_context=None,
    public_sampling_seed=None,
):
    """Poisson-sampled, padded, optionally augmented image batches.

    Args:
        images: `[N, H, W, C]` uint8 array (normalized here), or float
            features (`experiment.featurize`), taken as they are.
        labels: `[N]` integer labels.
        batch_size: B, the expected logical batch size (q = B/N).
        seed: the seed of the augmentations (public; not of the sample).
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
        public_sampling_seed: FOR TESTS ONLY: draw the sample from this
            public seed (reproducible), which forfeits amplification by
            sampling; the dataset is marked "public" and the privacy
            statement says so. None (default): a secret, fresh sample.

    Returns:
        A `tf.data.Dataset` of `(x, y, {"dp_mask": mask})` physical batches
        (per replica with an `input_context`).
    """
    images = tf.constant(images)
    labels = tf.constant(np.asarray(labels).astype(np.int64))
    sampler = _Sampler(
        len(labels),
        batch_size,
        accumulation_steps,
        overflow_probability,
        input_context,
        public_sampling_seed,
    )

    def fetch(indices, view_seed):
        rows = tf.maximum(indices, 0)
        x = pipeline.normalize(tf.gather(images, rows), mean, std)
        y = tf.gather(labels, rows)
        return _mask_and_augment(x, y, indices, view_seed, num_views, augment)

    return sampler.attach(
        sampler.index_batches(steps, seed)
        .map(fetch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE),
        steps,
    )


def poisson_source_dataset(
    source,
    batch_size,
    seed=0,
    preprocess=None,
    steps=None,
    accumulation_steps=1,
    num_views=None,
    augment=augment_lib.random_crop_flip,
    overflow_probability=1e-18,
    input_context=None,
    public_sampling_seed=None,
):
    """Poisson-sampled batches read by index from a random-access source.

    Only the sampled examples are read, in parallel, so the dataset can be
    far larger than memory (ImageNet).

    Args:
        source: `len(source)` = N and `source[i]`, the example i: a dict
            with "image" and "label" (`tfds.data_source`) or a pair
            `(image, label)`; images uint8 `[H, W, C]` of any size.
        batch_size: B, the expected logical batch size (q = B/N).
        seed: the seed of the augmentations (public; not of the sample).
        preprocess: one uint8 image to a float32 image of a fixed shape
            (e.g. `imagenet.preprocess`); default: `pipeline.normalize`.
        steps, accumulation_steps, num_views, augment, overflow_probability,
            input_context, public_sampling_seed: as `poisson_dataset`.

    Returns:
        A `tf.data.Dataset` of `(x, y, {"dp_mask": mask})` physical batches.
    """
    sampler = _Sampler(
        len(source),
        batch_size,
        accumulation_steps,
        overflow_probability,
        input_context,
        public_sampling_seed,
    )
    preprocess = preprocess or pipeline.normalize

    def read(index):
        example = source[int(index)]
        if isinstance(example, dict):
            example = (example["image"], example["label"])
        image, label = example
        return np.asarray(image, np.uint8), np.int64(label)

    # Padding rows (index -1) get the first example this pipeline owns,
    # read once here: any image of the right kind will do, since the mask
    # zeroes them.
    placeholder = read(sampler.first_index)
    channels = placeholder[0].shape[-1]

    def read_or_pad(index):
        return placeholder if index < 0 else read(index)

    def fetch_one(index):
        image, label = tf.numpy_function(
            read_or_pad, [index], (tf.uint8, tf.int64), stateful=False
        )
        image.set_shape([None, None, channels])
        return preprocess(image), tf.reshape(label, []), index

    batches = sampler.index_batches(steps, seed)
    rows = sampler.rows_per_batch
    examples = (
        batches.map(lambda indices, _: indices)
        .unbatch()
        .map(fetch_one, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(rows, drop_remainder=True)
    )
    view_seeds = batches.map(lambda _, view_seed: view_seed)
    return sampler.attach(
        tf.data.Dataset.zip(examples, view_seeds)
        .map(
            lambda e, view_seed: _mask_and_augment(
                *e, view_seed, num_views, augment
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE),
        steps,
    )


def _mask_and_augment(x, y, indices, view_seed, num_views, augment):
    """Zeroes padding rows (index -1), adds their mask, draws the views."""
    mask = indices >= 0
    x = tf.where(tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1)), x, 0.0)
    if num_views is not None:
        x = augment_lib.augmult(x, num_views, view_seed, augment)
    y = tf.where(mask, y, tf.zeros_like(y))
    return x, y, {sampling_lib.MASK: tf.cast(mask, tf.float32)}


def _fresh_key():
    """A `[2]` int64 stateless-RNG key from the operating system's entropy."""
    return np.array([secrets.randbits(63), secrets.randbits(63)], np.int64)


class _Sampler:
    """The Poisson sample of each step, padded, shuffled, cut into batches.

    This input pipeline's examples are those with index i mod P = p (P
    pipelines). Step t's sample: each of them with probability q, from the
    key of the iteration (secret and fresh for each iteration of the
    dataset, or the public test seed). On overflow a uniformly random m of
    them are kept. The m rows (indices, -1 for padding) are put in a random
    order, so that padding spreads over the physical batches, and cut into
    `accumulation_steps` physical batches of `local` equal parts, one per
    local replica.
    """

    def __init__(
        self,
        num_examples,
        batch_size,
        accumulation_steps,
        overflow_probability,
        input_context,
        public_sampling_seed,
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
        self.q = batch_size / num_examples
        self.batch_size, self.num_examples = batch_size, num_examples
        self.pipelines, self.pipeline_id = pipelines, pipeline_id
        self.owned = len(range(pipeline_id, num_examples, pipelines))
        self.first_index = pipeline_id
        largest = math.ceil(num_examples / pipelines)
        local = replicas // pipelines
        parts = accumulation_steps * local
        rows = accounting.poisson_max_batch_size(
            largest, largest * self.q, overflow_probability / pipelines
        )
        self.rows = parts * math.ceil(rows / parts)  # m_p, this pipeline's
        self.rows_per_batch = self.rows // parts
        self.accumulation_steps = accumulation_steps
        self.local = local
        # Per step, P[some pipeline's sample does not fit its rows].
        self.overflow_probability = min(
            1.0,
            pipelines
            * accounting.poisson_overflow_probability(
                largest, largest * self.q, self.rows
            ),
        )
        self.public_sampling_seed = public_sampling_seed
        if public_sampling_seed is not None:
            _log.warning(
                "Poisson sampling from the public seed %s: whoever knows it "
                "knows which steps hold each example, so epsilon is "
                "accounted for without amplification by sampling. Use it for "
                "tests only.",
                public_sampling_seed,
            )

    def attach(self, dataset, steps):
        """Marks `dataset` with how it samples (`sampling.Sampling`) and
        with its length: `steps` logical batches of `accumulation_steps *
        local` physical ones (None: forever), so that `fit` can check that
        its epochs are whole logical batches."""
        parts = self.accumulation_steps * self.local
        dataset = dataset.apply(
            tf.data.experimental.assert_cardinality(
                steps * parts if steps else tf.data.INFINITE_CARDINALITY
            )
        )
        kind = "poisson" if self.public_sampling_seed is None else "public"
        return sampling_lib.attach(
            dataset,
            sampling_lib.Sampling(
                kind,
                self.overflow_probability,
                batch_size=self.batch_size,
                num_examples=self.num_examples,
                accumulation_steps=self.accumulation_steps,
            ),
        )

    def _key(self):
        """The sampling key of one iteration of the dataset."""
        if self.public_sampling_seed is not None:
            return tf.constant([self.public_sampling_seed, 1], tf.int64)
        key = tf.numpy_function(_fresh_key, [], tf.int64, stateful=True)
        return tf.ensure_shape(key, [2])

    def sample(self, key, step):
        """`[m_p]` indices of logical step `step` (-1 for padding)."""
        step_key = tf.random.experimental.stateless_fold_in(key, step)
        include_key, order_key, pad_key = tf.unstack(
            tf.random.experimental.stateless_split(step_key, 3)
        )
        include = (
            tf.random.stateless_uniform([self.owned], include_key) < self.q
        )
        chosen = tf.where(include)[:, 0] * self.pipelines + self.pipeline_id
        chosen = tf.random.experimental.stateless_shuffle(chosen, order_key)
        chosen = chosen[: self.rows]
        pad = self.rows - tf.shape(chosen)[0]
        indices = tf.concat([chosen, -tf.ones([pad], tf.int64)], 0)
        indices = tf.random.experimental.stateless_shuffle(indices, pad_key)
        return tf.ensure_shape(indices, [self.rows])

    def index_batches(self, steps, seed=0):
        """`(indices, view seed)` of this pipeline's physical batches, in
        order; the view seeds come from the public `seed` and the step."""
        parts = self.accumulation_steps * self.local
        view_base = tf.constant([seed, 2], tf.int64)

        def batches(key, step):
            indices = tf.reshape(self.sample(key, step), [parts, -1])
            step_seed = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(view_base, step),
                self.pipeline_id,
            )
            seeds = tf.random.experimental.stateless_split(step_seed, parts)
            return tf.data.Dataset.from_tensor_slices((indices, seeds))

        steps_ds = (
            tf.data.Dataset.range(steps) if steps else tf.data.Dataset.counter()
        )
        keys = tf.data.Dataset.from_tensors(0).map(lambda _: self._key())
        return keys.flat_map(
            lambda key: steps_ds.flat_map(lambda step: batches(key, step))
        )
