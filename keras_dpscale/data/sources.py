"""Where training data comes from: tfds, and offline sources.

`load(name, split)` returns a `tf.data.Dataset` of `(image uint8 [H, W, C],
label int64)` pairs, in a fixed order. It tries, in order:

1. tfds with `data_dir`: a prepared dataset (the real one), or one that tfds
   can prepare from the archives in `manual_dir` (for cifar10,
   `cifar-10-binary.tar.gz`) without a download;
2. `image_folder=`: an ImageFolder directory (`<split>/<class>/<file>`; the
   sorted class names are the labels) or a `.tar.gz` of one, such as
   `../shared/data/cifar10-jpeg.tar.gz` (a lossy JPEG copy of CIFAR-10),
   read with tfds' `ImageFolder`;
3. for fashion_mnist, Debian's package `dataset-fashion-mnist` (IDX files in
   /usr/share/datasets/fashion-mnist).

If none works, one `DataNotFoundError` lists what was tried and why it failed.
Nothing is ever downloaded.
"""

import gzip
import hashlib
import os
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "keras_dpscale")


class DataNotFoundError(FileNotFoundError):
    """No source of the dataset could be read."""


def read_idx(path):
    """Reads an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


def fashion_mnist_idx(split, directory=DEBIAN_FASHION_MNIST):
    """Fashion-MNIST from IDX files: `(images [n, 28, 28, 1], labels [n])`."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
    return images[..., None], labels.astype(np.int64)


def image_folder_root(path, cache_dir=CACHE):
    """The ImageFolder root for a directory or a `.tar.gz` (extracted once).

    An archive is extracted to a folder of the cache named after the
    archive's name, path, size and modification time: two archives never
    share one (a private and a public archive of the same name would
    otherwise read as one, whichever was extracted first)."""
    if os.path.isdir(path):
        return path
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is neither a directory nor a tar archive.")
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = hashlib.sha256(
        f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    name = f"{os.path.basename(path).split('.')[0]}-{key}"
    root = os.path.join(cache_dir, name)
    if not os.path.exists(os.path.join(root, ".complete")):
        os.makedirs(root, exist_ok=True)
        with tarfile.open(path) as tar:
            tar.extractall(root, filter="data")
        open(os.path.join(root, ".complete"), "w").close()
    entries = [e for e in os.listdir(root) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(root, entries[0])):
        inner = os.path.join(root, entries[0])  # archive with a top folder
        if not os.path.isdir(os.path.join(root, "train")):
            return inner
    return root


def _from_image_folder(path, split, cache_dir):
    builder = tfds.folder_dataset.ImageFolder(
        image_folder_root(path, cache_dir)
    )
    ds = builder.as_dataset(
        split=split, shuffle_files=False, as_supervised=True
    )
    # The images of a dataset share one shape: make it static, as XLA needs.
    shape = next(iter(ds))[0].shape
    return ds.map(lambda x, y: (tf.ensure_shape(x, shape), y))


def _tfds_data_dir(data_dir):
    """The directory tfds reads prepared datasets from."""
    return os.path.expanduser(
        data_dir
        or os.environ.get("TFDS_DATA_DIR")
        or os.path.join("~", "tensorflow_datasets")
    )


def _has_manual_archives(manual_dir):
    return bool(
        manual_dir and os.path.isdir(manual_dir) and os.listdir(manual_dir)
    )


def _from_tfds(name, split, data_dir, manual_dir):
    where = _tfds_data_dir(data_dir)
    if (
        "://" not in where
        and not os.path.isdir(os.path.join(where, name.split(":")[0]))
        and not _has_manual_archives(manual_dir)
    ):
        # Neither prepared here nor preparable: say so without asking tfds,
        # which would log a warning for each missing version folder (e.g.
        # "Variant folder .../fashion_mnist/3.0.1 has no dataset_info.json")
        # before the next source is tried.
        raise FileNotFoundError(
            f"not prepared in {where}, and no manual_dir with its archives"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not _has_manual_archives(manual_dir):
            raise FileNotFoundError(
                f"not prepared in {builder.data_dir}, and no manual_dir with "
                "its archives"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir,
                download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS,
            )
        )
    return builder.as_dataset(
        split=split, shuffle_files=False, as_supervised=True
    )


def _from_debian(name, split):
    if name != "fashion_mnist":
        raise FileNotFoundError("only fashion_mnist has a Debian package")
    images, labels = fashion_mnist_idx(split)
    return tf.data.Dataset.from_tensor_slices((images, labels))


def load(name, split="train", **kwargs):
    """`load_with_source(...)`'s dataset alone (see there)."""
    return load_with_source(name, split, **kwargs)[0]


def load_with_source(
    name,
    split="train",
    data_dir=None,
    manual_dir=None,
    image_folder=None,
    cache_dir=CACHE,
    source=None,
):
    """The `(image, label)` examples of a dataset split, from the first source
    that works (see the module docstring).

    Args:
        name: a tfds name: "cifar10", "cifar100", "mnist", "fashion_mnist",
            "imagenet2012", ...
        split: "train" or "test" (tfds split names).
        data_dir: tfds data directory (local or gs://).
        manual_dir: directory holding the dataset's archives for tfds.
        image_folder: an ImageFolder directory or `.tar.gz`.
        cache_dir: where tarballs are extracted.
        source: try this source only ("tfds", "image_folder" or
            "debian"): e.g. the one the training split came from, so that
            a run's splits never come from two sources.

    Returns:
        `(dataset, source)`: an unbatched `tf.data.Dataset` of `(uint8
        image, int64 label)` and the name of the source it came from.

    Raises:
        DataNotFoundError: no source worked; the message lists them.
    """
    attempts = []
    sources = [
        (
            "tfds",
            f"tfds '{name}' (data_dir={data_dir}, manual_dir={manual_dir})",
            lambda: _from_tfds(name, split, data_dir, manual_dir),
        )
    ]
    if image_folder:
        sources.append(
            (
                "image_folder",
                f"ImageFolder {image_folder}",
                lambda: _from_image_folder(image_folder, split, cache_dir),
            )
        )
    sources.append(
        (
            "debian",
            f"Debian package files in {DEBIAN_FASHION_MNIST}",
            lambda: _from_debian(name, split),
        )
    )
    if source is not None:
        sources = [s for s in sources if s[0] == source]
        if not sources:
            raise DataNotFoundError(
                f"No source {source!r} for '{name}' split '{split}' (is "
                "image_folder given?)."
            )
    for kind, description, read in sources:
        try:
            return read(), kind
        except Exception as e:  # noqa: BLE001 -- reported below
            attempts.append(f"- {description}: {type(e).__name__}: {e}")
    raise DataNotFoundError(
        f"No source of '{name}' split '{split}' could be read (nothing is "
        "downloaded). Tried:\n" + "\n".join(attempts) + "\nProvide one of: "
        "image_folder=<ImageFolder dir or .tar.gz>; a prepared tfds data_dir; "
        "manual_dir=<dir with the archives tfds expects>; for fashion_mnist, "
        "`apt-get install dataset-fashion-mnist`."
    )


def to_arrays(examples):
    """A dataset of `(image, label)` as numpy `(images, labels)` in memory."""
    images, labels = [], []
    for image, label in examples.batch(4096):
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.concatenate(images), np.concatenate(labels)


def load_arrays(name, split="train", **kwargs):
    """`load` as numpy arrays `(images [n, H, W, C] uint8, labels [n])`."""
    return to_arrays(load(name, split, **kwargs))
