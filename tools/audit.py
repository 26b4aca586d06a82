"""Empirical privacy audit of a DP-SGD run: claimed epsilon vs a lower bound.

    python tools/audit.py --config configs/audit_whitebox.gin
    python tools/audit.py --config configs/audit_blackbox.gin \
        --gin_bindings "blackbox_audit.canary_kind = 'ood'" --output_dir /tmp/a
    # self-test: a planted bug (noise x 0.1) must be reported as a violation
    python tools/audit.py --config configs/audit_whitebox.gin \
        --plant_bug less_noise
    # an adversary who knows the sample (its seed is public): honest
    # accounting holds; the old behaviour (a public seed accounted as a
    # secret Poisson sample) is reported as a violation
    python tools/audit.py --config configs/audit_known_sampling.gin
    python tools/audit.py --config configs/audit_known_sampling.gin \
        --plant_bug public_sampling_seed

Trains with canaries (`keras_dpscale.auditing`), prints the epsilon that the
optimizer's ledger claims and the one-run lower bound (Steinke, Nasr &
Jagielski 2023) with its confidence, and writes `report.json` and
`scores.png` (canary scores, included vs excluded) to --output_dir.

The configs bind `audit.method` to `@whitebox_audit` (Dirac canaries in
gradient space, the real DP step) or `@blackbox_audit` (mislabeled or
out-of-distribution images, scored by their loss), and set their arguments.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from keras_dpscale import auditing  # noqa: E402

flags.DEFINE_multi_string("config", [], "Gin config files.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (override).")
flags.DEFINE_string("output_dir", "audit_report", "Where the report goes.")
flags.DEFINE_enum(
    "plant_bug",
    "none",
    ["none", "less_noise", "no_clipping", "public_sampling_seed"],
    "Self-test of the auditor only: train with a planted privacy bug that "
    "the ledger does not see (noise scaled by 0.1; no per-example clipping; "
    "a sample from a public seed accounted as secret Poisson sampling, the "
    "library's behaviour before the sample was made secret); the audit "
    "should then report a VIOLATION.",
)
FLAGS = flags.FLAGS

gin.external_configurable(auditing.whitebox_audit, "whitebox_audit")
gin.external_configurable(auditing.blackbox_audit, "blackbox_audit")


def plant_bug(kind):
    """Monkeypatches the DP step with a known bug (self-test of the audit)."""
    import tensorflow as tf

    from keras_dpscale import noise
    from keras_dpscale.engines import clip

    if kind == "less_noise":
        real = noise.add_gaussian_noise
        noise.add_gaussian_noise = lambda g, s, seed: real(g, 0.1 * s, seed)
    elif kind == "no_clipping":
        # Where both clipping engines take their factors from.
        clip.clip_factors = lambda norms, l2_norm_clip: tf.ones_like(norms)
    elif kind == "public_sampling_seed":
        from keras_dpscale import sampling
        from keras_dpscale.auditing import runs

        runs.sampling_of = lambda seed: sampling.Sampling("poisson")


@gin.configurable
def audit(method=gin.REQUIRED):
    """Runs the configured audit (`whitebox_audit` or `blackbox_audit`)."""
    return method()


def main(argv):
    del argv
    gin.parse_config_files_and_bindings(FLAGS.config, FLAGS.gin_bindings)
    if FLAGS.plant_bug != "none":
        print(f"PLANTED BUG for a self-test of the audit: {FLAGS.plant_bug}")
        plant_bug(FLAGS.plant_bug)
    result = audit()
    result.settings["planted_bug"] = FLAGS.plant_bug
    json_path, png_path = auditing.write_report(result, FLAGS.output_dir)
    run = result.one_run
    print(result.settings["privacy_statement"])
    print(
        f"{result.kind} audit, m={run.m} canaries ({run.num_included} "
        f"included): claimed epsilon {result.claimed_epsilon:.4g} at delta "
        f"{result.delta:g}; audited lower bound {result.epsilon_lower_bound:.4g}"
        f" at {100 * run.confidence:g}% confidence ({run.num_correct} of "
        f"{run.num_guesses} guesses correct); ratio audited/claimed "
        f"{result.ratio:.3f}; {result.runtime_s:.1f} s"
    )
    if result.epsilon_lower_bound > result.claimed_epsilon:
        print("VIOLATION: the audited lower bound exceeds the claimed epsilon.")
    print(f"report: {json_path}, {png_path}")


if __name__ == "__main__":
    app.run(main)
