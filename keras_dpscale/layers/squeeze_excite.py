"""Squeeze-and-Excite (Hu et al. 2018), as the NFNets use it."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dpscale")
class SqueezeExcite(keras.layers.Layer):
    """Rescales channels by `scale * sigmoid(MLP(mean over H, W))`.

    The spatial mean is per example, so the layer does not mix examples.
    NFNets use `se_ratio=0.5` of the input channels as the hidden width,
    ReLU, and `scale=2` (the block output is `2 * sigmoid(.) * x`, which
    keeps its variance at initialization).

    Args:
        se_ratio: hidden width as a fraction of the input channels.
        hidden_channels: hidden width (overrides `se_ratio`).
        activation: hidden activation.
        scale: constant multiplier of the sigmoid gate.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        se_ratio=0.5,
        hidden_channels=None,
        activation="relu",
        scale=2.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.se_ratio = se_ratio
        self.hidden_channels = hidden_channels
        self.activation = activation
        self.scale = scale

    def build(self, input_shape):
        channels = input_shape[-1]
        hidden = self.hidden_channels or max(1, int(channels * self.se_ratio))
        self.fc0 = keras.layers.Dense(
            hidden, activation=self.activation, name="fc0"
        )
        self.fc1 = keras.layers.Dense(channels, name="fc1")
        self.fc0.build((input_shape[0], channels))
        self.fc1.build((input_shape[0], hidden))

    def call(self, inputs):
        h = ops.mean(inputs, axis=(1, 2))
        h = ops.sigmoid(self.fc1(self.fc0(h)))[:, None, None, :]
        return inputs * (h * ops.cast(self.scale, h.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "se_ratio": self.se_ratio,
            "hidden_channels": self.hidden_channels,
            "activation": self.activation,
            "scale": self.scale,
        }
