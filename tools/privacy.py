"""Privacy calculator: sigma for a budget, epsilon of a run, and a plot.

    # sigma and steps for a target epsilon, under PLD and RDP
    python tools/privacy.py --batch_size 4096 --num_examples 50000 \
        --epochs 200 --target_epsilon 8 --delta 1e-5
    # epsilon of a run
    python tools/privacy.py --batch_size 4096 --num_examples 50000 \
        --noise_multiplier 3 --steps 2468 --delta 1e-5
    # epsilon against steps for several sigmas
    python tools/privacy.py --batch_size 4096 --num_examples 50000 \
        --noise_multiplier 2,3,4 --steps 2468 --delta 1e-5 --plot eps.png
"""

import sys

from absl import app
from absl import flags
from absl import logging

from keras_dpscale import accounting

flags.DEFINE_integer("batch_size", None, "Logical batch size B.", required=True)
flags.DEFINE_integer("num_examples", None, "Dataset size N.", required=True)
flags.DEFINE_float("delta", None, "delta.", required=True)
flags.DEFINE_float("target_epsilon", None, "Calibrate sigma for this epsilon.")
flags.DEFINE_list("noise_multiplier", None, "sigma (several for --plot).")
flags.DEFINE_integer("steps", None, "Logical steps.")
flags.DEFINE_float("epochs", None, "Epochs (steps = ceil(epochs * N / B)).")
flags.DEFINE_enum("sampling", "poisson", accounting.SAMPLING, "Sampling.")
flags.DEFINE_string("plot", None, "Write epsilon against steps to this PNG.")
flags.DEFINE_integer("plot_points", 30, "Points per curve of --plot.")
FLAGS = flags.FLAGS


def plot(path, sigmas, steps, accountant="pld", points=30):
    """Draws epsilon (at FLAGS.delta) against steps, one curve per sigma."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    grid = sorted(
        {max(1, round(steps * (i + 1) / points)) for i in range(points)}
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma in sigmas:
        eps = [
            accounting.compute_epsilon(
                sigma,
                FLAGS.batch_size,
                FLAGS.num_examples,
                t,
                FLAGS.delta,
                accountant,
                FLAGS.sampling,
            )
            for t in grid
        ]
        ax.plot(grid, eps, label=f"sigma={sigma:g}")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta={FLAGS.delta:g} ({accountant.upper()})")
    ax.set_title(
        f"B={FLAGS.batch_size}, N={FLAGS.num_examples}, {FLAGS.sampling} sampling"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(_):
    logging.set_verbosity(logging.ERROR)  # RDP's notes on skipped orders
    if (FLAGS.target_epsilon is None) == (FLAGS.noise_multiplier is None):
        sys.exit("Give exactly one of --target_epsilon and --noise_multiplier.")
    steps = accounting.steps_for(
        FLAGS.batch_size, FLAGS.num_examples, FLAGS.steps, FLAGS.epochs
    )
    common = (FLAGS.batch_size, FLAGS.num_examples)
    print(
        f"B={FLAGS.batch_size} N={FLAGS.num_examples} steps={steps} "
        f"(epochs={steps * FLAGS.batch_size / FLAGS.num_examples:.2f}) "
        f"delta={FLAGS.delta:g} sampling={FLAGS.sampling}"
    )
    if FLAGS.target_epsilon is not None:
        sigmas = []
        for accountant in accounting.ACCOUNTANTS:
            sigma = accounting.calibrate_noise_multiplier(
                FLAGS.target_epsilon,
                FLAGS.delta,
                *common,
                steps=steps,
                accountant=accountant,
                sampling=FLAGS.sampling,
            )
            eps = accounting.compute_epsilon(
                sigma, *common, steps, FLAGS.delta, accountant, FLAGS.sampling
            )
            print(
                f"{accountant.upper()}: noise_multiplier={sigma:.4f} "
                f"epsilon={eps:.4f}"
            )
            sigmas.append(sigma)
        sigmas = sigmas[:1]  # plot the PLD calibration
    else:
        sigmas = [float(s) for s in FLAGS.noise_multiplier]
        for sigma in sigmas:
            for accountant in accounting.ACCOUNTANTS:
                eps = accounting.compute_epsilon(
                    sigma,
                    *common,
                    steps,
                    FLAGS.delta,
                    accountant,
                    FLAGS.sampling,
                )
                print(
                    f"{accountant.upper()}: noise_multiplier={sigma:g} "
                    f"epsilon={eps:.4f}"
                )
    if FLAGS.plot:
        plot(FLAGS.plot, sigmas, steps, points=FLAGS.plot_points)


if __name__ == "__main__":
    app.run(main)
