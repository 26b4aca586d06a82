"""DP training from a gin config: the README's first command.

    python tools/train.py                                 # configs/fashion_mnist.gin
    python tools/train.py --config configs/cifar10_wrn_16_4_eps8.gin \
        --gin_bindings "train_and_evaluate.epochs = 1" --strategy mirrored

The config states the data, the model and the DPSGD settings
(`keras_dpscale.experiment.train_and_evaluate`); the run prints a progress
bar with epsilon, writes TensorBoard logs, the operative config, result.json
and a SavedModel with the privacy record to --model_dir, and ends with one
line: test accuracy and epsilon. `tools/train_tpu.py` is the same launcher
with `--strategy tpu` as its default.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from keras_dpscale import distribute  # noqa: E402
from keras_dpscale import experiment  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_multi_string(
    "config",
    [os.path.join(_ROOT, "configs", "fashion_mnist.gin")],
    "Gin config files.",
)
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (override).")
flags.DEFINE_string("model_dir", "/tmp/keras_dpscale", "Output directory.")
flags.DEFINE_enum(
    "strategy", "default", distribute.STRATEGIES, "tf.distribute strategy."
)
flags.DEFINE_string("tpu", None, "TPU name or address (--strategy tpu).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    gin.parse_config_files_and_bindings(FLAGS.config, FLAGS.gin_bindings)
    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
    result = experiment.train_and_evaluate(FLAGS.model_dir, strategy)
    print(result["privacy_statement"])
    print(
        f"test accuracy {result['test_accuracy']:.4f}, epsilon "
        f"{result['epsilon']:.3f} at delta {result['delta']:g} "
        f"({result['steps']} steps of batch {result['batch_size']}, "
        f"noise multiplier {result['noise_multiplier']:.4g}, "
        f"{result['seconds']:.0f} s); model in {FLAGS.model_dir}"
    )


if __name__ == "__main__":
    app.run(main)
