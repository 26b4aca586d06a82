"""A small ConvNeXt (Liu et al. 2022) for 32x32 images.

A patchify stem (`Conv2D` with stride `patch_size`, then LayerNorm), stages
of ConvNeXt blocks (depthwise 7x7 convolution, LayerNorm, an inverted
bottleneck of `Dense` layers with GELU, layer scale, residual) with
LayerNorm and a stride-2 `Conv2D` between stages, global average pooling,
LayerNorm and a `Dense` head. LayerNorm works per example: no BatchNorm to
replace for per-example clipping.

Every trainable layer has a fast clipping rule: layer scale takes
`rules.layer_scale`'s.
"""

import keras

from keras_dpscale import dp_model
from keras_dpscale import rules
from keras_dpscale.rules import layer_scale as layer_scale_lib


@keras.saving.register_keras_serializable(package="keras_dpscale")
class LayerScale(keras.layers.Layer):
    """Multiplies each channel by a learnable scale (Touvron et al. 2021).

    Args:
        initial_value: the scales' initial value.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, initial_value=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.initial_value = initial_value

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.initial_value),
        )

    def call(self, inputs):
        return inputs * keras.ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "initial_value": self.initial_value}


rules.register_rule(LayerScale)(layer_scale_lib.LayerScaleRule)


def convnext(
    widths=(48, 96, 192),
    depths=(2, 2, 2),
    num_classes=10,
    input_shape=(32, 32, 3),
    patch_size=2,
    kernel_size=7,
    layer_scale=1e-6,
    private=True,
    name=None,
):
    """Builds a ConvNeXt with one stage per entry of `widths`.

    Args:
        widths: the channels of each stage.
        depths: the number of blocks of each stage.
        num_classes: size of the output (logits).
        input_shape: image shape (H, W, C).
        patch_size: the stem's kernel size and stride.
        kernel_size: of the blocks' depthwise convolutions.
        layer_scale: initial value of the layer scales, or None for none.
        private: return a `DPModel` (True) or a plain `keras.Model` (False,
            for non-private baselines).
        name: model name; defaults to `convnext_{depths}`, e.g.
            "convnext_2_2_2".

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits. The
        classifier is the layer named "head".
    """
    if len(widths) != len(depths):
        raise ValueError(f"{len(widths)} widths but {len(depths)} depths.")

    def norm(h, name):
        return keras.layers.LayerNormalization(epsilon=1e-6, name=name)(h)

    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(
        widths[0], patch_size, strides=patch_size, name="stem_conv"
    )(inputs)
    h = norm(h, "stem_norm")
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        if stage > 0:
            h = norm(h, f"stage{stage + 1}_down_norm")
            h = keras.layers.Conv2D(
                width, 2, strides=2, name=f"stage{stage + 1}_down_conv"
            )(h)
        for block in range(depth):
            prefix = f"stage{stage + 1}_block{block + 1}"
            r = keras.layers.DepthwiseConv2D(
                kernel_size, padding="same", name=f"{prefix}_dwconv"
            )(h)
            r = norm(r, f"{prefix}_norm")
            r = keras.layers.Dense(
                4 * width, activation="gelu", name=f"{prefix}_pwconv1"
            )(r)
            r = keras.layers.Dense(width, name=f"{prefix}_pwconv2")(r)
            if layer_scale is not None:
                r = LayerScale(layer_scale, name=f"{prefix}_layer_scale")(r)
            h = keras.layers.Add(name=f"{prefix}_add")([h, r])
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = norm(h, "final_norm")
    outputs = keras.layers.Dense(num_classes, name="head")(h)
    cls = dp_model.DPModel if private else keras.Model
    default = "convnext_" + "_".join(map(str, depths))
    return cls(inputs, outputs, name=name or default)
