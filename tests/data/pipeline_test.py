"""The shuffled-batch pipeline: shapes, determinism, sharding."""

import numpy as np
import tensorflow as tf

from keras_dpscale import data


def test_shuffled_dataset_shapes_determinism_and_sharding():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(40, 8, 8, 3)).astype(np.uint8)
    examples = tf.data.Dataset.from_tensor_slices((images, np.arange(40)))
    ds = data.shuffled_dataset(examples, 8, num_views=3, seed=7)
    x, y = next(iter(ds))
    assert x.shape == (8, 3, 8, 8, 3) and x.dtype == tf.float32
    again = next(iter(data.shuffled_dataset(examples, 8, num_views=3, seed=7)))
    np.testing.assert_array_equal(x, again[0])
    assert float(tf.reduce_max(tf.abs(x))) <= 1.0
    plain = next(iter(data.shuffled_dataset(examples, 8, seed=7)))[0]
    assert plain.shape == (8, 8, 8, 3)
    ctx = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2
    )
    shard = data.shuffled_dataset(examples, 8, seed=7, input_context=ctx)
    xs, ys = next(iter(shard))
    assert xs.shape[0] == 4 and all(int(v) % 2 == 1 for v in ys)
