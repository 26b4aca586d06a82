"""DPConfig: validated once, frozen, completed by the data."""

import dataclasses

import pytest

from keras_dpscale import accounting
from keras_dpscale.config import DPConfig


def test_frozen():
    config = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.noise_multiplier = 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip"),
        (dict(l2_norm_clip=1.0, noise_multiplier=-1.0), ">= 0"),
        (dict(l2_norm_clip=1.0), "Give noise_multiplier"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, steps=10), "steps"),
        (
            dict(l2_norm_clip=1.0, noise_multiplier=1.0, target_epsilon=1.0),
            "not both",
        ),
        (dict(l2_norm_clip=1.0, noise_multiplier=1, batch_size=0), "batch"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1, batch_size=True), "batch"),
        (dict(l2_norm_clip=float("inf"), noise_multiplier=1.0), "finite"),
        (dict(l2_norm_clip=1.0, noise_multiplier=float("inf")), "finite"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1, target_delta=1.0), "delta"),
        (
            dict(
                l2_norm_clip=1.0,
                noise_multiplier=1.0,
                epsilon_budget=float("nan"),
                target_delta=1e-5,
                num_examples=100,
                batch_size=10,
            ),
            "epsilon_budget",
        ),
        (dict(l2_norm_clip=1.0, noise_multiplier=1, sampling="x"), "sampling"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1, accountant="x"), "x"),
        (
            dict(l2_norm_clip=1.0, noise_multiplier=1, epsilon_budget=3.0),
            "needs target_delta, num_examples, batch_size",
        ),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)


def test_replace_revalidates():
    config = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        config.replace(l2_norm_clip=-1.0)


def test_completed_calibrates_once_b_is_known():
    config = DPConfig(
        l2_norm_clip=1.0,
        target_epsilon=2.0,
        target_delta=1e-5,
        num_examples=1000,
        steps=20,
    )
    assert config.noise_multiplier is None
    done = config.completed(batch_size=100)
    want = accounting.calibrate_noise_multiplier(2.0, 1e-5, 100, 1000, steps=20)
    assert done.noise_multiplier == pytest.approx(want)
    assert done.epsilon_budget == 2.0
    # The given N must agree with the data's.
    with pytest.raises(ValueError, match="num_examples=1000"):
        done.completed(num_examples=999)


def test_a_fixed_sigma_ends_the_calibration_and_keeps_the_budget():
    config = DPConfig(
        l2_norm_clip=1.0,
        target_epsilon=2.0,
        target_delta=1e-5,
        num_examples=1000,
        batch_size=100,
        steps=20,
    )
    fixed = config.with_noise_multiplier(0.5)
    assert fixed.noise_multiplier == 0.5
    assert not fixed.calibrating
    assert fixed.epsilon_budget == 2.0
