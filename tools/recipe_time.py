"""Wall time of a whole recipe, from a measured step time.

A config's run is T logical steps of B examples with K augmult views: T * B
* K images through the DP step. Given the seconds per step measured on a
shorter run of the same model on the same device (the CIFAR-10 run of
`tools/device_check.sh`, or `tools/bench_step.py`), with b examples of k
views per step, the whole run takes about

    T * (B * K) / (b * k) * seconds_per_step

(the DP step's cost grows with the images it sees; compilation, evaluation
and input are left out). It prints the recipe's figures and that estimate:

    python tools/recipe_time.py --config configs/cifar10_wrn_16_4_eps8.gin \
        --seconds_per_step 0.21 --measured_batch 512 --measured_augmult 4

The estimate is only as good as the measurement: measure the same model, on
the device and with the precision the recipe will run with.
"""

import sys

from absl import app
from absl import flags

flags.DEFINE_multi_string("config", None, "Gin config(s) of the recipe.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (override).")
flags.DEFINE_float(
    "seconds_per_step", None, "Measured seconds per (physical) DP step."
)
flags.DEFINE_integer(
    "measured_batch", None, "Examples per measured step (all replicas)."
)
flags.DEFINE_integer(
    "measured_augmult", 1, "Augmult views per example in the measured step."
)
flags.DEFINE_integer(
    "num_examples", None, "N (default: the dataset's known training size)."
)
FLAGS = flags.FLAGS

# Training-set sizes of the datasets the configs name (public facts).
NUM_EXAMPLES = {
    "cifar10": 50_000,
    "cifar100": 50_000,
    "fashion_mnist": 60_000,
    "mnist": 60_000,
    "imagenet2012": 1_281_167,
}


def recipe(num_examples=None):
    """The parsed config's T, B, K and N.

    Args:
        num_examples: N; default: `NUM_EXAMPLES` of the config's dataset.

    Returns:
        A dict: steps (logical), batch_size, augmult, num_examples,
        dataset.
    """
    import inspect

    import gin

    from keras_dpscale import experiment

    defaults = inspect.signature(experiment.train_and_evaluate).parameters
    plan = {k: defaults[k].default for k in ("batch_size", "epochs")}
    plan.update(
        {
            k: v
            for k, v in gin.get_bindings("train_and_evaluate").items()
            if k in plan
        }
    )
    data = gin.get_bindings("build_data")
    dataset = data.get("dataset", "fashion_mnist")
    n = num_examples or NUM_EXAMPLES.get(dataset)
    if n is None:
        raise ValueError(f"N of {dataset!r} unknown: give --num_examples.")
    if data.get("validation_size"):
        n -= int(data["validation_size"])
    steps = experiment.Plan(
        batch_size=plan["batch_size"], epochs=plan["epochs"]
    ).steps(n)
    return {
        "dataset": dataset,
        "num_examples": n,
        "steps": steps,
        "batch_size": plan["batch_size"],
        "augmult": data.get("augmult") or 1,
    }


def seconds(figures, seconds_per_step, measured_batch, measured_augmult=1):
    """The estimated wall time (s) of the recipe `figures` (`recipe`)."""
    images = figures["steps"] * figures["batch_size"] * figures["augmult"]
    return images / (measured_batch * measured_augmult) * seconds_per_step


def main(_):
    from keras_dpscale import experiment

    if not FLAGS.config:
        sys.exit("recipe_time.py: give --config.")
    experiment.parse_config(FLAGS.config, FLAGS.gin_bindings)
    figures = recipe(FLAGS.num_examples)
    images = figures["steps"] * figures["batch_size"] * figures["augmult"]
    print(
        f"recipe: {figures['steps']} steps of B={figures['batch_size']} x "
        f"{figures['augmult']} views (N={figures['num_examples']}, "
        f"{figures['dataset']}): {images:,} images through the DP step"
    )
    if FLAGS.seconds_per_step is None or FLAGS.measured_batch is None:
        return
    total = seconds(
        figures,
        FLAGS.seconds_per_step,
        FLAGS.measured_batch,
        FLAGS.measured_augmult,
    )
    print(
        f"estimate: {total / 3600:.2f} h ({total:,.0f} s) at "
        f"{FLAGS.seconds_per_step:g} s per step of {FLAGS.measured_batch} x "
        f"{FLAGS.measured_augmult} views"
    )


if __name__ == "__main__":
    app.run(main)
