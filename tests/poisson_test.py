"""Poisson sampling: inclusion rate, batch size, padding, the DP step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import accounting
from keras_dpscale import data

N, B = 1000, 50


def arrays(n=N):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 1)).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # identify examples
    images[:, 0, 1, 0] = np.arange(n) // 256
    return images, np.arange(n) % 3


def example_ids(x, mask):
    pixels = np.rint((np.asarray(x) * 0.5 + 0.5) * 255).astype(int)
    ids = pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 1, 0]
    return ids[np.asarray(mask) > 0]


def test_inclusion_rate_and_mean_batch_size():
    images, labels = arrays()
    steps = 400
    ds = data.poisson_dataset(images, labels, B, seed=1, steps=steps)
    counts = np.zeros(N)
    sizes = []
    rows = None
    for x, y, extra in ds:
        mask = extra["dp_mask"].numpy()
        rows = len(mask)
        ids = example_ids(x, mask)
        assert len(set(ids)) == len(ids)  # each example at most once a step
        counts[ids] += 1
        sizes.append(mask.sum())
        assert np.all(np.asarray(x)[mask == 0] == 0)  # padding is zeros
    q = B / N
    assert rows == accounting.poisson_max_batch_size(N, B, 1e-18)
    assert abs(np.mean(sizes) - B) < 6 * np.sqrt(B * (1 - q) / steps)
    assert abs(counts.mean() / steps - q) < 0.003
    # Independent inclusion: per-example counts are Binomial(steps, q).
    assert 0.7 < counts.var() / (steps * q * (1 - q)) < 1.3


def test_same_seed_same_batches_and_views():
    images, labels = arrays()
    a = next(iter(data.poisson_dataset(images, labels, B, 3, num_views=2)))
    b = next(iter(data.poisson_dataset(images, labels, B, 3, num_views=2)))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape[1:] == (2, 8, 8, 1)


def test_overflow_keeps_at_most_the_padded_size():
    images, labels = arrays()
    ds = data.poisson_dataset(
        images, labels, B, 4, steps=50, overflow_probability=0.3
    )
    sizes = [float(tf.reduce_sum(m["dp_mask"])) for _, _, m in ds]
    rows = accounting.poisson_max_batch_size(N, B, 0.3)
    assert max(sizes) == rows  # some steps overflowed and were truncated
    assert rows < B + 5


def test_accumulation_cuts_a_logical_batch_into_physical_ones():
    images, labels = arrays()
    logical = list(data.poisson_dataset(images, labels, B, 5, steps=2))
    physical = list(
        data.poisson_dataset(
            images, labels, B, 5, steps=2, accumulation_steps=2
        )
    )
    assert len(physical) == 4
    for i, (x, _, m) in enumerate(logical):
        parts = physical[2 * i : 2 * i + 2]
        joined = np.concatenate([p[2]["dp_mask"] for p in parts])
        mask = np.asarray(m["dp_mask"])  # m rounded up to a multiple of 2
        np.testing.assert_array_equal(joined[: len(mask)], mask)
        assert not joined[len(mask) :].any()


def test_overflow_probability_and_max_batch_size():
    for p in (1e-6, 1e-18):
        m = accounting.poisson_max_batch_size(60_000, 256, p)
        assert accounting.poisson_overflow_probability(60_000, 256, m) <= p
        assert accounting.poisson_overflow_probability(60_000, 256, m - 1) > p


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_dp_training_on_poisson_batches_is_accounted(accumulation_steps):
    images, labels = arrays()
    ds = data.poisson_dataset(
        images, labels, B, 6, steps=6, accumulation_steps=accumulation_steps
    )
    model = kd.DPSequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            batch_size=B,
            num_examples=N,
            target_delta=1e-5,
            sampling="poisson",
            accumulation_steps=accumulation_steps,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(ds, epochs=1, verbose=0)
    opt = model.optimizer
    rows = accounting.poisson_max_batch_size(N, B, 1e-18)
    rows = accumulation_steps * -(-rows // accumulation_steps)
    assert opt.privacy_ledger() == [
        accounting.Segment(1.0, B, "poisson", 6, rows)
    ]
    want = accounting.compute_epsilon(1.0, B, N, 6, 1e-5)
    assert history.history["epsilon"][-1] == pytest.approx(want)
    assert "truncation adds" in opt.privacy_statement()
