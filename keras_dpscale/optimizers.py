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
example must never reach a DP optimizer.
"""

import keras
import tensorflow as tf

from keras_dpscale import noise

_NOT_PRIVATE = (
    "{name} received gradients from a train_step that does not clip per "
    "example, so training would not be private. Build the model as "
    "keras_dpscale.DPModel / DPSequential, or wrap an existing model with "
    "keras_dpscale.make_private(model), then compile it with this optimizer."
)


class DPOptimizerMixin:
    """DP-SGD settings and the accumulate -> noise -> apply step.

    Mixed into a Keras optimizer class (`DPSGD`, `DPAdam`) in front of it.

    Args:
        l2_norm_clip: C, the bound on each example's gradient norm (> 0).
        noise_multiplier: sigma (>= 0); the noise std is sigma * C.
        accumulation_steps: physical batches per logical batch. Clipped
            gradients are summed over them and the noise is added once.
        microbatch_size: examples per chunk of per-example gradients; trades
            speed for memory and changes nothing else. None: the whole
            physical batch at once.
        batch_size: the logical batch size B that the noisy sum is divided
            by: a public constant. None: `accumulation_steps` times the
            static batch dimension of the data (which must then be static).
        rescale_to_unit_norm: divide the update by C as well (De et al.
            2022), so that the learning rate does not depend on C.
        noise_seed: seed of the noise, for reproducible tests only (whoever
            knows it can remove the noise). None: a fresh secret seed from
            the operating system, never stored.
    """

    def __init__(
        self,
        *args,
        l2_norm_clip,
        noise_multiplier,
        accumulation_steps=1,
        microbatch_size=None,
        batch_size=None,
        rescale_to_unit_norm=False,
        noise_seed=None,
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
        if not noise_multiplier >= 0:
            raise ValueError(
                f"noise_multiplier must be >= 0, got {noise_multiplier}."
            )
        if int(accumulation_steps) != accumulation_steps or (
            accumulation_steps < 1
        ):
            raise ValueError(
                f"accumulation_steps must be an integer >= 1, got {accumulation_steps}."
            )
        for name, value in (
            ("microbatch_size", microbatch_size),
            ("batch_size", batch_size),
        ):
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(
                    f"{name} must be None or an integer >= 1, got {value}."
                )
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.accumulation_steps = int(accumulation_steps)
        self.microbatch_size = microbatch_size
        self.batch_size = batch_size
        self.rescale_to_unit_norm = bool(rescale_to_unit_norm)
        self.noise_seed = noise_seed
        self._seed = noise.fresh_seed() if noise_seed is None else noise_seed

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._micro_step = self.add_variable(
            shape=(), dtype="int64", name="dp_micro_step"
        )
        self._grad_sums = []
        if self.accumulation_steps > 1:
            self._grad_sums = self.add_optimizer_variables(
                variables, "dp_grad_sum"
            )

    def logical_batch_size(self, physical_batch_size):
        """B, the public divisor of the noisy gradient sum."""
        if self.batch_size is not None:
            return self.batch_size
        if physical_batch_size is None:
            raise ValueError(
                "The batch dimension of the training data is not static, so "
                "the logical batch size is unknown. Batch the dataset with "
                "drop_remainder=True, or pass batch_size=B to the optimizer."
            )
        return self.accumulation_steps * physical_batch_size

    def apply_private_gradients(
        self, clipped_grad_sum, trainable_variables, physical_batch_size
    ):
        """Accumulates one physical batch; on the last one, noise and apply.

        Args:
            clipped_grad_sum: list of summed clipped per-example gradients of
                one physical batch, one per variable.
            trainable_variables: the variables they belong to.
            physical_batch_size: the static batch dimension (or None).
        """
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise NotImplementedError(
                "DP training across several replicas is not supported yet: "
                "each replica would add its own noise. Train on one device."
            )
        batch_size = self.logical_batch_size(physical_batch_size)
        if not self.built:  # Keras builds lazily, on the first trace.
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        if self.accumulation_steps == 1:
            self._apply_noisy_mean(
                clipped_grad_sum, trainable_variables, batch_size
            )
            return
        sums = [
            self._grad_sums[self._get_variable_index(v)]
            for v in trainable_variables
        ]
        is_last = (self._micro_step + 1) % self.accumulation_steps == 0

        def apply_and_reset():
            total = [s + g for s, g in zip(sums, clipped_grad_sum)]
            self._apply_noisy_mean(total, trainable_variables, batch_size)
            for s in sums:
                s.assign(tf.zeros_like(s))

        def accumulate():
            for s, g in zip(sums, clipped_grad_sum):
                s.assign_add(g)

        tf.cond(is_last, apply_and_reset, accumulate)
        self._micro_step.assign_add(1)

    def _apply_noisy_mean(self, grad_sum, trainable_variables, batch_size):
        """The one place where noise is added: once per logical batch."""
        seed = noise.step_seed(self._seed, self.iterations)
        stddev = self.noise_multiplier * self.l2_norm_clip
        noisy_sum = noise.add_gaussian_noise(grad_sum, stddev, seed)
        scale = 1.0 / batch_size
        if self.rescale_to_unit_norm:
            scale /= self.l2_norm_clip
        super().apply([g * scale for g in noisy_sum], trainable_variables)

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
                "batch_size": self.batch_size,
                "rescale_to_unit_norm": self.rescale_to_unit_norm,
                "noise_seed": self.noise_seed,
            }
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
        batch_size, rescale_to_unit_norm, noise_seed: see
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
        noise_multiplier,
        name="dpsgd",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=nesterov,
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
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


def is_private(optimizer):
    """True if `optimizer` adds DP noise (a `DPOptimizerMixin` subclass)."""
    return isinstance(optimizer, DPOptimizerMixin)
