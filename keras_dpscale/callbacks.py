"""Keras callbacks that report and enforce the privacy budget."""

import math

import keras

from keras_dpscale import optimizers


class PrivacyBudget(keras.callbacks.Callback):
    """Puts epsilon in the epoch logs and stops training within a budget.

    Each epoch, `logs["epsilon"]` is the epsilon spent so far at `delta`
    (shown in the progress bar, kept in `History`, and written by the
    `TensorBoard` callback if that runs after this one; `DPModel.fit` puts
    this callback first). With a budget, training stops *before* the step
    that would take epsilon past it: the limit is computed from the ledger
    before training, and `fit` stops as soon as one more call of the train
    function could exceed it. If even the first step would, `fit` raises.

    `DPModel.fit` adds one automatically when the optimizer knows
    `num_examples` and `target_delta`.

    Args:
        epsilon_budget: the budget; default: the optimizer's
            `epsilon_budget` (None: report only).
        delta: default: the optimizer's `target_delta`.
        verbose: print the privacy statement at the end of training.
    """

    def __init__(self, epsilon_budget=None, delta=None, verbose=1):
        super().__init__()
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.verbose = verbose
        self.stopped_at_budget = False
        self._limit = None

    @property
    def _optimizer(self):
        optimizer = self.model.optimizer
        if not optimizers.is_private(optimizer):
            raise ValueError(
                "PrivacyBudget needs a model compiled with a DP optimizer."
            )
        return optimizer

    def _budget(self):
        if self.epsilon_budget is not None:
            return self.epsilon_budget
        return self._optimizer.epsilon_budget

    def _delta(self):
        return (
            self._optimizer.target_delta if self.delta is None else self.delta
        )

    def _steps_per_call(self):
        """Logical steps that one call of the train function can complete."""
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        return math.ceil(per_call / self._optimizer.accumulation_steps)

    def _update_limit(self):
        """The step count that training must not pass (None if unknown)."""
        optimizer = self._optimizer
        remaining = self.model.remaining_steps(self._budget(), self._delta())
        self._key = self.model.coming_steps()
        self._limit = (
            None if remaining is None else _steps(optimizer) + remaining
        )

    def on_train_begin(self, logs=None):
        self.stopped_at_budget = False
        self._epoch = 0
        if not hasattr(self.model, "privacy_ledger"):
            raise ValueError(
                "PrivacyBudget needs a keras_dpscale DP model (DPModel, "
                "DPSequential or make_private(model))."
            )
        if self._budget() is None:
            return
        self._update_limit()
        if self._limit is not None and (
            _steps(self._optimizer) + self._steps_per_call() > self._limit
        ):
            raise RuntimeError(
                "The privacy budget is spent: one more step would take "
                f"epsilon above {self._budget()} at delta={self._delta()}. "
                f"So far: {self.model.privacy_statement(self._delta())}"
            )

    def on_train_batch_end(self, batch, logs=None):
        if self._budget() is None:
            return
        if self._limit is None or self._key != self.model.coming_steps():
            self._update_limit()  # first step taken, or sigma/B changed
        iterations = _steps(self._optimizer)
        if iterations + self._steps_per_call() > self._limit:
            self.model.stop_training = True
            # Early only if the plan had batches left after this one.
            self.stopped_at_budget = (self._epoch, batch + 1) < (
                self.params.get("epochs", 0) - 1,
                self.params.get("steps") or 0,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.model.epsilon(self._delta())

    def on_train_end(self, logs=None):
        if self.verbose:
            if self.stopped_at_budget:
                print(
                    f"Stopped at the privacy budget epsilon={self._budget()}."
                )
            print(self.model.privacy_statement(self._delta()))


def _steps(optimizer):
    """The optimizer's logical step count (a Python int, also of a
    replicated variable)."""
    return int(optimizer.iterations.numpy())


def reports_privacy(optimizer):
    """True if `optimizer` knows enough to report epsilon."""
    return (
        optimizers.is_private(optimizer)
        and optimizer.num_examples is not None
        and optimizer.target_delta is not None
    )
