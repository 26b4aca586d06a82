"""`DPModel`, `DPSequential` and `make_private`: Keras models that train with DP-SGD.

A DP model replaces Keras' `train_step` by the private one:

    per-example norms -> clip each gradient to norm <= C -> sum
        (fast_clipping.py: ghost norms and book-keeping, or
         clipping.py: per-example gradients by tf.vectorized_map)
    -> accumulate, add noise once per logical batch, apply   (optimizers.py)

Everything else (`fit`, `evaluate`, `predict`, callbacks, saving) is Keras'.

It fails closed: compiling with a non-DP optimizer, a `BatchNormalization`
layer, any layer that updates state from the data during training, and
`sample_weight` / `class_weight` raise errors that name the fix.
"""

import contextlib
import logging

import keras
import tensorflow as tf
from keras.src.backend.common.stateless_scope import StatelessScope
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.losses import loss as loss_module
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.trainers.trainer import Trainer
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_dpscale import callbacks as dp_callbacks
from keras_dpscale import clipping
from keras_dpscale import fast_clipping
from keras_dpscale import optimizers

# The key under which a Poisson batch carries its padding mask, in the
# sample-weight slot of the batch: `(x, y, {MASK: mask})`.
MASK = "dp_mask"


class DPTrainer:
    """The private `train_step`, mixed in front of a Keras model class."""

    def compile(self, optimizer=None, *args, jit_compile=True, **kwargs):
        """As `keras.Model.compile`; the optimizer must be a DP optimizer.

        `jit_compile` defaults to True: the per-example step runs under XLA.
        """
        if not optimizers.is_private(optimizer):
            raise ValueError(
                f"{type(self).__name__} trains with differential privacy "
                "and needs a DP optimizer, such as keras_dpscale.DPSGD(...) "
                f"or keras_dpscale.DPAdam(...); got {optimizer!r}."
            )
        check_layers(self)
        self._jit_per_replica = bool(jit_compile) and _is_mirrored(
            self.distribute_strategy
        )
        if self._jit_per_replica:
            # XLA cannot compile one program over several devices' variables
            # (Mirrored strategies): compile each replica's step instead.
            jit_compile = False
        super().compile(optimizer, *args, jit_compile=jit_compile, **kwargs)

    def fit(self, *args, callbacks=None, **kwargs):
        """As `keras.Model.fit`; reports epsilon and enforces the budget.

        When the optimizer knows `num_examples` and `target_delta`, a
        `callbacks.PrivacyBudget` runs first among the callbacks (so that
        `epsilon` is in the logs that the others see); a user's own
        `PrivacyBudget` is moved first instead.
        """
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = callbacks.callbacks  # never bypass the budget
        callbacks = list(callbacks or [])
        budget = [
            c for c in callbacks if isinstance(c, dp_callbacks.PrivacyBudget)
        ]
        others = [c for c in callbacks if c not in budget]
        if not budget and dp_callbacks.reports_privacy(self.optimizer):
            verbose = 0 if kwargs.get("verbose", "auto") == 0 else 1
            budget = [dp_callbacks.PrivacyBudget(verbose=verbose)]
        if self.built and not self.optimizer.built:
            # Variables created while tracing make TensorFlow trace the
            # (costly, vectorized) train step a second time.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return super().fit(*args, callbacks=budget + others, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' build on one batch under tf.distribute, from one replica's
        part of it: Keras averages the replicas' parts with a collective
        reduce, which fails eagerly under `MultiWorkerMirroredStrategy`."""
        if self._distribute_strategy is None:
            return
        strategy = self.distribute_strategy
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(it),
                )
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _symbolic_build(self, iterator=None, data_batch=None):
        """Keras' build on one symbolic batch (under tf.distribute), given
        the batch that the model sees: without the Poisson mask, which is
        not a loss weight, and with one of the augmult views."""
        if data_batch is not None:
            x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(
                data_batch
            )
            if isinstance(sample_weight, dict) and set(sample_weight) == {MASK}:
                sample_weight = None
            if self._num_views(x) is not None:
                x = x[:, 0]
            data_batch = data_adapter_utils.pack_x_y_sample_weight(
                x, y, sample_weight
            )
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    def compile_from_config(self, config):
        """Recompiles a loaded model (with its DP optimizer) through `compile`."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        mask = None
        if isinstance(sample_weight, dict) and set(sample_weight) == {MASK}:
            mask, sample_weight = sample_weight[MASK], None
        if sample_weight is not None:
            raise ValueError(
                "sample_weight and class_weight are not supported in DP "
                "training: a weight scales an example's gradient after it is "
                "clipped, which breaks the sensitivity bound. Remove them "
                "(resample the data instead of weighting it)."
            )
        optimizer = self.optimizer
        if not optimizers.is_private(optimizer):
            raise ValueError(optimizers._NOT_PRIVATE.format(name="A DPModel"))
        if (mask is not None) != (optimizer.sampling == "poisson"):
            raise ValueError(
                "The optimizer's sampling must say what the data did: "
                "Poisson-sampled batches, padded to a fixed size and given as "
                f"(x, y, {{'{MASK}': mask}}), need sampling='poisson' and "
                "batch_size=B (the expected size); other batches need "
                "sampling='shuffle'."
            )
        grad_sum, losses, y_pred = self.clipped_gradient_sum(x, y, mask)
        batch_size = tf.nest.flatten(x)[0].shape[0]
        optimizer.apply_private_gradients(
            grad_sum, self.trainable_variables, batch_size
        )
        for sg in _seed_generators(self):
            sg.next()
        if mask is None:
            mask = tf.ones_like(losses)
        mask = tf.cast(mask, losses.dtype)
        count = tf.reduce_sum(mask)
        self._loss_tracker.update_state(
            tf.math.divide_no_nan(tf.reduce_sum(losses * mask), count),
            sample_weight=count,
        )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=mask)
        if tf_trainer._collective_all_reduce_multi_worker(
            self.distribute_strategy
        ):
            # Keras averages the logs of several workers along axis 0,
            # which scalars lack.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def clipped_gradient_sum(self, x, y=None, mask=None):
        """The sum over a batch of per-example gradients clipped to norm
        <= C, before noise: the private part of `train_step`.

        Args:
            x, y: a batch (`x` with K views per example for augmult).
            mask: optional `[B]` 0/1 weights of a padded Poisson batch.

        Returns:
            `(grad_sum, losses, y_pred)`: one float32 sum per trainable
            variable, the per-example losses `[B]`, and the predictions.
        """
        optimizer = self.optimizer
        num_views = self._num_views(x)
        variables = self.trainable_variables
        for v in variables:
            if getattr(v, "regularizer", None) is not None:
                raise ValueError(
                    f"The variable '{v.path}' has a weight regularizer, "
                    "which would add the same data-independent term to "
                    "every example's gradient before clipping. Remove it "
                    "and use the optimizer's `weight_decay` instead."
                )
        example = (x,) if y is None else (x, y)
        seed_generators = _seed_generators(self)
        dynamic_batch = tf.shape(tf.nest.flatten(x)[0])[0]
        # One independent seed per example for dropout and other random ops.
        example_seeds = [
            tf.random.experimental.stateless_split(
                tf.cast(sg.state, tf.int64), dynamic_batch
            )
            for sg in seed_generators
        ]

        def loss_fn(inputs):
            (*xy, seeds) = inputs
            xi, yi = (xy[0], None) if y is None else xy
            return self._per_example_loss(
                xi, yi, seed_generators, seeds, num_views
            )

        def batch_loss_fn(inputs):
            (*xy, seeds) = inputs
            xb, yb = (xy[0], None) if y is None else xy
            return self._batch_losses(xb, yb, seed_generators, seeds, num_views)

        def clipped_sum(example, mask):
            args = (
                variables,
                example,
                optimizer.l2_norm_clip,
                optimizer.microbatch_size,
                mask,
            )
            # "auto" keeps microbatches on the vectorized engine: the fast
            # engine in chunks measured 6x slower (README, Speed).
            if optimizer.clipping == "fast" or (
                optimizer.clipping == "auto"
                and optimizer.microbatch_size is None
            ):
                try:
                    return fast_clipping.clipped_gradient_sum(
                        self, batch_loss_fn, *args, num_seeds=1
                    )
                except fast_clipping.Unsupported as e:
                    if optimizer.clipping == "fast":
                        raise ValueError(
                            "clipping='fast' cannot compute this model's "
                            f"per-example norms exactly: {e}. Use "
                            "clipping='vectorized' or 'auto'."
                        ) from e
                    logging.getLogger("keras_dpscale").info(
                        "clipping='auto': the vectorized engine, because %s.", e
                    )
            return clipping.clipped_gradient_sum(loss_fn, *args)

        if getattr(self, "_jit_per_replica", False):
            clipped_sum = tf.function(clipped_sum, jit_compile=True)
        return clipped_sum((*example, example_seeds), mask)

    def _num_views(self, x):
        """K if `x` holds K augmented views per example (augmult), else None.

        Views are recognized by rank: `[B, K, H, W, C]` for a model whose
        one input is `[B, H, W, C]`.
        """
        inputs = getattr(self, "inputs", None)
        if not isinstance(x, tf.Tensor) or not inputs or len(inputs) != 1:
            return None
        if x.shape.rank == len(inputs[0].shape) + 1:
            return x.shape[1]
        return None

    @contextlib.contextmanager
    def _training_forward(self, x, seed_generators, seeds):
        """Yields `(y_pred, scope)`: the model on `x` in training mode, in a
        `StatelessScope` that gives each random layer its seed from `seeds`
        and collects added losses. On exit, raises if the pass assigned a
        model variable from the data (`check_no_state_updates`)."""
        mapping = [
            (sg.state, tf.cast(s, sg.state.dtype))
            for sg, s in zip(seed_generators, seeds)
        ]
        with StatelessScope(state_mapping=mapping, collect_losses=True) as s:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            yield y_pred, s
        check_no_state_updates(self, s, seed_generators)

    def _batch_losses(self, x, y, seed_generators, seeds, num_views):
        """Per-example losses `[B]` and predictions of a whole batch, in one
        forward pass (the fast engine's). With `num_views` K, `x` is `[B, K,
        ...]`: the model sees B*K rows, and an example's loss is the mean of
        its views' losses, as in `_per_example_loss`."""
        rows = 1 if num_views is None else num_views
        if num_views is not None:
            x = tf.reshape(x, [-1, *x.shape[2:]])
        # The batch's dropout and other random ops read the first example's
        # seed: fresh every step (and every microbatch).
        first_seeds = [s[0] for s in seeds]
        with self._training_forward(x, seed_generators, first_seeds) as (
            y_pred,
            scope,
        ):
            pass
        if scope.losses:
            raise fast_clipping.Unsupported(
                "the model adds losses in its forward pass (add_loss)"
            )
        losses = self._per_row_losses(y, y_pred, rows)
        losses = tf.reduce_mean(tf.reshape(losses, [-1, rows]), axis=1)
        return losses, tf.nest.map_structure(
            lambda t: tf.reduce_mean(
                tf.reshape(t, [-1, rows, *t.shape[1:]]), 1
            ),
            y_pred,
        )

    def _per_row_losses(self, y, y_pred, rows):
        """The compiled loss of each row `[B*K]`, from the loss's own
        unreduced `call` (an example's loss is then the mean over its rows,
        as Keras' batch mean gives it on the example's rows alone).

        Only for what the batch mean reduces exactly to per-example means:
        one output, Keras `Loss` objects with the default
        "sum_over_batch_size" reduction, no output mask, and the model's own
        `compute_loss`.
        """
        compile_loss = self._compile_loss
        if (
            y is None
            or compile_loss is None
            or tf.nest.is_nested(y)
            or tf.nest.is_nested(y_pred)
            or getattr(y_pred, "_keras_mask", None) is not None
            or type(self).compute_loss is not Trainer.compute_loss
        ):
            raise fast_clipping.Unsupported(
                "the loss is not one Keras loss of one output"
            )
        if not compile_loss.built:
            compile_loss.build(y, y_pred)
        y = tf.repeat(y, rows, axis=0)
        values = []
        for _, loss, weight, _ in compile_loss._flat_losses:
            if getattr(loss, "reduction", None) != "sum_over_batch_size":
                raise fast_clipping.Unsupported(
                    f"the loss {loss!r} does not reduce by the batch mean"
                )
            value = tf.cast(loss.call(y, y_pred), tf.float32)
            value = tf.reshape(value, [tf.shape(value)[0], -1])
            if weight is not None:
                value = value * weight
            values.append(value)
        return tf.add_n([tf.reduce_mean(v, axis=1) for v in values])

    def _per_example_loss(self, x, y, seed_generators, seeds, num_views):
        """Loss and prediction of ONE example (no batch dimension).

        Runs inside `tf.vectorized_map`, in a `StatelessScope`: the random
        layers read this example's own seed, and any attempt to update a
        model variable from the data is caught (`check_no_state_updates`).
        With `num_views` K, `x` is the example's K views: the loss is the
        mean of their losses (one gradient per example, De et al. 2022) and
        the prediction the mean of their predictions.
        """
        rows = 1 if num_views is None else num_views
        if num_views is None:
            x = tf.nest.map_structure(lambda t: t[None], x)
        if y is not None:
            y = tf.nest.map_structure(
                lambda t: tf.repeat(t[None], rows, axis=0), y
            )
        with self._training_forward(x, seed_generators, seeds) as (y_pred, _):
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=None, training=True
            )
        # Keras divides losses by the number of replicas; a per-example loss
        # must stay whole so that its gradient is clipped at the right scale.
        loss = loss_module.unscale_loss_for_distribution(loss)
        return loss, tf.nest.map_structure(
            lambda t: tf.reduce_mean(t, axis=0), y_pred
        )


def _is_mirrored(strategy):
    """True for the strategies that replicate over several local devices."""
    return strategy.num_replicas_in_sync > 1 and isinstance(
        strategy,
        (
            tf.distribute.MirroredStrategy,
            tf.distribute.MultiWorkerMirroredStrategy,
        ),
    )


def _seed_generators(model):
    return [
        sg
        for layer in model._flatten_layers()
        for sg in getattr(layer, "_seed_generators", [])
    ]


def check_layers(model):
    """Raises if the model has a layer that mixes examples (BatchNorm)."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization) or getattr(
            layer, "mixes_examples", False
        ):
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) computes its "
                "output for one example from other examples of the batch, "
                "so per-example gradients and their clipping bound do not "
                "hold. Replace it with keras.layers.GroupNormalization or "
                "LayerNormalization."
            )


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


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPModel(DPTrainer, keras.Model):
    """A `keras.Model` that trains with DP-SGD.

    Use it like `keras.Model`: functional (`DPModel(inputs, outputs)`) or
    subclassed (`class MyModel(DPModel)` with a `call` method), and compile
    it with a DP optimizer such as `keras_dpscale.DPSGD`.
    """

    def __new__(cls, *args, **kwargs):
        # Like keras.Model, which hands functional use to Functional, but
        # without rewriting this class's bases (Keras injects Functional into
        # a Model subclass used functionally, which breaks later subclasses).
        if cls is DPModel and functional_init_arguments(args, kwargs):
            return DPFunctional.__new__(DPFunctional, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if functional_init_arguments(args, kwargs):
            raise TypeError(
                f"{type(self).__name__} subclasses DPModel and is called with "
                "inputs and outputs; for a functional subclass, subclass "
                "keras_dpscale.dp_model.DPFunctional instead."
            )
        super().__init__(*args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPFunctional(DPModel, Functional):
    """A functional `DPModel`: what `DPModel(inputs, outputs)` returns."""

    def __new__(cls, *args, **kwargs):
        return Functional.__new__(cls, *args, **kwargs)

    def __init__(self, inputs, outputs, name=None, **kwargs):
        Trainer.__init__(self)
        Functional.__init__(self, inputs, outputs, name=name, **kwargs)


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPSequential(DPTrainer, keras.Sequential):
    """A `keras.Sequential` that trains with DP-SGD."""


@keras.saving.register_keras_serializable(package="keras_dpscale")
class PrivateWrapper(DPModel):
    """A `DPModel` around a subclassed Keras model (see `make_private`)."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def get_config(self):
        config = super().get_config()
        config["model"] = keras.saving.serialize_keras_object(self.model)
        return config

    @classmethod
    def from_config(cls, config):
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def make_private(model):
    """Returns a DP-trainable model that shares `model`'s layers and weights.

    Args:
        model: a built `keras.Sequential`, a functional `keras.Model`, or a
            subclassed `keras.Model`.

    Returns:
        A `DPSequential`, a functional `DPModel`, or a `PrivateWrapper`. The
        weights are shared, not copied: training one trains the other.
    """
    if isinstance(model, DPTrainer):
        return model
    if isinstance(model, keras.Sequential):
        return DPSequential(model.layers, name=model.name)
    if isinstance(model, Functional):
        return DPModel(model.inputs, model.outputs, name=model.name)
    return PrivateWrapper(model, name=f"private_{model.name}")
