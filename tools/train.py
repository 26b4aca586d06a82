"""DP training from a gin config: the README's first command.

    python tools/train.py                                 # configs/fashion_mnist.gin
    python tools/train.py --config configs/cifar10_wrn_16_4_eps8.gin \
        --gin_bindings "train_and_evaluate.epochs = 1" --strategy mirrored

The config states the data, the model and the DP settings (the builders of
`keras_dpscale.experiment`, called by `train_and_evaluate`). It names no
location: the data are read from --data_dir (default: the environment
variable KERAS_DPSCALE_DATA_DIR, else ../shared/data beside the
repository; see `experiment.default_data_dir`). The run prints a progress
bar with epsilon, writes TensorBoard logs, the operative config, result.json
and a SavedModel with the privacy record to --model_dir, and ends with one
line: test accuracy and epsilon. `tools/train_tpu.py` is the same launcher
with `--strategy tpu` as its default.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
flags.DEFINE_string(
    "data_dir",
    None,
    "Data directory: the config's image_folder/manual_dir are relative to "
    "it, and tfds reads prepared datasets from it (local or gs://). "
    f"Default: ${experiment.DATA_DIR_ENV}, else ../shared/data beside the "
    "repository.",
)
flags.DEFINE_enum(
    "strategy", "default", distribute.STRATEGIES, "tf.distribute strategy."
)
flags.DEFINE_string("tpu", None, "TPU name or address (--strategy tpu).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    experiment.parse_config(FLAGS.config, FLAGS.gin_bindings)
    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
    result = experiment.train_and_evaluate(
        FLAGS.model_dir, strategy, FLAGS.data_dir
    )
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
