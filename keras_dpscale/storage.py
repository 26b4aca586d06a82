"""The files of a run: through `tf.io.gfile`, written by the chief only.

Every file under a run's `model_dir` (checkpoints, the configs,
`result.json`, TensorBoard logs, the SavedModel) is read and written
through `tf.io.gfile`, so that `model_dir` may be a local folder, a
`gs://bucket/run` on Cloud TPU or any other TensorFlow filesystem
(`ram://` in the tests). Python's `open` and `os` would take `gs://b/run`
for a local folder named `gs:`.

Atomic writes. `write_bytes` writes a temporary sibling (`.<name>.tmp-<hex>`,
see `is_temporary`) and renames it over the target, as TensorFlow's own
checkpoints do. On a local disk the rename is atomic (POSIX) and the data
and the directory are fsynced; on an object store (GCS) an object appears
only once it is complete, and the rename is a copy then a delete, so a
reader never sees a torn file either.

Several workers. Under `MultiWorkerMirroredStrategy` every worker runs the
same code, and saving may need all of them (as `tf.saved_model.save`
does), but only the chief writes under `model_dir`. As in TensorFlow's
multi-worker guide, `writer_dir(path)` is `path` on the chief and a fresh
local temporary directory on any other worker, deleted when the write is
done. `is_chief` reads the task from the strategy's cluster resolver, or
from `TF_CONFIG`; a single process is the chief. Reads (resuming from a
checkpoint) come from `model_dir` on every worker.
"""

import contextlib
import os
import re
import shutil
import tempfile
import uuid

import tensorflow as tf

_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]+$")


def join(path, *names):
    """`path/name/...`, for a local path or a URL such as `gs://b/run`."""
    return os.path.join(os.fspath(path), *names)


def is_remote(path):
    """Whether `path` is a URL (`gs://`, `ram://`, ...), not a local path."""
    return "://" in os.fspath(path)


def is_temporary(name):
    """Whether a file name is a temporary that `write_bytes` left behind."""
    return bool(_TEMPORARY.match(name))


def exists(path):
    """Whether the file or directory `path` exists."""
    return tf.io.gfile.exists(os.fspath(path))


def makedirs(path):
    """Creates the directory `path` and its parents (no error if it exists)."""
    tf.io.gfile.makedirs(os.fspath(path))


def listdir(path):
    """The names in directory `path` (empty if it does not exist)."""
    path = os.fspath(path)
    if not tf.io.gfile.isdir(path):
        return []
    return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]


def remove(path):
    """Deletes the file `path`."""
    tf.io.gfile.remove(os.fspath(path))


def read_bytes(path):
    """The content of the file `path`."""
    with tf.io.gfile.GFile(os.fspath(path), "rb") as f:
        return f.read()


def read_text(path):
    """The content of the file `path`, decoded as UTF-8."""
    return read_bytes(path).decode("utf-8")


def _fsync(path):
    """Flushes a local file or directory to disk; a no-op for URLs."""
    if is_remote(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data):
    """Writes `data` to the file `path` atomically (see the module docstring).

    Args:
        path: the file; its directory must exist.
        data: `bytes`.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    temp = join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with tf.io.gfile.GFile(temp, "wb") as f:
            f.write(data)
        _fsync(temp)
        tf.io.gfile.rename(temp, path, overwrite=True)
    except BaseException:
        with contextlib.suppress(Exception):
            if tf.io.gfile.exists(temp):
                tf.io.gfile.remove(temp)
        raise
    _fsync(directory or ".")


def write_text(path, text):
    """Writes `text` (UTF-8) to the file `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _resolver(strategy):
    """The cluster resolver of `strategy` (or of `TF_CONFIG`)."""
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return resolver


def is_chief(strategy=None):
    """Whether this process writes the run's files.

    The chief is the task of type "chief", else worker 0, else a process
    outside any cluster (no task type), as in `tf.distribute`.

    Args:
        strategy: a `tf.distribute.Strategy`; default: the current one. Its
            `cluster_resolver` gives the task; without one, `TF_CONFIG`.

    Returns:
        True on the chief (and in a single process).
    """
    resolver = _resolver(strategy)
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    if task_type != "worker" or (task_id or 0) != 0:
        return False
    if isinstance(resolver, tf.distribute.cluster_resolver.TPUClusterResolver):
        return True  # one client drives the TPU workers
    return "chief" not in resolver.cluster_spec().as_dict()


@contextlib.contextmanager
def writer_dir(path, strategy=None):
    """Where this worker writes what belongs at `path`.

    Every worker may run the same saving code (`tf.saved_model.save` needs
    all of them under a multi-worker strategy); only the chief's files land
    in `path`.

    Args:
        path: the directory the chief writes.
        strategy: see `is_chief`.

    Yields:
        `path` on the chief; on any other worker, a new local temporary
        directory, deleted with its content at the end of the `with`.
    """
    if is_chief(strategy):
        yield os.fspath(path)
        return
    resolver = _resolver(strategy)
    temp = tempfile.mkdtemp(
        prefix=f"keras_dpscale-{resolver.task_type}-{resolver.task_id}-"
    )
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def check_writable(model_dir, strategy=None):
    """Fails now, not after training, if the chief cannot write `model_dir`.

    On the chief, creates `model_dir` and writes and deletes a probe file in
    it; on another worker, only checks that `model_dir` can be read.

    Args:
        model_dir: a local path or a URL (`gs://bucket/run`).
        strategy: see `is_chief`.

    Raises:
        OSError: naming `model_dir`, if it cannot be created, written or
            reached (a read-only or forbidden path, a bucket without
            access or credentials).
    """
    model_dir = os.fspath(model_dir)
    try:
        if not is_chief(strategy):
            exists(model_dir)
            return
        makedirs(model_dir)
        probe = join(model_dir, f".write-probe-{uuid.uuid4().hex}")
        with tf.io.gfile.GFile(probe, "wb") as f:
            f.write(b"keras_dpscale")
        remove(probe)
    except (OSError, tf.errors.OpError) as e:
        message = getattr(e, "message", None) or str(e)
        raise OSError(
            f"model_dir {model_dir!r} is not writable: {type(e).__name__}: "
            f"{message}. Give a model_dir that this process can create and "
            "write (for gs://, a bucket that the job's credentials can "
            "write)."
        ) from e
