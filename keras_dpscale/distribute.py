"""The `tf.distribute` strategy of a run, by name: one function for launchers."""

import contextlib
import logging

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


class StrategyUnavailableError(RuntimeError):
    """The strategy asked for needs hardware that this host does not have."""


def make_strategy(name="default", tpu=None):
    """Creates (and for TPUs, connects and initializes) a strategy.

    Args:
        name: "default" (one device), "mirrored" (all local GPUs, or CPU),
            "multi_worker" (`MultiWorkerMirroredStrategy`; the cluster comes
            from `TF_CONFIG`) or "tpu".
        tpu: the TPU's name or address for `TPUClusterResolver` ("" or
            "local" on a TPU VM).

    Returns:
        A `tf.distribute.Strategy`. Build the model and the optimizer in
        its `scope()`.

    Raises:
        StrategyUnavailableError: "tpu", and no TPU could be found,
            reached or initialized (the message says which and why).
        ValueError: an unknown name.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return _tpu_strategy(tpu)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")


def _tpu_strategy(tpu):
    where = f"--tpu={tpu!r}" if tpu else "no --tpu given"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu or ""
        )
        tf.config.experimental_connect_to_cluster(resolver)
        with _quiet_info("tensorflow"):  # "Initializing the TPU system..."
            tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    except Exception as e:  # noqa: BLE001 -- each failure means "no TPU"
        # The first sentence of the cause (TF's can run to many lines).
        cause = " ".join(str(e).split()).split(". ")[0][:200].rstrip(".")
        cause = cause or type(e).__name__
        raise StrategyUnavailableError(
            f"no TPU found ({where}): {type(e).__name__}: {cause}. On a "
            "Cloud TPU VM pass --tpu=local, else the TPU's name or "
            "grpc:// address; without a TPU use --strategy default or "
            "mirrored (tools/train.py)."
        ) from e
    if not tf.config.list_logical_devices("TPU"):
        raise StrategyUnavailableError(
            f"no TPU found ({where}): the TPU system initialized with no TPU "
            "device."
        )
    return strategy


@contextlib.contextmanager
def _quiet_info(name):
    """Drops the INFO records of logger `name` (WARNING and up still show)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)
