"""Features learned without privacy on public data: transfer in one run.

Kurakin et al. 2022 and De et al. 2022 train a network without privacy on
public data, then train privately on the private data from there. Here the
public network is trained at the start of the run (a small CNN, minutes on
2 CPU cores for CIFAR-10), and its frozen intermediate features become the
run's fixed feature map (`build_data(features=PublicPretraining())`):
computed once for each private example alone (`featurize`), with a small
DP model (GroupNorm and a linear layer) trained on top.

    build_data.features = @keras_dpscale.experiment.PublicPretraining()
    keras_dpscale.experiment.PublicPretraining.dataset = "cifar10"
    keras_dpscale.experiment.PublicPretraining.image_folder = "cifar10-jpeg.tar.gz"

Privacy: the public network is trained on the public dataset only, so its
weights depend on no private example; the DP guarantee covers the private
training on top. That the public dataset is public and shares no example
with the private one is the user's claim, as for any pre-trained weights;
`build_data` refuses the private dataset itself as the public one. The
record names the map (`export.feature_map_name`: the network's name says
what it was trained on).
"""

import dataclasses
import os

import gin
import keras
import numpy as np
import tensorflow as tf

from keras_dpscale import data


@gin.configurable(module="keras_dpscale.experiment")
@dataclasses.dataclass(frozen=True)
class PublicPretraining:
    """How to learn the feature map on public data.

    Attributes:
        dataset: the public dataset, a `data.load` name (its "train" split).
        image_folder: its ImageFolder archive or directory, relative to
            the run's data directory (None: tfds or Debian sources only).
        epochs: training epochs of the public network (Adam, batch
            `batch_size`, `learning_rate`, horizontal flips).
        batch_size: the public network's batch size.
        learning_rate: Adam's learning rate.
    """

    dataset: str = "cifar10"
    image_folder: str | None = "cifar10-jpeg.tar.gz"
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3

    def train(self, image_shape, where, private_dataset, private_folder=None):
        """Trains the public network; returns its frozen feature map.

        Args:
            image_shape: `[H, W, C]` of the private images; the public
                images are resized to it (and turned grey or RGB).
            where: the `data.load` locations (`data_dir`, `image_folder`
                already resolved, `manual_dir`).
            private_dataset, private_folder: the private dataset's name (in
                any tfds spelling) and ImageFolder, refused as the public
                ones. The private `manual_dir` is not passed on.

        Returns:
            A frozen `keras.Model` from normalized images `[n, H, W, C]` to
            features `[n, H / 4, W / 4, 64]`, named after its training
            (the dataset, the source it was read from, the epochs).
        """
        folder = where.get("image_folder")
        if _canonical(self.dataset) == _canonical(private_dataset) or (
            folder is not None
            and private_folder is not None
            and os.path.realpath(folder) == os.path.realpath(private_folder)
        ):
            raise ValueError(
                f"PublicPretraining reads the private dataset "
                f"({private_dataset!r}, {private_folder!r}): training on it "
                "without privacy would void the guarantee. Name a public "
                "dataset."
            )
        try:
            images, labels, source = _public_arrays(
                self.dataset, dict(where, manual_dir=None), image_shape
            )
        except data.DataNotFoundError as e:
            raise data.DataNotFoundError(
                f"PublicPretraining's public data ({self.dataset!r}, "
                f"image_folder {folder!r}) was not found: put it in the data "
                "directory (the launcher's --data_dir), or train without "
                "public data (configs/fashion_mnist_tanh_cnn.gin for "
                f"Fashion-MNIST).\n{e}"
            ) from e
        network = _network(image_shape, int(labels.max()) + 1)
        network.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=True,
        )
        flip = keras.layers.RandomFlip("horizontal")
        batches = (
            tf.data.Dataset.from_tensor_slices((images, labels))
            .shuffle(len(images))
            .batch(self.batch_size)
            .map(lambda x, y: (flip(x, training=True), y))
            .prefetch(2)
        )
        print(
            f"public pretraining: {self.dataset} from {source}, "
            f"{len(images)} images at {tuple(image_shape)}, {self.epochs} "
            "epochs"
        )
        network.fit(batches, epochs=self.epochs, verbose=2)
        features = keras.Model(
            network.input,
            network.get_layer("features").output,
            name=(
                f"cnn_trained_on_public_{self.dataset}_from_{source}_"
                f"{self.epochs}_epochs"
            ),
        )
        features.trainable = False
        return features


def _public_arrays(dataset, where, image_shape):
    """The public training split at the private images' shape, normalized
    as the private images are (`data.normalize`), its labels and the source
    it came from."""
    height, width, channels = image_shape

    def to_shape(image, label):
        image = tf.cast(image, tf.float32)
        if image.shape[-1] != channels:
            image = (
                tf.image.rgb_to_grayscale(image)
                if channels == 1
                else tf.image.grayscale_to_rgb(image)
            )
        image = tf.image.resize(image, (height, width), antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return data.normalize(image), label

    examples, source = data.sources.load_with_source(dataset, "train", **where)
    batches = examples.map(to_shape).batch(1000)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in batches])
    return (
        np.concatenate(images),
        np.concatenate(labels).astype("int32"),
        source,
    )


def _canonical(name):
    """A dataset name without version, config, case or underscores:
    "FashionMNIST:3.0.1", "fashion_mnist/x" and "fashion_mnist" are one."""
    return name.split(":")[0].split("/")[0].lower().replace("_", "")


def _network(image_shape, num_classes):
    """Two stages of two 3x3 ReLU convolutions (32, then 64 channels) and
    a 2x2 max-pool: the features; then a convolution of 128, global
    average pooling and the public classes."""
    conv = keras.layers.Conv2D
    inputs = keras.Input(image_shape)
    h = conv(32, 3, padding="same", activation="relu")(inputs)
    h = conv(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = conv(64, 3, padding="same", activation="relu")(h)
    h = conv(64, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2, name="features")(h)
    h = conv(128, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(num_classes)(h)
    return keras.Model(inputs, outputs, name="public_network")
