"""ImageNet preprocessing: central square, resize, standardize, crops."""

import functools

import numpy as np
import tensorflow as tf

from keras_dpscale import data
from keras_dpscale.data import imagenet


def test_eval_preprocessing_is_a_standardized_central_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 200  # the central 40x40 square
    out = imagenet.preprocess(tf.constant(image), image_size=20).numpy()
    assert out.shape == (20, 20, 3)
    want = (200 / 255 - np.array(imagenet.MEAN_RGB)) / imagenet.STDDEV_RGB
    np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), rtol=1e-4)


def test_train_views_are_crops_inside_the_enlarged_image():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (30, 25, 3)).astype(np.uint8))
    big = imagenet.preprocess(image, 20, train=True, augmult=True)
    assert big.shape == (24, 24, 3)
    views = data.augmult(
        big[None], 3, tf.constant([1, 2], tf.int64), imagenet.augmult_crops(20)
    ).numpy()[0]
    assert views.shape == (3, 20, 20, 3)
    windows = [
        w
        for i in range(5)
        for j in range(5)
        for w in (
            big[i : i + 20, j : j + 20],
            big[i : i + 20, j : j + 20][:, ::-1],
        )
    ]
    for v in views:
        assert any(np.allclose(v, w) for w in windows)


def test_pipeline_batches_images_of_different_sizes():
    rng = np.random.default_rng(1)
    sizes = [(30, 40), (50, 20), (24, 24), (33, 31)] * 2

    def gen():
        for i, (h, w) in enumerate(sizes):
            yield rng.integers(0, 256, (h, w, 3)).astype(np.uint8), i % 5

    examples = tf.data.Dataset.from_generator(
        gen,
        output_signature=(
            tf.TensorSpec((None, None, 3), tf.uint8),
            tf.TensorSpec((), tf.int64),
        ),
    )
    train = data.shuffled_dataset(
        examples,
        4,
        num_views=2,
        preprocess=functools.partial(
            imagenet.preprocess, image_size=20, train=True, augmult=True
        ),
        augment=imagenet.augmult_crops(20),
    )
    x, y = next(iter(train))
    assert x.shape == (4, 2, 20, 20, 3)
    evaluation = data.eval_dataset(
        examples,
        3,
        preprocess=functools.partial(imagenet.preprocess, image_size=20),
    )
    assert [b[0].shape[0] for b in evaluation] == [3, 3, 2]
