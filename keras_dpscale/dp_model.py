"""`DPModel`, `DPSequential` and `make_private`: Keras models that train with DP-SGD.

A DP model replaces Keras' `train_step` by the private one:

    per-example norms -> clip each gradient to norm <= C -> sum
        (fast_clipping.py: ghost norms and book-keeping, or
         clipping.py: per-example gradients by tf.vectorized_map)
    -> accumulate, add noise once per logical batch, apply   (optimizers.py)

Everything else (`fit`, `evaluate`, `predict`, callbacks, saving) is Keras'.

The model owns its privacy ledger (`keras_dpscale.ledger`): every DP step
that trained its weights, whichever optimizer took it. `fit` records how
its data were drawn (`keras_dpscale.sampling`): on arrays it draws Poisson
batches itself (secret, fresh every pass); a dataset made by
`keras_dpscale.data` says how it samples; any other pipeline is accounted
for as if every example were in every step, with a warning.

It fails closed: compiling with a non-DP optimizer, a `BatchNormalization`
or `MixUp`-like layer, any layer that updates state from the data during
training, `sample_weight` / `class_weight`, and data sampled more weakly
than sigma was calibrated for raise errors that name the fix.
"""

import contextlib
import logging
import warnings
import weakref

import keras
import tensorflow as tf
from keras.src.backend.common.stateless_scope import StatelessScope
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.losses import loss as loss_module
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.trainers.data_adapters import array_data_adapter
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.trainers.trainer import Trainer

from keras_dpscale import accounting
from keras_dpscale import callbacks as dp_callbacks
from keras_dpscale import clipping
from keras_dpscale import fast_clipping
from keras_dpscale import ledger as ledger_lib
from keras_dpscale import optimizers
from keras_dpscale import sampling as sampling_lib
from keras_dpscale.data import poisson

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
        self._not_covered = warn_data_dependent_state(self)
        self._dp_ledger.adopt(self.trainable_variables)
        self._jit_per_replica = bool(jit_compile) and _is_mirrored(
            self.distribute_strategy
        )
        if self._jit_per_replica:
            # XLA cannot compile one program over several devices' variables
            # (Mirrored strategies): compile each replica's step instead.
            jit_compile = False
        super().compile(optimizer, *args, jit_compile=jit_compile, **kwargs)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        **kwargs,
    ):
        """As `keras.Model.fit`; samples, records and reports privately.

        - Arrays (`fit(x_train, y_train, batch_size=B)`): each logical step
          is a Poisson sample of the examples with rate B/N, drawn afresh
          from the operating system's entropy for every pass (`shuffle` is
          ignored), padded to a fixed size with a mask; an epoch is
          round(N/B) logical steps. N and B become the optimizer's
          `num_examples` and `batch_size` if it has none (they must agree
          if it has).
        - A dataset: its `sampling.Sampling` (the library's pipelines set
          it, `sampling.declare` states a user's own); any other pipeline is
          accounted for as "unknown" (every example in every step), with a
          warning.

        The steps are recorded with that sampling in the model's ledger.
        When the optimizer knows `num_examples` and `target_delta`, a
        `callbacks.PrivacyBudget` runs first among the callbacks (`epsilon`
        in the logs; training stops before the budget); a user's own
        `PrivacyBudget` is moved first instead.

        Raises:
            ValueError: `sample_weight` or `class_weight`; arrays that
                disagree with the optimizer's `num_examples`/`batch_size`;
                data sampled more weakly than the sampling that sigma was
                calibrated for.
        """
        if sample_weight is not None or class_weight is not None:
            raise ValueError(_NO_WEIGHTS)
        optimizer = self.optimizer
        if not optimizers.is_private(optimizer):
            raise ValueError(optimizers._NOT_PRIVATE.format(name="A DPModel"))
        if _is_arrays(x, y):
            x, y, validation_data, steps_per_epoch, drawn = (
                self._poisson_fit_data(
                    x,
                    y,
                    batch_size,
                    validation_split,
                    validation_data,
                    steps_per_epoch,
                )
            )
            batch_size, validation_split = None, 0.0
        else:
            drawn = sampling_lib.of(x)
            if drawn.kind == "unknown" and not drawn.declared:
                warnings.warn(_UNKNOWN_PIPELINE, stacklevel=2)
            x = _checked_masks(x)
        self._check_calibrated_for(drawn)
        if optimizer.discard_partial_batch():
            warnings.warn(
                "A logical batch was half accumulated when fit started; it "
                "was dropped (never noised or applied), so that its rows do "
                "not join those of another sample.",
                stacklevel=2,
            )
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = callbacks.callbacks  # never bypass the budget
        callbacks = list(callbacks or [])
        budget = [
            c for c in callbacks if isinstance(c, dp_callbacks.PrivacyBudget)
        ]
        others = [c for c in callbacks if c not in budget]
        if not budget and dp_callbacks.reports_privacy(optimizer):
            quiet = verbose == 0
            budget = [dp_callbacks.PrivacyBudget(verbose=0 if quiet else 1)]
        if self.built and not optimizer.built:
            # Variables created while tracing make TensorFlow trace the
            # (costly, vectorized) train step a second time.
            with self.distribute_strategy.scope():
                optimizer.build(self.trainable_variables)
        self._dp_ledger.set_sampling(drawn)
        try:
            return super().fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=verbose,
                callbacks=budget + others,
                validation_split=validation_split,
                validation_data=validation_data,
                shuffle=shuffle,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                **kwargs,
            )
        finally:
            # Steps outside fit (train_on_batch, custom loops) are "unknown".
            self._dp_ledger.set_sampling(sampling_lib.UNKNOWN)

    def _poisson_fit_data(
        self, x, y, batch_size, validation_split, validation_data, steps
    ):
        """`fit` on arrays: Poisson batches of them (see `fit`)."""
        optimizer = self.optimizer
        if self.distribute_strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "fit on arrays samples Poisson batches for one replica; under "
                "a distribution strategy, use "
                "keras_dpscale.data.train_dataset with "
                "strategy.distribute_datasets_from_function."
            )
        if validation_split and validation_data is None:
            (x, y, _), validation_data = (
                array_data_adapter.train_validation_split(
                    (x, y, None), validation_split=validation_split
                )
            )
        num_examples = len(tf.nest.flatten(x)[0])
        if optimizer.num_examples not in (None, num_examples):
            raise ValueError(
                f"The optimizer's num_examples={optimizer.num_examples}, but "
                f"fit was given {num_examples} training examples."
            )
        given = batch_size
        batch_size = given or optimizer.batch_size or 32
        if given is not None and optimizer.batch_size not in (None, given):
            raise ValueError(
                f"The optimizer's batch_size={optimizer.batch_size}, but fit "
                f"was given batch_size={given}."
            )
        accounting.check_arguments(batch_size, num_examples)
        optimizer.num_examples = num_examples
        optimizer.batch_size = batch_size
        data = poisson.arrays_dataset(
            x, y, batch_size, accumulation_steps=optimizer.accumulation_steps
        )
        if steps is None:
            steps = max(1, round(num_examples / batch_size))
            steps *= optimizer.accumulation_steps
        return data, None, validation_data, steps, sampling_lib.of(data)

    def _check_calibrated_for(self, drawn):
        """Raises if sigma was calibrated for a stronger sampling than the
        data's (the budget would be spent at once)."""
        optimizer = self.optimizer
        planned = optimizer.sampling
        if optimizer._calibration is None:
            return
        if _STRENGTH.index(drawn.kind) > _STRENGTH.index(planned):
            raise ValueError(
                f"The optimizer calibrated sigma for {planned} sampling, but "
                f"the data are sampled as '{drawn.kind}' "
                f"({accounting.SAMPLING_ASSUMPTIONS[drawn.kind]}). Train on arrays "
                "or on keras_dpscale.data.train_dataset (Poisson sampling), "
                "pass sampling='" + drawn.kind + "' to the optimizer to "
                "calibrate for it, or state how your pipeline samples with "
                "keras_dpscale.sampling.declare."
            )

    # -- The privacy record of the weights (the model's ledger). ----------

    def privacy_ledger(self):
        """Every DP step of this model's weights, as `accounting.Segment`s."""
        return self._dp_ledger.segments()

    def privacy_settings(self, delta=None, accountant=None):
        """`(optimizer, delta, accountant, num_examples)` for reporting: the
        given values, else the DP optimizer's (None if there is none)."""
        optimizer = getattr(self, "optimizer", None)
        if not optimizers.is_private(optimizer):
            optimizer = None
        delta = (
            delta
            if delta is not None
            else getattr(optimizer, "target_delta", None)
        )
        if delta is None:
            raise ValueError(
                "Reporting epsilon needs delta: pass delta=..., or "
                "target_delta=... to the DP optimizer."
            )
        accountant = accountant or getattr(optimizer, "accountant", "pld")
        num_examples = getattr(optimizer, "num_examples", None)
        return optimizer, delta, accountant, num_examples

    def epsilon(self, delta=None, accountant=None):
        """Epsilon of every DP step recorded, at `delta` (default: the
        optimizer's `target_delta`)."""
        _, delta, accountant, num_examples = self.privacy_settings(
            delta, accountant
        )
        return accounting.ledger_epsilon(
            self.privacy_ledger(), num_examples, delta, accountant
        )

    def privacy_statement(self, delta=None):
        """What the guarantee is, what it assumes and what it does not cover."""
        optimizer, delta, accountant, num_examples = self.privacy_settings(
            delta
        )
        return accounting.privacy_statement(
            self.privacy_ledger(),
            delta,
            accountant,
            num_examples=num_examples,
            l2_norm_clip=getattr(optimizer, "l2_norm_clip", None),
            non_private_steps=self.non_private_steps(),
            not_covered=self.not_covered(),
        )

    def non_private_steps(self):
        """Steps of a non-DP optimizer on the weights before DP training."""
        return int(self._dp_ledger.non_private_steps.numpy())

    def not_covered(self):
        """State set from data outside DP training (adapted statistics)."""
        found = getattr(self, "_not_covered", None)
        return list(found if found is not None else data_dependent_state(self))

    def coming_steps(self):
        """A `Segment` with the settings of the coming steps (the optimizer's
        and the current data's sampling), or None if not known yet."""
        return self.optimizer.coming_steps(self._dp_ledger.sampling())

    def remaining_steps(self, epsilon_budget=None, delta=None):
        """Logical steps like the coming ones left within the budget; None
        if the coming steps' settings are not known yet."""
        optimizer, delta, accountant, num_examples = self.privacy_settings(
            delta
        )
        budget = (
            optimizer.epsilon_budget
            if epsilon_budget is None
            else epsilon_budget
        )
        if budget is None:
            raise ValueError("A budget check needs epsilon_budget.")
        coming = self.coming_steps()
        if coming is None:
            return None
        return accounting.remaining_steps(
            self.privacy_ledger(),
            coming,
            num_examples,
            delta,
            budget,
            accountant,
        )

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
            # A row counts only where its mask is exactly 1: any other value
            # (a weight in disguise) drops the row. `fit` raises on such
            # values where it can see the data (`_checked_masks`).
            mask = tf.cast(tf.equal(sample_weight[MASK], 1), tf.float32)
            sample_weight = None
        if sample_weight is not None:
            raise ValueError(_NO_WEIGHTS)
        optimizer = self.optimizer
        if not optimizers.is_private(optimizer):
            raise ValueError(optimizers._NOT_PRIVATE.format(name="A DPModel"))
        grad_sum, losses, y_pred = self.clipped_gradient_sum(x, y, mask)
        batch_size = tf.nest.flatten(x)[0].shape[0]
        optimizer.apply_private_gradients(
            grad_sum,
            self.trainable_variables,
            batch_size,
            record=self._dp_ledger.record,
            padded=mask is not None,
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


_NO_WEIGHTS = (
    "sample_weight and class_weight are not supported in DP training: a "
    "weight scales an example's gradient after it is clipped, which breaks "
    "the sensitivity bound. Remove them (resample the data instead of "
    "weighting it)."
)
_UNKNOWN_PIPELINE = (
    "keras_dpscale cannot see how this dataset samples its batches, so "
    "epsilon counts every example in every step (no amplification by "
    "sampling). For Poisson sampling, fit on arrays or on "
    "keras_dpscale.data.train_dataset(...); to state how your own pipeline "
    "samples, use keras_dpscale.sampling.declare(dataset, ...)."
)


def _is_arrays(x, y):
    """True for in-memory arrays (NumPy, tensors, nests of them)."""
    if x is None or isinstance(x, tf.data.Dataset):
        return False
    try:
        return array_data_adapter.can_convert_arrays((x, y))
    except Exception:  # noqa: BLE001 -- anything else is not arrays
        return False


def _checked_masks(data):
    """A `tf.data.Dataset` whose padding masks are checked to be 0/1 (an
    error at the batch that breaks it, before it is trained on)."""
    if not isinstance(data, tf.data.Dataset):
        return data
    spec = data.element_spec
    if not (
        isinstance(spec, tuple)
        and len(spec) == 3
        and isinstance(spec[2], dict)
        and set(spec[2]) == {MASK}
    ):
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
    """Raises if the model has a layer that mixes examples by design
    (BatchNormalization, MixUp, CutMix, or `mixes_examples = True`).

    This is a check of intent, in both engines; the fast engine also proves
    on the traced computation that nothing else mixes (`separability`).
    """
    for layer in model._flatten_layers():
        if isinstance(layer, _MIXING_LAYERS) or getattr(
            layer, "mixes_examples", False
        ):
            if isinstance(layer, keras.layers.BatchNormalization):
                fix = (
                    "Replace it with keras.layers.GroupNormalization or "
                    "LayerNormalization."
                )
            else:
                fix = (
                    "Remove it: mixing examples (MixUp, CutMix) is not "
                    "compatible with per-example clipping; augment each "
                    "example on its own (augmult) instead."
                )
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) computes its "
                "output for one example from other examples of the batch, "
                "so per-example gradients and their clipping bound do not "
                f"hold. {fix}"
            )


def data_dependent_state(model):
    """Descriptions of the layers whose state was set from data outside DP
    training (adapted preprocessing layers)."""
    return [
        f"the statistics of layer '{layer.name}' ({type(layer).__name__}), "
        "set by adapt()"
        for layer in model._flatten_layers(include_self=False)
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
        self._dp_ledger = ledger_lib.PrivacyLedger(self)


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPFunctional(DPModel, Functional):
    """A functional `DPModel`: what `DPModel(inputs, outputs)` returns."""

    def __new__(cls, *args, **kwargs):
        return Functional.__new__(cls, *args, **kwargs)

    def __init__(self, inputs, outputs, name=None, **kwargs):
        Trainer.__init__(self)
        Functional.__init__(self, inputs, outputs, name=name, **kwargs)
        self._dp_ledger = ledger_lib.PrivacyLedger(self)


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPSequential(DPTrainer, keras.Sequential):
    """A `keras.Sequential` that trains with DP-SGD."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dp_ledger = ledger_lib.PrivacyLedger(self)


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
        Asked again for the same model, it returns the same DP model, whose
        ledger holds every DP step of the shared weights. If `model` was
        trained by a non-DP optimizer, its steps are recorded as not covered
        by the guarantee (the privacy statement says so).
    """
    if isinstance(model, DPTrainer):
        return model
    made = getattr(model, "_keras_dpscale_private", lambda: None)()
    if made is not None:
        return made
    if isinstance(model, keras.Sequential):
        private = DPSequential(model.layers, name=model.name)
    elif isinstance(model, Functional):
        private = DPModel(model.inputs, model.outputs, name=model.name)
    else:
        private = PrivateWrapper(model, name=f"private_{model.name}")
    trained = getattr(model, "optimizer", None)
    if trained is not None and not optimizers.is_private(trained):
        steps = int(trained.iterations.numpy()) if trained.built else 0
        if steps:
            private._dp_ledger.add_non_private_steps(steps)
            warnings.warn(
                f"The weights of '{model.name}' were trained by a non-DP "
                f"optimizer for {steps} steps; the privacy guarantee of DP "
                "training covers only what follows, and the privacy "
                "statement says so.",
                stacklevel=2,
            )
    object.__setattr__(model, "_keras_dpscale_private", weakref.ref(private))
    return private
