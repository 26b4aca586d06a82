"""Privacy accounting with dp-accounting: epsilon, sigma from a budget, steps.

A DP-SGD run is described by the `DpEvent` of its steps, which depends on
how the batches were drawn (`keras_dpscale.sampling`):

- "poisson" (each example joins each step independently with probability
  q = B/N, from a secret sample): T steps are
  `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)`;
- "shuffle" (each pass over the data holds each example at most once): an
  example is in at most ceil(T / floor(N/B)) of the T steps, and nothing
  is assumed about which: that many releases of a Gaussian mechanism;
- "unknown" and "public" (a pipeline the library cannot see into, or a
  Poisson sample whose seed is known): every example may be in every step:
  T releases of a Gaussian mechanism.

Each kind holds under the add/remove relation in which a removed example's
rows become padding (zero gradient), assuming only that which rows form a
batch does not depend on the examples' values. PLD (the default) and RDP
accountants evaluate the events; `calibrate_noise_multiplier` and
`remaining_steps` search with dp-accounting's `calibrate_dp_mechanism`.

Padded Poisson batches (`data.poisson`) are truncated when a sample
overflows its rows, and `truncation_delta` adds (1 + e^epsilon) times the
overflow probability to delta; dp-accounting 0.6's
`TruncatedSubsampledGaussianDpEvent` (checked) would account for this
inside epsilon instead, but it is PLD-only, models one truncation of the
whole dataset where each input pipeline truncates its own shard, and needs
each segment's shard size and rows per shard, which the ledger does not
record (and it merges segments keeping the largest row count, which would
understate truncation), while at the default overflow probability 1e-18
both give the same epsilon (the added delta is about 1e-14).
"""

import dataclasses
import math
import warnings

import dp_accounting

from keras_dpscale import sampling as sampling_lib

ACCOUNTANTS = ("pld", "rdp")
SAMPLING = sampling_lib.KINDS
MAX_NOISE_MULTIPLIER = 1e3
MIN_NOISE_MULTIPLIER = 0.1


def check_arguments(batch_size, num_examples, delta=None):
    """Validates the public quantities that accounting depends on."""
    if num_examples is None or num_examples < 1:
        raise ValueError(
            "Privacy accounting needs num_examples, the size of the training "
            f"set (got {num_examples})."
        )
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be in [1, num_examples={num_examples}], got "
            f"{batch_size}."
        )
    if delta is not None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}.")
        if delta >= 1 / num_examples:
            warnings.warn(
                f"delta={delta} is not below 1/num_examples="
                f"{1 / num_examples:.3g}: a mechanism that publishes one "
                "random example meets such a guarantee. Use delta << 1/N.",
                stacklevel=3,
            )


def releases(batch_size, num_examples, steps, sampling="poisson"):
    """How many of `steps` steps one example may be in, without
    amplification: one per pass for "shuffle", all of them otherwise."""
    if sampling == "shuffle":
        return math.ceil(steps / max(1, num_examples // batch_size))
    return int(steps)


def dp_sgd_event(
    noise_multiplier, batch_size, num_examples, steps, sampling="poisson"
):
    """The `DpEvent` of `steps` DP-SGD steps.

    Args:
        noise_multiplier: sigma.
        batch_size: the (expected) logical batch size B.
        num_examples: the dataset size N.
        steps: the number of logical steps T.
        sampling: one of `SAMPLING` (see the module docstring).

    Returns:
        A `dp_accounting.DpEvent`.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling}.")
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling != "poisson":
        return dp_accounting.SelfComposedDpEvent(
            gaussian, releases(batch_size, num_examples, steps, sampling)
        )
    q = batch_size / num_examples
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, gaussian), int(steps)
    )


def make_accountant(accountant="pld"):
    """A fresh dp-accounting accountant: "pld" (default) or "rdp"."""
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    raise ValueError(
        f"accountant must be one of {ACCOUNTANTS}, got {accountant}."
    )


def epsilon_of_event(event, delta, accountant="pld"):
    """Epsilon of any `DpEvent` at `delta`."""
    return make_accountant(accountant).compose(event).get_epsilon(delta)


def compute_epsilon(
    noise_multiplier,
    batch_size,
    num_examples,
    steps,
    delta,
    accountant="pld",
    sampling="poisson",
):
    """Epsilon of `steps` DP-SGD steps at `delta` (see `dp_sgd_event`)."""
    check_arguments(batch_size, num_examples, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_sgd_event(
        noise_multiplier, batch_size, num_examples, steps, sampling
    )
    return epsilon_of_event(event, delta, accountant)


def steps_for(batch_size, num_examples, steps=None, epochs=None):
    """Logical steps from exactly one of `steps` and `epochs`."""
    if (steps is None) == (epochs is None):
        raise ValueError(
            "Give exactly one of steps and epochs (got steps="
            f"{steps}, epochs={epochs})."
        )
    if steps is None:
        steps = math.ceil(epochs * num_examples / batch_size)
    return int(steps)


class _Epsilons:
    """The epsilon at `delta` of each `DpEvent`, computed once.

    It also stands in for the fresh accountant that
    `dp_accounting.calibrate_dp_mechanism` asks for (an empty `ledger`,
    `compose`, `get_epsilon`), so that a calibration's search and the checks
    around it share their evaluations: each takes a PLD accountant up to
    seconds.
    """

    ledger = dp_accounting.NoOpDpEvent()

    def __init__(self, accountant, delta):
        make_accountant(accountant)  # validates the name
        self.accountant, self.delta = accountant, delta
        self._known, self._event = {}, None

    def __call__(self, event, delta=None):
        delta = self.delta if delta is None else delta
        key = (repr(event), delta)  # DpEvents hold lists: repr, not hash
        if key not in self._known:
            self._known[key] = epsilon_of_event(event, delta, self.accountant)
        return self._known[key]

    def calibrate(self, make_event, target_epsilon, bracket, **kwargs):
        """`dp_accounting.calibrate_dp_mechanism` with these epsilons."""
        return dp_accounting.calibrate_dp_mechanism(
            lambda: self,
            make_event,
            target_epsilon,
            self.delta,
            bracket,
            **kwargs,
        )

    def compose(self, event):
        self._event = event
        return self

    def get_epsilon(self, delta):
        return self(self._event, delta)


def _smallest_sigma(epsilons, make_event, target_epsilon, upper, guess, tol):
    """The smallest sigma, to a factor 1 + tol, with epsilon <= the target.

    dp-accounting's calibration (its bracket search from `upper` through
    `guess`, then Brent's method) over x = log(1 / sigma), so that `tol` is
    relative. Below `MIN_NOISE_MULTIPLIER` the epsilon is that of the
    minimum, so the search cannot wander into tiny sigmas (where PLD blows
    up).

    Args:
        epsilons: an `_Epsilons`.
        make_event: sigma -> `DpEvent`.
        target_epsilon: the budget, reached at `MAX_NOISE_MULTIPLIER`.
        upper: a sigma whose epsilon is probably <= the target (if not,
            the search starts from `MAX_NOISE_MULTIPLIER`).
        guess: a smaller sigma, ideally just below the answer.
        tol: the relative tolerance.

    Raises:
        ValueError: the answer is below `MIN_NOISE_MULTIPLIER`.
    """

    def event(x):
        return make_event(max(math.exp(-x), MIN_NOISE_MULTIPLIER))

    lower = -math.log(upper)
    if epsilons(event(lower)) > target_epsilon:
        lower = -math.log(MAX_NOISE_MULTIPLIER)

    too_large = ValueError(
        f"epsilon={target_epsilon} is so large that sigma would be below "
        f"{MIN_NOISE_MULTIPLIER}; give noise_multiplier instead."
    )
    try:
        x = epsilons.calibrate(
            event,
            target_epsilon,
            dp_accounting.LowerEndpointAndGuess(lower, -math.log(guess)),
            tol=tol,
        )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
        raise too_large from None
    if math.exp(-x) < MIN_NOISE_MULTIPLIER:
        raise too_large
    return math.exp(-x)


def calibrate_noise_multiplier(
    target_epsilon,
    delta,
    batch_size,
    num_examples,
    steps=None,
    epochs=None,
    accountant="pld",
    sampling="poisson",
):
    """The smallest sigma (to 0.1%) whose epsilon is <= `target_epsilon`.

    dp-accounting's `calibrate_dp_mechanism` searches sigma. For PLD it
    starts from the sigma that RDP needs (found first, to 1%: RDP is cheap
    and its epsilon is above PLD's), so that PLD is evaluated near the
    answer only.

    Returns:
        sigma with `epsilon(sigma) <= target_epsilon`, within 0.1% of the
        smallest such sigma.

    Raises:
        ValueError: the target needs sigma > 1e3 or < 0.1, or an argument is
            missing.
    """
    check_arguments(batch_size, num_examples, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
    steps = steps_for(batch_size, num_examples, steps, epochs)

    def make_event(sigma):
        return dp_sgd_event(sigma, batch_size, num_examples, steps, sampling)

    epsilons = _Epsilons(accountant, delta)
    if epsilons(make_event(MAX_NOISE_MULTIPLIER)) > target_epsilon:
        raise ValueError(
            f"epsilon={target_epsilon} at delta={delta} cannot be reached "
            f"with noise_multiplier <= {MAX_NOISE_MULTIPLIER:g} for {steps} "
            f"steps of batch {batch_size} out of {num_examples}: train "
            "fewer steps, use a larger dataset or a larger budget."
        )
    upper, guess = MAX_NOISE_MULTIPLIER, 1.0
    if accountant == "pld":
        rdp = _Epsilons("rdp", delta)
        if rdp(make_event(MAX_NOISE_MULTIPLIER)) <= target_epsilon:
            upper = _smallest_sigma(
                rdp, make_event, target_epsilon, upper, guess, tol=1e-2
            )
            guess = 0.85 * upper
    sigma = _smallest_sigma(
        epsilons, make_event, target_epsilon, upper, guess, tol=1e-3
    )
    reached = epsilons(make_event(sigma))
    if reached > target_epsilon:  # never return a sigma above the budget
        raise AssertionError(f"calibration gave epsilon {reached} > target")
    return sigma


def calibrate_steps(
    target_epsilon,
    delta,
    noise_multiplier,
    batch_size,
    num_examples,
    accountant="pld",
    sampling="poisson",
    max_steps=10**7,
):
    """The largest number of steps whose epsilon is <= `target_epsilon`."""
    check_arguments(batch_size, num_examples, delta)
    return remaining_steps(
        [],
        Segment(noise_multiplier, batch_size, sampling, 0),
        num_examples,
        delta,
        target_epsilon,
        accountant,
        max_steps,
    )


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive logical steps with the same settings, as a ledger holds.

    Attributes:
        noise_multiplier: sigma.
        batch_size: B, the public divisor (the expected size for Poisson).
        sampling: one of `SAMPLING`: how the batches were drawn.
        steps: the number of logical steps.
        max_batch_size: rows per logical batch in the pipeline (>= B for
            Poisson batches padded to a fixed size); None: B.
        num_examples: N; None: given when the ledger is evaluated.
        overflow_probability: per step, the probability that a padded
            Poisson batch was truncated (`truncation_delta`).
        declared: the sampling is the user's claim (`sampling.declare`).
    """

    noise_multiplier: float
    batch_size: int
    sampling: str
    steps: int
    max_batch_size: int = None
    num_examples: int = None
    overflow_probability: float = 0.0
    declared: bool = False


def _num_examples(segment, num_examples):
    n = segment.num_examples or num_examples
    check_arguments(segment.batch_size, n)
    return n


def ledger_event(segments, num_examples=None):
    """The composed `DpEvent` of a ledger's segments (heterogeneous steps);
    `num_examples` is N where a segment does not record it."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_sgd_event(
                s.noise_multiplier,
                s.batch_size,
                _num_examples(s, num_examples),
                s.steps,
                s.sampling,
            )
            for s in segments
            if s.steps > 0
        ]
    )


def ledger_epsilon(segments, num_examples, delta, accountant="pld"):
    """Epsilon at `delta` of all the steps a ledger records."""
    segments = [s for s in segments if s.steps > 0]
    for s in segments:
        _num_examples(s, num_examples)
    if not segments:
        return 0.0
    if any(s.noise_multiplier == 0 for s in segments):
        return math.inf
    event = ledger_event(segments, num_examples)
    return epsilon_of_event(event, delta, accountant)


def remaining_steps(
    segments,
    next_step,
    num_examples,
    delta,
    epsilon_budget,
    accountant="pld",
    max_steps=10**7,
):
    """How many more steps like `next_step` keep epsilon <= the budget.

    dp-accounting's `calibrate_dp_mechanism` searches the number of steps
    (discrete), and the last step within the budget is then checked
    exactly. For PLD the search starts from the steps that RDP allows
    (found first: RDP is cheap and its epsilon is above PLD's).

    Args:
        segments: the steps taken so far (a ledger's `Segment`s).
        next_step: a `Segment` with the settings of the coming steps (its
            `steps` is ignored).
        num_examples, delta, accountant: as in `ledger_epsilon`.
        epsilon_budget: the budget.
        max_steps: the search's upper limit.

    Returns:
        The largest n <= `max_steps` such that the ledger plus n such steps
        has epsilon <= `epsilon_budget` (0 if even one step would exceed it).
    """

    def with_steps(n):
        extra = dataclasses.replace(next_step, steps=min(int(n), max_steps))
        return list(segments) + [extra]

    if ledger_epsilon(with_steps(1), num_examples, delta, accountant) > (
        epsilon_budget
    ):
        return 0  # also for sigma = 0, whose epsilon is infinite
    lower = 1
    if accountant == "pld":
        lower = remaining_steps(
            segments,
            next_step,
            num_examples,
            delta,
            epsilon_budget,
            "rdp",
            max_steps,
        )
    return _largest_steps(
        _Epsilons(accountant, delta),
        lambda n: ledger_event(with_steps(n), num_examples),
        epsilon_budget,
        max(1, lower),
        max_steps,
    )


def _largest_steps(epsilons, make_event, epsilon_budget, lower, max_steps):
    """The largest n <= max_steps with epsilon <= the budget.

    dp-accounting's calibration (discrete: its bracket search from `lower`
    through 2 `lower`, then Brent's method), then the last step within the
    budget checked exactly.

    Args:
        epsilons: an `_Epsilons`.
        make_event: n -> `DpEvent`, for n >= 1 (n > max_steps: max_steps).
        epsilon_budget: the budget, met at n = 1.
        lower: a number of steps probably within the budget (if not, the
            search starts from 1).
        max_steps: the search's upper limit.
    """

    def epsilon(n):
        return epsilons(make_event(n))

    if epsilon(lower) > epsilon_budget:
        lower = 1
    try:
        n = epsilons.calibrate(
            make_event,
            epsilon_budget,
            dp_accounting.LowerEndpointAndGuess(lower, 2 * lower),
            discrete=True,
        )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
        n = max_steps  # even max_steps keep epsilon within the budget
    n = min(int(n), max_steps)
    while n < max_steps and epsilon(n + 1) <= epsilon_budget:
        n += 1
    if epsilon(n) > epsilon_budget:  # never return a step above the budget
        raise AssertionError(f"calibration gave epsilon {epsilon(n)}")
    return n


def poisson_overflow_probability(num_examples, batch_size, max_batch_size):
    """P[Binomial(N, B/N) > m]: a Poisson batch does not fit in m rows."""
    n, q, m = num_examples, batch_size / num_examples, int(max_batch_size)
    if m >= n:
        return 0.0
    if q >= 1.0:
        return 1.0

    def log_pmf(k):
        return (
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * math.log(q)
            + (n - k) * math.log1p(-q)
        )

    total, k = 0.0, m + 1
    while k <= n:
        term = math.exp(log_pmf(k))
        total += term
        if k > n * q and term < 1e-30 * max(total, 1e-300):
            break
        k += 1
    return min(total, 1.0)


def poisson_max_batch_size(num_examples, batch_size, overflow_probability):
    """The smallest m with `poisson_overflow_probability(...) <= p`; the
    expected `batch_size` may be fractional (a shard of the data)."""
    m = max(1, math.ceil(batch_size))
    while (
        poisson_overflow_probability(num_examples, batch_size, m)
        > overflow_probability
    ):
        m += max(1, int(0.01 * batch_size))
    while m > 1 and (
        poisson_overflow_probability(num_examples, batch_size, m - 1)
        <= overflow_probability
    ):
        m -= 1
    return m


def truncation_delta(segments, epsilon):
    """The delta that truncating Poisson batches to a padded size adds.

    The truncated pipeline differs from true Poisson sampling only when a
    batch overflows, so over the run their output distributions are within
    total variation eta = sum over steps of P[overflow]; an (epsilon,
    delta)-DP mechanism run on it is then (epsilon, delta + (1 + e^epsilon)
    eta)-DP.
    """
    eta = sum(
        s.steps * s.overflow_probability
        for s in segments
        if s.sampling == "poisson"
    )
    if eta == 0:
        return 0.0
    return (1 + math.exp(min(epsilon, 700))) * eta


# What each sampling kind assumes, in the words of the privacy statement.
SAMPLING_ASSUMPTIONS = {
    "poisson": "Poisson sampling from a secret sample",
    "shuffle": (
        "each pass over the data holds each example at most once (shuffled "
        "batches; no amplification by sampling is assumed)"
    ),
    "unknown": (
        "a pipeline that keras_dpscale cannot see into: every example is "
        "counted in every step (no amplification by sampling)"
    ),
    "public": (
        "Poisson sampling from a public seed: every example is counted in "
        "every step (no amplification by sampling)"
    ),
}


def privacy_statement(
    segments,
    delta,
    accountant="pld",
    num_examples=None,
    l2_norm_clip=None,
    non_private_steps=0,
    not_covered=(),
):
    """A plain account of the guarantee of a ledger, naming what it assumes
    and what it does not cover.

    Args:
        segments: the ledger's `Segment`s.
        delta: the delta of the guarantee.
        accountant: "pld" or "rdp".
        num_examples: N where a segment does not record it.
        l2_norm_clip: C, for the text.
        non_private_steps: steps that trained the weights before, without
            DP (not covered).
        not_covered: descriptions of state set from data outside DP
            training (adapted normalization statistics, ...).

    Returns:
        The statement, a few sentences.
    """
    segments = [s for s in segments if s.steps > 0]
    steps = sum(s.steps for s in segments)
    if segments:
        epsilon = ledger_epsilon(segments, num_examples, delta, accountant)
        sigmas = sorted({s.noise_multiplier for s in segments})
        kinds = []
        for s in segments:
            text = SAMPLING_ASSUMPTIONS[s.sampling]
            if s.declared:
                text += " (the user's claim)"
            if text not in kinds:
                kinds.append(text)
        text = (
            f"epsilon={epsilon:.4g} at delta={delta:g} for the {steps} DP "
            f"steps recorded (noise_multiplier "
            f"{', '.join(f'{v:g}' for v in sigmas)}"
            + (f", l2_norm_clip {l2_norm_clip:g}" if l2_norm_clip else "")
            + f", N={segments[0].num_examples or num_examples}, "
            f"{accountant.upper()} accountant; {'; '.join(kinds)}"
        )
        extra = truncation_delta(segments, epsilon)
        if extra:
            text += (
                f"; padded Poisson batches, whose rare truncation adds "
                f"{extra:.3g} to delta"
            )
        text += ")."
    else:
        text = f"No DP step is recorded: epsilon=0 at delta={delta:g}."
    text += (
        " It covers the weights only if they were independent of the "
        "private data before the first recorded DP step (random "
        "initialization or public pre-training: the user's claim)."
    )
    if non_private_steps:
        text += (
            f" WARNING: before that, the weights took {non_private_steps} "
            "steps of a non-DP optimizer, which this guarantee does not "
            "cover."
        )
    for item in not_covered:
        text += f" Not covered: {item}."
    return text
