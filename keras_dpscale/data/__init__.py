"""Input pipelines for DP training: augmentation multiplicity and loaders."""

from keras_dpscale.data.augmult import augmult
from keras_dpscale.data.augmult import random_crop_flip

__all__ = ["augmult", "random_crop_flip"]
