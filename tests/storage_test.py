"""Storage: files through tf.io.gfile, atomic writes, the chief writes."""

import json
import os
import uuid

import pytest
import tensorflow as tf

from keras_dpscale import storage


def ram_dir():
    """A fresh directory in TensorFlow's in-memory filesystem (as gs://)."""
    return f"ram://storage_test/{uuid.uuid4().hex}"


def worker_config(task_type="worker", index=1, chief=False):
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    if chief:
        cluster["chief"] = ["localhost:3"]
    return json.dumps(
        {"cluster": cluster, "task": {"type": task_type, "index": index}}
    )


class FakeStrategy:
    """A strategy whose only part used here is its cluster resolver."""

    def __init__(self, task_type, task_id, jobs):
        spec = tf.train.ClusterSpec(
            {job: [f"localhost:{i}"] for i, job in enumerate(jobs)}
        )
        self.cluster_resolver = (
            tf.distribute.cluster_resolver.SimpleClusterResolver(
                spec, task_type=task_type, task_id=task_id
            )
        )


@pytest.mark.parametrize("remote", [True, False])
def test_atomic_write_read_list_remove(tmp_path, monkeypatch, remote):
    monkeypatch.chdir(tmp_path)
    directory = ram_dir() if remote else str(tmp_path / "run")
    assert storage.listdir(directory) == []
    assert not storage.exists(directory)
    storage.makedirs(storage.join(directory, "sub"))
    path = storage.join(directory, "result.json")
    storage.write_text(path, "first")
    storage.write_text(path, "second é")  # replaces it
    storage.write_bytes(storage.join(directory, "b.bin"), b"\x00\x01")
    assert storage.read_text(path) == "second é"
    assert storage.read_bytes(storage.join(directory, "b.bin")) == b"\x00\x01"
    # No temporary is left; a subdirectory is listed without a slash.
    assert sorted(storage.listdir(directory)) == [
        "b.bin",
        "result.json",
        "sub",
    ]
    storage.remove(path)
    assert not storage.exists(path)
    assert storage.is_remote(directory) == remote
    if remote:
        assert os.listdir(tmp_path) == []  # no local folder named "ram:"


def test_temporary_names():
    assert storage.is_temporary(".ckpt-0000000009.npz.tmp-0a1b")
    assert storage.is_temporary(".checkpoint.json.tmp-" + uuid.uuid4().hex)
    assert not storage.is_temporary("ckpt-0000000009.npz")
    assert not storage.is_temporary(".checkpoint.json")


def test_the_chief_is_worker_0_or_the_chief_task(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert storage.is_chief()  # a single process
    monkeypatch.setenv("TF_CONFIG", worker_config(index=1))
    assert not storage.is_chief()
    monkeypatch.setenv("TF_CONFIG", worker_config(index=0))
    assert storage.is_chief()
    monkeypatch.setenv("TF_CONFIG", worker_config(index=0, chief=True))
    assert not storage.is_chief()
    monkeypatch.setenv("TF_CONFIG", worker_config("chief", 0, chief=True))
    assert storage.is_chief()
    monkeypatch.setenv("TF_CONFIG", worker_config("evaluator", 0))
    assert not storage.is_chief()
    # The strategy's own cluster resolver comes first.
    monkeypatch.delenv("TF_CONFIG")
    assert not storage.is_chief(FakeStrategy("worker", 1, ["worker"]))
    assert not storage.is_chief(FakeStrategy("worker", 0, ["chief", "worker"]))
    assert storage.is_chief(FakeStrategy("worker", 0, ["worker"]))
    assert storage.is_chief(FakeStrategy("chief", 0, ["chief", "worker"]))


def test_a_worker_that_is_not_chief_writes_to_a_temporary_dir(monkeypatch):
    model_dir = ram_dir()
    strategy = FakeStrategy("worker", 1, ["worker"])
    with storage.writer_dir(model_dir, strategy) as target:
        assert target != model_dir and os.path.isdir(target)
        storage.write_text(storage.join(target, "result.json"), "{}")
    assert not os.path.exists(target)  # deleted with its content
    assert not storage.exists(model_dir)
    storage.check_writable(model_dir, strategy)  # it only reads
    assert not storage.exists(model_dir)
    with storage.writer_dir(model_dir) as target:  # the chief
        assert target == model_dir


def test_check_writable(tmp_path):
    model_dir = ram_dir()
    storage.check_writable(model_dir)
    assert storage.exists(model_dir) and storage.listdir(model_dir) == []
    storage.check_writable(tmp_path / "run")  # a local path
    assert os.listdir(tmp_path / "run") == []
    (tmp_path / "file").write_text("")
    for bad in ("/proc/forbidden/run", str(tmp_path / "file" / "run")):
        with pytest.raises(OSError, match=f"model_dir '{bad}' is not writ"):
            storage.check_writable(bad)
