"""`build_optimizer`: the DP optimizer of a run, with its privacy settings.

A config picks the optimizer by name and binds any of its Keras arguments
by name, a learning-rate schedule included (every class of
`keras.optimizers.schedules` is known to gin):

    build_optimizer.optimizer = "dpadam"
    build_optimizer.beta_2 = 0.99
    build_optimizer.learning_rate = @CosineDecay()
    CosineDecay.initial_learning_rate = 2.0
    CosineDecay.decay_steps = 2472  # logical steps
"""

import inspect

import gin
import keras

from keras_dpscale import optimizers

# The optimizers a config can name, with the launcher's defaults for their
# Keras arguments (DPSGD: momentum 0.9, the Fashion-MNIST recipe).
OPTIMIZERS = {
    "dpsgd": (optimizers.DPSGD, {"momentum": 0.9}),
    "dpadam": (optimizers.DPAdam, {}),
}

for _name, _schedule in vars(keras.optimizers.schedules).items():
    if (
        inspect.isclass(_schedule)
        and issubclass(
            _schedule, keras.optimizers.schedules.LearningRateSchedule
        )
        and _schedule is not keras.optimizers.schedules.LearningRateSchedule
    ):
        gin.external_configurable(
            _schedule, module="keras.optimizers.schedules"
        )


@gin.configurable(denylist=["plan", "num_examples"])
def build_optimizer(
    plan,
    num_examples,
    *,
    optimizer="dpsgd",
    learning_rate=4.0,
    l2_norm_clip=0.1,
    rescale_to_unit_norm=False,
    noise_multiplier=None,
    target_epsilon=3.0,
    accountant="pld",
    ema_momentum=None,
    **keras_kwargs,
):
    """Makes the DP optimizer (call it in the strategy's scope).

    Args:
        plan: the run's `Plan` (B, T, sampling, accumulation, delta).
        num_examples: N, the training set size.
        optimizer: a name in `OPTIMIZERS` ("dpsgd", "dpadam").
        learning_rate: a float or a `keras.optimizers.schedules` object
            (its steps are logical steps).
        l2_norm_clip, rescale_to_unit_norm, noise_multiplier: the DP-SGD
            settings (`config.DPConfig`).
        target_epsilon: calibrate sigma to spend at most this epsilon at
            `plan.target_delta` over the run's T steps (with
            `noise_multiplier = None`); it is also the budget.
        accountant: "pld" or "rdp" (`accounting`).
        ema_momentum: parameter averaging (EMA) of the weights, or None;
            evaluation and export use the averaged weights.
        **keras_kwargs: the Keras optimizer's own arguments (`momentum`,
            `nesterov`, `beta_1`, `weight_decay`, ...).

    Returns:
        A `DPSGD` or `DPAdam`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}."
        )
    cls, defaults = OPTIMIZERS[optimizer]
    return cls(
        learning_rate=learning_rate,
        l2_norm_clip=l2_norm_clip,
        rescale_to_unit_norm=rescale_to_unit_norm,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        target_delta=plan.target_delta,
        accountant=accountant,
        steps=plan.steps(num_examples) if noise_multiplier is None else None,
        num_examples=num_examples,
        batch_size=plan.batch_size,
        sampling=plan.sampling,
        accumulation_steps=plan.accumulation_steps,
        use_ema=ema_momentum is not None,
        ema_momentum=ema_momentum or 0.99,
        **{**defaults, **keras_kwargs},
    )
