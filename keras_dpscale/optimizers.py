"""DP optimizers: accumulate clipped sums, add noise once per logical batch, apply.

`DPSGD` is Keras' SGD (momentum, Nesterov, learning-rate schedules, weight
decay, `use_ema`) that also holds a `DPConfig` (`keras_dpscale.config`);
`DPAdam` is Keras' Adam with the same. A `DPModel`'s private step
(`DPTrainer.train_step`) computes the sum of clipped per-example gradients
of each physical batch and then uses the optimizer's three parts of the
second half of DP-SGD:

    accumulate     the clipped sums of the `accumulation_steps` physical
                   batches of a logical batch;
    add_noise      N(0, (noise_multiplier * l2_norm_clip)^2), once per
                   logical batch, one draw over all replicas;
    apply_mean     divide by the public logical batch size B (and by C if
                   rescale_to_unit_norm), then the ordinary Keras update.

`optimizer.iterations` counts logical steps. The plain Keras entry points
(`apply`, `apply_gradients`) raise: gradients that were not clipped per
example must never reach a DP optimizer. The record of the steps is the
model's (`keras_dpscale.ledger`), not the optimizer's.
"""

import dataclasses

import keras
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale import config as config_lib
from keras_dpscale import noise

NOT_PRIVATE = (
    "{name} received gradients from a train_step that does not clip per "
    "example, so training would not be private. Build the model as "
    "keras_dpscale.DPModel / DPSequential, or wrap an existing model with "
    "keras_dpscale.make_private(model), then compile it with this optimizer."
)
# Optimizer arguments that would act after per-example clipping.
_REFUSED = (
    ("gradient_accumulation_steps", "accumulation_steps"),
    ("loss_scale_factor", "a float32 or bfloat16 model"),
    # Keras clips each replica's share before the all-reduce: only replica
    # 0's share holds the noise, so clipping would act on un-noised sums.
    ("clipnorm", "l2_norm_clip (per example)"),
    ("global_clipnorm", "l2_norm_clip (per example)"),
    ("clipvalue", "l2_norm_clip (per example)"),
)
# Settings of the trainer, not of the optimizer.
_TRAINER_SETTINGS = ("clipping", "microbatch_size")


class DPOptimizerMixin:
    """The second half of DP-SGD, mixed in front of a Keras optimizer class.

    Args:
        l2_norm_clip, noise_multiplier, accumulation_steps, batch_size,
        rescale_to_unit_norm, noise_seed, num_examples, target_delta,
        target_epsilon, steps, epochs, epsilon_budget, sampling, accountant:
            the DP settings, see `keras_dpscale.config.DPConfig`.
        *args, **kwargs: the Keras optimizer's own arguments.
    """

    def __init__(self, *args, l2_norm_clip, **kwargs):
        name = type(self).__name__
        for arg, use in _REFUSED:
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"{name} does not take `{arg}`: it would act after "
                    f"per-example clipping. Use {use} instead."
                )
        for arg in _TRAINER_SETTINGS:
            if arg in kwargs:
                raise ValueError(
                    f"`{arg}` is a setting of the private step, not of the "
                    f"optimizer: pass it to model.compile(..., {arg}=...)."
                )
        dp = {f.name: kwargs.pop(f.name) for f in _FIELDS if f.name in kwargs}
        super().__init__(*args, **kwargs)
        self._grad_sums = []  # built with the other variables
        self.dp_config = config_lib.DPConfig(l2_norm_clip=l2_norm_clip, **dp)
        seed = self.dp_config.noise_seed
        self._seed = noise.fresh_seed() if seed is None else seed

    @property
    def dp_config(self):
        """The DP settings (`DPConfig`): replaced, never changed in place."""
        return self._dp_config

    @dp_config.setter
    def dp_config(self, config):
        # The step reads sigma from a variable: it must follow every new
        # config (calibration, `fit`, restore), not only the setter below.
        self._dp_config = config
        if self.built:
            with tf.init_scope():
                self._noise_multiplier_var.assign(
                    config.noise_multiplier or 0.0
                )

    @property
    def noise_multiplier(self):
        """sigma; setting it changes the noise from the next step on (and
        ends a calibration from `target_epsilon`)."""
        return self.dp_config.noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value):
        self.dp_config = self.dp_config.with_noise_multiplier(value)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._micro_step = self.add_variable(
            shape=(),
            dtype="int64",
            aggregation="only_first_replica",
            name="dp_micro_step",
        )
        # The sigma that the step reads; every new `dp_config` assigns it.
        self._noise_multiplier_var = self.add_variable(
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(
                self.noise_multiplier or 0.0
            ),
            aggregation="only_first_replica",
            name="dp_noise_multiplier",
        )
        self._grad_sums = []
        if self.accumulation_steps > 1:
            self._grad_sums = [self._accumulator(v) for v in variables]

    def _accumulator(self, variable):
        """A replica-local sum of clipped gradients for `variable`: each
        replica adds its own physical batches without synchronizing; read
        across replicas it is their sum."""
        with keras.name_scope(self.name, caller=self):
            accumulator = keras.Variable(
                initializer="zeros",
                shape=variable.shape,
                dtype=variable.dtype,
                trainable=False,
                aggregation="sum",
                synchronization="on_read",
                name=f"{variable.path.replace('/', '_')}_dp_grad_sum",
            )
        self._track_variable(accumulator)
        return accumulator

    # -- The private step's second half (called by DPTrainer.train_step). --

    def prepare(self, variables, physical_batch_size, padded):
        """Builds the optimizer and fixes B (calibrating sigma if it waits
        for B), at trace time. Returns `(B, rows)`: the public logical batch
        size and the rows of a logical batch in the pipeline.

        Args:
            variables: the trainable variables.
            physical_batch_size: the static batch dimension of one replica
                (or None).
            padded: the batches are padded with masked rows (Poisson): B is
                then the given `batch_size`, not the rows.
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if physical_batch_size is not None:
            physical_batch_size *= replicas
        batch_size = self._logical_batch_size(physical_batch_size, padded)
        rows = self.accumulation_steps * (physical_batch_size or batch_size)
        with tf.init_scope():  # eagerly, before the first step
            completed = self.dp_config.completed(batch_size)
            if completed is not self.dp_config:  # sigma calibrated for B
                self.dp_config = completed
        if not self.built:  # Keras builds lazily, on the first trace.
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        return batch_size, rows

    def accumulate(self, grad_sum, variables):
        """Adds one physical batch's clipped sum to the logical batch's.

        Under several replicas each replica accumulates its own share
        (replica-local variables, no communication); `apply_mean` sums the
        replicas' totals once per logical batch.

        Returns:
            `(total, is_last)`: the logical batch's sum so far (this batch
            included; this replica's share) and whether this was its last
            physical batch (a Python True without accumulation). The sums
            restart from zero after the last one.
        """
        if self.accumulation_steps == 1:
            return grad_sum, True
        is_last = (self._micro_step + 1) % self.accumulation_steps == 0
        total = []
        for v, g in zip(variables, grad_sum):
            s = self._grad_sums[self._get_variable_index(v)]
            total.append(s + g)
            s.assign(tf.where(is_last, tf.zeros_like(s), total[-1]))
        self._micro_step.assign_add(1)
        return total, is_last

    def add_noise(self, grad_sum):
        """The logical batch's sum plus N(0, (sigma C)^2) per entry: the one
        place where noise is added, once per logical batch. Replicas' updates
        are summed (all-reduce): the first replica adds the draw, the others
        none.

        Returns:
            `(noisy_sum, sigma)`: the noisy sum and the sigma it used.
        """
        replica = tf.distribute.get_replica_context()
        first = (
            1.0
            if replica is None
            else tf.cast(
                tf.equal(replica.replica_id_in_sync_group, 0), tf.float32
            )
        )
        sigma = tf.convert_to_tensor(self._noise_multiplier_var)
        stddev = sigma * self.l2_norm_clip * first
        seed = noise.step_seed(self._seed, self.iterations)
        return noise.add_gaussian_noise(grad_sum, stddev, seed), sigma

    def apply_mean(self, noisy_sum, variables, batch_size):
        """The Keras update with the noisy sum divided by the public B (and
        by C if `rescale_to_unit_norm`)."""
        scale = 1.0 / batch_size
        if self.rescale_to_unit_norm:
            scale /= self.l2_norm_clip
        super().apply([g * scale for g in noisy_sum], variables)

    def _logical_batch_size(self, physical_batch_size, padded):
        """B, the public divisor of the noisy gradient sum."""
        if self.batch_size is not None:
            actual = (physical_batch_size or 0) * self.accumulation_steps
            if not padded and actual not in (0, self.batch_size):
                raise ValueError(
                    f"batch_size={self.batch_size}, but the data come in "
                    f"batches of {physical_batch_size} x accumulation_steps="
                    f"{self.accumulation_steps} = {actual}. Make them agree."
                )
            return self.batch_size
        if padded:
            raise ValueError(
                "Padded batches (with a mask) need batch_size=B, the expected "
                "logical batch size, in the optimizer: the divisor of the "
                "noisy sum must not depend on the data."
            )
        if physical_batch_size is None:
            raise ValueError(
                "The batch dimension of the training data is not static, so "
                "the logical batch size is unknown. Batch the dataset with "
                "drop_remainder=True, or pass batch_size=B to the optimizer."
            )
        return self.accumulation_steps * physical_batch_size

    # -- Between steps. -----------------------------------------------------

    def save_own_variables(self, store):
        # The accumulators hold clipped sums that no noise has covered yet
        # (a fit that ended inside a logical batch): saved as zeros, like
        # the dropped batch that `discard_partial_batch` makes of them.
        super().save_own_variables(store)
        accumulators = {id(s) for s in self._grad_sums}
        for i, variable in enumerate(self.variables):
            if id(variable) in accumulators:
                store[str(i)] = tf.zeros_like(variable).numpy()

    def at_step_boundary(self):
        """True if no logical batch is half accumulated."""
        if not self.built or self.accumulation_steps == 1:
            return True
        return int(self._micro_step.numpy()) % self.accumulation_steps == 0

    def discard_partial_batch(self):
        """Drops a half-accumulated logical batch (never noised or applied,
        so it costs no privacy): its rows must not join those of the next
        sample. Returns True if there was one."""
        if self.at_step_boundary():
            return False
        for s in self._grad_sums:
            s.assign(tf.zeros_like(s))
        micro = int(self._micro_step.numpy())
        self._micro_step.assign(micro - micro % self.accumulation_steps)
        return True

    def coming_steps(self, sampling):
        """A `Segment` with the coming steps' settings (steps 0), given the
        data's `sampling`; None if B or sigma is not known yet."""
        if self.batch_size is None or self.noise_multiplier is None:
            return None
        return accounting.Segment(
            self.noise_multiplier,
            self.batch_size,
            sampling.kind,
            0,
            num_examples=self.num_examples,
            overflow_probability=sampling.overflow_probability,
            declared=sampling.declared,
        )

    def apply(self, grads, trainable_variables=None):
        raise RuntimeError(NOT_PRIVATE.format(name=type(self).__name__))

    def get_config(self):
        config = super().get_config()
        dp = self.dp_config
        for field in _FIELDS:
            config[field.name] = getattr(dp, field.name)
        config["l2_norm_clip"] = dp.l2_norm_clip
        if dp.noise_multiplier is not None:
            # Calibrated: the restored optimizer keeps this sigma.
            config.update(target_epsilon=None, steps=None, epochs=None)
        else:
            config["noise_multiplier"] = None
        return config


_FIELDS = [
    f
    for f in dataclasses.fields(config_lib.DPConfig)
    if f.name != "l2_norm_clip"
]


def _config_property(name):
    return property(
        lambda self: getattr(self.dp_config, name),
        doc=f"`DPConfig.{name}` (read-only).",
    )


for _field in dataclasses.fields(config_lib.DPConfig):
    if _field.name != "noise_multiplier":
        setattr(DPOptimizerMixin, _field.name, _config_property(_field.name))


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPSGD(DPOptimizerMixin, keras.optimizers.SGD):
    """DP-SGD: Keras' SGD with per-example clipping and Gaussian noise.

    Use it with a `keras_dpscale.DPModel`:

    ```python
    model.compile(
        optimizer=keras_dpscale.DPSGD(
            learning_rate=2.0, l2_norm_clip=1.0, noise_multiplier=3.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ```

    Args:
        learning_rate, momentum, nesterov: as in `keras.optimizers.SGD`.
        l2_norm_clip: C. The other DP settings: `DPConfig`.
        **kwargs: the DP settings and other `keras.optimizers.SGD` arguments
            (`weight_decay`, `use_ema`, `ema_momentum`, ...).
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        *,
        l2_norm_clip,
        name="dpsgd",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=nesterov,
            l2_norm_clip=l2_norm_clip,
            name=name,
            **kwargs,
        )


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DPAdam(DPOptimizerMixin, keras.optimizers.Adam):
    """DP-Adam: Keras' Adam applied to the noisy mean of clipped gradients.

    Takes `keras.optimizers.Adam`'s arguments and the DP settings of
    `DPConfig` (`l2_norm_clip` and `noise_multiplier` required).
    """

    def __init__(self, *args, name="dpadam", **kwargs):
        super().__init__(*args, name=name, **kwargs)


def is_private(optimizer):
    """True if `optimizer` adds DP noise (a `DPOptimizerMixin` subclass)."""
    return isinstance(optimizer, DPOptimizerMixin)
