"""NFNets (Brock et al. 2021b): normalizer-free, high-accuracy ImageNet nets.

De et al. 2022 reach 86.7% ImageNet top-1 at epsilon = 8 by DP fine-tuning
an NFNet-F3 pre-trained on JFT-4B. The architecture follows the published
code (deepmind-research/nfnets, `nfnet.py`): a 4-convolution stem, NF blocks
with grouped 3x3 convolutions (group width 128), Squeeze-Excite, SkipInit
gains and stochastic depth, then a 1x1 convolution doubling the width.
"""

import typing

import keras

from keras_dpscale import dp_model
from keras_dpscale import layers as dp_layers
from keras_dpscale.models.blocks import act
from keras_dpscale.models.blocks import classifier
from keras_dpscale.models.blocks import conv
from keras_dpscale.models.blocks import residual


class Variant(typing.NamedTuple):
    """Stage depths, the published image sizes, and the head's dropout."""

    depth: tuple
    train_imsize: int
    test_imsize: int
    dropout_rate: float


VARIANTS = {
    "F0": Variant((1, 2, 6, 3), 192, 256, 0.2),
    "F1": Variant((2, 4, 12, 6), 224, 320, 0.3),
    "F2": Variant((3, 6, 18, 9), 256, 352, 0.4),
    "F3": Variant((4, 8, 24, 12), 320, 416, 0.4),
    "F4": Variant((5, 10, 30, 15), 384, 512, 0.5),
    "F5": Variant((6, 12, 36, 18), 416, 544, 0.5),
    "F6": Variant((7, 14, 42, 21), 448, 576, 0.5),
}
WIDTHS = (256, 512, 1536, 1536)


def nfnet(
    variant="F0",
    num_classes=1000,
    input_shape=None,
    width=1.0,
    se_ratio=0.5,
    alpha=0.2,
    stochdepth_rate=0.1,
    dropout_rate=None,
    activation="gelu",
    group_size=128,
    depth=None,
    private=True,
    name=None,
):
    """Builds an NFNet-`variant`.

    Args:
        variant: "F0" to "F6" (F0: 71.5M parameters with 1000 classes).
        num_classes: size of the output (logits).
        input_shape: image shape; defaults to the variant's training size.
        width: width multiplier of all stages (1 in the published models;
            smaller for tests).
        se_ratio: Squeeze-Excite hidden width over the block's width.
        alpha: residual branch scale.
        stochdepth_rate: stochastic depth rate of the last block.
        dropout_rate: dropout before the classifier; the variant's default.
        activation: activation (gamma-scaled; GELU as published).
        group_size: channels per group of the 3x3 convolutions.
        depth: blocks per stage, to override the variant's (tests).
        private: return a `DPModel` (True) or a plain `keras.Model`.
        name: model name; defaults to `nfnet_{variant}` in lower case.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits; the
        classifier is the layer named "head".
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}.")
    params = VARIANTS[variant]
    if input_shape is None:
        input_shape = (params.train_imsize,) * 2 + (3,)
    depth = depth or params.depth
    if dropout_rate is None:
        dropout_rate = params.dropout_rate

    inputs = keras.Input(input_shape)
    h = inputs
    stem = ((16, 2), (32, 1), (64, 1), (int(WIDTHS[0] * width) // 2, 2))
    for i, (filters, strides) in enumerate(stem):
        if i:
            h = act(h, activation, f"stem_act{i - 1}")
        h = conv(h, filters, 3, f"stem_conv{i}", strides)
    channels = h.shape[-1]
    num_blocks = sum(depth)
    index = 0
    expected_std = 1.0
    for stage, stage_depth in enumerate(depth):
        out_ch = int(WIDTHS[stage] * width)
        # The grouped convolutions' width: half the output, in whole groups.
        groups = max(1, int(out_ch * 0.5) // group_size)
        mid = min(group_size, int(out_ch * 0.5)) * groups
        for block in range(stage_depth):
            p = f"block{index}"
            strides = 2 if stage > 0 and block == 0 else 1
            out = act(h, activation, f"{p}_act0")
            out = keras.layers.Rescaling(1.0 / expected_std, name=f"{p}_beta")(
                out
            )
            shortcut = h
            if strides > 1:
                shortcut = keras.layers.AveragePooling2D(
                    2, 2, padding="same", name=f"{p}_avg_pool"
                )(out)
            elif channels != out_ch:
                shortcut = out
            if strides > 1 or channels != out_ch:
                shortcut = conv(shortcut, out_ch, 1, f"{p}_conv_shortcut")
            r = conv(out, mid, 1, f"{p}_conv0")
            r = conv(
                act(r, activation, f"{p}_act1"),
                mid,
                3,
                f"{p}_conv1",
                strides,
                groups,
            )
            r = conv(
                act(r, activation, f"{p}_act2"),
                mid,
                3,
                f"{p}_conv1b",
                1,
                groups,
            )
            r = conv(act(r, activation, f"{p}_act3"), out_ch, 1, f"{p}_conv2")
            r = dp_layers.SqueezeExcite(se_ratio, name=f"{p}_squeeze_excite")(r)
            h = residual(
                shortcut, r, p, alpha, stochdepth_rate * index / num_blocks
            )
            channels = out_ch
            index += 1
            if block == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
    h = conv(h, 2 * channels, 1, "final_conv")
    h = act(h, activation, "final_act")
    outputs = classifier(h, num_classes, dropout_rate)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name or f"nfnet_{variant.lower()}")
