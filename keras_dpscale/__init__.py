"""keras_dpscale: differentially private training (DP-SGD) for Keras 3."""

from keras_dpscale import accounting
from keras_dpscale import callbacks
from keras_dpscale import checkpoint
from keras_dpscale import layers
from keras_dpscale import models
from keras_dpscale import transfer
from keras_dpscale.dp_model import DPModel
from keras_dpscale.dp_model import DPSequential
from keras_dpscale.dp_model import make_private
from keras_dpscale.export import export_saved_model
from keras_dpscale.optimizers import DPAdam
from keras_dpscale.optimizers import DPSGD

__all__ = [
    "accounting",
    "callbacks",
    "checkpoint",
    "layers",
    "models",
    "transfer",
    "DPAdam",
    "DPModel",
    "DPSGD",
    "DPSequential",
    "export_saved_model",
    "make_private",
]
__version__ = "0.1.0"
