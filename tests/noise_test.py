"""The Gaussian noise: its distribution and its seeds."""

import numpy as np
import scipy.stats
import tensorflow as tf

from keras_dpscale import noise


def test_noise_is_gaussian_with_the_given_std():
    grads = [tf.zeros((100, 50)), tf.zeros((3000,))]
    noisy = noise.add_gaussian_noise(grads, 2.5, noise.step_seed(7, 0))
    values = np.concatenate([np.ravel(g) for g in noisy])
    assert scipy.stats.kstest(values, "norm", args=(0, 2.5)).pvalue > 0.01
    # The same test rejects a std that is off by 10%.
    assert scipy.stats.kstest(values, "norm", args=(0, 2.75)).pvalue < 1e-3


def test_noise_adds_to_the_gradient():
    grads = [tf.fill((10000,), 3.0)]
    noisy = noise.add_gaussian_noise(grads, 0.5, noise.step_seed(1, 0))[0]
    assert abs(float(tf.reduce_mean(noisy)) - 3.0) < 0.05


def test_steps_and_variables_get_independent_noise():
    grads = [tf.zeros((2000,)), tf.zeros((2000,))]
    a0, b0 = noise.add_gaussian_noise(grads, 1.0, noise.step_seed(5, 0))
    a1, _ = noise.add_gaussian_noise(grads, 1.0, noise.step_seed(5, 1))
    again, _ = noise.add_gaussian_noise(grads, 1.0, noise.step_seed(5, 0))
    np.testing.assert_array_equal(a0, again)  # same seed and step: same draw
    for u, v in ((a0, b0), (a0, a1)):
        assert abs(np.corrcoef(u, v)[0, 1]) < 0.1


def test_fresh_seeds_differ():
    assert len({noise.fresh_seed() for _ in range(10)}) == 10
