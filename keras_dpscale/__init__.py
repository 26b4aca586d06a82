"""keras_dpscale: differentially private training (DP-SGD) for Keras 3.

The public names load on first use (PEP 562), so that importing one part
(`keras_dpscale.data`, `keras_dpscale.accounting`) does not import the
model, the clipping engines or the layers. Load a saved DP model with
`keras_dpscale.load_model` (it registers the package's Keras classes).
"""

import importlib

# Public name -> (module, attribute or None for the module itself).
_PUBLIC = {
    "accounting": ("keras_dpscale.accounting", None),
    "callbacks": ("keras_dpscale.callbacks", None),
    "checkpoint": ("keras_dpscale.checkpoint", None),
    "data": ("keras_dpscale.data", None),
    "layers": ("keras_dpscale.layers", None),
    "models": ("keras_dpscale.models", None),
    "rules": ("keras_dpscale.rules", None),
    "sampling": ("keras_dpscale.sampling", None),
    "transfer": ("keras_dpscale.transfer", None),
    "DPAdam": ("keras_dpscale.optimizers", "DPAdam"),
    "DPConfig": ("keras_dpscale.config", "DPConfig"),
    "DPModel": ("keras_dpscale.dp_model", "DPModel"),
    "DPSGD": ("keras_dpscale.optimizers", "DPSGD"),
    "DPSequential": ("keras_dpscale.dp_model", "DPSequential"),
    "export_saved_model": ("keras_dpscale.export", "export_saved_model"),
    "load_model": ("keras_dpscale.saving", "load_model"),
    "make_private": ("keras_dpscale.dp_model", "make_private"),
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(
            f"module 'keras_dpscale' has no attribute {name!r}"
        )
    module, attribute = _PUBLIC[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
