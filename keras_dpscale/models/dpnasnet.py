"""DPNASNet: the Fashion-MNIST network of Cheng et al. 2022 (DPNAS).

"DPNAS: Neural Architecture Search for Deep Learning with Differential
Privacy", AAAI 2022: a cell searched for DP-SGD, reported at 88.09%
Fashion-MNIST test accuracy at epsilon = 3. The architecture follows the
authors' code (github.com/TheSunWillRise/DPNAS, `dp_evaluate/models.py`,
`DPNASNet_FMNIST`): a stem convolution, three cells separated by 2x2
max-pools, a 1x1 "adapt" convolution and a two-layer head. Each cell
projects its input to `width` channels (node 0), computes nodes 1 to 5 as
sums of operations on earlier nodes, and concatenates nodes 1 to 5. Every
GroupNorm has 8 groups and no affine parameters, as in the authors' code.
"""

import math

import keras

from keras_dpscale import dp_model

# The searched cell for Fashion-MNIST: (operation, from node, to node).
FMNIST_GENOTYPE = (
    ("skip", 0, 1),
    ("none", 0, 2),
    ("sep_conv_selu", 1, 2),
    ("sep_conv_relu", 0, 3),
    ("sep_conv_selu", 1, 3),
    ("skip", 2, 3),
    ("none", 0, 4),
    ("none", 1, 4),
    ("sep_conv_tanh", 2, 4),
    ("skip", 3, 4),
    ("sep_conv_selu", 0, 5),
    ("sep_conv_tanh", 1, 5),
    ("max_pool", 2, 5),
    ("sep_conv_relu", 3, 5),
    ("max_pool", 4, 5),
)

_GROUPS = 8


def _he_fan_out(kernel_size, channels):
    # The authors' init: normal(0, sqrt(2 / (k * k * out_channels))).
    return keras.initializers.RandomNormal(
        stddev=math.sqrt(2.0 / (kernel_size * kernel_size * channels))
    )


def _group_norm():
    return keras.layers.GroupNormalization(
        _GROUPS, center=False, scale=False, epsilon=1e-5
    )


def _operation(op, h, name):
    """One edge of the cell (the "priv_" primitives of the authors' code)."""
    if op == "skip":
        return h
    if op == "max_pool":
        return keras.layers.MaxPooling2D(3, 1, padding="same", name=name)(h)
    if op.startswith("sep_conv_"):
        # A 3x3 depthwise convolution (groups = channels), GroupNorm, act.
        channels = h.shape[-1]
        h = keras.layers.DepthwiseConv2D(
            3,
            padding="same",
            use_bias=False,
            depthwise_initializer=_he_fan_out(3, channels),
            name=name,
        )(h)
        h = _group_norm()(h)
        return keras.layers.Activation(op[len("sep_conv_") :])(h)
    raise ValueError(f"Unknown DPNAS operation {op!r}.")


def _cell(h, width, genotype, name):
    nodes = {
        0: _group_norm()(
            keras.layers.Conv2D(
                width,
                1,
                use_bias=False,
                kernel_initializer=_he_fan_out(1, width),
                name=f"{name}_preprocess",
            )(h)
        )
    }
    for op, source, target in genotype:
        if op == "none":  # the zero operation adds nothing
            continue
        out = _operation(op, nodes[source], f"{name}_{op}_{source}_{target}")
        nodes[target] = (
            keras.layers.Add()([nodes[target], out]) if target in nodes else out
        )
    last = max(target for _, _, target in genotype)
    return keras.layers.Concatenate()([nodes[i] for i in range(1, last + 1)])


def dpnasnet(
    num_classes=10,
    input_shape=(28, 28, 1),
    width=16,
    head_width=128,
    genotype=FMNIST_GENOTYPE,
    private=True,
    name="dpnasnet",
):
    """Stem, cell, pool, cell, pool, cell (twice as wide), pool, head.

    Args:
        num_classes: size of the output (logits).
        input_shape: image shape.
        width: the authors' C; the stem and the first two cells have
            2 * width channels per node, the third 4 * width.
        head_width: channels of the 1x1 adapt convolution and units of
            the hidden Dense layer (128 in the paper).
        genotype: the cell, (operation, from node, to node) triples with
            operations "none", "skip", "max_pool" and "sep_conv_<act>".
        private: return a `DPModel` (True) or a plain `keras.Model`.
        name: model name.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits.
    """
    channels = 2 * width
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(
        channels,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer=_he_fan_out(3, channels),
        name="stem",
    )(inputs)
    h = _group_norm()(h)
    for i, cell_width in enumerate((channels, channels, 2 * channels)):
        h = _cell(h, cell_width, genotype, name=f"cell{i}")
        h = keras.layers.MaxPooling2D(2, 2)(h)
    h = keras.layers.Conv2D(
        head_width,
        1,
        use_bias=False,
        kernel_initializer=_he_fan_out(1, head_width),
        name="adapt",
    )(h)
    h = _group_norm()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(head_width, activation="tanh")(h)
    outputs = keras.layers.Dense(num_classes, name="head")(h)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name)
