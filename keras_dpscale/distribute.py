"""The `tf.distribute` strategy of a run, by name: one function for launchers."""

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


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
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu or ""
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")
