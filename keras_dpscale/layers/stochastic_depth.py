"""Stochastic depth (Huang et al. 2016) with per-example randomness."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dpscale")
class StochasticDepth(keras.layers.Layer):
    """Drops a residual branch, per example, with probability `rate`.

    In training, each example's branch is kept with probability `1 - rate`
    and scaled by `1 / (1 - rate)`; at inference the layer is the identity.
    The randomness comes from the layer's `SeedGenerator`, so in the DP
    train step every example draws from its own seed, like `Dropout`: the
    drop decision of one example never depends on another.

    Args:
        rate: drop probability, in [0, 1).
        seed: seed of the layer's `SeedGenerator`.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate}.")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        u = keras.random.uniform(shape, seed=self.seed_generator)
        mask = ops.cast(u < keep, inputs.dtype)
        return inputs * mask / ops.cast(keep, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
