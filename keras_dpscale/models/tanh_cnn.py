"""The small tanh CNN of Tramèr & Boneh 2021 for (Fashion-)MNIST.

"Differentially Private Learning Needs Better Features (or Much More Data)",
ICLR 2021, table 9: 26,010 parameters with 10 classes; tanh activations
train better than ReLU under DP-SGD.
"""

import keras

from keras_dpscale import dp_model


def tanh_cnn(
    num_classes=10, input_shape=(28, 28, 1), private=True, name="tanh_cnn"
):
    """Conv 16 8x8/2, max-pool 2/1, conv 32 4x4/2, max-pool 2/1, dense 32.

    Args:
        num_classes: size of the output (logits).
        input_shape: image shape.
        private: return a `DPModel` (True) or a plain `keras.Model`.
        name: model name.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits.
    """
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(16, 8, 2, padding="same", activation="tanh")(inputs)
    h = keras.layers.MaxPooling2D(2, 1)(h)
    h = keras.layers.Conv2D(32, 4, 2, padding="valid", activation="tanh")(h)
    h = keras.layers.MaxPooling2D(2, 1)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="tanh")(h)
    outputs = keras.layers.Dense(num_classes, name="head")(h)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=name)
