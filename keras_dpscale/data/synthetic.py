"""Synthetic image classification data, for demos, audits and tests."""

import numpy as np


def synthetic_images(num_examples, seed, size=8, num_classes=10, noise=1.0):
    """Noisy copies of `num_classes` fixed random patterns, with their class.

    Returns:
        `(images [N, size, size, 3] float32, labels [N] int32)`.
    """
    rng = np.random.default_rng([seed, 2])
    patterns = np.random.default_rng(1234).normal(
        size=(num_classes, size, size, 3)
    )
    labels = rng.integers(0, num_classes, size=num_examples)
    images = patterns[labels] + noise * rng.normal(
        size=(num_examples, size, size, 3)
    )
    return images.astype(np.float32), labels.astype(np.int32)
