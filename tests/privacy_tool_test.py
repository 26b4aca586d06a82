"""tools/privacy.py: the numbers it prints are the library's."""

import os
import re
import subprocess
import sys

import pytest

from keras_dpscale import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "privacy.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        check=True,
    )
    return out.stdout


def test_epsilon_of_a_run_and_plot(tmp_path):
    png = tmp_path / "eps.png"
    out = run(
        "--batch_size=256",
        "--num_examples=60000",
        "--noise_multiplier=1,2",
        "--steps=200",
        "--delta=1e-5",
        f"--plot={png}",
        "--plot_points=6",
    )
    for sigma in (1.0, 2.0):
        for accountant in ("pld", "rdp"):
            want = accounting.compute_epsilon(
                sigma, 256, 60000, 200, 1e-5, accountant
            )
            line = f"{accountant.upper()}: noise_multiplier={sigma:g} epsilon={want:.4f}"
            assert line in out
    assert png.stat().st_size > 10_000


def test_sigma_for_a_target():
    out = run(
        "--batch_size=256",
        "--num_examples=60000",
        "--epochs=3",
        "--target_epsilon=2",
        "--delta=1e-5",
    )
    assert "steps=704" in out
    for accountant in ("PLD", "RDP"):
        eps = float(re.search(rf"{accountant}: .* epsilon=([\d.]+)", out)[1])
        assert 0.99 * 2 <= eps <= 2


def test_contradictory_flags_exit():
    with pytest.raises(subprocess.CalledProcessError):
        run(
            "--batch_size=256",
            "--num_examples=60000",
            "--steps=10",
            "--delta=1e-5",
            "--noise_multiplier=1",
            "--target_epsilon=2",
        )
