"""A short DP-SGD training run: the README's first command.

    python tools/train.py                  # about a minute on 2 CPU cores

Trains a small WRN (GroupNorm) with DPSGD on a synthetic 10-class image task
that this script generates (no download), then prints the test accuracy and
the privacy guarantee (epsilon at delta). Real datasets and gin configs come
with the data and launcher issues.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_dpscale as kd  # noqa: E402
from keras_dpscale.data.synthetic import synthetic_images  # noqa: E402
from keras_dpscale.models import wide_resnet  # noqa: E402

flags.DEFINE_integer("num_examples", 4096, "Synthetic training examples.")
flags.DEFINE_integer("batch_size", 256, "Logical batch size.")
flags.DEFINE_integer("accumulation_steps", 2, "Physical batches per step.")
flags.DEFINE_integer("epochs", 3, "Epochs.")
flags.DEFINE_float("learning_rate", 2.0, "Learning rate (update divided by C).")
flags.DEFINE_float("l2_norm_clip", 1.0, "Per-example clipping norm C.")
flags.DEFINE_float("noise_multiplier", 1.0, "Noise multiplier sigma.")
flags.DEFINE_float("delta", 1e-5, "delta of the (epsilon, delta) guarantee.")
flags.DEFINE_integer("seed", 0, "Seed of the data and the initialization.")
FLAGS = flags.FLAGS


def main(_):
    keras.utils.set_random_seed(FLAGS.seed)
    x, y = synthetic_images(FLAGS.num_examples, FLAGS.seed, size=16, noise=2.0)
    x_test, y_test = synthetic_images(1024, FLAGS.seed + 1, size=16, noise=2.0)
    physical = FLAGS.batch_size // FLAGS.accumulation_steps
    train = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(FLAGS.num_examples, seed=FLAGS.seed)
        .batch(physical, drop_remainder=True)
        .prefetch(2)
    )
    model = wide_resnet(depth=10, width=1, input_shape=x.shape[1:])
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=FLAGS.learning_rate,
            l2_norm_clip=FLAGS.l2_norm_clip,
            noise_multiplier=FLAGS.noise_multiplier,
            accumulation_steps=FLAGS.accumulation_steps,
            rescale_to_unit_norm=True,
            num_examples=FLAGS.num_examples,
            target_delta=FLAGS.delta,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train, epochs=FLAGS.epochs, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    epsilon = model.optimizer.epsilon()
    print(
        f"test accuracy {accuracy:.4f} (chance 0.10), epsilon {epsilon:.3g} "
        f"at delta {FLAGS.delta:g}, after {int(model.optimizer.iterations)} "
        f"DP steps of batch {FLAGS.batch_size}"
    )


if __name__ == "__main__":
    app.run(main)
