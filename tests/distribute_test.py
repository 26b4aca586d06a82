"""Strategies: `make_strategy`, and DP training over several workers."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_dpscale import distribute


@pytest.mark.parametrize("name", ["default", "mirrored"])
def test_make_strategy(name):
    strategy = distribute.make_strategy(name)
    assert isinstance(strategy, tf.distribute.Strategy)
    assert strategy.num_replicas_in_sync >= 1
    with pytest.raises(ValueError, match="strategy must be"):
        distribute.make_strategy("nope")


WORKER = """
import sys
import numpy as np
import tensorflow as tf

mode, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "one_process":  # 2 replicas in this process
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
else:  # one replica per process; the cluster is in TF_CONFIG
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras
import keras_dpscale as kd

rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = rng.integers(0, 3, 32)


def dataset_fn(ctx):  # replica r gets the r-th part of each batch of 16 // k
    per_replica = 16 // k // ctx.num_replicas_in_sync  # k physical batches
    local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    first = ctx.input_pipeline_id * local

    def part(xb, yb, r):
        rows = slice(r * per_replica, (r + 1) * per_replica)
        return (tf.ensure_shape(xb[rows], [per_replica, 6]),
                tf.ensure_shape(yb[rows], [per_replica]))

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16 // k).flat_map(
        lambda xb, yb: tf.data.Dataset.range(first, first + local).map(
            lambda r: part(xb, yb, r)))


with strategy.scope():
    keras.utils.set_random_seed(0)
    model = kd.DPSequential([keras.Input((6,)),
                             keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3)])
    model.compile(
        optimizer=kd.DPSGD(learning_rate=1.0, l2_norm_clip=0.05,
                           noise_multiplier=2.0, noise_seed=3, batch_size=16,
                           num_examples=32, target_delta=1e-5,
                           accumulation_steps=k),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
before = [v.numpy() for v in model.trainable_variables]
model.fit(strategy.distribute_datasets_from_function(dataset_fn),
          steps_per_epoch=2 * k, epochs=1, verbose=0)
np.savez(out, epsilon=model.epsilon(),
         steps=int(model.optimizer.iterations.numpy()),
         *[v.numpy() - b for v, b in zip(model.trainable_variables, before)])
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("k", [1, 2])
def test_multi_worker_training_equals_one_process(tmp_path, k):
    """2 workers equal one process with 2 replicas, with and without
    accumulating k physical batches per logical batch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                "worker",
                str(tmp_path / f"w{i}"),
                str(k),
            ],
            env={
                **env,
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": i}}
                ),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    one = subprocess.run(
        [
            sys.executable,
            "-c",
            WORKER,
            "one_process",
            str(tmp_path / "one"),
            str(k),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert one.returncode == 0, one.stderr[-3000:]
    for worker, error in zip(workers, errors):
        assert worker.returncode == 0, error[-3000:]
    want = np.load(tmp_path / "one.npz")
    assert int(want["steps"]) == 2
    for i in range(2):
        got = np.load(tmp_path / f"w{i}.npz")
        assert int(got["steps"]) == 2
        assert float(got["epsilon"]) == float(want["epsilon"]) > 0
        updates = [k for k in want.files if k.startswith("arr_")]
        assert len(updates) == 4
        for k in updates:  # noise included: same seed, same single draw
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
            assert np.abs(want[k]).max() > 1e-3


@pytest.mark.parametrize("tpu", [None, "local"])
def test_tpu_strategy_without_a_tpu_raises_a_clear_error(tpu):
    # No TPU here: no name to resolve (None), or none in the local cluster.
    with pytest.raises(distribute.StrategyUnavailableError) as error:
        distribute.make_strategy("tpu", tpu)
    message = str(error.value)
    assert message.startswith("no TPU found")
    assert "\n" not in message and len(message) < 500
    assert "--strategy default or mirrored" in message
