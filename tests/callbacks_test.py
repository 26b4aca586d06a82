"""The privacy budget: epsilon in the logs, stopping before the budget."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import accounting

N = 256


def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def data(batch_size):
    """A pipeline of the test's own: the library cannot see how it samples."""
    return tf.data.Dataset.from_tensor_slices(arrays()).batch(
        batch_size, drop_remainder=True
    )


def model_with(**kwargs):
    model = kd.DPSequential([keras.Input((6,)), keras.layers.Dense(2)])
    kwargs.setdefault("learning_rate", 0.1)
    kwargs.setdefault("l2_norm_clip", 1.0)
    kwargs.setdefault("num_examples", N)
    kwargs.setdefault("target_delta", 1e-3)
    kwargs.setdefault("accountant", "rdp")
    model.compile(
        optimizer=kd.DPSGD(**kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def epsilon_after(optimizer, steps):
    return accounting.compute_epsilon(
        optimizer.noise_multiplier,
        optimizer.batch_size,
        N,
        steps,
        optimizer.target_delta,
        accountant="rdp",
    )


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_training_stops_before_the_budget(accumulation_steps):
    budget = 2.0
    model = model_with(
        noise_multiplier=1.5,
        epsilon_budget=budget,
        batch_size=32,
        accumulation_steps=accumulation_steps,
    )
    opt = model.optimizer
    allowed = accounting.calibrate_steps(budget, 1e-3, 1.5, 32, N, "rdp")
    budget_callback = kd.callbacks.PrivacyBudget(verbose=0)
    history = model.fit(
        *arrays(),
        batch_size=32,
        epochs=100,
        verbose=0,
        callbacks=[budget_callback],
    )
    assert budget_callback.stopped_at_budget  # 100 epochs were planned
    steps = int(opt.iterations)
    assert steps == allowed  # not one step more, and none wasted
    assert model.epsilon() <= budget < epsilon_after(opt, steps + 1)
    eps = history.history["epsilon"]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(model.epsilon())
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="budget is spent"):
        model.fit(*arrays(), batch_size=32, epochs=1, verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_target_epsilon_calibrates_at_the_first_step_and_is_met():
    model = model_with(target_epsilon=3.0, epochs=4)
    opt = model.optimizer
    assert opt.noise_multiplier is None  # B comes from the data
    budget_callback = kd.callbacks.PrivacyBudget(verbose=0)
    model.fit(
        *arrays(),
        batch_size=32,
        epochs=4,
        verbose=0,
        callbacks=[budget_callback],
    )
    # The plan's last step meets the target: nothing was stopped early.
    assert not budget_callback.stopped_at_budget
    assert opt.batch_size == 32
    assert opt.noise_multiplier == pytest.approx(
        accounting.calibrate_noise_multiplier(
            3.0, 1e-3, 32, N, epochs=4, accountant="rdp"
        )
    )
    assert int(opt.iterations) == 4 * N // 32
    assert 0.99 * 3.0 <= model.epsilon() <= 3.0


def test_a_pipeline_the_library_cannot_see_into_is_counted_in_every_step(
    tmp_path,
):
    model = model_with(noise_multiplier=1.0)
    board = keras.callbacks.TensorBoard(str(tmp_path))
    with pytest.warns(UserWarning, match="cannot see how this dataset"):
        history = model.fit(data(32), epochs=2, verbose=0, callbacks=[board])
    assert len(history.history["epsilon"]) == 2
    assert any(tmp_path.rglob("*tfevents*"))
    assert "cannot see into" in model.privacy_statement()
    # 16 steps, every example counted in each: 16 Gaussian releases.
    want = accounting.compute_epsilon(
        1.0, 32, N, 16, 1e-3, "rdp", sampling="unknown"
    )
    assert history.history["epsilon"][-1] == pytest.approx(want)
    # Calibrated for Poisson sampling, such data are refused before training.
    calibrated = model_with(target_epsilon=3.0, epochs=4, batch_size=32)
    with pytest.raises(ValueError, match="calibrated sigma for poisson"):
        calibrated.fit(data(32), epochs=1, verbose=0)
    # Declared by the user, the claim is recorded as the user's.
    declared = model_with(noise_multiplier=1.0)
    declared.fit(kd.sampling.declare(data(32), "shuffle"), verbose=0)
    assert declared.privacy_ledger()[0].declared
    assert "the user's claim" in declared.privacy_statement()


def test_no_report_without_dataset_size():
    model = model_with(noise_multiplier=1.0, num_examples=None)
    history = model.fit(data(32), epochs=1, verbose=0)
    assert "epsilon" not in history.history


def test_budget_holds_with_steps_per_execution_and_a_callback_list():
    budget = 2.0
    model = model_with(
        noise_multiplier=1.5, epsilon_budget=budget, batch_size=32
    )
    model.compile(
        optimizer=model.optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=4,
    )
    allowed = accounting.calibrate_steps(budget, 1e-3, 1.5, 32, N, "rdp")
    callbacks = keras.callbacks.CallbackList([], model=model)
    model.fit(
        *arrays(), batch_size=32, epochs=100, verbose=0, callbacks=callbacks
    )
    steps = int(model.optimizer.iterations)
    # One call runs 4 steps, so it stops up to 3 steps early, never late.
    assert allowed - 3 <= steps <= allowed
    assert model.epsilon() <= budget
