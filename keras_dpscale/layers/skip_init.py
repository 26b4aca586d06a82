"""SkipInit: a learnable scalar gain on the residual branch."""

import keras
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import normalization


@keras.saving.register_keras_serializable(package="keras_dpscale")
class SkipInitGain(keras.layers.Layer):
    """Multiplies its input by a learnable scalar, zero at initialization.

    With the gain at zero, each residual block starts as the identity (De &
    Smith 2020, "Batch Normalization Biases Residual Blocks Towards the
    Identity Function in Deep Networks"), as in NF-ResNets and NFNets.

    Args:
        initial_value: the gain's initial value.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, initial_value=0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_value = initial_value

    def build(self, input_shape):
        self.gain = self.add_weight(
            name="gain",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_value),
        )

    def call(self, inputs):
        return inputs * ops.cast(self.gain, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "initial_value": self.initial_value}


@rules.register_rule(SkipInitGain)
class SkipInitGainRule(normalization.ScalarGainRule):
    """The fast engine's rule for `SkipInitGain`: a scalar gain."""
