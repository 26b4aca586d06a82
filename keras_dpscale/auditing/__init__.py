"""Empirical privacy auditing: lower bounds on the epsilon of a training run.

An audit trains with *canaries*, scores each canary after training, and turns
how well the scores tell included canaries from excluded ones into an
epsilon that the training run provably exceeds with high confidence (if the
guess is better than an (epsilon, delta)-DP algorithm allows). A lower bound
above the epsilon that the accountant claims means that the implementation
is not as private as claimed: a bug.

Two statistical procedures:

- **One run** (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
  Training Run", NeurIPS, arXiv 2305.08846): m canaries, each included in the
  training set independently with probability 1/2 (S_i = +1 or -1). After
  training, the auditor guesses S_i = +1 for the k+ canaries of highest
  score, S_i = -1 for the k- of lowest score, and abstains on the others:
  r = k+ + k- guesses, v of them correct. For an (epsilon, delta)-DP
  algorithm, P[v or more correct] is at most `one_run_p_value(m, r, v,
  epsilon, delta)` (the paper's bound for approximate DP, computed as in the
  code that the paper gives in its appendix); `one_run_epsilon_lower_bound` is the largest epsilon that
  this p-value rejects at significance 1 - confidence.
- **Many runs** (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021): runs on
  a fixed pair of neighbouring datasets D (with the target) and D' (without);
  a threshold on a score gives false-positive and false-negative rates,
  whose Clopper-Pearson upper bounds give epsilon >= log((1 - delta - FPR) /
  FNR) (and the symmetric bound).

Canaries (`DiracCanaries`, `input_space_canaries`) and the audited training
runs (`whitebox_audit`, `blackbox_audit`) follow; `write_report` writes the
JSON report and the PNG of the score distributions.

The binomial tails and Clopper-Pearson bounds come from `scipy.stats` (which
dp-accounting installs), the Gaussian mechanism's exact epsilon from
dp-accounting's analytic `get_epsilon_gaussian`.
"""

from keras_dpscale.auditing.canaries import DiracCanaries
from keras_dpscale.auditing.canaries import draw_inclusion
from keras_dpscale.auditing.canaries import input_space_canaries
from keras_dpscale.auditing.runs import AuditResult
from keras_dpscale.auditing.runs import blackbox_audit
from keras_dpscale.auditing.runs import poisson_draws
from keras_dpscale.auditing.runs import train_with_canaries
from keras_dpscale.auditing.runs import whitebox_audit
from keras_dpscale.auditing.runs import write_report
from keras_dpscale.auditing.statistics import binomial_cdf
from keras_dpscale.auditing.statistics import binomial_pmf
from keras_dpscale.auditing.statistics import binomial_sf
from keras_dpscale.auditing.statistics import clopper_pearson
from keras_dpscale.auditing.statistics import clopper_pearson_lower
from keras_dpscale.auditing.statistics import clopper_pearson_upper
from keras_dpscale.auditing.statistics import default_guess_counts
from keras_dpscale.auditing.statistics import epsilon_from_error_rates
from keras_dpscale.auditing.statistics import gaussian_epsilon
from keras_dpscale.auditing.statistics import guesses_from_scores
from keras_dpscale.auditing.statistics import many_run_audit
from keras_dpscale.auditing.statistics import ManyRunResult
from keras_dpscale.auditing.statistics import one_run_audit
from keras_dpscale.auditing.statistics import one_run_epsilon_lower_bound
from keras_dpscale.auditing.statistics import one_run_p_value
from keras_dpscale.auditing.statistics import OneRunResult
from keras_dpscale.data.synthetic import synthetic_images

__all__ = [
    "AuditResult",
    "binomial_cdf",
    "binomial_pmf",
    "binomial_sf",
    "blackbox_audit",
    "clopper_pearson",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "default_guess_counts",
    "DiracCanaries",
    "draw_inclusion",
    "epsilon_from_error_rates",
    "gaussian_epsilon",
    "guesses_from_scores",
    "input_space_canaries",
    "many_run_audit",
    "ManyRunResult",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "OneRunResult",
    "poisson_draws",
    "synthetic_images",
    "train_with_canaries",
    "whitebox_audit",
    "write_report",
]
