"""Private Keras 3 names that keras_dpscale uses, all in one place.

Checked against Keras 3.15.1 (TensorFlow backend). Each name says what it
is used for; `tools/compat_check.sh`-style upgrades start here.
"""

# keras.applications' ConvNeXt layer scale (`x * gamma`), for its rule.
from keras.src.applications.convnext import (
    LayerScale as ApplicationsLayerScale,
)

# A scope that runs layers without writing variables, with a mapping for the
# seed generators' state: per-example seeds and the no-state-update check.
from keras.src.backend.common.stateless_scope import StatelessScope

# Whether Keras all-reduces logs across workers (logs then need rank 1).
from keras.src.backend.tensorflow.trainer import (
    _collective_all_reduce_multi_worker as collective_all_reduce_multi_worker,
)

# Undoes Keras' division of a loss by the number of replicas.
from keras.src.losses.loss import unscale_loss_for_distribution

# The functional model class and its constructor-argument test.
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments

# fit's own array handling: validation split and "is this arrays?".
from keras.src.trainers.data_adapters.array_data_adapter import (
    can_convert_arrays,
)
from keras.src.trainers.data_adapters.array_slicing import (
    train_validation_split,
)

# Unpacking (x, y, sample_weight) the way Keras' train_step does.
from keras.src.trainers.data_adapters.data_adapter_utils import (
    pack_x_y_sample_weight,
)
from keras.src.trainers.data_adapters.data_adapter_utils import (
    unpack_x_y_sample_weight,
)
from keras.src.trainers.trainer import Trainer

__all__ = [
    "ApplicationsLayerScale",
    "Functional",
    "StatelessScope",
    "Trainer",
    "can_convert_arrays",
    "collective_all_reduce_multi_worker",
    "ema_averages",
    "export_archive_root",
    "call_has_training_arg",
    "compiled_loss",
    "compute_loss",
    "flat_losses",
    "flatten_layers",
    "functional_init_arguments",
    "pack_x_y_sample_weight",
    "seed_generators",
    "train_validation_split",
    "unpack_x_y_sample_weight",
    "unscale_loss_for_distribution",
]


def flatten_layers(model, include_self=True):
    """Every layer of `model`, nested ones included (`_flatten_layers`)."""
    return list(model._flatten_layers(include_self=include_self))


def seed_generators(model):
    """The seed generators of `model`'s layers (`_seed_generators`)."""
    return [
        sg
        for layer in flatten_layers(model)
        for sg in getattr(layer, "_seed_generators", [])
    ]


def call_has_training_arg(model):
    """Whether `model.call` takes `training` (`_call_has_training_arg`)."""
    return model._call_has_training_arg


def compiled_loss(model):
    """The model's `CompileLoss` (`_compile_loss`), or None."""
    return model._compile_loss


def compute_loss(model, **kwargs):
    """`Trainer._compute_loss`: the compiled loss plus added losses."""
    return model._compute_loss(**kwargs)


def flat_losses(compile_loss):
    """`(loss, weight)` of each compiled loss (`CompileLoss._flat_losses`)."""
    return [(loss, weight) for _, loss, weight, _ in compile_loss._flat_losses]


# The fast engine and its rules (`engines/fast`, `rules/`). Checked against
# Keras 3.15.1.
def own_trainable_variables(layer):
    """The trainable variables `layer` owns itself, not its sublayers'
    (`_trainable_variables`)."""
    return [
        v for v in getattr(layer, "_trainable_variables", []) if v.trainable
    ]


def backend_variable(variable):
    """The TensorFlow variable behind a Keras variable (`_value`): what a
    `tf.GradientTape` watches (`.value` would be a cast under mixed
    precision). Anything else as it is."""
    return getattr(variable, "_value", variable)


def reshape_into_groups(layer, x):
    """`GroupNormalization`'s input with its channels split into groups
    (`_reshape_into_groups`)."""
    return layer._reshape_into_groups(x)


__all__ += [
    "backend_variable",
    "own_trainable_variables",
    "reshape_into_groups",
]


def ema_averages(optimizer):
    """`(variables, averages)`: the optimizer's variables and their moving
    averages under `use_ema` (`_trainable_variables`,
    `_model_variables_moving_average`); averages None if there are none."""
    return (
        getattr(optimizer, "_trainable_variables", []),
        getattr(optimizer, "_model_variables_moving_average", None),
    )


def export_archive_root(archive):
    """The trackable that a `keras.export.ExportArchive` saves
    (`_tf_trackable`): extra variables written beside the endpoints."""
    return archive._tf_trackable
