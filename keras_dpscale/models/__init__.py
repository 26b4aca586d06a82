"""Image classifiers ready for DP training."""

from keras_dpscale.models.wide_resnet import wide_resnet
