"""train_dataset: Poisson by default, shuffled batches on request."""

import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale import data


def examples(n=200):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n) % 10))


def test_poisson_is_the_default():
    x, y, extra = next(iter(data.train_dataset(examples(), 20, num_views=2)))
    rows = accounting.poisson_max_batch_size(200, 20, 1e-18)
    assert x.shape == (rows, 2, 8, 8, 3)
    assert extra["dp_mask"].shape == (rows,)
    assert 0 < float(tf.reduce_sum(extra["dp_mask"])) <= rows


def test_shuffled_batches_on_request():
    ds = data.train_dataset(
        examples(), 20, sampling="shuffle", accumulation_steps=2
    )
    x, y = next(iter(ds))
    assert x.shape == (10, 8, 8, 3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="not a multiple"):
        data.train_dataset(
            examples(), 20, sampling="shuffle", accumulation_steps=3
        )
    with pytest.raises(ValueError, match="sampling must be"):
        data.train_dataset(examples(), 20, sampling="uniform")
    with pytest.raises(ValueError, match="random-access source"):
        data.train_dataset(examples(), 20, preprocess=lambda image: image)


def test_random_access_source_is_read_by_index():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(200, 8, 8, 3)).astype(np.uint8)
    source = [(images[i], i % 10) for i in range(200)]  # len and [i]
    public = dict(public_sampling_seed=2)  # to compare the two pipelines
    x, y, extra = next(
        iter(data.train_dataset(source, 20, augment=lambda x, s: x, **public))
    )
    rows = accounting.poisson_max_batch_size(200, 20, 1e-18)
    assert x.shape == (rows, 8, 8, 3)
    # The same sample as the in-memory pipeline with the same seed.
    x2, y2, extra2 = next(
        iter(
            data.train_dataset(
                tf.data.Dataset.from_tensor_slices(
                    (images, np.arange(200) % 10)
                ),
                20,
                **public,
            )
        )
    )
    np.testing.assert_array_equal(extra["dp_mask"], extra2["dp_mask"])
    np.testing.assert_allclose(x, x2)
    np.testing.assert_array_equal(y, y2)
