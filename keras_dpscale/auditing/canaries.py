"""Canaries: Dirac canaries in gradient space, input-space canaries."""

import keras
import numpy as np
import tensorflow as tf

from keras_dpscale.data.synthetic import synthetic_images


@keras.saving.register_keras_serializable(package="keras_dpscale")
class DiracCanaries(keras.layers.Layer):
    """Gradient-space Dirac canaries for a white-box audit of the DP step.

    Holds an m-vector v of trainable weights (initially 0) and is called on
    `[outputs, canary_index]`, with `canary_index` an int per example: i in
    [0, m) for canary i, anything else (e.g. -1) for an ordinary example.

    - Ordinary example: `outputs` pass through unchanged and its gradient on
      v is exactly 0.
    - Canary i: the outputs are multiplied by 0, so its gradient on every
      other weight of the model is exactly 0, and the layer adds the loss
      `-gradient_norm * v[i]`: the canary's per-example gradient is
      `-gradient_norm * e_i`, a Dirac spike on coordinate i of v. With
      `gradient_norm` > C, clipping scales it to norm exactly C (so a
      clipping bug shows in the audit too).

    After DP-SGD with momentum 0, v_i(T) - v_i(0) is (lr / B) times the sum
    over steps of (C if canary i was in the batch) plus N(0, (sigma C)^2)
    noise: the score of canary i (`whitebox_audit`). This is the Dirac
    canary of Steinke, Nasr & Jagielski 2023 (section 7), built into an
    ordinary Keras model so that it goes through the library's real train
    step: per-example gradients, clipping, accumulation, noise, update.

    Args:
        num_canaries: m.
        gradient_norm: the norm of a canary's gradient before clipping.
    """

    def __init__(self, num_canaries, gradient_norm=10.0, **kwargs):
        super().__init__(**kwargs)
        self.num_canaries = int(num_canaries)
        self.gradient_norm = float(gradient_norm)

    def build(self, input_shape):
        self.canary_weights = self.add_weight(
            shape=(self.num_canaries,),
            initializer="zeros",
            trainable=True,
            name="canary_weights",
        )

    def call(self, inputs):
        outputs, canary_index = inputs
        index = tf.cast(tf.reshape(canary_index, [-1]), tf.int32)
        # one_hot of an index outside [0, m) is all zeros: ordinary examples.
        one_hot = tf.one_hot(index, self.num_canaries, dtype=outputs.dtype)
        self.add_loss(
            -self.gradient_norm
            * tf.reduce_sum(
                one_hot * tf.cast(self.canary_weights, one_hot.dtype)
            )
        )
        is_canary = tf.reduce_sum(one_hot, axis=-1)
        keep = tf.reshape(
            1.0 - is_canary, [-1] + [1] * (outputs.shape.rank - 1)
        )
        return outputs * keep

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            num_canaries=self.num_canaries, gradient_norm=self.gradient_norm
        )
        return config


def draw_inclusion(num_canaries, seed):
    """S: each of m canaries included independently with probability 1/2."""
    return np.random.default_rng([seed, 1]).random(num_canaries) < 0.5


def input_space_canaries(
    num_canaries, kind="mislabeled", size=8, num_classes=10, seed=0
):
    """Input-space canaries for a black-box audit.

    Args:
        num_canaries: m.
        kind: "mislabeled": images of the training distribution
            (`synthetic_images`) with a wrong label, drawn uniformly from the
            other classes; "ood": out-of-distribution images (uniform noise
            in [-3, 3]) with a random label.
        size, num_classes: as `synthetic_images`.
        seed: the canaries' seed.

    Returns:
        `(images [m, size, size, 3] float32, labels [m] int32)`.
    """
    rng = np.random.default_rng([seed, 3])
    if kind == "mislabeled":
        images, labels = synthetic_images(
            num_canaries, seed + 10_000, size, num_classes
        )
        shift = rng.integers(1, num_classes, size=num_canaries)
        return images, ((labels + shift) % num_classes).astype(np.int32)
    if kind == "ood":
        images = rng.uniform(-3.0, 3.0, size=(num_canaries, size, size, 3))
        labels = rng.integers(0, num_classes, size=num_canaries)
        return images.astype(np.float32), labels.astype(np.int32)
    raise ValueError(f"kind must be 'mislabeled' or 'ood', got {kind!r}.")
