"""keras_dpscale: differentially private training (DP-SGD) for Keras 3."""

from keras_dpscale import accounting
from keras_dpscale import callbacks
from keras_dpscale import layers
from keras_dpscale import models
from keras_dpscale import transfer
from keras_dpscale.dp_model import DPModel
from keras_dpscale.dp_model import DPSequential
from keras_dpscale.dp_model import make_private
from keras_dpscale.optimizers import DPAdam
from keras_dpscale.optimizers import DPSGD

__all__ = [
    "accounting",
    "callbacks",
    "layers",
    "models",
    "transfer",
    "DPAdam",
    "DPModel",
    "DPSGD",
    "DPSequential",
    "make_private",
]
__version__ = "0.1.0"
