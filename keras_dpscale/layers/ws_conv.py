"""Weight-standardized convolutions: the WRNs' and the NFNets' convolutions.

Weight standardization (Qiao et al. 2019) normalizes each output channel's
filter to zero mean and unit variance before the convolution. It depends on
the weights only, never on other examples, so it is compatible with
per-example clipping, unlike BatchNormalization. De et al. 2022 use it in
their GroupNorm Wide ResNets; the NFNets of Brock et al. 2021 use the scaled
form with a learnable gain, which preserves the signal's variance without any
activation normalization.

Both register their fast-clipping rule (`WSConvRule`, `keras_dpscale.rules`):
the conv rule with the standardized kernel and its gain.
"""

import keras
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import conv as conv_rules


@keras.saving.register_keras_serializable(package="keras_dpscale")
class WSConv2D(keras.layers.Conv2D):
    """`Conv2D` whose kernel is standardized per output channel.

    The kernel used is `(W - mean(W)) / sqrt(var(W) + epsilon)`, with the
    mean and variance over each output channel's fan-in (height, width and
    input channels). Statistics are computed in float32, also under a mixed
    precision policy. All `Conv2D` arguments are accepted.

    Args:
        epsilon: added to the variance.
        **kwargs: `keras.layers.Conv2D` arguments.
    """

    def __init__(self, *args, epsilon=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.epsilon = epsilon

    def standardized_kernel(self, kernel):
        """The standardized kernel, in float32."""
        return self.standardization(kernel)[0]

    def standardization(self, kernel):
        """`(unit, inv_std, dlog, var)`: the standardized kernel without gain
        `unit = (W - mean) * r(var)`, and per output channel `r`, `d log r /
        d var` and `var` (float32; for per-example norms, `WSConvRule`)."""
        centered, var = _center(kernel)
        inv_std = ops.rsqrt(var + self.epsilon)
        return centered * inv_std, inv_std, -0.5 / (var + self.epsilon), var

    def convolution_op(self, inputs, kernel):
        kernel = ops.cast(self.standardized_kernel(kernel), inputs.dtype)
        return super().convolution_op(inputs, kernel)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_dpscale")
class ScaledWSConv2D(WSConv2D):
    """NFNet's scaled weight-standardized `Conv2D` with a learnable gain.

    The kernel used is `gain * (W - mean(W)) / sqrt(max(N * var(W),
    epsilon))`, with `N` the fan-in (Brock et al. 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization", eq. 2, and the
    `WSConv2D` of the published NFNet code). With unit gain, a unit-variance
    input gives a unit-variance output at initialization. The gain has one
    entry per output channel, initialized to one. Bias is on by default, as
    in the NFNets.

    Args:
        epsilon: lower bound of `N * var(W)`.
        gain_initializer: initializer of the gain.
        **kwargs: `keras.layers.Conv2D` arguments.
    """

    def __init__(self, *args, epsilon=1e-4, gain_initializer="ones", **kwargs):
        super().__init__(*args, epsilon=epsilon, **kwargs)
        self.gain_initializer = keras.initializers.get(gain_initializer)

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(
            name="gain",
            shape=(self.filters,),
            initializer=self.gain_initializer,
        )

    # Conv2D saves only its kernel and bias; save every variable.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def standardized_kernel(self, kernel):
        return self.standardization(kernel)[0] * ops.cast(self.gain, "float32")

    def standardization(self, kernel):
        centered, var = _center(kernel)
        fan_in = 1
        for size in kernel.shape[:-1]:
            fan_in *= size
        inv_std = ops.rsqrt(ops.maximum(var * fan_in, self.epsilon))
        # r is constant in var where the bound epsilon is the maximum.
        dlog = ops.where(
            var * fan_in >= self.epsilon, -0.5 / ops.maximum(var, 1e-30), 0.0
        )
        return centered * inv_std, inv_std, dlog, var

    def get_config(self):
        return {
            **super().get_config(),
            "gain_initializer": keras.initializers.serialize(
                self.gain_initializer
            ),
        }


def _center(kernel):
    """`(kernel - mean, var)` over each output channel's fan-in, in float32."""
    kernel = ops.cast(kernel, "float32")
    mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
    return kernel - mean, var


@rules.register_rule(WSConv2D, ScaledWSConv2D)
class WSConvRule(conv_rules.ConvRule):
    """The conv rule of `WSConv2D` and `ScaledWSConv2D`: the kernel used is
    `unit * gain`, with `unit` the standardized kernel (and the gain of
    `ScaledWSConv2D`); per-example norms and sums follow the standardization
    back to the kernel variable (`ghost_norms.ws_kernel_gradients`)."""

    def kernel_used(self, layer):
        unit, inv_std, dlog, var = layer.standardization(layer.kernel)
        per_channel = tuple(ops.reshape(t, [-1]) for t in (inv_std, dlog, var))
        gain = layer.gain if isinstance(layer, ScaledWSConv2D) else None
        return (unit,) + per_channel, gain

    def standardized(self, layer, kernel):
        return layer.standardization(kernel)[0]
