"""ImageNet preprocessing as in jax_privacy's image pipeline (De et al. 2022).

Every image (train and eval) is cut to its central square, resized
(bicubic, clipped to [0, 1]) and standardized per channel. For training with
augmult the image is resized to 1.2x the size (268 for 224) and the views are
random 224 crops inside it with random flips (`augmult_crops`).
"""

import functools

import tensorflow as tf

from keras_dpscale.data import augment as augment_lib

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)


def preprocess(image, image_size=224, train=False, augmult=False):
    """One decoded uint8 image `[H, W, 3]` to float32 `[s, s, 3]`.

    `s` is `image_size`, or `int(1.2 * image_size)` when `train` and
    `augmult` (the views are then cropped to `image_size`).
    """
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    image = tf.image.crop_to_bounding_box(
        image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side
    )
    size = int(1.2 * image_size) if train and augmult else image_size
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.image.resize(image, (size, size), method="bicubic")
    image = tf.clip_by_value(image, 0.0, 1.0)
    return (image - MEAN_RGB) / STDDEV_RGB


def augmult_crops(image_size=224):
    """The augmentation for `augment.augmult`: crops inside, random flips."""
    return functools.partial(
        augment_lib.random_crop_flip,
        padding=0,
        crop_size=(image_size, image_size),
    )
