"""The shuffled-batch pipeline: shapes, determinism, sharding."""

import numpy as np
import pytest
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


@pytest.mark.parametrize("batch_size,k", [(4, 1), (2, 2)])
def test_a_logical_batch_never_holds_an_example_twice(batch_size, k):
    # N = 10 is no multiple of the logical batch (4): batches that ran over
    # the end of a pass would repeat examples.
    images = np.zeros((10, 4, 4, 1), np.uint8)
    examples = tf.data.Dataset.from_tensor_slices((images, np.arange(10)))
    ds = data.shuffled_dataset(
        examples, batch_size, seed=3, accumulation_steps=k
    )
    labels = [y.numpy() for _, y in ds.take(60)]
    for i in range(0, 60, k):
        logical = np.concatenate(labels[i : i + k])
        assert len(set(logical)) == len(logical) == 4, logical


def test_normalize_scales_uint8_images_and_passes_float_features():
    images = tf.constant([[0, 255]], tf.uint8)
    np.testing.assert_allclose(data.normalize(images).numpy(), [[-1.0, 1.0]])
    features = tf.constant([[3.5, -7.0]], tf.float64)
    out = data.normalize(features)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [[3.5, -7.0]])
    with pytest.raises(ValueError, match="uint8 images or float"):
        data.normalize(tf.constant([[1, 2]], tf.int32))
