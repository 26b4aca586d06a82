"""`DPModel`, `DPSequential` and `make_private`: Keras models that train with DP-SGD.

A DP model replaces Keras' `train_step` by the private one,
`DPTrainer.train_step`, which reads top to bottom:

    per-example norms -> clip each gradient to norm <= C -> sum
        (the engine chosen at compile, `keras_dpscale.engines`)
    -> accumulate over the logical batch -> add noise once -> apply
        (the DP optimizer, `keras_dpscale.optimizers`)

Everything else (`fit`, `evaluate`, `predict`, callbacks, saving) is Keras'.

The model owns its privacy ledger (`keras_dpscale.ledger`): every DP step
that trained its weights, whichever optimizer took it. `fit` records how
its data were drawn (`keras_dpscale.sampling`): on arrays it draws Poisson
batches itself (secret, fresh every pass); a dataset made by
`keras_dpscale.data` says how it samples; any other pipeline is accounted
for as if every example were in every step, with a warning.

It fails closed (`keras_dpscale.validators`): compiling with a non-DP
optimizer, a trainable `BatchNormalization` (a frozen one is allowed) or a
`MixUp`-like layer, any layer that updates state from the data during
training, `sample_weight` / `class_weight`, and data sampled more weakly
than sigma was calibrated for raise errors that name the fix.
"""

import inspect
import warnings
import weakref

import keras
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale import callbacks as dp_callbacks
from keras_dpscale import engines
from keras_dpscale import ledger as ledger_lib
from keras_dpscale import optimizers
from keras_dpscale import reporting
from keras_dpscale import sampling as sampling_lib
from keras_dpscale import validators
from keras_dpscale._compat import keras_private
from keras_dpscale.data import poisson
from keras_dpscale.engines import losses as losses_lib

MASK = validators.MASK


class DPTrainer(reporting.PrivacyReporting):
    """The private `train_step`, mixed in front of a Keras model class."""

    def compile(
        self,
        optimizer=None,
        *args,
        clipping="auto",
        microbatch_size=None,
        jit_compile=True,
        **kwargs,
    ):
        """As `keras.Model.compile`; the optimizer must be a DP optimizer.

        Args:
            optimizer: a DP optimizer (`keras_dpscale.DPSGD`, `DPAdam`).
            clipping: how per-example clipping is computed; the result is
                the same. "fast": ghost norms and book-keeping
                (`keras_dpscale.engines.fast`), raises if the model is
                outside what it covers. "vectorized": per-example gradients
                by `tf.vectorized_map`. "auto" (default): "fast" where it
                covers the model and no `microbatch_size` is set, else
                "vectorized" (the choice is logged).
            microbatch_size: examples per chunk of per-example work; trades
                speed for memory and changes nothing else.
            jit_compile: defaults to True: the step runs under XLA.
            *args, **kwargs: as `keras.Model.compile`.
        """
        if not optimizers.is_private(optimizer):
            raise ValueError(
                f"{type(self).__name__} trains with differential privacy "
                "and needs a DP optimizer, such as keras_dpscale.DPSGD(...) "
                f"or keras_dpscale.DPAdam(...); got {optimizer!r}."
            )
        kwargs = _weighted_by_mask(_by_name(args, kwargs))
        jit_compile = kwargs.pop("jit_compile", jit_compile)
        validators.check_layers(self)
        self._not_covered = validators.warn_data_dependent_state(self)
        self._dp_ledger.adopt(self.trainable_variables)
        self._dp_engine = engines.select(clipping, microbatch_size)
        self._jit_per_replica = bool(jit_compile) and _is_mirrored(
            self.distribute_strategy
        )
        if self._jit_per_replica:
            # XLA cannot compile one program over several devices' variables
            # (Mirrored strategies): compile each replica's step instead.
            jit_compile = False
        if _is_mirrored(self.distribute_strategy) and (
            kwargs.get("steps_per_execution", 1) != 1
        ):
            raise ValueError(
                "steps_per_execution > 1 fails under Mirrored strategies in "
                "Keras 3 (keras-team/keras#19246, for any model): leave it "
                "at 1 there."
            )
        super().compile(optimizer, jit_compile=jit_compile, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and getattr(self, "_dp_engine", None):
            config["clipping"] = self._dp_engine.clipping
            config["microbatch_size"] = self._dp_engine.microbatch_size
        return config

    def train_on_batch(self, x, y=None, sample_weight=None, **kwargs):
        """As `keras.Model.train_on_batch`, traced for this batch's size."""
        _trace_for(self, tf.nest.flatten(x)[0].shape[0])
        return super().train_on_batch(
            x, y, sample_weight=sample_weight, **kwargs
        )

    def train_step(self, data):
        """One private step: per-example norms -> clip -> sum -> accumulate
        -> noise once per logical batch -> apply (Abadi et al. 2016; De et
        al. 2022, Alg. 1)."""
        x, y, mask = _private_batch(data)
        optimizer = _private(self.optimizer)
        variables = self.trainable_variables
        batch_size, rows = optimizer.prepare(
            variables, tf.nest.flatten(x)[0].shape[0], mask is not None
        )
        # 1-3. Each example's gradient norm, its gradient clipped to norm
        # <= C, the clipped gradients summed over this physical batch.
        clipped_sum = self._dp_engine.clipped_gradient_sum
        if self._jit_per_replica:
            clipped_sum = tf.function(clipped_sum, jit_compile=True)
        grad_sum, losses, y_pred = clipped_sum(
            self, x, y, mask, optimizer.l2_norm_clip
        )
        # Every state update below waits for the data, so a call that gets
        # none (an exhausted iterator, outside XLA) changes nothing.
        with tf.control_dependencies(tf.nest.flatten(grad_sum)):
            # 4. Accumulate the logical batch's physical batches.
            total, is_last = optimizer.accumulate(grad_sum, variables)

            def noise_and_apply(total):
                # 5. Noise N(0, (sigma C)^2): once per logical batch, one
                # draw over all replicas, recorded in the model's ledger.
                noisy_sum, sigma = optimizer.add_noise(total)
                self._dp_ledger.record(
                    sigma,
                    batch_size,
                    optimizer.num_examples,
                    rows,
                )
                # 6. The replicas' sums added up, divided by the public B
                # -> update.
                optimizer.apply_mean(noisy_sum, variables, batch_size)

            _run_if(is_last, noise_and_apply, total)
        for sg in keras_private.seed_generators(self):
            sg.next()
        return self._training_logs(x, y, y_pred, losses, mask)

    def _training_logs(self, x, y, y_pred, losses, mask):
        """The loss and metrics of the step's real (unmasked) examples."""
        if mask is None:
            mask = tf.ones_like(losses)
        mask = tf.cast(mask, losses.dtype)
        count = tf.reduce_sum(mask)
        self._loss_tracker.update_state(
            tf.math.divide_no_nan(tf.reduce_sum(losses * mask), count),
            sample_weight=count,
        )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=mask)
        if keras_private.collective_all_reduce_multi_worker(
            self.distribute_strategy
        ):
            # Keras averages the logs of several workers along axis 0,
            # which scalars lack.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

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
            raise ValueError(validators.NO_WEIGHTS)
        optimizer = _private(self.optimizer)
        if _is_arrays(x, y):
            x, y, validation_data, steps_per_epoch, drawn = _poisson_fit_data(
                self,
                x,
                y,
                batch_size,
                validation_split,
                validation_data,
                steps_per_epoch,
            )
            batch_size, validation_split = None, 0.0
        else:
            x, drawn = _dataset_fit_data(self, x)
        if isinstance(x, tf.data.Dataset):
            _trace_for(self, tf.nest.flatten(x.element_spec)[0].shape[0])
        if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            # A dataset samples its own batches (Keras would only warn that
            # `shuffle` is ignored).
            shuffle = False
        _check_whole_logical_batches(x, steps_per_epoch, optimizer, drawn)
        if optimizer.dp_config.calibrating:
            validators.check_sampling(optimizer.sampling, drawn)
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
        if (
            budget
            and optimizer.batch_size is None
            and self.steps_per_execution > 1
        ):
            raise ValueError(
                "The privacy budget is checked between executions of "
                f"steps_per_execution={self.steps_per_execution} steps, and "
                "needs B before the first: pass batch_size=B to the DP "
                "optimizer, or batch the dataset with drop_remainder=True."
            )
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
            x, y, sample_weight = keras_private.unpack_x_y_sample_weight(
                data_batch
            )
            if isinstance(sample_weight, dict) and set(sample_weight) == {MASK}:
                sample_weight = None
            if losses_lib.num_views(self, x) is not None:
                x = x[:, 0]
            data_batch = keras_private.pack_x_y_sample_weight(
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


def _run_if(condition, fn, *args):
    """`fn(*args)` where `condition` holds (True, or a boolean tensor equal
    on every replica: the last physical batch of a logical batch).

    `fn` synchronizes the replicas (the optimizer's all-reduce), which
    TensorFlow does not allow inside a conditional of one replica's
    function under `MirroredStrategy`. So there the condition is taken in
    cross-replica context (`merge_call`, which every replica reaches on
    every physical batch) and `fn` runs on all replicas from there.
    """
    if condition is True:
        fn(*args)
        return
    replica = tf.distribute.get_replica_context()
    strategy = tf.distribute.get_strategy()
    # Mirrored strategies synchronize through merge_call even with one
    # replica (a MirroredStrategy on one CPU or GPU).
    if replica is None or not isinstance(strategy, _MIRRORED):
        tf.cond(condition, lambda: fn(*args), lambda: None)
        return

    def in_cross_replica_context(strategy, condition, *args):
        condition = strategy.experimental_local_results(condition)[0]
        tf.cond(condition, lambda: strategy.run(fn, args=args), lambda: None)

    replica.merge_call(in_cross_replica_context, args=(condition, *args))


def _trace_for(model, rows):
    """Makes the next step trace afresh when the batches' static size
    changes. Keras would retrace its step with an unknown batch dimension,
    and the check of a step's rows against the logical batch size B
    (`DPOptimizerMixin.prepare`), which needs the static size, would pass
    batches larger than the B that the ledger records."""
    if getattr(model, "_dp_traced_rows", rows) != rows:
        model.train_function = None
    model._dp_traced_rows = rows


def _check_whole_logical_batches(x, steps_per_epoch, optimizer, drawn):
    """Raises unless each epoch is whole logical batches: a logical batch
    that ran over an epoch's end would join the last physical batches of
    one pass over the data (or one sample) to the first of the next, and
    an example could be in its noised sum twice. A pipeline that cuts its
    samples into physical batches (`sampling.Sampling.accumulation_steps`)
    must cut them as the optimizer accumulates (`drawn`: the data's
    sampling)."""
    k = optimizer.accumulation_steps
    cut = drawn.accumulation_steps
    if cut is not None and cut != k:
        raise ValueError(
            f"The dataset cuts each sample into {cut} physical batches, the "
            f"optimizer accumulates accumulation_steps={k}: pass the same "
            "accumulation_steps to both."
        )
    if k == 1:
        return
    counts = [] if steps_per_epoch is None else [steps_per_epoch]
    if isinstance(x, tf.data.Dataset):
        cardinality = int(x.cardinality())
        if cardinality == tf.data.UNKNOWN_CARDINALITY:
            counts.append("an unknown number")  # might run out mid-batch
        elif cardinality != tf.data.INFINITE_CARDINALITY:
            counts.append(cardinality)
    elif steps_per_epoch is None:
        counts.append("an unknown number")
    for count in counts:
        if isinstance(count, str) or count % k:
            raise ValueError(
                f"With accumulation_steps={k}, each epoch must be whole "
                "logical batches: steps_per_epoch (if given) and the "
                "dataset's number of batches (unless it repeats forever) "
                f"must be known multiples of {k} (got {count}). Give the "
                "dataset a known length (`tf.data.experimental."
                "assert_cardinality`) or repeat it."
            )


def _by_name(args, kwargs):
    """`compile`'s positional arguments after the optimizer, by name."""
    names = list(inspect.signature(keras.Model.compile).parameters)[2:]
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"compile got two values for `{name}`.")
        kwargs[name] = value
    return kwargs


def _weighted_by_mask(compile_kwargs):
    """`compile` arguments whose `metrics` are weighted metrics: the only
    weight a DP batch has is its padding mask, and Keras' (unweighted)
    `metrics` would count the padding rows of a Poisson batch."""
    metrics = compile_kwargs.pop("metrics", None)
    if not metrics:
        return compile_kwargs
    weighted = compile_kwargs.get("weighted_metrics")
    if weighted is None:
        compile_kwargs["weighted_metrics"] = metrics
    elif isinstance(metrics, (list, tuple)) and isinstance(
        weighted, (list, tuple)
    ):
        compile_kwargs["weighted_metrics"] = list(metrics) + list(weighted)
    else:
        raise ValueError(
            "A DP model weights every metric by its batches' padding mask: "
            "pass the metrics as `weighted_metrics` only."
        )
    return compile_kwargs


def _private_batch(data):
    """`(x, y, mask)` of a training batch: the 0/1 mask of a padded Poisson
    batch (None if unpadded); any other sample weight raises."""
    x, y, sample_weight = keras_private.unpack_x_y_sample_weight(data)
    mask = None
    if isinstance(sample_weight, dict) and set(sample_weight) == {MASK}:
        # A row counts only where its mask is exactly 1: any other value
        # (a weight in disguise) drops the row. `fit` raises on such values
        # where it can see the data (`validators.checked_masks`).
        mask = tf.cast(tf.equal(sample_weight[MASK], 1), tf.float32)
        sample_weight = None
    if sample_weight is not None:
        raise ValueError(validators.NO_WEIGHTS)
    return x, y, mask


def _private(optimizer):
    """`optimizer`, or an error if it does not add DP noise."""
    if not optimizers.is_private(optimizer):
        raise ValueError(optimizers.NOT_PRIVATE.format(name="A DPModel"))
    return optimizer


def _dataset_fit_data(model, x):
    """`fit` on a dataset: `(x, sampling)`, with the padding masks checked
    and the optimizer's B and N completed from what the data say."""
    optimizer = model.optimizer
    drawn = sampling_lib.of(x)
    if drawn.kind == "unknown" and not drawn.declared:
        warnings.warn(_UNKNOWN_PIPELINE, stacklevel=3)
    if drawn.batch_size is not None:
        # A pipeline that samples at rate B/N must agree with the
        # accountant's B and N (or give them).
        optimizer.dp_config = optimizer.dp_config.completed(
            drawn.batch_size, drawn.num_examples
        )
    elif optimizer.batch_size is None and isinstance(x, tf.data.Dataset):
        rows = tf.nest.flatten(x.element_spec)[0].shape[0]
        if rows is not None and not validators.has_mask(x):
            # B before the first step, so that the budget knows it.
            optimizer.dp_config = optimizer.dp_config.completed(
                rows * optimizer.accumulation_steps
            )
    return validators.checked_masks(x), drawn


def _poisson_fit_data(
    model, x, y, batch_size, validation_split, validation_data, steps
):
    """`fit` on arrays: Poisson batches of them (see `fit`)."""
    optimizer = model.optimizer
    if model.distribute_strategy.num_replicas_in_sync > 1:
        raise ValueError(
            "fit on arrays samples Poisson batches for one replica; under "
            "a distribution strategy, use "
            "keras_dpscale.data.train_dataset with "
            "strategy.distribute_datasets_from_function."
        )
    if validation_split and validation_data is None:
        (x, y, _), validation_data = keras_private.train_validation_split(
            (x, y, None), validation_split=validation_split
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
    optimizer.dp_config = optimizer.dp_config.completed(
        batch_size, num_examples
    )
    data = poisson.arrays_dataset(
        x, y, batch_size, accumulation_steps=optimizer.accumulation_steps
    )
    if steps is None:
        steps = max(1, round(num_examples / batch_size))
        steps *= optimizer.accumulation_steps
    return data, None, validation_data, steps, sampling_lib.of(data)


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
        return keras_private.can_convert_arrays((x, y))
    except Exception:  # noqa: BLE001 -- anything else is not arrays
        return False


_MIRRORED = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
)


def _is_mirrored(strategy):
    """True for the strategies that replicate over several local devices."""
    return strategy.num_replicas_in_sync > 1 and isinstance(strategy, _MIRRORED)


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
        if cls is DPModel and keras_private.functional_init_arguments(
            args, kwargs
        ):
            return DPFunctional.__new__(DPFunctional, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if keras_private.functional_init_arguments(args, kwargs):
            raise TypeError(
                f"{type(self).__name__} subclasses DPModel and is called with "
                "inputs and outputs; for a functional subclass, subclass "
                "keras_dpscale.dp_model.DPFunctional instead."
            )
        super().__init__(*args, **kwargs)
        self._dp_ledger = ledger_lib.PrivacyLedger(self)


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPFunctional(DPModel, keras_private.Functional):
    """A functional `DPModel`: what `DPModel(inputs, outputs)` returns."""

    def __new__(cls, *args, **kwargs):
        return keras_private.Functional.__new__(cls, *args, **kwargs)

    def __init__(self, inputs, outputs, name=None, **kwargs):
        keras_private.Trainer.__init__(self)
        keras_private.Functional.__init__(
            self, inputs, outputs, name=name, **kwargs
        )
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
    elif isinstance(model, keras_private.Functional):
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
