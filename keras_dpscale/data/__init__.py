"""Input pipelines for DP training: sources, augmult, Poisson sampling."""

from keras_dpscale.data import imagenet
from keras_dpscale.data.augment import augmult
from keras_dpscale.data.augment import random_crop_flip
from keras_dpscale.data.pipeline import eval_dataset
from keras_dpscale.data.pipeline import normalize
from keras_dpscale.data.pipeline import shuffled_dataset
from keras_dpscale.data.poisson import poisson_dataset
from keras_dpscale.data.poisson import poisson_source_dataset
from keras_dpscale.data.sources import DataNotFoundError
from keras_dpscale.data.sources import load
from keras_dpscale.data.sources import load_arrays
from keras_dpscale.data.training import train_dataset

__all__ = [
    "DataNotFoundError",
    "augmult",
    "eval_dataset",
    "imagenet",
    "load",
    "load_arrays",
    "normalize",
    "poisson_dataset",
    "poisson_source_dataset",
    "random_crop_flip",
    "shuffled_dataset",
    "train_dataset",
]
