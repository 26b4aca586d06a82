"""Validators: what DP training refuses or warns about, apart from the step.

- `check_layers`: layers that mix the examples of a batch by design
  (BatchNormalization in training mode, MixUp, CutMix, `mixes_examples`);
  a frozen BatchNormalization (`frozen_batch_normalization`) is allowed;
- `data_dependent_state`: state set from data outside DP training (adapted
  preprocessing layers), which the privacy statement lists as not covered;
- `checked_masks`: a padded dataset's masks are 0/1, never weights;
- `check_sampling`: the data are not sampled more weakly than sigma was
  calibrated for.

The fast engine also proves separability on the traced computation
(`engines.separability`); these checks state intent, for both engines.
"""

import warnings

import keras
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale._compat import keras_private
from keras_dpscale import sampling as sampling_lib

# The key under which a padded batch carries its 0/1 mask.
MASK = sampling_lib.MASK

# Layers that mix the examples of a batch by design.
_MIXING_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in ("BatchNormalization", "MixUp", "CutMix")
    if hasattr(keras.layers, name)
)
# Sampling kinds from the strongest assumption to the weakest.
_STRENGTH = ("poisson", "shuffle", "public", "unknown")

NO_WEIGHTS = (
    "sample_weight and class_weight are not supported in DP training: a "
    "weight scales an example's gradient after it is clipped, which breaks "
    "the sensitivity bound. Remove them (resample the data instead of "
    "weighting it)."
)


def check_sampling(planned, drawn):
    """Raises if sigma was calibrated for `planned` sampling, stronger than
    the data's `drawn` one (the budget would be spent at once)."""
    if _STRENGTH.index(drawn.kind) > _STRENGTH.index(planned):
        raise ValueError(
            f"The optimizer calibrated sigma for {planned} sampling, but "
            f"the data are sampled as '{drawn.kind}' "
            f"({accounting.SAMPLING_ASSUMPTIONS[drawn.kind]}). Train on "
            "arrays or on keras_dpscale.data.train_dataset (Poisson "
            "sampling), pass sampling='" + drawn.kind + "' to the optimizer "
            "to calibrate for it, or state how your pipeline samples with "
            "keras_dpscale.sampling.declare."
        )


def has_mask(data):
    """True for a `tf.data.Dataset` of padded batches `(x, y, {MASK: m})`."""
    if not isinstance(data, tf.data.Dataset):
        return False
    spec = data.element_spec
    return (
        isinstance(spec, tuple)
        and len(spec) == 3
        and isinstance(spec[2], dict)
        and set(spec[2]) == {MASK}
    )


def checked_masks(data):
    """A `tf.data.Dataset` whose padding masks are checked to be 0/1 (an
    error at the batch that breaks it, before it is trained on)."""
    if not has_mask(data):
        return data

    def check(x, y, weights):
        mask = weights[MASK]
        binary = tf.reduce_all((mask == 0) | (mask == 1))
        with tf.control_dependencies(
            [
                tf.debugging.Assert(
                    binary,
                    [
                        f"The padding mask '{MASK}' must hold 0 (padding) "
                        "or 1 (an example) only; a weight would scale an "
                        "example's clipped gradient. Got:",
                        mask,
                    ],
                )
            ]
        ):
            return x, y, {MASK: tf.identity(mask)}

    return data.map(check)


def frozen_batch_normalization(layer):
    """True for a `BatchNormalization` that runs in inference mode even in
    training, so that it neither mixes the examples nor learns from them.

    Keras 3's `BatchNormalization.call` takes the batch's statistics and
    updates its moving ones only `if training and self.trainable`. So the
    layer is frozen exactly when its own `trainable` is False (not its
    parent's: `backbone.trainable = False` sets it on every sublayer, but a
    BatchNormalization set trainable again inside a frozen backbone runs in
    training mode) and its `call` is Keras' own (a subclass or an instance
    that replaces `call` may do anything). It then normalizes each example
    by the fixed moving statistics, and has no trainable variables.
    """
    return (
        isinstance(layer, keras.layers.BatchNormalization)
        and not layer.trainable
        and not getattr(layer, "mixes_examples", False)
        and "call" not in vars(layer)
        and type(layer).call is keras.layers.BatchNormalization.call
    )


def check_layers(model):
    """Raises if the model has a layer that mixes examples by design
    (BatchNormalization in training mode, MixUp, CutMix, or
    `mixes_examples = True`).

    A frozen BatchNormalization (`frozen_batch_normalization`: its own
    `trainable` is False and its `call` is Keras') is allowed: it normalizes
    each example with fixed statistics and updates none. MixUp and CutMix
    mix whether trainable or not, and stay refused.

    This is a check of intent, in both engines; the engines prove what runs
    (the fast engine: `separability` refuses batch statistics; both: a
    variable written from the data raises at the first step).
    """
    for layer in keras_private.flatten_layers(model):
        if frozen_batch_normalization(layer):
            continue
        if isinstance(layer, _MIXING_LAYERS) or getattr(
            layer, "mixes_examples", False
        ):
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) computes its "
                "output for one example from other examples of the batch, "
                "so per-example gradients and their clipping bound do not "
                f"hold. {_fix(layer)}"
            )


def _fix(layer):
    """The fix named by `check_layers`' error for `layer`."""
    if not isinstance(layer, keras.layers.BatchNormalization):
        return (
            "Remove it: mixing examples (MixUp, CutMix) is not compatible "
            "with per-example clipping; augment each example on its own "
            "(augmult) instead."
        )
    if getattr(layer, "mixes_examples", False):
        return "It declares `mixes_examples = True`: remove it."
    if not layer.trainable:
        return (
            "It is frozen, but its class replaces BatchNormalization's call, "
            "so it may still use the batch's statistics. Use "
            "keras.layers.BatchNormalization itself, or replace it with "
            "keras.layers.GroupNormalization or LayerNormalization."
        )
    return (
        "Replace it with keras.layers.GroupNormalization or "
        "LayerNormalization, or freeze it (`layer.trainable = False`, on "
        "the BatchNormalization layer itself: Keras then normalizes with "
        "its fixed moving statistics, one example at a time; "
        "keras_dpscale.transfer.freeze_batch_normalization does it for a "
        "whole model)."
    )


def data_dependent_state(model):
    """Descriptions of the layers whose state was set from data outside DP
    training (adapted preprocessing layers)."""
    return [
        f"the statistics of layer '{layer.name}' ({type(layer).__name__}), "
        "set by adapt()"
        for layer in keras_private.flatten_layers(model, include_self=False)
        if _adapted(layer)
    ]


def warn_data_dependent_state(model):
    """Warns about `data_dependent_state` (naming the fix) and returns it;
    the privacy statement lists it as not covered."""
    found = data_dependent_state(model)
    if found:
        warnings.warn(
            "keras_dpscale: "
            + "; ".join(found)
            + " come from data, and DP training does not protect them: if "
            "that was the private training data, the model leaks it. Compute "
            "them on public data or pass them as constants (e.g. "
            "Normalization(mean=..., variance=...)), or normalize in the "
            "input pipeline with public constants.",
            stacklevel=3,
        )
    return found


def _adapted(layer):
    """True for a preprocessing layer whose statistics came from `adapt()`
    (not from its constructor): `Normalization`, `Discretization`."""
    if isinstance(layer, keras.layers.Normalization):
        if layer.input_mean is not None or not layer.built:
            return False
        return bool(
            tf.reduce_any(layer.adapt_mean != 0)
            or tf.reduce_any(layer.adapt_variance != 1)
        )
    if isinstance(layer, keras.layers.Discretization):
        summary = getattr(layer, "summary", None)
        return summary is not None and summary.size > 0
    return False
