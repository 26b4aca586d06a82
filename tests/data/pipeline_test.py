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


def featurized(images, features, batch_size=4):
    labels = np.arange(len(images))
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    out = list(data.featurize(ds, features, batch_size=batch_size))
    assert [y.numpy() for _, y in out] == list(labels)  # order kept
    return np.stack([x.numpy() for x, _ in out])


def test_featurize_maps_each_example_alone_even_with_a_mixing_map():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4, 1)).astype(np.uint8)
    scale = lambda x: 2.0 * x  # noqa: E731
    np.testing.assert_allclose(
        featurized(images, scale),
        2.0 * data.normalize(images).numpy(),
        atol=1e-6,
    )

    # A map that centres a batch on its mean mixes the examples of a batch;
    # applied to one example at a time it cannot: changing example 1 leaves
    # every other example's features as they were.
    def centre(x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True) + x

    before = featurized(images, centre)
    changed = images.copy()
    changed[1] = 255 - changed[1]
    after = featurized(changed, centre)
    np.testing.assert_array_equal(
        np.delete(after, 1, 0), np.delete(before, 1, 0)
    )
    np.testing.assert_allclose(
        before, data.normalize(images).numpy(), atol=1e-6
    )


def test_featurize_refuses_a_map_that_keeps_state():
    # One example's pixels written into a variable that the next example's
    # features read: vectorizing alone would not keep them apart.
    total = tf.Variable(0.0)

    def remember(x):
        total.assign_add(tf.reduce_sum(x))
        return x * 0.0 + total.read_value()

    images = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="through state"):
        featurized(images, remember)
