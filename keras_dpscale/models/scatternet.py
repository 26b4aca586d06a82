"""ScatterNet + linear: Tramer & Boneh 2021's model on scattering features.

"Differentially Private Learning Needs Better Features (or Much More Data)",
ICLR 2021: a linear classifier on the scattering coefficients
(`layers.Scattering2D`) of the image, after a GroupNorm of the
coefficients, beats end-to-end CNNs under DP-SGD at small epsilon. The
features are hand-crafted: configs that use them say so.

The model takes the coefficients, computed once for the whole dataset by
`experiment.build_data(features=Scattering2D(...))` (a fixed map, public):
`[7, 7, 81]` for 28 x 28 grey images with J = 2. The same model on other
fixed features (a network trained on public data,
`experiment.PublicPretraining`) is registered as `linear_on_features`.
"""

import keras

from keras_dpscale import dp_model


def scatternet_linear(
    num_classes=10,
    input_shape=(7, 7, 81),
    groups=27,
    private=True,
    name="scatternet_linear",
):
    """GroupNorm of the scattering coefficients, then a Dense layer.

    Args:
        num_classes: size of the output (logits).
        input_shape: the coefficients' shape `[H', W', K]`.
        groups: GroupNorm groups over the K coefficients (27 in the
            paper for 81 coefficients); 0: no normalization.
        private: return a `DPModel` (True) or a plain `keras.Model`.
        name: model name.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits; the head
        starts at zero, as in the paper.
    """
    inputs = keras.Input(input_shape)
    h = inputs
    if groups:
        h = keras.layers.GroupNormalization(groups, name="group_norm")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer="zeros", name="head"
    )(h)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name)
