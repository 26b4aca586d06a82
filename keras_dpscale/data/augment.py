"""Augmentation multiplicity (De et al. 2022): K augmented views per example.

`augmult(images, num_views, seed)` turns a batch `[B, H, W, C]` into
`[B, K, H, W, C]`. A `DPModel` given such a batch averages the losses of an
example's K views *before* taking that example's gradient, so each example
still contributes one gradient of norm <= C and the sampling rate stays B/N.

The CIFAR augmentation of the paper: a random crop of the image mirror-padded
by 4 pixels on each side, and a random horizontal flip. All randomness is
stateless and vectorized, so the same seed gives the same views eagerly and
inside `tf.data`.
"""

import tensorflow as tf


def random_crop_flip(images, seed, padding=4, flip=True, crop_size=None):
    """Mirror-pads by `padding`, crops at random, flips at random.

    Args:
        images: `[n, H, W, C]`.
        seed: `[2]` int seed (stateless RNG).
        padding: pixels of mirror padding on each side.
        flip: random horizontal flips.
        crop_size: `(h, w)` of the crops; default `(H, W)`. With
            `padding=0` and a smaller size, crops lie inside the image (the
            ImageNet recipe: 224 crops of a 268 image).

    Returns:
        `[n, h, w, C]`, one independent draw per image.
    """
    n = tf.shape(images)[0]
    height, width = crop_size or (images.shape[1], images.shape[2])
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2)
    )
    slack = (
        images.shape[1] + 2 * padding - height,
        images.shape[2] + 2 * padding - width,
    )
    if min(slack) < 0:
        raise ValueError(f"crop_size {crop_size} exceeds the padded image.")
    if max(slack) > 0:
        padded = images
        if padding:
            padded = tf.pad(
                images,
                [[0, 0], [padding, padding], [padding, padding], [0, 0]],
                mode="REFLECT",
            )
        offsets = tf.random.stateless_uniform(
            [n, 2], crop_seed, minval=0, maxval=2**30, dtype=tf.int32
        ) % tf.constant([slack[0] + 1, slack[1] + 1])
        rows = offsets[:, :1] + tf.range(height)[None]
        cols = offsets[:, 1:] + tf.range(width)[None]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    if flip:
        flips = tf.random.stateless_uniform([n], flip_seed) < 0.5
        images = tf.where(
            flips[:, None, None, None], tf.reverse(images, axis=[2]), images
        )
    return images


def augmult(images, num_views, seed, augment=random_crop_flip):
    """K independent augmented views of every image.

    Args:
        images: `[B, H, W, C]`.
        num_views: K >= 1.
        seed: `[2]` int seed.
        augment: `augment(images [n, H, W, C], seed) -> [n, h, w, C]`, with
            one independent draw per image (default: crop and flip).

    Returns:
        `[B, K, h, w, C]`.
    """
    if num_views < 1:
        raise ValueError(f"augmult needs num_views >= 1, got {num_views}.")
    tiled = tf.repeat(images, num_views, axis=0)  # [B*K, H, W, C]
    views = augment(tiled, seed)
    return tf.reshape(views, [-1, num_views] + views.shape[1:].as_list())
