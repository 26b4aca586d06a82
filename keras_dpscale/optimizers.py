"""DP optimizers: sum clipped gradients, add noise once per logical batch, apply.

`DPSGD` is Keras' SGD (momentum, Nesterov, learning-rate schedules, weight
decay, `use_ema`) that also carries the DP-SGD settings. A `DPModel` computes
the sum of clipped per-example gradients of each physical batch
(`keras_dpscale.clipping`) and hands it to `apply_private_gradients`, which
is the second half of the private step:

    sum over the `accumulation_steps` physical batches of a logical batch
    -> add N(0, (noise_multiplier * l2_norm_clip)^2) once
    -> divide by the logical batch size B (and by C if rescale_to_unit_norm)
    -> the ordinary Keras update (SGD/momentum/EMA), once per logical batch.

`optimizer.iterations` counts logical steps. The plain Keras entry points
(`apply`, `apply_gradients`) raise: gradients that were not clipped per
example must never reach a DP optimizer. Each logical step is recorded in
the model's privacy ledger (`keras_dpscale.ledger`), which the model owns:
the record follows the weights, not the optimizer.
"""

import logging

import keras
import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale import noise

_NOT_PRIVATE = (
    "{name} received gradients from a train_step that does not clip per "
    "example, so training would not be private. Build the model as "
    "keras_dpscale.DPModel / DPSequential, or wrap an existing model with "
    "keras_dpscale.make_private(model), then compile it with this optimizer."
)


class DPOptimizerMixin:
    """DP-SGD settings, the accumulate -> noise -> apply step, and the ledger.

    Mixed into a Keras optimizer class (`DPSGD`, `DPAdam`) in front of it.

    Args:
        l2_norm_clip: C, the bound on each example's gradient norm (> 0).
        noise_multiplier: sigma (>= 0); the noise std is sigma * C. Give it,
            or `target_epsilon` to have it calibrated.
        accumulation_steps: physical batches per logical batch. Clipped
            gradients are summed over them and the noise is added once.
        microbatch_size: examples per chunk of per-example gradients; trades
            speed for memory and changes nothing else. None: the whole
            physical batch at once.
        clipping: how per-example clipping is computed; the result is the
            same. "fast": ghost norms and book-keeping
            (`keras_dpscale.fast_clipping`), without per-example gradients
            of the whole network; raises if the model is outside what it
            covers. "vectorized": per-example gradients by
            `tf.vectorized_map` (`keras_dpscale.clipping`). "auto"
            (default): "fast" where it covers the model and no
            `microbatch_size` is set, else "vectorized".
        batch_size: the logical batch size B that the noisy sum is divided
            by: a public constant. None: `accumulation_steps` times the
            static batch dimension of the data (which must then be static).
        rescale_to_unit_norm: divide the update by C as well (De et al.
            2022), so that the learning rate does not depend on C.
        noise_seed: seed of the noise, for reproducible tests only (whoever
            knows it can remove the noise). None: a fresh secret seed from
            the operating system, never stored.
        num_examples: N, the training set size: needed to report epsilon.
        target_delta: delta of the reported (epsilon, delta) guarantee.
        target_epsilon: calibrate sigma so that training for `steps` logical
            steps (or `epochs`) spends at most this epsilon; needs
            `target_delta`, `num_examples` and `batch_size`. It also becomes
            the `epsilon_budget`.
        steps, epochs: the planned training length, for `target_epsilon`.
        epsilon_budget: training stops before a step would take epsilon
            above it (`DPModel.fit` adds `callbacks.PrivacyBudget`).
        sampling: how the batches will be drawn, for calibrating sigma and
            the budget before training (`keras_dpscale.sampling`):
            "poisson" (default: the library's pipelines and `fit` on
            arrays), "shuffle" or "unknown". What the data actually did is
            what `fit` records: a weaker sampling than calibrated for
            raises before training.
        accountant: "pld" (default) or "rdp".
    """

    def __init__(
        self,
        *args,
        l2_norm_clip,
        noise_multiplier=None,
        accumulation_steps=1,
        microbatch_size=None,
        clipping="auto",
        batch_size=None,
        rescale_to_unit_norm=False,
        noise_seed=None,
        num_examples=None,
        target_delta=None,
        target_epsilon=None,
        steps=None,
        epochs=None,
        epsilon_budget=None,
        sampling="poisson",
        accountant="pld",
        **kwargs,
    ):
        for name, use in (
            ("gradient_accumulation_steps", "accumulation_steps"),
            ("loss_scale_factor", "a float32 or bfloat16 model"),
        ):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{type(self).__name__} does not take `{name}`: it would "
                    f"act after per-example clipping. Use {use} instead."
                )
        super().__init__(*args, **kwargs)
        if not l2_norm_clip > 0:
            raise ValueError(
                f"l2_norm_clip must be > 0, got {l2_norm_clip}. It bounds "
                "each example's gradient norm; 1.0 is the usual choice."
            )
        if int(accumulation_steps) != accumulation_steps or (
            accumulation_steps < 1
        ):
            raise ValueError(
                "accumulation_steps must be an integer >= 1, got "
                f"{accumulation_steps}."
            )
        for name, value in (
            ("microbatch_size", microbatch_size),
            ("batch_size", batch_size),
            ("num_examples", num_examples),
        ):
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(
                    f"{name} must be None or an integer >= 1, got {value}."
                )
        if sampling not in PLANNED_SAMPLING:
            raise ValueError(
                f"sampling must be one of {PLANNED_SAMPLING}, got {sampling!r}."
            )
        accounting.make_accountant(accountant)  # validates the name
        if clipping not in CLIPPING:
            raise ValueError(
                f"clipping must be one of {CLIPPING}, got {clipping!r}."
            )
        self.clipping = clipping
        self.l2_norm_clip = float(l2_norm_clip)
        self.accumulation_steps = int(accumulation_steps)
        self.microbatch_size = microbatch_size
        self.batch_size = batch_size
        self.rescale_to_unit_norm = bool(rescale_to_unit_norm)
        self.noise_seed = noise_seed
        self._seed = noise.fresh_seed() if noise_seed is None else noise_seed
        self._calibration = None
        self.num_examples = num_examples
        self.target_delta = target_delta
        self.sampling = sampling
        self.accountant = accountant
        self.noise_multiplier = self._calibrate(
            noise_multiplier, target_epsilon, steps, epochs
        )
        self.epsilon_budget = (
            target_epsilon if epsilon_budget is None else epsilon_budget
        )
        if self.num_examples is not None and self.batch_size is not None:
            accounting.check_arguments(
                self.batch_size, self.num_examples, self.target_delta
            )
        if self.epsilon_budget is not None and target_epsilon is None:
            self._require(
                "An epsilon budget with a fixed noise_multiplier",
                target_delta=target_delta,
                num_examples=num_examples,
                batch_size=batch_size,
            )

    def _require(self, purpose, **values):
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ValueError(
                f"{purpose} needs {', '.join(missing)}: pass "
                + ", ".join(f"{name}=..." for name in missing)
                + f" to {type(self).__name__}."
            )

    def _calibrate(self, noise_multiplier, target_epsilon, steps, epochs):
        """sigma: as given, or calibrated from `target_epsilon`."""
        if target_epsilon is None:
            if noise_multiplier is None:
                raise ValueError(
                    "Give noise_multiplier=sigma, or target_epsilon (with "
                    "target_delta, num_examples, batch_size and steps or "
                    "epochs) to have sigma calibrated."
                )
            if steps is not None or epochs is not None:
                raise ValueError(
                    "steps and epochs only serve to calibrate sigma from "
                    "target_epsilon; with a fixed noise_multiplier, use "
                    "epsilon_budget to stop training at a budget."
                )
            return noise_multiplier
        if noise_multiplier is not None:
            raise ValueError(
                "Give either noise_multiplier or target_epsilon, not both. To "
                "train with a fixed sigma and stop at a budget, pass "
                "noise_multiplier and epsilon_budget."
            )
        self._require(
            "Calibrating sigma from target_epsilon",
            target_delta=self.target_delta,
            num_examples=self.num_examples,
        )
        accounting.steps_for(1, self.num_examples, steps, epochs)  # one given
        self._calibration = (target_epsilon, steps, epochs)
        if self.batch_size is None:
            return None  # calibrated at the first step, once B is known
        return self._calibrate_for(self.batch_size)

    def _calibrate_for(self, batch_size):
        target_epsilon, steps, epochs = self._calibration
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon,
            self.target_delta,
            batch_size,
            self.num_examples,
            steps=steps,
            epochs=epochs,
            accountant=self.accountant,
            sampling=self.sampling,
        )
        logging.getLogger("keras_dpscale").info(
            "noise_multiplier=%.4f calibrated for epsilon=%g, delta=%g, "
            "batch %d of %d (%s accountant, %s sampling).",
            sigma,
            target_epsilon,
            self.target_delta,
            batch_size,
            self.num_examples,
            self.accountant,
            self.sampling,
        )
        return sigma

    @property
    def noise_multiplier(self):
        """sigma; setting it changes the noise from the next step on."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value):
        if value is None and getattr(self, "_calibration", None):
            self._noise_multiplier = None  # calibrated at the first step
            return
        if value is None or not value >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {value}.")
        self._noise_multiplier = float(value)
        if getattr(self, "built", False):
            self._noise_multiplier_var.assign(self._noise_multiplier)

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
        self._noise_multiplier_var = self.add_variable(
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(
                self._noise_multiplier or 0.0
            ),
            aggregation="only_first_replica",
            name="dp_noise_multiplier",
        )
        self._grad_sums = []
        if self.accumulation_steps > 1:
            self._grad_sums = self.add_optimizer_variables(
                variables, "dp_grad_sum"
            )

    def logical_batch_size(self, physical_batch_size, padded=False):
        """B, the public divisor of the noisy gradient sum.

        Args:
            physical_batch_size: the static batch dimension of all replicas
                (or None).
            padded: the batches are padded with masked rows (Poisson): B is
                then the given `batch_size`, not the rows.
        """
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

    def apply_private_gradients(
        self,
        clipped_grad_sum,
        trainable_variables,
        physical_batch_size,
        record,
        padded=False,
    ):
        """Accumulates one physical batch; on the last one, noise and apply.

        Every state update of the step (the accumulators, the micro-step,
        the update and its record) waits for the clipped sum, so a call that
        gets no data (an exhausted iterator, outside XLA) changes nothing.

        Args:
            clipped_grad_sum: list of summed clipped per-example gradients of
                one physical batch, one per variable.
            trainable_variables: the variables they belong to.
            physical_batch_size: the static batch dimension (or None).
            record: `record(sigma, batch_size, num_examples, rows)`, called
                once per logical batch, where the noise is added: the
                model's privacy ledger.
            padded: the batch has masked padding rows (Poisson).
        """
        # The batch of all replicas: each one holds an equal part of it.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1 and self.accumulation_steps > 1:
            raise NotImplementedError(
                "Gradient accumulation across several replicas is not "
                "supported yet (the update would synchronize the replicas "
                "inside a conditional). Use accumulation_steps=1 with more "
                "replicas or larger per-replica batches, or one replica."
            )
        if physical_batch_size is not None:
            physical_batch_size *= replicas
        batch_size = self.logical_batch_size(physical_batch_size, padded)
        # Rows of a logical batch in the pipeline (Poisson: the padded size).
        rows = self.accumulation_steps * (physical_batch_size or batch_size)
        if not self.built:  # Keras builds lazily, on the first trace.
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        if self._noise_multiplier is None:
            with tf.init_scope():  # once, eagerly, before the first step
                self.noise_multiplier = self._calibrate_for(batch_size)
                self.batch_size = batch_size
        with tf.control_dependencies(tf.nest.flatten(clipped_grad_sum)):
            if self.accumulation_steps == 1:
                self._apply_noisy_mean(
                    clipped_grad_sum,
                    trainable_variables,
                    batch_size,
                    rows,
                    record,
                )
                return
            sums = [
                self._grad_sums[self._get_variable_index(v)]
                for v in trainable_variables
            ]
            is_last = (self._micro_step + 1) % self.accumulation_steps == 0

            def apply_and_reset():
                total = [s + g for s, g in zip(sums, clipped_grad_sum)]
                self._apply_noisy_mean(
                    total, trainable_variables, batch_size, rows, record
                )
                for s in sums:
                    s.assign(tf.zeros_like(s))

            def accumulate():
                for s, g in zip(sums, clipped_grad_sum):
                    s.assign_add(g)

            tf.cond(is_last, apply_and_reset, accumulate)
            self._micro_step.assign_add(1)

    def _apply_noisy_mean(
        self, grad_sum, trainable_variables, batch_size, rows, record
    ):
        """The one place where noise is added: once per logical batch."""
        seed = noise.step_seed(self._seed, self.iterations)
        sigma = tf.convert_to_tensor(self._noise_multiplier_var)
        # Replicas' updates are summed (all-reduce): the first replica adds
        # the step's one noise draw, the others none.
        replica = tf.distribute.get_replica_context()
        first = (
            1.0
            if replica is None
            else tf.cast(
                tf.equal(replica.replica_id_in_sync_group, 0), tf.float32
            )
        )
        stddev = sigma * self.l2_norm_clip * first
        noisy_sum = noise.add_gaussian_noise(grad_sum, stddev, seed)
        record(sigma, batch_size, self.num_examples, rows)
        scale = 1.0 / batch_size
        if self.rescale_to_unit_norm:
            scale /= self.l2_norm_clip
        super().apply([g * scale for g in noisy_sum], trainable_variables)

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
        raise RuntimeError(_NOT_PRIVATE.format(name=type(self).__name__))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "l2_norm_clip": self.l2_norm_clip,
                "noise_multiplier": self.noise_multiplier,
                "accumulation_steps": self.accumulation_steps,
                "microbatch_size": self.microbatch_size,
                "clipping": self.clipping,
                "batch_size": self.batch_size,
                "rescale_to_unit_norm": self.rescale_to_unit_norm,
                "noise_seed": self.noise_seed,
                "num_examples": self.num_examples,
                "target_delta": self.target_delta,
                "epsilon_budget": self.epsilon_budget,
                "sampling": self.sampling,
                "accountant": self.accountant,
            }
        )
        if self._noise_multiplier is None:  # not calibrated yet
            target_epsilon, steps, epochs = self._calibration
            config.update(
                target_epsilon=target_epsilon, steps=steps, epochs=epochs
            )
        return config


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
        l2_norm_clip, noise_multiplier, accumulation_steps, microbatch_size,
        clipping, batch_size, rescale_to_unit_norm, noise_seed: see
            `DPOptimizerMixin`.
        **kwargs: other `keras.optimizers.SGD` arguments (`weight_decay`,
            `use_ema`, `ema_momentum`, `clipnorm` of the noisy update, ...).
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
    `DPOptimizerMixin` (`l2_norm_clip` and `noise_multiplier` required).
    """

    def __init__(self, *args, name="dpadam", **kwargs):
        super().__init__(*args, name=name, **kwargs)


# The per-example clipping engines (see `DPOptimizerMixin`).
CLIPPING = ("auto", "fast", "vectorized")
# The samplings an optimizer can be calibrated for (`keras_dpscale.sampling`).
PLANNED_SAMPLING = ("poisson", "shuffle", "unknown")


def is_private(optimizer):
    """True if `optimizer` adds DP noise (a `DPOptimizerMixin` subclass)."""
    return isinstance(optimizer, DPOptimizerMixin)
