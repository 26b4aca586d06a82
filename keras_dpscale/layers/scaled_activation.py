"""Gamma-scaled activations: variance-preserving nonlinearities of NFNets."""

import math

import keras
import numpy as np
from keras import ops

# gamma = 1 / std(g(x)) for x ~ N(0, 1), as in the published NFNet code
# (`nonlinearities` in deepmind-research/nfnets/base.py). "gelu" is the tanh
# approximation, which is JAX's default and the one the NFNets were trained
# with.
GAMMAS = {
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "softplus": 1.9203323125839233,
    "identity": 1.0,
}


def activation_fn(name):
    """The Keras function of an activation name (gelu: tanh approximation)."""
    if name == "gelu":
        return lambda x: keras.activations.gelu(x, approximate=True)
    if name == "identity":
        return lambda x: x
    return keras.activations.get(name)


def gamma(name, num_points=200_001):
    """`1 / std(g(x))`, x ~ N(0, 1), by quadrature on a fine grid.

    Gives the gamma of any activation, including those not in `GAMMAS`.
    The published constants were estimated by sampling and differ from
    these in the fourth digit; layers use the published ones, which the
    published checkpoints were trained with.
    """
    x = np.linspace(-12.0, 12.0, num_points)
    w = np.exp(-0.5 * x**2) * (x[1] - x[0]) / math.sqrt(2 * math.pi)
    y = np.asarray(activation_fn(name)(ops.convert_to_tensor(x)))
    mean = np.sum(w * y)
    return 1.0 / math.sqrt(np.sum(w * (y - mean) ** 2))


@keras.saving.register_keras_serializable(package="keras_dpscale")
class ScaledActivation(keras.layers.Layer):
    """`gamma * g(x)`: an activation rescaled to unit variance on N(0, 1).

    Args:
        activation: activation name (see `GAMMAS`; others get their gamma by
            quadrature).
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.activation = activation
        self.gamma = GAMMAS[activation] if activation in GAMMAS else None
        self._fn = activation_fn(activation)

    def build(self, input_shape):
        if self.gamma is None:
            self.gamma = gamma(self.activation)

    def call(self, inputs):
        return self._fn(inputs) * ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}
