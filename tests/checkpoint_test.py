"""Checkpoints: atomic under SIGKILL, complete, and resumed exactly."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import checkpoint
from keras_dpscale import storage

N = 64
REPO = pathlib.Path(__file__).resolve().parent.parent


def dense_model(seed=0, accumulation_steps=2):
    keras.utils.set_random_seed(seed)
    model = kd.DPSequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1,
            momentum=0.9,
            use_ema=True,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            accumulation_steps=accumulation_steps,
            num_examples=N,
            target_delta=1e-3,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def all_values(model):
    variables = model.variables + model.optimizer.variables
    return [v.numpy().copy() for v in variables]


def test_restore_skips_partial_and_corrupt_files(tmp_path):
    model = dense_model()
    opt = model.optimizer
    opt.build(model.trainable_variables)
    assert checkpoint.restore(model, tmp_path) is None  # a fresh start
    opt.iterations.assign(3)
    good = checkpoint.save(model, tmp_path, epoch=1, batch=2)
    expected = all_values(model)
    # A newer checkpoint, then damage: a torn final file (as a filesystem
    # without atomic renames could leave), a half-written temporary, and a
    # pointer to the torn file.
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    opt.iterations.assign(7)
    torn = pathlib.Path(checkpoint.save(model, tmp_path, epoch=1, batch=10))
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    temp = tmp_path / ".ckpt-0000000009.npz.tmp-0a1b"
    temp.write_bytes(pathlib.Path(good).read_bytes()[:100])
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 7
    assert checkpoint.latest(tmp_path) == good

    fresh = dense_model(seed=1)
    state = checkpoint.restore(fresh, tmp_path)
    assert (state.step, state.epoch, state.batch, state.path) == (
        3,
        1,
        2,
        good,
    )
    for want, got in zip(expected, all_values(fresh)):
        np.testing.assert_array_equal(want, got)
    # A new writer removes the temporary left by a killed one.
    callback = checkpoint.Checkpoint(tmp_path)
    callback.set_model(fresh)
    callback.on_train_begin()
    assert not temp.exists()
    # Never in the middle of a logical batch.
    fresh.optimizer._micro_step.assign(1)
    with pytest.raises(ValueError, match="between logical steps"):
        checkpoint.save(fresh, tmp_path, epoch=0)


class Snapshot(keras.callbacks.Callback):
    """Every variable's value at each epoch end (after the checkpoint)."""

    def __init__(self):
        super().__init__()
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(all_values(self.model))


def test_round_trip_restores_every_variable(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = dense_model()
    snapshot = Snapshot()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            checkpoint.Checkpoint(tmp_path, every_n_steps=1, keep=2),
            snapshot,
        ],
    )
    opt = model.optimizer
    # 2 epochs of round(N / B) = 8 Poisson steps of 2 physical batches each.
    assert int(opt.iterations) == 16
    assert len(checkpoint.checkpoints(tmp_path)) == 2  # keep=2

    fresh = dense_model(seed=1)
    fresh.optimizer.build(fresh.trainable_variables)
    before = all_values(fresh)
    state = checkpoint.restore(fresh, tmp_path)
    assert (state.step, state.epoch, state.batch) == (16, 2, 0)
    restored = all_values(fresh)
    assert len(restored) == len(snapshot.values[-1])
    changed = 0
    for want, got, old in zip(snapshot.values[-1], restored, before):
        np.testing.assert_array_equal(want, got)
        changed += not np.array_equal(got, old)
    # Weights, seed state, iterations, momenta, EMA, ledger, micro-step:
    # all differ from a fresh model's (the empty accumulators do not, nor
    # lr, sigma, the ledger's count of non-DP steps and its sampling now).
    assert changed >= len(restored) - 4 - 2 - 2
    new = fresh.optimizer
    assert int(new.iterations) == 16 and int(new._micro_step) == 32
    assert fresh.privacy_ledger() == model.privacy_ledger()
    assert fresh.epsilon() == model.epsilon()
    ema = new._model_variables_moving_average[0].numpy()
    assert not np.array_equal(ema, fresh.trainable_variables[0].numpy())
    for s in new._grad_sums:
        assert not np.any(s.numpy())
    with pytest.raises(ValueError, match="initial_epoch=2"):
        fresh.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            verbose=0,
            callbacks=[checkpoint.Checkpoint(tmp_path)],
        )


# Trains on Poisson batches for 3 epochs of 4 logical steps (2 physical
# batches each), checkpointing every step; resumes from argv[1] if it holds
# a checkpoint; SIGKILLs itself after physical batch argv[2] (0: never);
# writes the outcome to argv[3]. argv[4]: "public" (a sample from a public
# seed, for an exact comparison of weights) or "secret" (the default
# pipeline: a resumed run draws a fresh sample of the steps left).
CHILD = """
import dataclasses, json, os, signal, sys
import keras, numpy as np
import keras_dpscale as kd
from keras_dpscale import checkpoint, data

directory, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mode = sys.argv[4]
N, B, K, STEPS, EPOCHS = 64, 16, 2, 4, 3
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(N, 4, 4, 1), dtype=np.uint8)
labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int64)
model = kd.DPSequential([
    keras.Input((4, 4, 1)),
    keras.layers.Flatten(),
    keras.layers.Dense(8, activation="tanh"),
    keras.layers.Dropout(0.3),
    keras.layers.Dense(2),
])
model.compile(
    optimizer=kd.DPSGD(
        learning_rate=0.5, momentum=0.9, use_ema=True, l2_norm_clip=1.0,
        noise_multiplier=1.0, accumulation_steps=K, batch_size=B,
        sampling="poisson", num_examples=N, target_delta=1e-3,
        noise_seed=7),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
state = checkpoint.restore(model, directory)
epoch = state.epoch if state else 0
opt = model.optimizer


class Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(opt._micro_step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


if mode == "public":  # the same stream, from this epoch's start
    stream = data.poisson_dataset(
        images, labels, B, steps=STEPS * EPOCHS, accumulation_steps=K,
        public_sampling_seed=1)
    stream = kd.sampling.attach(stream.skip(epoch * STEPS * K),
                                kd.sampling.of(stream))
else:  # a fresh secret sample of the steps left from this epoch's start
    stream = data.poisson_dataset(
        images, labels, B, steps=(EPOCHS - epoch) * STEPS,
        accumulation_steps=K)
model.fit(
    stream,
    epochs=EPOCHS,
    initial_epoch=epoch,
    steps_per_epoch=STEPS * K,
    verbose=0,
    callbacks=[checkpoint.Checkpoint(directory, every_n_steps=1), Kill()],
)
with open(out, "w") as f:
    json.dump({
        "resumed_from": None if state is None else state.step,
        "iterations": int(opt.iterations),
        "ledger": [dataclasses.asdict(s) for s in model.privacy_ledger()],
        "epsilon": model.epsilon(),
        "weights": [v.numpy().tolist() for v in model.variables],
    }, f)
"""


def start_child(directory, kill_at, out, mode="public"):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(directory),
            str(kill_at),
            str(out),
            mode,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(child, returncode=0):
    output, _ = child.communicate(timeout=240)
    assert child.returncode == returncode, output[-3000:]


def test_killed_run_resumes_to_the_same_steps_and_epsilon(tmp_path):
    reference = start_child(tmp_path / "reference", 0, tmp_path / "ref.json")
    # Killed after physical batch 11 (of 24): in epoch 1, in the middle of
    # logical step 6, so the newest checkpoint is step 5 (epoch 1, batch 2).
    killed = start_child(tmp_path / "run", 11, tmp_path / "killed.json")
    finish(killed, -signal.SIGKILL)
    assert not (tmp_path / "killed.json").exists()
    assert os.path.basename(checkpoint.latest(tmp_path / "run")) == (
        "ckpt-0000000005.npz"
    )
    pointer = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert (pointer["step"], pointer["epoch"], pointer["batch"]) == (5, 1, 2)
    resumed = start_child(tmp_path / "run", 0, tmp_path / "resumed.json")
    finish(resumed)
    finish(reference)
    want = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert want["resumed_from"] is None and got["resumed_from"] == 5
    assert got["iterations"] == want["iterations"] == 12
    assert got["ledger"] == want["ledger"]
    assert got["ledger"][0]["steps"] == 12
    assert got["epsilon"] == pytest.approx(want["epsilon"], rel=0, abs=1e-9)
    # With a fixed noise seed, the same data, dropout and noise: the resumed
    # run ends where the uninterrupted one does.
    for w, g in zip(want["weights"], got["weights"]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_killed_run_with_a_secret_sample_resumes_without_replaying(tmp_path):
    killed = start_child(tmp_path / "run", 11, tmp_path / "k.json", "secret")
    finish(killed, -signal.SIGKILL)
    resumed = start_child(tmp_path / "run", 0, tmp_path / "r.json", "secret")
    finish(resumed)
    got = json.loads((tmp_path / "r.json").read_text())
    # Steps 1-5 before the kill, 6-12 after it from a fresh sample: each
    # counted once, as Poisson steps, whose epsilon is that of 12 steps.
    assert got["resumed_from"] == 5 and got["iterations"] == 12
    (segment,) = got["ledger"]
    assert (segment["sampling"], segment["steps"]) == ("poisson", 12)
    want = kd.accounting.compute_epsilon(1.0, 16, 64, 12, 1e-3)
    assert got["epsilon"] == pytest.approx(want)


def small_dp_model(**optimizer_kwargs):
    inputs = keras.Input((4,))
    model = kd.DPModel(inputs, keras.layers.Dense(3)(inputs))
    model.compile(
        kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, **optimizer_kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clipping="vectorized",
    )
    return model


def test_restore_refuses_another_batch_size(tmp_path):
    # The ledger would record a sampling rate that did not run.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 3, 64)
    model = small_dp_model()
    model.fit(
        kd.sampling.declare(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(
                16, drop_remainder=True
            ),
            "shuffle",
        ),
        verbose=0,
        callbacks=[checkpoint.Checkpoint(str(tmp_path))],
    )
    other = small_dp_model(batch_size=32)
    with pytest.raises(ValueError, match="trained with batch_size=16"):
        checkpoint.restore(other, str(tmp_path))
    same = small_dp_model(batch_size=16)
    assert checkpoint.restore(same, str(tmp_path)) is not None
    assert same.optimizer.batch_size == 16


def test_checkpoints_in_a_gs_like_directory(tmp_path, monkeypatch):
    # TensorFlow's in-memory filesystem stands in for gs://.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    directory = f"ram://checkpoint_test/{os.getpid()}-{id(tmp_path)}"
    model = dense_model()
    opt = model.optimizer
    opt.build(model.trainable_variables)
    assert checkpoint.restore(model, directory) is None
    opt.iterations.assign(3)
    good = checkpoint.save(model, directory, epoch=1, batch=2)
    assert good == f"{directory}/ckpt-0000000003.npz"
    expected = all_values(model)
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    opt.iterations.assign(7)
    torn = checkpoint.save(model, directory, epoch=1, batch=10)
    storage.write_bytes(torn, storage.read_bytes(torn)[:300])
    temp = f"{directory}/.ckpt-0000000009.npz.tmp-0a1b"
    storage.write_bytes(temp, b"partial")
    pointer = json.loads(storage.read_text(f"{directory}/checkpoint.json"))
    assert pointer["step"] == 7
    assert checkpoint.checkpoints(directory) == [torn, good]
    fresh = dense_model(seed=1)
    state = checkpoint.restore(fresh, directory)  # falls back to step 3
    assert (state.step, state.epoch, state.batch, state.path) == (
        3,
        1,
        2,
        good,
    )
    for want, got in zip(expected, all_values(fresh)):
        np.testing.assert_array_equal(want, got)
    callback = checkpoint.Checkpoint(directory)
    callback.set_model(fresh)
    callback.on_train_begin()
    assert not storage.exists(temp)
    assert os.listdir(tmp_path) == []  # no local folder named "ram:"


def test_a_worker_that_is_not_chief_writes_no_checkpoint(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    directory = f"ram://checkpoint_test/worker-{os.getpid()}"
    model = dense_model()
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(2)
    chiefs = checkpoint.save(model, directory, epoch=0, batch=4)
    temp = f"{directory}/.ckpt-0000000009.npz.tmp-0a1b"
    storage.write_bytes(temp, b"the chief's, being written")
    before = sorted(storage.listdir(directory))
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"worker": ["localhost:1", "localhost:2"]},
                "task": {"type": "worker", "index": 1},
            }
        ),
    )
    # Every worker resumes from the chief's checkpoints ...
    state = checkpoint.restore(dense_model(seed=1), directory)
    assert (state.step, state.path) == (2, chiefs)
    # ... but its own go to a temporary directory, deleted at once.
    model.optimizer.iterations.assign(5)
    path = checkpoint.save(model, directory, epoch=0, batch=10)
    assert path == f"{directory}/ckpt-0000000005.npz"
    callback = checkpoint.Checkpoint(directory)
    callback.set_model(model)
    callback.on_train_begin()  # leaves the chief's temporary alone
    assert sorted(storage.listdir(directory)) == before
