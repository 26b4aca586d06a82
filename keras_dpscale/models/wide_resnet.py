"""Pre-activation Wide ResNet with GroupNorm (Zagoruyko & Komodakis 2016).

The DP variant of De et al. 2022: weight-standardized convolutions and
GroupNormalization (16 groups) instead of BatchNorm, which would mix
examples and break per-example clipping.
"""

import keras

from keras_dpscale import dp_model
from keras_dpscale import layers as dp_layers
from keras_dpscale.models.blocks import classifier


def wide_resnet(
    depth=16,
    width=4,
    num_classes=10,
    input_shape=(32, 32, 3),
    groups=16,
    activation="relu",
    weight_standardization=True,
    dropout_rate=0.0,
    private=True,
    name=None,
):
    """Builds a pre-activation WRN-`depth`-`width` with GroupNorm.

    Args:
        depth: total depth, `6 * n + 4` for n blocks per stage.
        width: the widening factor k (stages have 16k, 32k, 64k channels).
        num_classes: size of the output (logits).
        input_shape: image shape (H, W, C).
        groups: GroupNormalization groups.
        activation: activation function.
        weight_standardization: `WSConv2D` (True, as De et al. 2022) or
            plain `Conv2D` convolutions.
        dropout_rate: dropout before the classifier.
        private: return a `DPModel` (True) or a plain `keras.Model` (False,
            for non-private baselines).
        name: model name; defaults to `wrn_{depth}_{width}`.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits. The
        classifier is the layer named "head".
    """
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4, got {depth}.")
    blocks = (depth - 4) // 6
    conv_cls = (
        dp_layers.WSConv2D if weight_standardization else keras.layers.Conv2D
    )

    def norm_act(h, name):
        h = keras.layers.GroupNormalization(groups, name=f"{name}_norm")(h)
        return keras.layers.Activation(activation, name=f"{name}_act")(h)

    def conv(h, filters, name, kernel_size=3, strides=1):
        return conv_cls(
            filters,
            kernel_size,
            strides,
            padding="same",
            use_bias=False,
            name=name,
        )(h)

    inputs = keras.Input(input_shape)
    h = conv(inputs, 16, "stem_conv")
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            prefix = f"stage{stage + 1}_block{block + 1}"
            strides = 2 if stage > 0 and block == 0 else 1
            pre = norm_act(h, f"{prefix}_pre")
            shortcut = h
            if strides != 1 or h.shape[-1] != filters:
                shortcut = conv(pre, filters, f"{prefix}_shortcut", 1, strides)
            r = conv(pre, filters, f"{prefix}_conv1", 3, strides)
            r = conv(norm_act(r, f"{prefix}_mid"), filters, f"{prefix}_conv2")
            h = keras.layers.Add(name=f"{prefix}_add")([shortcut, r])
    h = norm_act(h, "final")
    outputs = classifier(h, num_classes, dropout_rate, "glorot_uniform")
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name or f"wrn_{depth}_{width}")
