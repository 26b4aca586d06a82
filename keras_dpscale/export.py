"""Export a DP-trained model as a SavedModel that carries its privacy record.

`export_saved_model(model, path)` writes a TensorFlow SavedModel through
Keras' `keras.export.ExportArchive` (what `model.export` uses):

* the endpoint `serve`, also the default serving signature
  (`serving_default`): float32 images `[batch, H, W, C]` (input `images`) to
  class probabilities, the softmax of the model's logits (output
  `output_0`); for a model trained on a fixed feature map of the images
  (`features=`, `experiment.build_data(features=...)`), the normalized
  images, which `serve` maps through the features first, each alone as in
  training (the record then names the map: `features`);
* the optimizer's parameter averages (`use_ema=True`) in place of the raw
  weights, by default, when it keeps them;
* the privacy record (epsilon, delta, sigma, C, steps, batch size, dataset
  size, sampling, accountant, the ledger and the one-line statement), in
  three places that need nothing but TensorFlow to read:

  ```python
  import json
  import tensorflow as tf

  loaded = tf.saved_model.load(path)
  record = json.loads(loaded.privacy_json.numpy())  # a string tf.Variable
  # the same JSON, as a signature (also seen by `saved_model_cli show`):
  loaded.signatures["privacy"]()["privacy_json"]
  # and as a file: <path>/assets/privacy.json
  probabilities = loaded.serve(images)  # or loaded.signatures["serve"]
  ```

`path` may be local or a URL such as `gs://bucket/run/saved_model`: the
SavedModel is written through `tf.io.gfile` (`tf.saved_model.save`). Under
a multi-worker strategy every worker must call the export (saving may need
all of them), and only the chief's lands in `path`; the others write to a
temporary directory that is then deleted (`keras_dpscale.storage`).
TensorFlow's INFO lines about the save ("Assets written to", "Writing
fingerprint") are silenced during the export.

Keras' `fit` already overwrites the weights with their averages when it
ends, but a model saved mid-training (by a checkpoint callback) or trained
with `train_on_batch` holds raw weights: the export uses the averages
either way and leaves the model's own weights as they were.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile

import keras
import tensorflow as tf

from keras_dpscale import storage
from keras_dpscale._compat import keras_private


PRIVACY_FILE = "privacy.json"


def _uniform(values):
    """The value if all are equal, else the list (None if there are none)."""
    values = list(values)
    if not values:
        return None
    return values[0] if all(v == values[0] for v in values) else values


def _finite(value):
    """`value`, with an infinite float as the string "inf" (valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _require_ledger(model):
    if not hasattr(model, "privacy_ledger"):
        raise ValueError(
            "Only a keras_dpscale DP model (DPModel, DPSequential, "
            "make_private(model)) has a privacy record to export; got "
            f"{type(model).__name__}. Train it with keras_dpscale.DPModel or "
            "make_private(model) and a DP optimizer."
        )


def privacy_record(model, delta=None, ema_weights=False):
    """The privacy guarantee of `model`'s weights, as a JSON-able dict.

    It is read from the model's ledger (`keras_dpscale.ledger`): every DP
    step that trained the weights, whichever optimizer took it.

    Args:
        model: a DP model (`DPModel`, `DPSequential`, `make_private`).
        delta: delta of the guarantee; None: the optimizer's
            `target_delta`.
        ema_weights: whether the exported weights are the parameter averages.

    Returns:
        A dict: `epsilon`, `delta`, `noise_multiplier`, `l2_norm_clip`,
        `steps`, `batch_size`, `num_examples`, `sampling`, `accountant`,
        `ledger` (one dict per segment of steps with the same settings),
        `non_private_steps` (steps of a non-DP optimizer before, not
        covered), `not_covered`, `statement`, `ema_weights`, `ema_momentum`
        and `keras_dpscale_version`. `noise_multiplier`, `batch_size`,
        `num_examples` and `sampling` are the ledger's; a list when its
        segments differ. An infinite epsilon (sigma = 0) is the string
        "inf".

    Raises:
        ValueError: `model` is not a DP model, or delta or N is unknown.
    """
    import keras_dpscale  # the package imports this module

    _require_ledger(model)
    optimizer, delta, accountant, num_examples = model.privacy_settings(delta)
    ledger = [s for s in model.privacy_ledger() if s.steps > 0]
    if any((s.num_examples or num_examples) is None for s in ledger):
        raise ValueError(
            "The privacy record needs num_examples: pass num_examples=N to "
            "the optimizer."
        )
    epsilon = float(model.epsilon(delta))
    return {
        "epsilon": _finite(epsilon),
        "delta": float(delta),
        "noise_multiplier": _uniform(s.noise_multiplier for s in ledger),
        "l2_norm_clip": getattr(optimizer, "l2_norm_clip", None),
        "steps": int(sum(s.steps for s in ledger)),
        "batch_size": _uniform(s.batch_size for s in ledger),
        "num_examples": _uniform(
            s.num_examples or num_examples for s in ledger
        ),
        "sampling": _uniform(s.sampling for s in ledger),
        "accountant": accountant,
        "ledger": [dataclasses.asdict(s) for s in ledger],
        "non_private_steps": model.non_private_steps(),
        "not_covered": model.not_covered(),
        "statement": model.privacy_statement(delta),
        "ema_weights": bool(ema_weights),
        "ema_momentum": (
            float(optimizer.ema_momentum) if ema_weights and optimizer else None
        ),
        "keras_dpscale_version": keras_dpscale.__version__,
    }


def feature_map_name(features):
    """What a record calls a fixed feature map: a Keras model by its name
    and size (`experiment.PublicPretraining` names its network after what
    it was trained on), a Keras layer as its class and configuration
    (`Scattering2D(J=2, L=8)`; its class alone where it has no
    configuration), else its name. A description, not a proof: that the
    map does not depend on the private data is the user's claim."""
    if isinstance(features, keras.Model):
        return f"{features.name} ({features.count_params():,} weights)"
    if isinstance(features, keras.layers.Layer):
        try:
            config = features.get_config()
        except NotImplementedError:  # a layer that cannot describe itself
            return f"{type(features).__name__}(...)"
        base = keras.layers.Layer(name="_").get_config()
        args = ", ".join(
            f"{k}={v!r}" for k, v in sorted(config.items()) if k not in base
        )
        return f"{type(features).__name__}({args})"
    return getattr(features, "__qualname__", repr(features))


def feature_map_claim(features):
    """The sentence a privacy statement adds for a fixed feature map."""
    return (
        f"The model takes features computed by a fixed map, "
        f"{feature_map_name(features)}, of each image alone; epsilon does "
        "not cover the map: that it does not depend on the private data "
        "(for a network trained on public data: that the data is public and "
        "shares no example with the private data) is the user's claim."
    )


def features_of_each(features, images):
    """`features` of each image alone (a batch of one, under
    `tf.vectorized_map`), as `experiment.featurize` computed them for
    training: a map that mixes the examples of a batch serves each request
    as it trained, whatever else is in the batch."""
    return tf.vectorized_map(lambda image: features(image[None])[0], images)


def _image_shape(model, input_shape):
    """[H, W, C] of the model's input: given, or from a functional model."""
    if input_shape is not None:
        return list(input_shape)
    for candidate in (model, getattr(model, "model", None)):
        inputs = getattr(candidate, "inputs", None)
        if inputs:
            if len(inputs) != 1:
                raise ValueError(
                    "export_saved_model exports models with one image "
                    f"input; this one has {len(inputs)} inputs."
                )
            return list(inputs[0].shape[1:])
    raise ValueError(
        "The model's input shape is unknown (a subclassed model): pass "
        "input_shape=(H, W, C) to export_saved_model."
    )


@contextlib.contextmanager
def _quiet_save():
    """Raises the log levels that let a SavedModel's writing be announced.

    `tf.saved_model.save` logs "Function ... contains input name(s)",
    "Sharding callback duration" and "Writing fingerprint to ..." at INFO,
    through absl's handler (at absl's verbosity) or the root logger's;
    raising TensorFlow's own logger is not enough. Warnings and errors
    still show.
    """
    from absl import logging as absl_logging

    loggers = [logging.getLogger(), tf.get_logger(), logging.getLogger("absl")]
    levels = [logger.level for logger in loggers]
    verbosity = absl_logging.get_verbosity()
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    absl_logging.set_verbosity(min(verbosity, absl_logging.WARNING))
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _ema_pairs(optimizer):
    """(model variable, its average) pairs; empty if there are no averages."""
    variables, averages = keras_private.ema_averages(optimizer)
    if not (optimizer.use_ema and optimizer.built and averages):
        return []
    return [(v, a) for v, a in zip(variables, averages) if a is not None]


def export_saved_model(
    model,
    path,
    use_ema=True,
    delta=None,
    probabilities=True,
    input_shape=None,
    features=None,
):
    """Writes `model` as a SavedModel for serving, with its privacy record.

    The SavedModel needs neither Keras nor keras_dpscale: load it with
    `tf.saved_model.load(path)` (see the module docstring for its endpoints
    and the three places the privacy record is kept).

    Args:
        model: a model trained by a DP optimizer (a `DPModel`,
            `DPSequential` or `make_private` model, or one loaded with
            `keras.models.load_model`) whose output is logits.
        path: the directory to write the SavedModel to: a local path or a
            URL (`gs://...`). Only the chief of a multi-worker strategy
            writes it (see the module docstring).
        use_ema: export the optimizer's parameter averages (when it was
            created with `use_ema=True` and has taken a step) instead of the
            current weights. The model's own weights are restored afterwards.
        delta: delta of the reported guarantee; None: the optimizer's
            `target_delta`.
        probabilities: `serve` returns softmax probabilities (True) or the
            logits (False).
        input_shape: (H, W, C) of what `serve` takes: for a model without
            a functional input, and for `features` (the images' shape).
        features: the fixed feature map of the normalized images that the
            model was trained on (`experiment.featurize`): `serve` applies
            it to each of its images alone, as in training
            (`features_of_each`), and the record names it (`features`,
            `feature_map_name`). None: `serve` feeds its images to the
            model as they are. A model saved and loaded again does not know
            its map: pass it here again (`tools/export.py` cannot).

    Returns:
        The privacy record written (see `privacy_record`).

    Raises:
        ValueError: the model is not a DP model (there is no guarantee to
            record), delta or N is unknown, or the input shape is unknown.
    """
    _require_ledger(model)
    optimizer = getattr(model, "optimizer", None)
    if features is not None and (
        input_shape is None or None in tuple(input_shape)
    ):
        raise ValueError(
            "export_saved_model with features= needs input_shape=(H, W, C), "
            "all known: the shape of the images that the feature map takes; "
            f"got {input_shape}."
        )
    shape = _image_shape(model, input_shape)
    pairs = _ema_pairs(optimizer) if use_ema and optimizer else []
    record = privacy_record(model, delta, ema_weights=bool(pairs))
    record["outputs"] = "probabilities" if probabilities else "logits"
    if features is not None:
        record["features"] = feature_map_name(features)
        record["statement"] += " " + feature_map_claim(features)
    text = json.dumps(record, indent=2, sort_keys=True)

    def serve(images):
        inputs = (
            images if features is None else features_of_each(features, images)
        )
        logits = keras.ops.cast(model(inputs, training=False), "float32")
        return keras.ops.softmax(logits, axis=-1) if probabilities else logits

    def privacy():
        return {"privacy_json": tf.constant(text)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    if isinstance(features, keras.layers.Layer):
        if not features.built:  # ExportArchive tracks built layers only
            features(keras.ops.zeros([1] + shape))
        archive.track(features)
    archive.add_endpoint(
        "serve",
        serve,
        input_signature=[
            keras.InputSpec(shape=[None] + shape, dtype="float32")
        ],
    )
    archive.add_endpoint("privacy", privacy, input_signature=[])
    root = keras_private.export_archive_root(archive)
    root.privacy_json = tf.Variable(text, trainable=False, name="privacy_json")
    raw = [v.numpy() for v, _ in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        asset = os.path.join(tmp, PRIVACY_FILE)
        with open(asset, "w") as f:
            f.write(text + "\n")
        root.privacy_asset = tf.saved_model.Asset(asset)
        strategy = getattr(model, "distribute_strategy", None)
        try:
            for variable, average in pairs:
                variable.assign(average)
            with storage.writer_dir(path, strategy) as target, _quiet_save():
                archive.write_out(target, verbose=False)
        finally:
            for (variable, _), value in zip(pairs, raw):
                variable.assign(value)
    return record
