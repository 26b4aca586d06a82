"""The model's loss per example: what both clipping engines differentiate.

- `per_example_loss`: the loss of ONE example (no batch dimension), for
  `tf.vectorized_map` (the vectorized engine);
- `batch_losses`: the `[B]` losses of a whole batch in one forward pass (the
  fast engine), from the compiled loss's own unreduced `call`.

Both run the model in training mode in a `StatelessScope` that gives each
random layer its seed and raises if the pass wrote a model variable from
the data (`check_no_state_updates`). With augmult (`num_views` K), an
example's loss is the mean of its K views' losses (one gradient per
example, De et al. 2022) and its prediction the mean of theirs.
"""

import contextlib

import tensorflow as tf

from keras_dpscale._compat import keras_private
from keras_dpscale.rules import Unsupported


def num_views(model, x):
    """K if `x` holds K augmented views per example (augmult), else None.

    Views are recognized by rank: `[B, K, H, W, C]` for a model whose one
    input is `[B, H, W, C]`.
    """
    inputs = getattr(model, "inputs", None)
    if not isinstance(x, tf.Tensor) or not inputs or len(inputs) != 1:
        return None
    if x.shape.rank == len(inputs[0].shape) + 1:
        return x.shape[1]
    return None


def check_no_state_updates(model, scope, seed_generators):
    """Raises if the forward pass assigned a model variable from the data.

    Such updates (BatchNormalization's moving statistics, for example) carry
    information about the training data that no noise protects.
    """
    seed_states = {id(sg.state) for sg in seed_generators}
    for v in model.non_trainable_variables + model.trainable_variables:
        if id(v) in seed_states:
            continue
        if scope.get_current_value(v) is not None:
            raise ValueError(
                f"The forward pass updates the variable '{v.path}' from the "
                "training data, which DP-SGD cannot protect (its update is "
                "not clipped or noised). Remove the layer that owns it, or "
                "replace BatchNormalization by GroupNormalization."
            )


@contextlib.contextmanager
def training_forward(model, x, seed_generators, seeds):
    """Yields `(y_pred, scope)`: the model on `x` in training mode, in a
    `StatelessScope` that gives each random layer its seed from `seeds` and
    collects added losses. On exit, raises if the pass assigned a model
    variable from the data (`check_no_state_updates`)."""
    mapping = [
        (sg.state, tf.cast(s, sg.state.dtype))
        for sg, s in zip(seed_generators, seeds)
    ]
    with keras_private.StatelessScope(
        state_mapping=mapping, collect_losses=True
    ) as scope:
        if keras_private.call_has_training_arg(model):
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        yield y_pred, scope
    check_no_state_updates(model, scope, seed_generators)


def per_example_loss(model, x, y, seed_generators, seeds, views):
    """Loss and prediction of ONE example (no batch dimension), with its own
    seeds; `x` holds its `views` K views if not None."""
    rows = 1 if views is None else views
    if views is None:
        x = tf.nest.map_structure(lambda t: t[None], x)
    if y is not None:
        y = tf.nest.map_structure(lambda t: tf.repeat(t[None], rows, axis=0), y)
    with training_forward(model, x, seed_generators, seeds) as (y_pred, _):
        loss = keras_private.compute_loss(
            model, x=x, y=y, y_pred=y_pred, sample_weight=None, training=True
        )
    # Keras divides losses by the number of replicas; a per-example loss
    # must stay whole so that its gradient is clipped at the right scale.
    loss = keras_private.unscale_loss_for_distribution(loss)
    return loss, tf.nest.map_structure(
        lambda t: tf.reduce_mean(t, axis=0), y_pred
    )


def batch_losses(model, x, y, seed_generators, seeds, views):
    """Per-example losses `[B]` and predictions of a whole batch, in one
    forward pass. With `views` K, `x` is `[B, K, ...]`: the model sees B*K
    rows, and an example's loss is the mean of its views' losses."""
    rows = 1 if views is None else views
    if views is not None:
        x = tf.reshape(x, [-1, *x.shape[2:]])
    # The batch's dropout and other random ops read the first example's
    # seed: fresh every step (and every microbatch).
    first_seeds = [s[0] for s in seeds]
    with training_forward(model, x, seed_generators, first_seeds) as (
        y_pred,
        scope,
    ):
        pass
    if scope.losses:
        raise Unsupported(
            "the model adds losses in its forward pass (add_loss)"
        )
    losses = _per_row_losses(model, y, y_pred, rows)
    losses = tf.reduce_mean(tf.reshape(losses, [-1, rows]), axis=1)
    return losses, tf.nest.map_structure(
        lambda t: tf.reduce_mean(tf.reshape(t, [-1, rows, *t.shape[1:]]), 1),
        y_pred,
    )


def _per_row_losses(model, y, y_pred, rows):
    """The compiled loss of each row `[B*K]`, from the loss's own unreduced
    `call` (an example's loss is then the mean over its rows, as Keras'
    batch mean gives it on the example's rows alone).

    Only for what the batch mean reduces exactly to per-example means: one
    output, Keras `Loss` objects with the default "sum_over_batch_size"
    reduction, no output mask, and the model's own `compute_loss`.
    """
    compile_loss = keras_private.compiled_loss(model)
    if (
        y is None
        or compile_loss is None
        or tf.nest.is_nested(y)
        or tf.nest.is_nested(y_pred)
        or getattr(y_pred, "_keras_mask", None) is not None
        or type(model).compute_loss is not keras_private.Trainer.compute_loss
    ):
        raise Unsupported("the loss is not one Keras loss of one output")
    if not compile_loss.built:
        compile_loss.build(y, y_pred)
    y = tf.repeat(y, rows, axis=0)
    values = []
    for loss, weight in keras_private.flat_losses(compile_loss):
        if getattr(loss, "reduction", None) != "sum_over_batch_size":
            raise Unsupported(
                f"the loss {loss!r} does not reduce by the batch mean"
            )
        value = tf.cast(loss.call(y, y_pred), tf.float32)
        value = tf.reshape(value, [tf.shape(value)[0], -1])
        if weight is not None:
            value = value * weight
        values.append(value)
    return tf.add_n([tf.reduce_mean(v, axis=1) for v in values])
