"""The launcher and `experiment.train_and_evaluate`, end to end, tiny."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, n_train=32, n_test=10):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(["dark", "bright"]):
            os.makedirs(root / split / cls)
            for i in range(n // 2):
                image = rng.integers(0, 100, (8, 8, 3)) + 120 * label
                png = tf.io.encode_png(image.astype(np.uint8))
                (root / split / cls / f"{i}.png").write_bytes(png.numpy())


def test_train_py_runs_a_config_end_to_end(tmp_path):
    make_image_folder(tmp_path / "images")
    model_dir = tmp_path / "run"
    bindings = [
        'train_and_evaluate.dataset = "tiny"',
        "train_and_evaluate.data_kwargs = "
        f"{{'image_folder': '{tmp_path / 'images'}', "
        f"'cache_dir': '{tmp_path / 'cache'}'}}",
        'train_and_evaluate.model = "wrn_10_1"',
        "train_and_evaluate.model_kwargs = "
        "{'input_shape': (8, 8, 3), 'groups': 4, 'num_classes': 2}",
        "train_and_evaluate.batch_size = 8",
        "train_and_evaluate.epochs = 2",
        "train_and_evaluate.eval_batch_size = 10",
        "train_and_evaluate.ema_momentum = 0.9",
    ]
    command = [
        sys.executable,
        os.path.join(ROOT, "tools", "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "smoke.gin"),
        "--model_dir",
        str(model_dir),
    ] + [f"--gin_bindings={b}" for b in bindings]
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy ") and "epsilon" in last
    result = json.loads((model_dir / "result.json").read_text())
    # 32 examples, B = 8: 4 steps per epoch, 2 epochs.
    assert result["steps"] == 8
    assert 0 < result["epsilon"] <= 3.0 + 1e-9  # smoke.gin's target
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["sampling"] == "poisson"
    operative = (model_dir / "operative_config.gin").read_text()
    assert "train_and_evaluate.batch_size = 8" in operative
    assert os.listdir(model_dir / "logs")  # TensorBoard
    assert (model_dir / "saved_model" / "saved_model.pb").exists()
    record = json.loads(
        (model_dir / "saved_model" / "assets" / "privacy.json").read_text()
    )
    assert record["epsilon"] == result["epsilon"]
    # The same command again resumes from the last checkpoint (epoch 2 of
    # 2): no new step, the same guarantee.
    again = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((model_dir / "result.json").read_text())
    assert resumed["steps"] == 8
    assert resumed["epsilon"] == result["epsilon"]


def test_every_config_parses():
    import gin

    from keras_dpscale import experiment  # noqa: F401  (registers)

    configs = os.path.join(ROOT, "configs")
    names = [n for n in os.listdir(configs) if not n.startswith("audit_")]
    assert {
        "fashion_mnist.gin",
        "smoke.gin",
        "cifar10_wrn_16_4_eps1.gin",
        "cifar10_wrn_16_4_eps2.gin",
        "cifar10_wrn_16_4_eps4.gin",
        "cifar10_wrn_16_4_eps8.gin",
        "cifar10_wrn_40_4_eps8.gin",
        "imagenet_nf_resnet50_eps8.gin",
        "imagenet_nfnet_f3.gin",
    } <= set(names)
    for name in names:
        gin.clear_config()
        gin.parse_config_file(os.path.join(configs, name))
        text = open(os.path.join(configs, name)).read()
        # big_vision-style header: the command, the hardware, the result.
        assert "python tools/train" in text and "Hardware:" in text
        assert "Expected" in text
    gin.clear_config()
