"""Tests of keras_dpscale.auditing: the statistics, canaries and audited runs.

The white-box runs train the library's real DP step (DPModel + DPSGD) with
Dirac canaries; planted bugs (less noise, no clipping, noise forgotten when
accumulating) must make the audited lower bound exceed the claimed epsilon.
"""

import json
import math
import os
import subprocess
import sys

import dp_accounting
import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import keras_dpscale
from keras_dpscale import accounting
from keras_dpscale import auditing
from keras_dpscale import noise
from keras_dpscale import optimizers
from keras_dpscale.engines import clip

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
DELTA = 1e-5
CLAIMED_EPSILON = 2.0
STEPS = 10


def full_batch_sigma(epsilon, steps):
    """sigma of `steps` full-batch steps at (epsilon, DELTA), analytically.

    T full-batch Gaussian steps are one Gaussian mechanism with noise
    sigma / sqrt(T) (computed here instead of calibrating with the PLD
    accountant, which takes seconds).
    """
    return math.sqrt(steps) * dp_accounting.get_sigma_gaussian(epsilon, DELTA)


# Small, fast white-box run (about 5 s on 2 cores): full batch, 10 steps.
WHITEBOX = dict(
    num_canaries=500,
    num_ordinary=64,
    steps=STEPS,
    target_epsilon=None,
    noise_multiplier=full_batch_sigma(CLAIMED_EPSILON, STEPS),
    delta=DELTA,
    noise_seed=7,
    seed=0,
)


def paper_p_value(m, r, v, eps, delta):
    """`p_value_DP_audit` of Steinke, Nasr & Jagielski (2023), with scipy."""
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += scipy.stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


# --- one-run statistics -----------------------------------------------------


def exact_binomial_tail(n, p, ks):
    """sum over k in ks (0 <= k <= n) of C(n, k) p^k (1 - p)^(n - k), with
    `math` only."""
    return math.fsum(
        math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in ks if 0 <= k <= n
    )


@pytest.mark.parametrize("n, p", [(0, 0.3), (7, 0.0), (7, 1.0), (12, 0.3)])
def test_binomial_tails_against_the_sum_of_terms(n, p):
    pmf = auditing.binomial_pmf(n, p)
    assert pmf.shape == (n + 1,)
    for k in range(-1, n + 2):
        if 0 <= k <= n:
            want = exact_binomial_tail(n, p, [k])
            assert pmf[k] == pytest.approx(want, abs=1e-15)
        assert auditing.binomial_cdf(k, n, p) == pytest.approx(
            exact_binomial_tail(n, p, range(k + 1)), abs=1e-14
        )
        assert auditing.binomial_sf(k, n, p) == pytest.approx(
            exact_binomial_tail(n, p, range(k, n + 1)), abs=1e-14
        )


@pytest.mark.parametrize(
    "r, v, eps, delta",
    [(20, 15, 1.0, 0.0), (30, 30, 3.0, 1e-3), (40, 25, 0.5, 1e-5)],
)
def test_p_value_against_the_sum_of_terms(r, v, eps, delta):
    """The paper's bound written out term by term with `math` only."""
    m, q = 1000, math.exp(eps) / (1 + math.exp(eps))
    beta = exact_binomial_tail(r, q, range(v, r + 1))
    alpha = max(
        exact_binomial_tail(r, q, range(v - i, v)) / i for i in range(1, v + 1)
    )
    want = min(1.0, beta + alpha * delta * 2 * m)
    assert auditing.one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        want, rel=1e-9
    )


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [
        (100, 50, 40, 1.0, 1e-5),
        (1000, 200, 180, 2.0, 1e-5),
        (1000, 1000, 700, 0.5, 0.0),
        (500, 30, 30, 3.0, 1e-3),
        (50, 10, 0, 1.0, 1e-5),
    ],
)
def test_p_value_is_the_papers(m, r, v, eps, delta):
    ours = auditing.one_run_p_value(m, r, v, eps, delta)
    assert ours == pytest.approx(paper_p_value(m, r, v, eps, delta), rel=1e-9)


def test_lower_bound_is_where_the_p_value_crosses_beta():
    m, r, v = 1000, 200, 170
    eps = auditing.one_run_epsilon_lower_bound(m, r, v, DELTA, 0.95)
    assert eps > 0
    assert paper_p_value(m, r, v, eps - 1e-6, DELTA) < 0.05
    assert paper_p_value(m, r, v, eps + 1e-3, DELTA) >= 0.05


def test_lower_bound_is_monotone():
    m, r = 400, 100
    bounds = [
        auditing.one_run_epsilon_lower_bound(m, r, v, DELTA)
        for v in range(50, r + 1)
    ]
    assert bounds[0] == 0.0
    assert np.all(np.diff(bounds) >= -1e-9)
    assert bounds[-1] > 2.0
    # More confidence or more delta can only lower the bound.
    assert auditing.one_run_epsilon_lower_bound(m, r, 90, DELTA, 0.99) < (
        auditing.one_run_epsilon_lower_bound(m, r, 90, DELTA, 0.95)
    )
    assert auditing.one_run_epsilon_lower_bound(m, r, 90, 1e-3) < (
        auditing.one_run_epsilon_lower_bound(m, r, 90, 0.0)
    )


@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_randomized_response_bound_is_valid_and_tight(eps):
    """eps-DP randomized response: bound <= eps at 95%, and close to it."""
    m, bounds = 20_000, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        correct = rng.random(m) < 1 / (1 + math.exp(-eps))
        bounds.append(
            auditing.one_run_epsilon_lower_bound(m, m, int(correct.sum()), 0)
        )
    bounds = np.array(bounds)
    # At 95% confidence about 1 in 20 may exceed eps; 4 or more would have
    # probability < 2% for a valid bound.
    assert np.sum(bounds > eps) <= 3
    assert np.mean(bounds) > 0.9 * eps


def test_one_run_audit_guesses_and_union_bound():
    m = 200
    included = auditing.draw_inclusion(m, seed=3)
    scores = included.astype(float)  # a perfect attack
    one = auditing.one_run_audit(scores, included, DELTA, 0.95, [(50, 50)])
    assert one.num_correct == one.num_guesses == 100
    assert one.epsilon_lower_bound == pytest.approx(
        auditing.one_run_epsilon_lower_bound(m, 100, 100, DELTA, 0.95)
    )
    # Several guess counts: each is tested at 0.05 / (number tried).
    result = auditing.one_run_audit(scores, included, DELTA)
    tried = auditing.default_guess_counts(m)
    assert len(result.tried) == len(tried) > 1
    expected = max(
        auditing.one_run_epsilon_lower_bound(
            m,
            t["k_plus"] + t["k_minus"],
            t["num_correct"],
            DELTA,
            1 - 0.05 / len(tried),
        )
        for t in result.tried
    )
    assert result.epsilon_lower_bound == pytest.approx(expected)
    assert result.epsilon_lower_bound < one.epsilon_lower_bound
    # A score that carries no information gives (almost always) no bound.
    rng = np.random.default_rng(0)
    noise_only = auditing.one_run_audit(rng.normal(size=m), included, DELTA)
    assert noise_only.epsilon_lower_bound < 0.5
    guesses = auditing.guesses_from_scores([3.0, 1.0, 2.0, 0.0], 1, 2)
    np.testing.assert_array_equal(guesses, [1, -1, 0, -1])


def test_gaussian_scores_one_run_bound_below_truth():
    """Idealized Dirac canaries: N(mu, 1) in, N(0, 1) out; mu-GDP run."""
    mu = 1.0
    true_eps = auditing.gaussian_epsilon(mu, DELTA)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = rng.normal(size=1000) + mu * included
        bound = auditing.one_run_audit(scores, included, DELTA)
        assert 0 < bound.epsilon_lower_bound <= true_eps


# --- many-run statistics ------------------------------------------------------


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (57, 1000)])
def test_clopper_pearson_matches_scipy(k, n):
    lo, hi = auditing.clopper_pearson(k, n, 0.95)
    ref = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-9)
    assert hi == pytest.approx(ref.high, abs=1e-9)
    if k < n:
        assert auditing.clopper_pearson_upper(k, n, 0.025) == pytest.approx(
            scipy.stats.beta.ppf(0.975, k + 1, n - k), abs=1e-9
        )


def test_clopper_pearson_closed_forms_and_definition():
    # No success (or no failure) in n: (1 - p)^n = significance.
    for n in (1, 10, 1000):
        assert auditing.clopper_pearson_upper(0, n, 0.025) == pytest.approx(
            1 - 0.025 ** (1 / n), rel=1e-12
        )
        assert auditing.clopper_pearson_lower(n, n, 0.025) == pytest.approx(
            0.025 ** (1 / n), rel=1e-12
        )
    # In general: the binomial tail at the bound is the significance.
    k, n = 7, 40
    hi = auditing.clopper_pearson_upper(k, n, 0.05)
    lo = auditing.clopper_pearson_lower(k, n, 0.05)
    assert exact_binomial_tail(n, hi, range(0, k + 1)) == pytest.approx(0.05)
    assert exact_binomial_tail(n, lo, range(k, n + 1)) == pytest.approx(0.05)
    assert lo < k / n < hi


def test_gaussian_epsilon_solves_the_balle_wang_equation():
    def phi(x):
        return 0.5 * math.erfc(-x / math.sqrt(2))

    for mu, delta in ((0.5, 1e-5), (1.0, 1e-5), (3.0, 1e-10)):
        eps = auditing.gaussian_epsilon(mu, delta)
        got = phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)
        assert eps > 0 and got == pytest.approx(delta, rel=1e-6)
    assert auditing.gaussian_epsilon(0.01, 0.5) == 0.0


def test_many_run_audit_on_the_gaussian_mechanism():
    """Analytic runs: the score of a mu-GDP mechanism on D and on D'."""
    mu = 2.0
    true_eps = auditing.gaussian_epsilon(mu, DELTA)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        result = auditing.many_run_audit(
            rng.normal(mu, 1, 2000), rng.normal(0, 1, 2000), DELTA
        )
        assert 1.0 < result.epsilon_lower_bound <= true_eps
        assert result.num_with == result.num_without == 1000  # split
    # A fixed threshold uses every run.
    fixed = auditing.many_run_audit(
        rng.normal(mu, 1, 500), rng.normal(0, 1, 500), DELTA, threshold=2.5
    )
    assert fixed.num_with == 500
    assert (
        auditing.many_run_audit(
            rng.normal(0, 1, 500), rng.normal(0, 1, 500), DELTA
        ).epsilon_lower_bound
        < 0.5
    )


def test_gaussian_epsilon_agrees_with_the_accountant():
    # Full-batch DP-SGD: T Gaussian steps of noise sigma are mu = sqrt(T)/sigma.
    eps = accounting.compute_epsilon(3.0, 100, 100, 9, DELTA)
    assert auditing.gaussian_epsilon(1.0, DELTA) == pytest.approx(eps, rel=1e-3)


# --- canaries -------------------------------------------------------------------


def test_dirac_canary_gradients():
    m = 5
    features = keras.Input((3,))
    index = keras.Input((), dtype="int32")
    canaries = auditing.DiracCanaries(m, gradient_norm=4.0)
    model = keras_dpscale.DPModel(
        [features, index], canaries([keras.layers.Dense(2)(features), index])
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = np.ones((1, 3), np.float32)
    for i, expected_v in ((2, -4.0 * np.eye(m)[2]), (-1, np.zeros(m))):
        with tf.GradientTape() as tape:
            out = model((x, np.array([i], np.int32)), training=True)
            loss = loss_fn(np.array([1]), out) + sum(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        by_name = {v.path: g for v, g in zip(model.trainable_variables, grads)}
        v_grad = by_name[canaries.canary_weights.path]
        np.testing.assert_allclose(v_grad, expected_v)
        others = [
            g for p, g in by_name.items() if p != canaries.canary_weights.path
        ]
        if i >= 0:  # a canary touches nothing but its own coordinate
            for g in others:
                np.testing.assert_array_equal(g, 0.0)
        else:
            assert any(np.any(np.asarray(g) != 0) for g in others)


def test_input_space_canaries():
    images, _ = auditing.synthetic_images(50, seed=0)
    mis_x, mis_y = auditing.input_space_canaries(50, "mislabeled", seed=0)
    # Same generator, so the true class of the mislabeled images is known.
    _, true_y = auditing.synthetic_images(50, seed=10_000)
    assert mis_x.shape == images.shape
    assert np.all(mis_y != true_y)
    ood_x, ood_y = auditing.input_space_canaries(50, "ood", seed=0)
    assert ood_x.shape == images.shape and ood_y.max() < 10
    with pytest.raises(ValueError):
        auditing.input_space_canaries(5, "other")


# --- audited training runs ------------------------------------------------------


@pytest.fixture(scope="module")
def honest_whitebox():
    keras.backend.clear_session()
    return auditing.whitebox_audit(**WHITEBOX)


def test_whitebox_audit_of_the_real_dp_step(honest_whitebox):
    result = honest_whitebox
    claimed = result.claimed_epsilon
    assert claimed == pytest.approx(CLAIMED_EPSILON, rel=0.01)
    assert claimed == pytest.approx(
        keras_dpscale.accounting.compute_epsilon(
            result.settings["noise_multiplier"],
            result.settings["batch_size"],
            result.settings["num_examples"],
            WHITEBOX["steps"],
            DELTA,
            sampling="poisson",
        )
    )
    # The audit has power (it finds some epsilon) but never exceeds the claim.
    assert 0 < result.epsilon_lower_bound <= claimed
    inc = result.included
    assert result.scores[inc].mean() > result.scores[~inc].mean()


def test_planted_bug_less_noise_is_detected(monkeypatch, honest_whitebox):
    real = noise.add_gaussian_noise
    monkeypatch.setattr(
        noise, "add_gaussian_noise", lambda g, s, seed: real(g, s * 0.1, seed)
    )
    buggy = auditing.whitebox_audit(**WHITEBOX)
    # The ledger does not know about the bug: it claims the same epsilon.
    assert buggy.claimed_epsilon == pytest.approx(
        honest_whitebox.claimed_epsilon
    )
    assert buggy.epsilon_lower_bound > buggy.claimed_epsilon


def test_planted_bug_no_clipping_is_detected(monkeypatch):
    # Canary gradients have norm 10 C: unclipped, they stand out of the noise.
    monkeypatch.setattr(
        clip, "clip_factors", lambda norms, c: tf.ones_like(norms)
    )
    buggy = auditing.whitebox_audit(**WHITEBOX)
    assert buggy.epsilon_lower_bound > buggy.claimed_epsilon


def test_planted_bug_noise_skipped_when_accumulating(monkeypatch):
    """A DP step that forgets the noise on the gradient-accumulation path."""
    real = optimizers.DPOptimizerMixin.add_noise

    def buggy_add_noise(self, grad_sum):
        noisy_sum, sigma = real(self, grad_sum)
        if self.accumulation_steps == 1:
            return noisy_sum, sigma
        return grad_sum, sigma  # the ledger still records sigma

    monkeypatch.setattr(
        optimizers.DPOptimizerMixin, "add_noise", buggy_add_noise
    )
    settings = dict(WHITEBOX, accumulation_steps=2)
    buggy = auditing.whitebox_audit(**settings)
    assert buggy.epsilon_lower_bound > buggy.claimed_epsilon


def test_blackbox_audit_with_mislabeled_canaries(tmp_path):
    result = auditing.blackbox_audit(
        num_canaries=64,
        num_ordinary=128,
        hidden_units=16,
        steps=5,
        sampling_rate=0.5,
        noise_multiplier=1.5,
        target_epsilon=None,
        noise_seed=1,
    )
    assert result.one_run.m == 64
    assert np.all(np.isfinite(result.scores)) and np.all(result.scores <= 0)
    assert 1.0 < result.claimed_epsilon < 10.0
    assert result.epsilon_lower_bound <= result.claimed_epsilon
    json_path, png_path = auditing.write_report(result, str(tmp_path))
    with open(json_path) as f:
        report = json.load(f)
    assert report["kind"] == "blackbox" and report["m"] == 64
    assert os.path.getsize(png_path) > 0


def test_audit_tool_writes_the_report(tmp_path):
    out = tmp_path / "report"
    command = [
        sys.executable,
        os.path.join(ROOT, "tools", "audit.py"),
        "--config",
        os.path.join(ROOT, "configs", "audit_whitebox.gin"),
        "--gin_bindings",
        "whitebox_audit.num_canaries = 100",
        "--gin_bindings",
        "whitebox_audit.num_ordinary = 16",
        "--gin_bindings",
        "whitebox_audit.steps = 3",
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "claimed epsilon" in done.stdout
    with open(out / "report.json") as f:
        report = json.load(f)
    for key in (
        "claimed_epsilon",
        "epsilon_lower_bound",
        "confidence",
        "ratio",
        "m",
        "num_guesses",
        "num_correct",
        "delta",
        "settings",
    ):
        assert key in report
    assert report["m"] == 100 and report["confidence"] == 0.95
    assert report["epsilon_lower_bound"] <= report["claimed_epsilon"]
    assert (out / "scores.png").stat().st_size > 0


KNOWN_SAMPLING = dict(
    num_canaries=500,
    num_ordinary=64,
    steps=100,
    sampling_rate=0.05,
    target_epsilon=0.5,
    delta=DELTA,
    noise_seed=7,
    seed=0,
    sampling_seed=1234,
    adversary="knows_sampling",
)


def test_an_adversary_who_knows_the_sample_breaks_only_the_old_accounting(
    monkeypatch,
):
    # Honest: a sample from a public seed is accounted without amplification.
    honest = auditing.whitebox_audit(**KNOWN_SAMPLING)
    assert "public seed" in honest.settings["privacy_statement"]
    assert honest.epsilon_lower_bound <= honest.claimed_epsilon
    # The old behaviour (the seed of the config drew the sample, and the
    # ledger counted it as secret Poisson sampling) is caught.
    monkeypatch.setattr(
        auditing.runs,
        "sampling_of",
        lambda seed: keras_dpscale.sampling.Sampling("poisson"),
    )
    old = auditing.whitebox_audit(**KNOWN_SAMPLING)
    assert old.claimed_epsilon == pytest.approx(0.5, rel=0.01)
    assert old.epsilon_lower_bound > old.claimed_epsilon
    with pytest.raises(ValueError, match="secret sample cannot be known"):
        auditing.whitebox_audit(
            **dict(KNOWN_SAMPLING, sampling_seed=None, steps=1)
        )
