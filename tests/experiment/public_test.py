"""Features learned on public data (`experiment.PublicPretraining`)."""

import json
import os

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import experiment
from keras_dpscale.experiment import public
from tests.experiment.experiment_test import importable_factories
from tests.experiment.experiment_test import make_image_folder
from tests.experiment.experiment_test import tiny_run

PUBLIC = dict(dataset="tiny_public", image_folder="public", batch_size=8)


@pytest.fixture
def folders(tmp_path):
    """Private 8x8 images in d/images; public 16x16 images in d/public
    (other pixels, other labels' meaning)."""
    make_image_folder(tmp_path / "d" / "images")
    rng = np.random.default_rng(1)
    for label, cls in enumerate(["a", "b", "c"]):
        os.makedirs(tmp_path / "d" / "public" / "train" / cls)
        for i in range(8):
            image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
            png = tf.io.encode_png(image).numpy()
            (
                tmp_path / "d" / "public" / "train" / cls / f"{i}.png"
            ).write_bytes(png)
    gin.clear_config()
    yield tmp_path / "d"
    gin.clear_config()


def private_inputs(data_dir, features=None):
    """`build_data` of the private images in `data_dir`/images."""
    return experiment.build_data(
        experiment.Plan(batch_size=8, epochs=1),
        str(data_dir),
        dataset="tiny",
        image_folder="images",
        features=features,
    )


def trained_map(data_dir):
    keras.utils.set_random_seed(0)
    return private_inputs(
        data_dir, public.PublicPretraining(epochs=1, **PUBLIC)
    )


def test_the_map_is_learned_from_public_data_only(folders):
    inputs = trained_map(folders)
    features = inputs.features
    assert isinstance(features, keras.Model) and not features.trainable
    name = "cnn_trained_on_public_tiny_public_from_image_folder_1_epochs"
    assert features.name == name
    assert inputs.image_shape == (8, 8, 3)  # the public images resized
    raw = np.stack([x.numpy() for x, _ in private_inputs(folders).examples])
    got = np.stack([x.numpy() for x, _ in inputs.examples])
    want = features(kd.data.normalize(tf.constant(raw))).numpy()
    assert got.shape == (32, 2, 2, 64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Other private images (every pixel changed), the same seed: the same
    # map, bit for bit. Had the public network seen a private example, its
    # weights would differ.
    for path in (folders / "images").rglob("*.png"):
        image = tf.io.decode_png(path.read_bytes()).numpy()
        path.write_bytes(tf.io.encode_png(255 - image).numpy())
    again = trained_map(folders).features
    for a, b in zip(features.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "dataset, folder",
    [
        ("tiny", "public"),
        ("Tiny:1.0.0", "public"),
        ("TINY/config", "public"),
        ("tiny_public", "images/"),
        ("tiny_public", "public/../images"),
        ("tiny_public", "link"),
    ],
)
def test_the_private_dataset_is_refused_as_public(folders, dataset, folder):
    # By its name in any tfds spelling, or by its folder under another name
    # (a path through "..", a symbolic link).
    os.symlink(folders / "images", folders / "link")
    pretraining = public.PublicPretraining(
        dataset=dataset, image_folder=folder, epochs=1
    )
    with pytest.raises(ValueError, match="private dataset"):
        private_inputs(folders, pretraining)


def test_the_private_manual_dir_is_not_passed_on(folders, monkeypatch):
    # tfds would prepare the public dataset from the private run's archives
    # in manual_dir: the public loader never sees it.
    seen = []
    load = kd.data.sources.load_with_source

    def spy(name, split, **kwargs):
        seen.append((name, kwargs.get("manual_dir")))
        return load(name, split, **kwargs)

    monkeypatch.setattr(kd.data.sources, "load_with_source", spy)
    keras.utils.set_random_seed(0)
    experiment.build_data(
        experiment.Plan(batch_size=8, epochs=1),
        str(folders),
        dataset="tiny",
        image_folder="images",
        manual_dir="private_archives",
        features=public.PublicPretraining(epochs=1, **PUBLIC),
    )
    assert ("tiny_public", None) in seen
    assert all(m is None for name, m in seen if name == "tiny_public")


def test_missing_public_data_is_named_as_such(folders):
    pretraining = public.PublicPretraining(
        dataset="tiny_public", image_folder="absent.tar.gz"
    )
    with pytest.raises(kd.data.DataNotFoundError, match="public data"):
        private_inputs(folders, pretraining)


def test_public_images_take_the_private_shape_and_normalization(folders):
    where = dict(
        data_dir=str(folders),
        image_folder=str(folders / "public"),
        manual_dir=None,
    )
    images, labels, source = public._public_arrays(
        "tiny_public", where, (8, 8, 1)
    )
    assert source == "image_folder"
    assert images.shape == (24, 8, 8, 1) and images.dtype == np.float32
    assert sorted(set(labels)) == [0, 1, 2]
    assert images.min() >= -1 and images.max() <= 1
    # uint8 grey images at 8x8, then the private images' normalization.
    rgb = kd.data.load("tiny_public", "train", **where)
    first = tf.cast(next(iter(rgb))[0], tf.float32)
    grey = tf.image.resize(
        tf.image.rgb_to_grayscale(first), (8, 8), antialias=True
    )
    grey = tf.cast(tf.clip_by_value(tf.round(grey), 0, 255), tf.uint8)
    np.testing.assert_allclose(images[0], kd.data.normalize(grey), atol=1e-6)


def test_the_launcher_trains_on_public_features_and_records_them(
    folders, monkeypatch
):
    tmp_path = folders.parent
    importable_factories(tmp_path, monkeypatch)
    result = tiny_run(
        tmp_path,
        monkeypatch,
        str(tmp_path / "run"),
        "build_data.features = @keras_dpscale.experiment.PublicPretraining()",
        'keras_dpscale.experiment.PublicPretraining.dataset = "tiny_public"',
        'keras_dpscale.experiment.PublicPretraining.image_folder = "public"',
        "keras_dpscale.experiment.PublicPretraining.epochs = 1",
        "keras_dpscale.experiment.PublicPretraining.batch_size = 8",
        'build_model.model = "linear_on_features"',
        "build_model.model_kwargs = "
        "{'num_classes': 2, 'input_shape': (2, 2, 64), 'groups': 16}",
    )
    assert result["steps"] == 8 and 0 <= result["test_accuracy"] <= 1
    name = (
        "cnn_trained_on_public_tiny_public_from_image_folder_1_epochs "
        "(65,568 weights)"
    )
    assert result["features"] == name
    claim = f"features computed by a fixed map, {name}, of each image alone"
    assert claim in result["privacy_statement"]
    assert "the user's claim" in result["privacy_statement"].split(claim)[1]
    saved = str(tmp_path / "run" / "saved_model")
    with open(os.path.join(saved, "assets", "privacy.json")) as f:
        record = json.load(f)
    assert record["features"] == name and claim in record["statement"]
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3))
    loaded = tf.saved_model.load(saved)  # takes the images, not features
    served = loaded.serve(kd.data.normalize(tf.constant(images, tf.uint8)))
    assert served.shape == (3, 2)
