"""Layers of the paper's architectures, all compatible with per-example DP."""

from keras_dpscale.layers.scaled_activation import ScaledActivation
from keras_dpscale.layers.scattering import Scattering2D
from keras_dpscale.layers.skip_init import SkipInitGain
from keras_dpscale.layers.squeeze_excite import SqueezeExcite
from keras_dpscale.layers.stochastic_depth import StochasticDepth
from keras_dpscale.layers.ws_conv import ScaledWSConv2D
from keras_dpscale.layers.ws_conv import WSConv2D

__all__ = [
    "ScaledActivation",
    "ScaledWSConv2D",
    "Scattering2D",
    "SkipInitGain",
    "SqueezeExcite",
    "StochasticDepth",
    "WSConv2D",
]
