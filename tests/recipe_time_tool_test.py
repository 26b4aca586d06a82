"""tools/recipe_time.py: a recipe's images and wall time from a step time."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "recipe_time.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        check=True,
    )
    return out.stdout


def test_estimate_of_the_cifar10_recipe():
    out = run(
        "--config",
        os.path.join(ROOT, "configs", "cifar10_wrn_16_4_eps8.gin"),
        "--seconds_per_step=0.5",
        "--measured_batch=512",
        "--measured_augmult=4",
    )
    # 206 epochs of round(50000 / 4096) = 12 steps, 4096 x 16 views each.
    images = 2472 * 4096 * 16
    assert f"{images:,} images" in out
    assert "2472 steps of B=4096 x 16 views (N=50000, cifar10)" in out
    seconds = images / (512 * 4) * 0.5
    want = f"estimate: {seconds / 3600:.2f} h ({seconds:,.0f} s)"
    assert want in out, out


def test_a_validation_split_and_bindings_change_the_recipe():
    out = run(
        "--config",
        os.path.join(ROOT, "configs", "fashion_mnist_tanh_cnn.gin"),
        "--gin_bindings=build_data.validation_size = 10000",
        "--gin_bindings=train_and_evaluate.epochs = 2",
    )
    # round(50000 / 1024) = 49 steps per epoch, no augmult.
    assert re.search(r"98 steps of B=1024 x 1 views \(N=50000", out), out
