"""`train_dataset`: the library's training pipeline, Poisson-sampled by default."""

import functools

import tensorflow as tf

from keras_dpscale.data import augment as augment_lib
from keras_dpscale.data import pipeline
from keras_dpscale.data import poisson
from keras_dpscale.data import sources


def train_dataset(
    examples,
    batch_size,
    seed=0,
    sampling="poisson",
    num_views=None,
    accumulation_steps=1,
    steps=None,
    augment=augment_lib.random_crop_flip,
    **kwargs,
):
    """Training batches for a DP model, with the sampling the accountant needs.

    Args:
        examples: a `tf.data.Dataset` of `(uint8 image, label)` (`load`),
            held in memory for Poisson sampling; or a random-access source
            (`len` and `[i]`, such as `tfds.data_source`), read by index
            (`poisson.poisson_source_dataset`; Poisson only).
        batch_size: B, the (expected) logical batch size.
        seed: the seed of the augmentations (and of the shuffle with
            "shuffle"); never of the Poisson sample, which is secret
            (`poisson`).
        sampling: "poisson" (default) or
            "shuffle" (shuffled fixed-size batches, streamed). The dataset
            carries its `keras_dpscale.sampling.Sampling`, which `fit`
            records; calibrate with `DPSGD(sampling=<the same>, ...)`.
        num_views: K for augmentation multiplicity, or None.
        accumulation_steps: physical batches per logical batch.
        steps: logical steps (Poisson; None: forever).
        augment: the augmentation of the views.
        **kwargs: passed to `poisson.poisson_dataset` or
            `pipeline.shuffled_dataset` (e.g. `public_sampling_seed`, for
            tests only).

    Returns:
        Poisson: `(x, y, {"dp_mask": mask})` batches of a fixed padded size;
        shuffle: `(x, y)` batches of `batch_size / accumulation_steps`.
    """
    if sampling == "poisson":
        if _random_access(examples):
            sample = functools.partial(poisson.poisson_source_dataset, examples)
        else:
            if kwargs.get("preprocess") is not None:
                raise ValueError(
                    "preprocess= needs a random-access source (Poisson "
                    "batches of in-memory images are normalized, not "
                    "preprocessed): pass tfds.data_source(...) examples, "
                    "or bind build_data.random_access = True."
                )
            kwargs.pop("preprocess", None)
            images, labels = sources.to_arrays(examples)
            sample = functools.partial(poisson.poisson_dataset, images, labels)
        return sample(
            batch_size,
            seed,
            steps=steps,
            accumulation_steps=accumulation_steps,
            num_views=num_views,
            augment=augment,
            **kwargs,
        )
    if sampling == "shuffle":
        if batch_size % accumulation_steps:
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of "
                f"accumulation_steps={accumulation_steps}."
            )
        return pipeline.shuffled_dataset(
            examples,
            batch_size // accumulation_steps,
            num_views=num_views,
            seed=seed,
            augment=augment,
            accumulation_steps=accumulation_steps,
            **kwargs,
        )
    raise ValueError(
        f"sampling must be 'poisson' or 'shuffle', got {sampling!r}."
    )


def _random_access(examples):
    return not isinstance(examples, tf.data.Dataset) and all(
        hasattr(examples, a) for a in ("__len__", "__getitem__")
    )
