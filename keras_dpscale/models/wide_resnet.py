"""Pre-activation Wide ResNet with GroupNorm (Zagoruyko & Komodakis 2016).

The DP variant of De et al. 2022 uses GroupNormalization (16 groups) instead
of BatchNorm, which would mix examples and break per-example clipping.
"""

import keras

from keras_dpscale import dp_model


def wide_resnet(
    depth=16,
    width=4,
    num_classes=10,
    input_shape=(32, 32, 3),
    groups=16,
    activation="relu",
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
        private: return a `DPModel` (True) or a plain `keras.Model` (False,
            for non-private baselines).
        name: model name; defaults to `wrn_{depth}_{width}`.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits.
    """
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4, got {depth}.")
    blocks = (depth - 4) // 6

    def norm_act(h):
        h = keras.layers.GroupNormalization(groups)(h)
        return keras.layers.Activation(activation)(h)

    def conv(h, filters, kernel_size=3, strides=1):
        return keras.layers.Conv2D(
            filters, kernel_size, strides, padding="same", use_bias=False
        )(h)

    inputs = keras.Input(input_shape)
    h = conv(inputs, 16)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            pre = norm_act(h)
            shortcut = h
            if strides != 1 or h.shape[-1] != filters:
                shortcut = conv(pre, filters, 1, strides)
            r = conv(pre, filters, 3, strides)
            r = conv(norm_act(r), filters)
            h = keras.layers.Add()([shortcut, r])
    h = keras.layers.GlobalAveragePooling2D()(norm_act(h))
    outputs = keras.layers.Dense(num_classes)(h)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name or f"wrn_{depth}_{width}")
