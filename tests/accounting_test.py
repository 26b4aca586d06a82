"""Epsilon, calibration and ledgers against dp-accounting called directly."""

import math

import dp_accounting
import pytest

from keras_dpscale import accounting

# ../shared/REFERENCE.md: (sigma, steps, B, N, delta, eps RDP, eps PLD).
REFERENCE = [
    (10.0, 875, 4096, 50_000, 1e-5, 0.988, 0.903),
    (3.0, 2468, 4096, 50_000, 1e-5, 7.046, 6.529),
    (2.5, 71_589, 16384, 1_281_167, 8e-7, 7.927, 7.440),
    (1.3127, 1368, 65_536, 1_281_167, 1e-6, 9.973, 9.290),
]


def direct_epsilon(sigma, steps, batch, n, delta, accountant):
    """dp-accounting itself, without this library."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            batch / n, dp_accounting.GaussianDpEvent(sigma)
        ),
        steps,
    )
    acc = (
        dp_accounting.pld.PLDAccountant()
        if accountant == "pld"
        else dp_accounting.rdp.RdpAccountant()
    )
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.filterwarnings("ignore:delta=")
@pytest.mark.parametrize(
    "case", REFERENCE, ids=["c10_e1", "c10_s3", "in", "kur"]
)
def test_reference_table_to_three_decimals(case):
    sigma, steps, batch, n, delta, eps_rdp, eps_pld = case
    for accountant, want in (("rdp", eps_rdp), ("pld", eps_pld)):
        got = accounting.compute_epsilon(
            sigma, batch, n, steps, delta, accountant=accountant
        )
        assert round(got, 3) == pytest.approx(want, abs=1e-9), accountant
        assert got == pytest.approx(
            direct_epsilon(sigma, steps, batch, n, delta, accountant), rel=1e-9
        )


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_is_within_one_percent_below_target(
    accountant, target
):
    sigma = accounting.calibrate_noise_multiplier(
        target, 1e-5, 4096, 50_000, epochs=40, accountant=accountant
    )
    steps = math.ceil(40 * 50_000 / 4096)
    eps = direct_epsilon(sigma, steps, 4096, 50_000, 1e-5, accountant)
    assert 0.99 * target <= eps <= target


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrate_steps_is_the_last_step_within_budget(accountant):
    args = (1.5, 1024, 60_000)
    steps = accounting.calibrate_steps(2.0, 1e-5, *args, accountant=accountant)
    eps = [
        accounting.compute_epsilon(*args, n, 1e-5, accountant=accountant)
        for n in (steps, steps + 1)
    ]
    assert eps[0] <= 2.0 < eps[1]
    assert accounting.calibrate_steps(0.01, 1e-5, 0.5, 256, 60_000) == 0


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrated_sigma_is_the_smallest_within_the_budget(accountant):
    # Every example in each of 100 steps: one Gaussian mechanism of noise
    # sigma / 10, whose exact sigma dp-accounting computes analytically.
    args = (28, 564, 100, 1e-5, accountant, "unknown")
    sigma = accounting.calibrate_noise_multiplier(
        0.5, 1e-5, 28, 564, steps=100, accountant=accountant, sampling="unknown"
    )
    exact = 10 * dp_accounting.get_sigma_gaussian(0.5, 1e-5)
    assert sigma >= exact  # no accountant beats the exact epsilon
    if accountant == "pld":  # tight: within its 1e-4 discretization
        assert sigma == pytest.approx(exact, rel=1e-3)
    # Within the budget, and 0.2% less noise would exceed it.
    assert accounting.compute_epsilon(sigma, *args) <= 0.5
    assert accounting.compute_epsilon(sigma * (1 - 2e-3), *args) > 0.5


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_huge_target_raises(accountant):
    with pytest.raises(ValueError, match="sigma would be below 0.1"):
        accounting.calibrate_noise_multiplier(
            1e4, 1e-5, 28, 564, steps=100, accountant=accountant
        )


def test_unreachable_target_raises():
    with pytest.raises(ValueError, match="cannot be reached"):
        accounting.calibrate_noise_multiplier(
            1e-4, 1e-10, 50_000, 50_000, steps=10**5, accountant="rdp"
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=10, epochs=2), "exactly one of steps and epochs"),
        (dict(), "exactly one of steps and epochs"),
        (dict(steps=10, num_examples=None), "needs num_examples"),
        (dict(steps=10, target_epsilon=-1), "target_epsilon must be > 0"),
    ],
)
def test_missing_or_contradictory_arguments_raise(kwargs, match):
    args = dict(
        target_epsilon=1.0, delta=1e-5, batch_size=100, num_examples=1000
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        accounting.calibrate_noise_multiplier(**args)


def test_large_delta_warns():
    with pytest.warns(UserWarning, match="not below 1/num_examples"):
        accounting.compute_epsilon(1.0, 10, 1000, 10, delta=1e-3)


def gaussian_releases(sigma, releases, delta=1e-5):
    return (
        dp_accounting.pld.PLDAccountant()
        .compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(sigma), releases
            )
        )
        .get_epsilon(delta)
    )


def test_each_sampling_has_its_own_honest_event():
    poisson = accounting.compute_epsilon(1.0, 100, 10_000, 500, 1e-5)
    # Shuffled batches: 500 steps of 100 steps per pass: at most 5 releases
    # of a Gaussian per example, and no amplification.
    shuffle = accounting.compute_epsilon(
        1.0, 100, 10_000, 500, 1e-5, sampling="shuffle"
    )
    assert shuffle == pytest.approx(gaussian_releases(1.0, 5))
    assert shuffle > 5 * poisson
    # A partial pass counts whole; floor(N/B) steps make a pass.
    assert accounting.releases(300, 1000, 7, "shuffle") == 3
    # A pipeline the library cannot see into, or a public sample: every
    # example may be in every step (10 steps, within one pass).
    every_step = gaussian_releases(1.0, 10)
    for kind in ("unknown", "public"):
        eps = accounting.compute_epsilon(
            1.0, 100, 10_000, 10, 1e-5, sampling=kind
        )
        assert eps == pytest.approx(every_step)
    with pytest.raises(ValueError, match="sampling must be one of"):
        accounting.compute_epsilon(1.0, 100, 10_000, 5, 1e-5, sampling="x")


def test_heterogeneous_ledger_composes_its_segments():
    segments = [
        accounting.Segment(2.0, 256, "poisson", 300),
        accounting.Segment(1.0, 512, "poisson", 100),
    ]
    got = accounting.ledger_epsilon(segments, 60_000, 1e-5)
    direct = (
        dp_accounting.pld.PLDAccountant()
        .compose(
            dp_accounting.ComposedDpEvent(
                [
                    accounting.dp_sgd_event(2.0, 256, 60_000, 300),
                    accounting.dp_sgd_event(1.0, 512, 60_000, 100),
                ]
            )
        )
        .get_epsilon(1e-5)
    )
    assert got == pytest.approx(direct)
    first_only = accounting.compute_epsilon(2.0, 256, 60_000, 300, 1e-5)
    assert got > first_only
    assert accounting.ledger_epsilon([], 60_000, 1e-5) == 0.0
    zero_noise = [accounting.Segment(0.0, 256, "poisson", 1)]
    assert accounting.ledger_epsilon(zero_noise, 60_000, 1e-5) == math.inf


def test_remaining_steps_after_a_ledger():
    ledger = [accounting.Segment(1.0, 256, "poisson", 200)]
    nxt = accounting.Segment(1.0, 256, "poisson", 0)
    n = accounting.remaining_steps(ledger, nxt, 60_000, 1e-5, 3.0, "rdp")
    total = accounting.calibrate_steps(3.0, 1e-5, 1.0, 256, 60_000, "rdp")
    assert n == total - 200


def test_remaining_steps_limits():
    nxt = accounting.Segment(1.0, 256, "poisson", 0)
    args = (60_000, 1e-5, 3.0, "rdp")
    assert accounting.remaining_steps([], nxt, *args, max_steps=50) == 50
    no_noise = accounting.Segment(0.0, 256, "poisson", 0)
    assert accounting.remaining_steps([], no_noise, *args) == 0
    spent = [accounting.Segment(0.5, 256, "unknown", 1000)]
    assert accounting.remaining_steps(spent, nxt, *args) == 0


def test_truncation_delta_is_one_plus_e_eps_times_overflow_mass():
    p = accounting.poisson_overflow_probability(60_000, 256, 300)
    assert 0 < p < 1e-2
    segments = [
        accounting.Segment(1.0, 256, "poisson", 100, 300, 60_000, p),
        accounting.Segment(1.0, 256, "shuffle", 100, 256, 60_000),
    ]
    got = accounting.truncation_delta(segments, 2.0)
    assert got == pytest.approx((1 + math.exp(2.0)) * 100 * p)
    assert accounting.truncation_delta(segments[1:], 2.0) == 0.0


def test_segments_carry_their_own_dataset_size():
    # Steps on a smaller dataset (a larger q) cost more: each segment is
    # accounted with its own N, the argument only fills in a missing one.
    a = accounting.Segment(1.0, 100, "poisson", 50, num_examples=1000)
    b = accounting.Segment(1.0, 100, "poisson", 50)
    assert accounting.ledger_epsilon([a], 10_000, 1e-5) == pytest.approx(
        accounting.compute_epsilon(1.0, 100, 1000, 50, 1e-5)
    )
    assert accounting.ledger_epsilon([b], 10_000, 1e-5) == pytest.approx(
        accounting.compute_epsilon(1.0, 100, 10_000, 50, 1e-5)
    )
    with pytest.raises(ValueError, match="num_examples"):
        accounting.ledger_epsilon([b], None, 1e-5)


def test_statement_names_assumptions_and_what_is_not_covered():
    segments = [
        accounting.Segment(1.0, 100, "poisson", 10, 120, 1000, 1e-18),
        accounting.Segment(1.0, 100, "unknown", 5, 100, 1000, 0.0, True),
    ]
    text = accounting.privacy_statement(
        segments,
        1e-5,
        non_private_steps=7,
        not_covered=["the statistics of layer 'n'"],
    )
    assert "15 DP steps" in text
    assert "secret sample" in text and "cannot see into" in text
    assert "the user's claim" in text
    assert "7 steps of a non-DP optimizer" in text
    assert "Not covered: the statistics of layer 'n'" in text
    empty = accounting.privacy_statement([], 1e-5)
    assert "No DP step" in empty and "do not depend" not in empty
