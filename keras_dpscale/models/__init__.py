"""Image classifiers ready for DP training."""

from keras_dpscale.models.wide_resnet import wide_resnet

__all__ = ["wide_resnet"]
