"""Normalizer-free ResNets (Brock et al. 2021a), as in De et al. 2022.

NF-ResNets replace BatchNorm by scaled weight standardization, a variance
scaling of each residual branch (`beta` in, `alpha` out) and a SkipInit gain,
so no layer mixes examples. De et al. 2022 train NF-ResNet-50 on ImageNet
with DP-SGD from scratch. The architecture follows the published code
(deepmind-research/nfnets, `nf_resnet.py`).
"""

import keras

from keras_dpscale import dp_model
from keras_dpscale.models.blocks import act
from keras_dpscale.models.blocks import classifier
from keras_dpscale.models.blocks import conv
from keras_dpscale.models.blocks import residual

DEPTHS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


def nf_resnet(
    depth=50,
    num_classes=1000,
    input_shape=(224, 224, 3),
    width=4,
    alpha=0.2,
    stochdepth_rate=0.1,
    dropout_rate=0.0,
    activation="relu",
    private=True,
    name=None,
):
    """Builds an NF-ResNet-`depth` (bottleneck blocks).

    Args:
        depth: one of `DEPTHS` (50: 25.6M parameters with 1000 classes), or
            the number of blocks of each of the 4 stages.
        num_classes: size of the output (logits).
        input_shape: image shape (H, W, C).
        width: width multiplier (4: stages of 256, 512, 1024, 2048; a
            fraction for tests).
        alpha: residual branch scale.
        stochdepth_rate: stochastic depth rate of the last block (block i
            of n drops with `stochdepth_rate * i / n`).
        dropout_rate: dropout before the classifier.
        activation: activation (gamma-scaled).
        private: return a `DPModel` (True) or a plain `keras.Model`.
        name: model name; defaults to `nf_resnet_{depth}`.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits; the
        classifier is the layer named "head".
    """
    if isinstance(depth, int):
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}.")
        stage_depths = DEPTHS[depth]
    else:
        stage_depths, depth = tuple(depth), 2 + 3 * sum(depth)

    inputs = keras.Input(input_shape)
    h = conv(
        inputs, int(16 * width), 7, "initial_conv", strides=2, use_bias=False
    )
    h = keras.layers.MaxPooling2D(3, 2, padding="same", name="max_pool")(h)
    num_blocks = sum(stage_depths)
    index = 0
    channels = h.shape[-1]
    expected_std = 1.0  # of the block's input, at initialization
    for stage, stage_depth in enumerate(stage_depths):
        out_ch = int(width * 64 * 2**stage)
        for block in range(stage_depth):
            p = f"block{index}"
            strides = 2 if stage > 0 and block == 0 else 1
            beta = 1.0 / expected_std
            out = act(h, activation, f"{p}_act0")
            out = keras.layers.Rescaling(beta, name=f"{p}_beta")(out)
            shortcut = h
            if strides > 1 or channels != out_ch:
                shortcut = conv(out, out_ch, 1, f"{p}_conv_shortcut", strides)
            r = conv(out, out_ch // 4, 1, f"{p}_conv0")
            r = conv(
                act(r, activation, f"{p}_act1"),
                out_ch // 4,
                3,
                f"{p}_conv1",
                strides,
            )
            r = conv(act(r, activation, f"{p}_act2"), out_ch, 1, f"{p}_conv2")
            h = residual(
                shortcut, r, p, alpha, stochdepth_rate * index / num_blocks
            )
            channels = out_ch
            index += 1
            if block == 0:  # the projection shortcut has unit variance
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
    h = act(h, activation, "final_act")
    outputs = classifier(h, num_classes, dropout_rate)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name or f"nf_resnet_{depth}")
