"""Loading saved DP models.

`import keras_dpscale` loads its parts on first use (so that
`keras_dpscale.data` stays light), so Keras does not know the package's
classes (`DPSGD`, `DPModel`, the layers) until they are imported.
`load_model` imports them, then loads with Keras.
"""

import importlib

import keras

# The modules that register Keras-serializable classes.
SERIALIZABLE = (
    "keras_dpscale.optimizers",
    "keras_dpscale.dp_model",
    "keras_dpscale.layers",
    "keras_dpscale.models",
)


def register_classes():
    """Registers every keras_dpscale class with Keras' serialization."""
    for module in SERIALIZABLE:
        importlib.import_module(module)


def load_model(filepath, **kwargs):
    """`keras.saving.load_model` for files that hold keras_dpscale classes.

    Args:
        filepath: a `.keras` file.
        **kwargs: as `keras.saving.load_model` (`compile`, `safe_mode`, ...).
    """
    register_classes()
    return keras.saving.load_model(filepath, **kwargs)
