"""The privacy budget: epsilon in the logs, stopping before the budget."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import accounting

N = 256


def data(batch_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(
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


@pytest.mark.filterwarnings("ignore:The data come in shuffled")
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
    history = model.fit(data(32 // accumulation_steps), epochs=100, verbose=0)
    steps = int(opt.iterations)
    assert steps == allowed  # not one step more, and none wasted
    assert opt.epsilon() <= budget < epsilon_after(opt, steps + 1)
    eps = history.history["epsilon"]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(opt.epsilon())
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="budget is spent"):
        model.fit(data(32 // accumulation_steps), epochs=1, verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


@pytest.mark.filterwarnings("ignore:The data come in shuffled")
def test_target_epsilon_calibrates_at_the_first_step_and_is_met():
    model = model_with(target_epsilon=3.0, epochs=4)
    opt = model.optimizer
    assert opt.noise_multiplier is None  # B comes from the data
    model.fit(data(32), epochs=4, verbose=0)
    assert opt.batch_size == 32
    assert opt.noise_multiplier == pytest.approx(
        accounting.calibrate_noise_multiplier(
            3.0, 1e-3, 32, N, epochs=4, accountant="rdp", sampling="shuffle"
        )
    )
    assert int(opt.iterations) == 4 * N // 32
    assert 0.99 * 3.0 <= opt.epsilon() <= 3.0


@pytest.mark.filterwarnings("ignore:The data come in shuffled")
def test_epsilon_goes_to_tensorboard_and_statement_names_sampling(tmp_path):
    model = model_with(noise_multiplier=1.0)
    board = keras.callbacks.TensorBoard(str(tmp_path))
    history = model.fit(data(32), epochs=2, verbose=0, callbacks=[board])
    assert len(history.history["epsilon"]) == 2
    assert any(tmp_path.rglob("*tfevents*"))
    statement = model.optimizer.privacy_statement()
    assert "assumes Poisson sampling" in statement
    loose = model.optimizer.epsilon(amplification=False)
    assert f"{loose:.4g}" in statement


def test_no_report_without_dataset_size():
    model = model_with(noise_multiplier=1.0, num_examples=None)
    history = model.fit(data(32), epochs=1, verbose=0)
    assert "epsilon" not in history.history


@pytest.mark.filterwarnings("ignore:The data come in shuffled")
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
    model.fit(data(32), epochs=100, verbose=0, callbacks=callbacks)
    steps = int(model.optimizer.iterations)
    # One call runs 4 steps, so it stops up to 3 steps early, never late.
    assert allowed - 3 <= steps <= allowed
    assert model.optimizer.epsilon() <= budget
