"""keras_dpscale.load_model in a fresh process (the package loads lazily)."""

import subprocess
import sys

import keras
import numpy as np

import keras_dpscale as kd
from tests.conftest import LOSS


def test_a_fresh_process_loads_a_saved_dp_model(tmp_path):
    model = kd.DPSequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=LOSS
    )
    path = str(tmp_path / "model.keras")
    model.save(path)
    code = (
        "import sys, keras_dpscale as kd; "
        f"m = kd.load_model({path!r}); "
        "print(type(m).__name__, type(m.optimizer).__name__, "
        "m.optimizer.l2_norm_clip)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["DPSequential", "DPSGD", "1.0"]
    loaded = kd.load_model(path)
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_step_settings_are_saved_with_the_model(tmp_path):
    model = kd.DPSequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
        loss=LOSS,
        clipping="vectorized",
        microbatch_size=2,
    )
    path = str(tmp_path / "model.keras")
    model.save(path)
    engine = kd.load_model(path)._dp_engine
    assert (engine.clipping, engine.microbatch_size) == ("vectorized", 2)
