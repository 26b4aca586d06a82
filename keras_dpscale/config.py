"""`DPConfig`: the DP-SGD settings of an optimizer, frozen and validated.

A DP optimizer (`keras_dpscale.DPSGD`, `DPAdam`) holds one `DPConfig`. It
is checked when it is made, and it never changes in place: what `fit`
learns about the data (N, B) makes a new, re-validated config
(`DPConfig.completed`). Calibrating sigma from a target epsilon happens
here too, once B is known.
"""

import dataclasses
import logging
import math

from keras_dpscale import accounting

# The samplings an optimizer can be calibrated for (`keras_dpscale.sampling`).
PLANNED_SAMPLING = ("poisson", "shuffle", "unknown")


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings.

    Attributes:
        l2_norm_clip: C, the bound on each example's gradient norm (> 0).
        noise_multiplier: sigma (>= 0); the noise std is sigma * C. Give it,
            or `target_epsilon` to have it calibrated (None until then).
        accumulation_steps: physical batches per logical batch. Clipped
            gradients are summed over them and the noise is added once.
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
            `target_delta`, `num_examples` and `batch_size` (B may come
            from the data, at the first step). It also becomes the
            `epsilon_budget`.
        steps, epochs: the planned training length, for `target_epsilon`.
        epsilon_budget: training stops before a step would take epsilon
            above it (`DPModel.fit` adds `callbacks.PrivacyBudget`).
        sampling: how the batches will be drawn, for calibrating sigma and
            the budget before training: "poisson" (default: the library's
            pipelines and `fit` on arrays), "shuffle" or "unknown". What the
            data actually did is what `fit` records: a weaker sampling than
            calibrated for raises before training.
        accountant: "pld" (default) or "rdp".
    """

    l2_norm_clip: float
    noise_multiplier: float | None = None
    accumulation_steps: int = 1
    batch_size: int | None = None
    rescale_to_unit_norm: bool = False
    noise_seed: int | None = None
    num_examples: int | None = None
    target_delta: float | None = None
    target_epsilon: float | None = None
    steps: int | None = None
    epochs: float | None = None
    epsilon_budget: float | None = None
    sampling: str = "poisson"
    accountant: str = "pld"

    def __post_init__(self):
        if not 0 < self.l2_norm_clip < math.inf:
            raise ValueError(
                f"l2_norm_clip must be > 0 and finite, got "
                f"{self.l2_norm_clip}. It bounds each example's gradient "
                "norm; 1.0 is the usual choice."
            )
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ValueError(
                f"target_delta must be in (0, 1), got {self.target_delta}."
            )
        for name in ("target_epsilon", "epsilon_budget"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {value}.")
        _set(self, l2_norm_clip=float(self.l2_norm_clip))
        steps = self.accumulation_steps
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(
                f"accumulation_steps must be an integer >= 1, got {steps}."
            )
        _set(self, accumulation_steps=int(steps))
        for name in ("batch_size", "num_examples"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or int(value) != value or value < 1
            ):
                raise ValueError(
                    f"{name} must be None or an integer >= 1, got {value}."
                )
        if self.sampling not in PLANNED_SAMPLING:
            raise ValueError(
                f"sampling must be one of {PLANNED_SAMPLING}, got "
                f"{self.sampling!r}."
            )
        accounting.make_accountant(self.accountant)  # validates the name
        _set(self, rescale_to_unit_norm=bool(self.rescale_to_unit_norm))
        self._check_noise()
        if self.epsilon_budget is None:
            _set(self, epsilon_budget=self.target_epsilon)
        if self.num_examples is not None and self.batch_size is not None:
            accounting.check_arguments(
                self.batch_size, self.num_examples, self.target_delta
            )
        if self.epsilon_budget is not None and self.target_epsilon is None:
            self._require(
                "An epsilon budget with a fixed noise_multiplier",
                target_delta=self.target_delta,
                num_examples=self.num_examples,
                batch_size=self.batch_size,
            )
        if self.noise_multiplier is None and self.batch_size is not None:
            _set(self, noise_multiplier=self._calibrated_sigma())

    def _check_noise(self):
        """Exactly one of sigma and a target epsilon (with what it needs)."""
        if self.target_epsilon is None:
            if self.noise_multiplier is None:
                raise ValueError(
                    "Give noise_multiplier=sigma, or target_epsilon (with "
                    "target_delta, num_examples, batch_size and steps or "
                    "epochs) to have sigma calibrated."
                )
            if self.steps is not None or self.epochs is not None:
                raise ValueError(
                    "steps and epochs only serve to calibrate sigma from "
                    "target_epsilon; with a fixed noise_multiplier, use "
                    "epsilon_budget to stop training at a budget."
                )
            if not 0 <= self.noise_multiplier < math.inf:
                raise ValueError(
                    "noise_multiplier must be >= 0 and finite, got "
                    f"{self.noise_multiplier}."
                )
            _set(self, noise_multiplier=float(self.noise_multiplier))
            return
        if self.noise_multiplier is not None:
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
        accounting.steps_for(1, self.num_examples, self.steps, self.epochs)

    @property
    def calibrating(self):
        """True if sigma comes from `target_epsilon`."""
        return self.target_epsilon is not None

    def _require(self, purpose, **values):
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ValueError(
                f"{purpose} needs {', '.join(missing)}: pass "
                + ", ".join(f"{name}=..." for name in missing)
                + " to the DP optimizer."
            )

    def _calibrated_sigma(self):
        sigma = accounting.calibrate_noise_multiplier(
            self.target_epsilon,
            self.target_delta,
            self.batch_size,
            self.num_examples,
            steps=self.steps,
            epochs=self.epochs,
            accountant=self.accountant,
            sampling=self.sampling,
        )
        logging.getLogger("keras_dpscale").info(
            "noise_multiplier=%.4f calibrated for epsilon=%g, delta=%g, "
            "batch %d of %d (%s accountant, %s sampling).",
            sigma,
            self.target_epsilon,
            self.target_delta,
            self.batch_size,
            self.num_examples,
            self.accountant,
            self.sampling,
        )
        return sigma

    def replace(self, **changes):
        """A new, re-validated config with `changes` (sigma recalibrated if
        it comes from `target_epsilon`)."""
        if self.calibrating:
            changes.setdefault("noise_multiplier", None)
        return dataclasses.replace(self, **changes)

    def with_noise_multiplier(self, noise_multiplier, **changes):
        """This config with a fixed sigma (no more calibration) and other
        `changes`; the epsilon budget stays."""
        return self.replace(
            **changes,
            noise_multiplier=noise_multiplier,
            target_epsilon=None,
            steps=None,
            epochs=None,
            epsilon_budget=self.epsilon_budget,
        )

    def completed(self, batch_size=None, num_examples=None):
        """This config with B and N filled in where it had none (given ones
        must agree), sigma calibrated if it was waiting for B."""
        changes = {}
        for name, value in (
            ("batch_size", batch_size),
            ("num_examples", num_examples),
        ):
            have = getattr(self, name)
            if value is None or have == value:
                continue
            if have is not None:
                raise ValueError(
                    f"The optimizer's {name}={have}, but the data give "
                    f"{name}={value}."
                )
            changes[name] = value
        return self.replace(**changes) if changes else self


def _set(config, **values):
    """Normalizes fields of a frozen config during its validation."""
    for name, value in values.items():
        object.__setattr__(config, name, value)
