"""Pieces shared by the models: NF convolutions, residuals, the head."""

import keras

from keras_dpscale import layers as dp_layers


def conv(h, filters, kernel_size, name, strides=1, groups=1, use_bias=True):
    """A `ScaledWSConv2D` with "same" padding, as in the published code."""
    return dp_layers.ScaledWSConv2D(
        filters,
        kernel_size,
        strides,
        padding="same",
        groups=groups,
        use_bias=use_bias,
        kernel_initializer="he_normal",
        name=name,
    )(h)


def act(h, activation, name):
    """A gamma-scaled (variance-preserving) activation."""
    return dp_layers.ScaledActivation(activation, name=name)(h)


def residual(shortcut, r, prefix, alpha, stochdepth_rate):
    """`shortcut + alpha * skip_gain * stochastic_depth(r)`."""
    if stochdepth_rate > 0:
        r = dp_layers.StochasticDepth(
            stochdepth_rate, name=f"{prefix}_stochdepth"
        )(r)
    r = dp_layers.SkipInitGain(name=f"{prefix}_skip_gain")(r)
    r = keras.layers.Rescaling(alpha, name=f"{prefix}_alpha")(r)
    return keras.layers.Add(name=f"{prefix}_add")([shortcut, r])


def classifier(h, num_classes, dropout_rate, kernel_initializer=None):
    """Global average pooling, dropout, and the Dense layer named "head"."""
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    if dropout_rate:
        h = keras.layers.Dropout(dropout_rate, name="dropout")(h)
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=kernel_initializer
        or keras.initializers.RandomNormal(stddev=0.01),
        name="head",
    )(h)
