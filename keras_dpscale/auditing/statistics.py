"""The statistics of privacy audits: one run (Steinke et al. 2023), many runs.

Binomial tails and Clopper-Pearson bounds come from `scipy.stats` (a
dependency of dp-accounting), the Gaussian mechanism's exact epsilon from
dp-accounting's analytic formula.
"""

import dataclasses
import math

import dp_accounting
import numpy as np
from scipy import special
from scipy import stats

# ---------------------------------------------------------------------------
# Binomial tails (`scipy.stats.binom`).
# ---------------------------------------------------------------------------


def binomial_pmf(n, p):
    """The probabilities P[Binomial(n, p) = k] for k = 0..n, as an array.

    Args:
        n: number of trials (>= 0).
        p: success probability in [0, 1].

    Returns:
        float64 array of length n + 1.
    """
    return stats.binom.pmf(np.arange(n + 1), n, p)


def binomial_cdf(k, n, p):
    """P[Binomial(n, p) <= k]."""
    return float(stats.binom.cdf(k, n, p))


def binomial_sf(k, n, p):
    """P[Binomial(n, p) >= k] (scipy's survival function at k - 1)."""
    return float(stats.binom.sf(k - 1, n, p))


# ---------------------------------------------------------------------------
# One-run audit (Steinke, Nasr & Jagielski 2023).
# ---------------------------------------------------------------------------


def one_run_p_value(m, r, v, epsilon, delta):
    """P-value of v or more correct guesses out of r, for an (eps, delta)-DP run.

    The approximate-DP bound of Steinke, Nasr & Jagielski 2023 (arXiv
    2305.08846, the paper's theorem for (eps, delta)-DP auditing): if the
    training algorithm is (epsilon, delta)-DP in each canary, m canaries are
    included independently with probability 1/2 and the auditor makes r
    guesses, then with q = e^eps / (e^eps + 1),

        P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * alpha,
        alpha = max_{i = 1..v} P[v > Binomial(r, q) >= v - i] / i.

    This is the computation of `p_value_DP_audit` in the paper's appendix
    code (also jax_privacy's `auditing._one_run_p_value`). With delta = 0 it
    is the pure-DP bound: W is dominated by Binomial(r, q).

    Args:
        m: number of canaries (each included with probability 1/2).
        r: number of guesses (abstentions excluded), 0 <= r <= m.
        v: number of correct guesses, 0 <= v <= r.
        epsilon: the epsilon of the null hypothesis (>= 0).
        delta: the delta of the null hypothesis, in [0, 1].

    Returns:
        The p-value, in [0, 1].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(
            f"Need epsilon >= 0, delta in [0, 1]: {epsilon}, {delta}."
        )
    if v == 0:
        return 1.0
    # The wrong guesses r - W ~ Binomial(r, 1 - q), 1 - q = 1 / (e^eps + 1):
    # accurate where q rounds to 1.
    wrong = special.expit(-epsilon)
    beta = float(stats.binom.cdf(r - v, r, wrong))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0:
        # P[v > Binomial(r, q) >= v - i] for i = 1..v, divided by i.
        wrong_counts = np.arange(r - v + 1, r + 1)
        below = np.cumsum(stats.binom.pmf(wrong_counts, r, wrong))
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def one_run_epsilon_lower_bound(
    m, r, v, delta, confidence=0.95, max_epsilon=100.0, iterations=60
):
    """The largest epsilon that v correct guesses out of r reject.

    epsilon_lower = sup {eps : one_run_p_value(m, r, v, eps, delta) < beta},
    beta = 1 - confidence, found by bisection as in the paper's
    `get_eps_audit` (the p-value grows with eps). With probability at least
    `confidence` over the canaries' inclusion and the training run, an
    (eps, delta)-DP algorithm with eps below this value would not have
    produced v correct guesses; so the run is not (eps, delta)-DP for any
    smaller eps.

    Args:
        m: number of canaries.
        r: number of guesses.
        v: number of correct guesses.
        delta: the delta at which epsilon is bounded.
        confidence: 1 - beta, e.g. 0.95.
        max_epsilon: the upper end of the search.
        iterations: bisection steps.

    Returns:
        The lower bound on epsilon (0.0 if no epsilon >= 0 is rejected).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    beta = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # p(lo) < beta <= p(hi)
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > max_epsilon:
            return max_epsilon
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores, k_plus, k_minus=0):
    """The auditor's guesses: +1 on the k+ highest scores, -1 on the k- lowest.

    Ties are broken by the canary's index (a fixed, data-independent order).

    Args:
        scores: `[m]` scores, higher meaning "more likely included".
        k_plus: number of +1 guesses.
        k_minus: number of -1 guesses (k+ + k- <= m).

    Returns:
        `[m]` int array in {-1, 0, +1} (0: abstain).
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"Need k+, k- >= 0, k+ + k- <= m={m}.")
    order = np.argsort(-scores, kind="stable")  # highest first
    guesses = np.zeros(m, dtype=np.int64)
    guesses[order[:k_plus]] = 1
    if k_minus:
        guesses[order[m - k_minus :]] = -1
    return guesses


@dataclasses.dataclass
class OneRunResult:
    """The outcome of a one-run audit.

    Attributes:
        epsilon_lower_bound: the epsilon that the run exceeds, at
            `confidence` (the maximum over the tried guess counts, each
            tested at significance (1 - confidence) / len(tried)).
        confidence: the overall confidence, after the union bound.
        delta: the delta of the bound.
        m: number of canaries.
        num_included: canaries included in training.
        k_plus, k_minus: the guess counts that gave the bound.
        num_guesses: r = k_plus + k_minus.
        num_correct: v.
        tried: one dict (k_plus, k_minus, num_correct, epsilon) per tried
            pair of guess counts.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    m: int
    num_included: int
    k_plus: int
    k_minus: int
    num_guesses: int
    num_correct: int
    tried: list


def default_guess_counts(m):
    """Symmetric guess counts (k, k) for k = m/64, m/32, ..., m/2.

    Fixed in advance, independently of the scores (the last pair guesses on
    every canary); the audit then pays a union bound over these 6 pairs.
    """
    counts = sorted({max(1, m // d) for d in (64, 32, 16, 8, 4, 2)})
    return [(k, k) for k in counts if 2 * k <= m]


def one_run_audit(scores, included, delta, confidence=0.95, guess_counts=None):
    """The one-run audit of Steinke, Nasr & Jagielski 2023 from canary scores.

    For each (k+, k-) in `guess_counts`, guesses +1 on the k+ highest scores
    and -1 on the k- lowest, counts the correct guesses v, and bounds epsilon
    at significance (1 - confidence) / len(guess_counts): a union bound over
    the tried counts, so that the maximum over them holds at `confidence`.
    (Choosing the counts after seeing the scores, without this correction,
    would overstate the confidence.)

    Args:
        scores: `[m]` canary scores, higher meaning "more likely included".
        included: `[m]` booleans, the canaries' true inclusion (S_i = +1).
        delta: delta of the bound (the accountant's delta).
        confidence: overall confidence, e.g. 0.95.
        guess_counts: list of (k_plus, k_minus) pairs, fixed in advance; None:
            `default_guess_counts(m)`.

    Returns:
        A `OneRunResult`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != (m,):
        raise ValueError("scores and included must have the same length.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Canary scores must be finite.")
    guess_counts = list(guess_counts or default_guess_counts(m))
    truth = np.where(included, 1, -1)
    per_test_confidence = 1.0 - (1.0 - confidence) / len(guess_counts)
    tried = []
    for k_plus, k_minus in guess_counts:
        guesses = guesses_from_scores(scores, k_plus, k_minus)
        v = int(np.sum(guesses == truth))
        epsilon = one_run_epsilon_lower_bound(
            m, k_plus + k_minus, v, delta, per_test_confidence
        )
        tried.append(
            dict(k_plus=k_plus, k_minus=k_minus, num_correct=v, epsilon=epsilon)
        )
    best = max(tried, key=lambda t: t["epsilon"])
    return OneRunResult(
        epsilon_lower_bound=best["epsilon"],
        confidence=confidence,
        delta=delta,
        m=m,
        num_included=int(included.sum()),
        k_plus=best["k_plus"],
        k_minus=best["k_minus"],
        num_guesses=best["k_plus"] + best["k_minus"],
        num_correct=best["num_correct"],
        tried=tried,
    )


# ---------------------------------------------------------------------------
# Many-run audit (Jagielski et al. 2020; Nasr et al. 2021).
# ---------------------------------------------------------------------------


def clopper_pearson_upper(k, n, significance):
    """One-sided exact upper bound p on a binomial proportion.

    The p with P[Binomial(n, p) <= k] = significance (1 if k = n): with
    probability >= 1 - significance, the true proportion is <= p. It is
    the (1 - significance) quantile of Beta(k + 1, n - k).
    """
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"Need 0 <= k <= n, n >= 1; got k={k}, n={n}.")
    if k == n:
        return 1.0
    return float(stats.beta.ppf(1.0 - significance, k + 1, n - k))


def clopper_pearson_lower(k, n, significance):
    """One-sided exact lower bound: P[Binomial(n, p) >= k] = significance,
    the significance quantile of Beta(k, n - k + 1) (0 if k = 0)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"Need 0 <= k <= n, n >= 1; got k={k}, n={n}.")
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(significance, k, n - k + 1))


def clopper_pearson(k, n, confidence=0.95):
    """The exact two-sided Clopper-Pearson interval (lo, hi) for k of n."""
    significance = (1.0 - confidence) / 2.0
    return (
        clopper_pearson_lower(k, n, significance),
        clopper_pearson_upper(k, n, significance),
    )


def epsilon_from_error_rates(fpr, fnr, delta):
    """Epsilon that a test with these error rates proves, at delta.

    An (eps, delta)-DP algorithm has FPR + e^eps FNR >= 1 - delta and
    FNR + e^eps FPR >= 1 - delta for any test, hence
    eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)).
    """
    bounds = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if 1.0 - delta - a > 0:
            bounds.append(math.inf if b == 0 else math.log((1 - delta - a) / b))
    return max(bounds)


@dataclasses.dataclass
class ManyRunResult:
    """The outcome of a many-run audit.

    Attributes:
        epsilon_lower_bound: epsilon >= this, at `confidence`.
        confidence: joint confidence of the two Clopper-Pearson bounds.
        delta: delta of the bound.
        threshold: the score threshold ("in" if score >= threshold).
        false_positives, false_negatives: counts at the threshold.
        num_with, num_without: runs on D (with the target) and D' (without).
        fpr_upper, fnr_upper: the Clopper-Pearson upper bounds.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    threshold: float
    false_positives: int
    false_negatives: int
    num_with: int
    num_without: int
    fpr_upper: float
    fnr_upper: float


def _best_threshold(scores_with, scores_without, delta):
    """The threshold with the largest point estimate of the epsilon bound."""
    candidates = np.unique(np.concatenate([scores_with, scores_without]))
    best, best_eps = candidates[0], -1.0
    for t in candidates:
        fpr = np.mean(scores_without >= t)
        fnr = np.mean(scores_with < t)
        # Add-one smoothing so that an empty tail does not win by chance.
        fpr = (fpr * len(scores_without) + 1) / (len(scores_without) + 2)
        fnr = (fnr * len(scores_with) + 1) / (len(scores_with) + 2)
        eps = epsilon_from_error_rates(fpr, fnr, delta)
        if eps > best_eps:
            best, best_eps = t, eps
    return float(best)


def many_run_audit(
    scores_with, scores_without, delta, confidence=0.95, threshold=None
):
    """The classic audit from many runs on neighbouring datasets D and D'.

    Guess "D" when a run's score is >= threshold. With FP false positives
    among the runs on D' and FN false negatives among the runs on D, the
    one-sided Clopper-Pearson upper bounds FPR_hi, FNR_hi each at
    significance (1 - confidence) / 2 hold jointly at `confidence` (union
    bound), and epsilon >= max(log((1 - delta - FPR_hi) / FNR_hi),
    log((1 - delta - FNR_hi) / FPR_hi)).

    Args:
        scores_with: scores of the runs trained on D (with the target).
        scores_without: scores of the runs trained on D'.
        delta: delta of the bound.
        confidence: e.g. 0.95.
        threshold: a threshold fixed in advance; None: choose it on the first
            half of each set of runs and count errors on the second half only
            (so that the choice does not bias the bound).

    Returns:
        A `ManyRunResult`.
    """
    scores_with = np.asarray(scores_with, dtype=np.float64)
    scores_without = np.asarray(scores_without, dtype=np.float64)
    if threshold is None:
        half_w, half_wo = len(scores_with) // 2, len(scores_without) // 2
        if min(half_w, half_wo) < 1:
            raise ValueError("Need at least 2 runs of each kind to split.")
        threshold = _best_threshold(
            scores_with[:half_w], scores_without[:half_wo], delta
        )
        scores_with, scores_without = (
            scores_with[half_w:],
            scores_without[half_wo:],
        )
    fp = int(np.sum(scores_without >= threshold))
    fn = int(np.sum(scores_with < threshold))
    significance = (1.0 - confidence) / 2.0
    fpr_hi = clopper_pearson_upper(fp, len(scores_without), significance)
    fnr_hi = clopper_pearson_upper(fn, len(scores_with), significance)
    return ManyRunResult(
        epsilon_lower_bound=epsilon_from_error_rates(fpr_hi, fnr_hi, delta),
        confidence=confidence,
        delta=delta,
        threshold=float(threshold),
        false_positives=fp,
        false_negatives=fn,
        num_with=len(scores_with),
        num_without=len(scores_without),
        fpr_upper=fpr_hi,
        fnr_upper=fnr_hi,
    )


def gaussian_epsilon(mu, delta):
    """The exact epsilon at delta of the Gaussian mechanism with mu = Delta/sigma.

    The solution of delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    (Balle & Wang 2018), from dp-accounting's analytic
    `get_epsilon_gaussian` (not its accountants): a reference for tests
    and reports.
    """
    return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))
