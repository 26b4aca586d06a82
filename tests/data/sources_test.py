"""Data sources: IDX files, ImageFolder trees and tarballs, tfds, the error."""

import gzip
import io
import os
import struct
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import data
from keras_dpscale.data import sources


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=(5,))
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    x, y = sources.fashion_mnist_idx("train", str(tmp_path))
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.skipif(
    not os.path.isdir(sources.DEBIAN_FASHION_MNIST),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist():
    x, y = sources.fashion_mnist_idx("test")
    assert x.shape == (10_000, 28, 28, 1)
    assert np.bincount(y).tolist() == [1000] * 10


def make_image_folder(root):
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2)):
        for label, cls in enumerate(["cat", "dog"]):
            os.makedirs(root / split / cls)
            for i in range(n):
                image = np.full((6, 6, 3), 40 * label + i, np.uint8)
                png = tf.io.encode_png(
                    image + rng.integers(0, 2, (6, 6, 3), np.uint8)
                )
                (root / split / cls / f"{i}.png").write_bytes(png.numpy())


@pytest.mark.parametrize("as_tarball", [False, True])
def test_image_folder_directory_and_tarball(tmp_path, as_tarball):
    make_image_folder(tmp_path / "tree")
    path = tmp_path / "tree"
    if as_tarball:
        path = tmp_path / "tree.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(tmp_path / "tree", arcname="tree")
    x, y = data.load_arrays(
        "anything",
        "train",
        image_folder=str(path),
        cache_dir=str(tmp_path / "c"),
    )
    assert x.shape == (6, 6, 6, 3) and x.dtype == np.uint8
    ds = data.load(
        "anything",
        "test",
        image_folder=str(path),
        cache_dir=str(tmp_path / "c"),
    )
    assert ds.element_spec[0].shape == (6, 6, 3)  # static, for XLA
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    # Label 1 is "dog", whose images are 40 brighter.
    assert x[y == 1].mean() > x[y == 0].mean() + 30


def test_two_archives_of_one_name_are_never_read_as_one(tmp_path):
    # A private and a public archive named alike (and extracted into one
    # cache) each read as their own images, whichever came first.
    means = {}
    for which, shift in (("private", 0), ("public", 100)):
        make_image_folder(tmp_path / which / "tree")
        for png in (tmp_path / which / "tree").rglob("*.png"):
            image = tf.io.decode_png(png.read_bytes()).numpy()
            png.write_bytes(tf.io.encode_png(image // 2 + shift).numpy())
        with tarfile.open(tmp_path / which / "data.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / which / "tree", arcname="tree")
        x, _ = data.load_arrays(
            "anything",
            "train",
            image_folder=str(tmp_path / which / "data.tar.gz"),
            cache_dir=str(tmp_path / "c"),
        )
        means[which] = x.mean()
    assert means["public"] > means["private"] + 90
    assert len(os.listdir(tmp_path / "c")) == 2


def test_prepared_tfds_data_comes_before_the_image_folder(
    tmp_path, monkeypatch
):
    # The real dataset (prepared by tfds) wins over the lossy JPEG copy.
    make_image_folder(tmp_path / "tree")
    real = tf.data.Dataset.from_tensor_slices(
        (np.zeros([2, 6, 6, 3], np.uint8), np.zeros([2], np.int64))
    )
    monkeypatch.setattr(sources, "_from_tfds", lambda *args: real)
    got = data.load("cifar10", "train", image_folder=str(tmp_path / "tree"))
    assert got is real


def test_a_source_can_be_forced(tmp_path, monkeypatch):
    # The evaluation split is read from the training split's source: a
    # forced source is the only one tried.
    make_image_folder(tmp_path / "tree")
    monkeypatch.setattr(
        sources, "_from_tfds", lambda *args: pytest.fail("tfds was tried")
    )
    ds, source = sources.load_with_source(
        "cifar10",
        "train",
        image_folder=str(tmp_path / "tree"),
        cache_dir=str(tmp_path / "c"),
        source="image_folder",
    )
    assert source == "image_folder" and int(ds.cardinality()) == 6
    with pytest.raises(data.DataNotFoundError, match="No source 'image_"):
        sources.load_with_source("cifar10", source="image_folder")


def test_missing_data_lists_what_was_tried(tmp_path):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load(
            "cifar10",
            data_dir=str(tmp_path),
            image_folder=str(tmp_path / "nothing"),
        )
    message = str(error.value)
    for tried in ("ImageFolder", "tfds 'cifar10'", "Debian package"):
        assert tried in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_absent_tfds_dataset_is_skipped_without_tfds_warnings(tmp_path, caplog):
    # The main job's data_dir holds no prepared fashion_mnist: the tfds
    # source is passed over quietly (tfds itself would warn "Variant folder
    # ... has no dataset_info.json") and the error still says why.
    with (
        caplog.at_level("WARNING"),
        pytest.raises(FileNotFoundError, match="not prepared in"),
    ):
        sources._from_tfds("fashion_mnist", "train", str(tmp_path), None)
    assert not [r for r in caplog.records if "dataset_info" in r.getMessage()]


def test_tfds_manual_dir_archive_is_used_and_checksummed(tmp_path):
    # A CIFAR-10 archive under the official name, in manual_dir: tfds takes
    # it instead of downloading, and rejects it by its checksum (a real
    # archive would pass), so a corrupt manual file fails loudly.
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "cifar-10-binary.tar.gz", "w:gz") as tar:
        record = bytes(1 + 3072)
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = len(record)
        tar.addfile(info, io.BytesIO(record))
    with pytest.raises(data.DataNotFoundError) as error:
        data.load(
            "cifar10",
            data_dir=str(tmp_path / "tfds"),
            manual_dir=str(manual),
        )
    message = str(error.value)
    assert "NonMatchingChecksumError" in message
    assert str(manual / "cifar-10-binary.tar.gz") in message


SHARED_CIFAR = os.path.join(
    os.path.dirname(__file__),
    "..",
    "..",
    "..",
    "shared",
    "data",
    "cifar10-jpeg.tar.gz",
)


@pytest.mark.skipif(
    not os.path.exists(SHARED_CIFAR), reason="no ../shared/data"
)
def test_shared_cifar10_jpeg_tarball(tmp_path):
    train = data.load(
        "cifar10", "train", image_folder=SHARED_CIFAR, cache_dir=str(tmp_path)
    )
    test = data.load(
        "cifar10", "test", image_folder=SHARED_CIFAR, cache_dir=str(tmp_path)
    )
    assert int(train.cardinality()) == 50_000
    assert int(test.cardinality()) == 10_000
    assert train.element_spec[0].shape == (32, 32, 3)
    labels = [int(y) for _, y in test.take(2000)]
    assert set(labels) <= set(range(10))
