"""The privacy ledger belongs to the model: it follows the weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import accounting
from keras_dpscale import ledger
from tests.conftest import LOSS
from tests.conftest import inputs_for
from tests.conftest import tiny_models

N = 64


def dpsgd(**kwargs):
    kwargs.setdefault("learning_rate", 0.1)
    kwargs.setdefault("l2_norm_clip", 1.0)
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("num_examples", N)
    kwargs.setdefault("target_delta", 1e-5)
    return kd.DPSGD(**kwargs)


def dense_model():
    return kd.DPSequential([keras.Input((6,)), keras.layers.Dense(3)])


def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    return x, rng.integers(0, 3, N)


def test_steps_accumulate_across_compiles_and_optimizers(tmp_path):
    # Re-compiling with a new DPSGD (to change the learning rate) must not
    # restart the record: the export covers every DP step of the weights.
    model = dense_model()
    model.compile(optimizer=dpsgd(), loss=LOSS)
    x, y = arrays()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # 8 steps
    first = model.epsilon()
    model.compile(optimizer=dpsgd(learning_rate=0.01), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # 4 more
    assert int(model.optimizer.iterations) == 4
    assert sum(s.steps for s in model.privacy_ledger()) == 12
    want = accounting.compute_epsilon(1.0, 16, N, 12, 1e-5)
    assert model.epsilon() == pytest.approx(want) and want > first
    record = kd.export_saved_model(model, str(tmp_path / "saved"))
    assert record["steps"] == 12
    assert record["epsilon"] == pytest.approx(want)
    # And it is saved with the model.
    model.save(str(tmp_path / "model.keras"))
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    assert loaded.privacy_ledger() == model.privacy_ledger()


def test_a_change_of_sigma_or_batch_opens_a_new_row():
    model = dense_model()
    model.compile(optimizer=dpsgd(noise_multiplier=2.0), loss=LOSS)
    x, y = arrays()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.optimizer.noise_multiplier = 1.0  # takes effect without retracing
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.compile(optimizer=dpsgd(), loss=LOSS)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    got = [
        (s.noise_multiplier, s.batch_size, s.steps)
        for s in model.privacy_ledger()
    ]
    assert got == [(2.0, 16, 4), (1.0, 16, 4), (1.0, 32, 2)]


def test_a_full_ledger_merges_conservatively():
    model = dense_model()
    model.compile(optimizer=dpsgd(), loss=LOSS)
    x, y = inputs_for(tiny_models()[0], 16)
    sigmas = [1.0 + 0.01 * i for i in range(ledger.CAPACITY + 5)]
    for sigma in sigmas:
        model.optimizer.noise_multiplier = sigma
        model.train_on_batch(x, y)
    rows = model.privacy_ledger()
    assert len(rows) == ledger.CAPACITY
    assert sum(s.steps for s in rows) == len(sigmas)
    assert rows[-1].noise_multiplier == pytest.approx(sigmas[-6])  # the min
    assert rows[-1].steps == 6
    exact = accounting.ledger_epsilon(
        [
            accounting.Segment(s, 16, "unknown", 1, num_examples=N)
            for s in sigmas
        ],
        N,
        1e-5,
        "rdp",
    )
    assert accounting.ledger_epsilon(rows, N, 1e-5, "rdp") >= exact


def test_weights_trained_without_dp_are_not_called_private(tmp_path):
    plain = tiny_models()[0]
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = inputs_for(plain, 16)
    plain.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 2 non-DP steps
    with pytest.warns(UserWarning, match="non-DP optimizer for 2 steps"):
        private = kd.make_private(plain)
    assert kd.make_private(plain) is private  # one record per weights
    private.compile(optimizer=dpsgd(), loss=LOSS)
    record = kd.export_saved_model(
        private, str(tmp_path / "a"), input_shape=(6,)
    )
    assert record["non_private_steps"] == 2
    assert "2 steps of a non-DP optimizer" in record["statement"]
    assert "do not depend on the training data" not in record["statement"]


def test_another_dp_model_over_the_same_layers_keeps_their_record():
    base = tiny_models()[0]
    first = kd.make_private(base)
    first.compile(optimizer=dpsgd(), loss=LOSS)
    x, y = inputs_for(base, 16)
    first.train_on_batch(x, y)
    first.train_on_batch(x, y)
    # A new head on the DP-trained layers: the new model starts from their
    # record, not from zero.
    head = keras.layers.Dense(2)(base.layers[-2].output)
    second = kd.DPModel(base.inputs, head)
    second.compile(optimizer=dpsgd(), loss=LOSS)
    assert sum(s.steps for s in second.privacy_ledger()) == 2


def test_adapted_normalization_is_named_as_not_covered():
    norm = keras.layers.Normalization()
    norm.adapt(np.random.default_rng(0).normal(3.0, 2.0, (100, 6)))
    model = kd.DPSequential([keras.Input((6,)), norm, keras.layers.Dense(3)])
    with pytest.warns(UserWarning, match="set by adapt"):
        model.compile(optimizer=dpsgd(), loss=LOSS)
    assert "Not covered: the statistics of layer" in model.privacy_statement()
    # Statistics given as constants are the user's choice, not data.
    fixed = keras.layers.Normalization(mean=0.0, variance=1.0)
    quiet = kd.DPSequential([keras.Input((6,)), fixed, keras.layers.Dense(3)])
    with warnings_as_errors():
        quiet.compile(optimizer=dpsgd(), loss=LOSS)
    assert "Not covered" not in quiet.privacy_statement()


def warnings_as_errors():
    import warnings

    class Context:
        def __enter__(self):
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            warnings.simplefilter("error", UserWarning)

        def __exit__(self, *exc):
            return self._catch.__exit__(*exc)

    return Context()


def test_exhausted_iterator_takes_no_step_without_xla():
    # Item 5: outside XLA, the call that finds the iterator exhausted must
    # not advance the accumulation (else later logical batches join rows of
    # two different samples).
    model = dense_model()
    model.compile(
        optimizer=dpsgd(accumulation_steps=2, batch_size=8),
        loss=LOSS,
        jit_compile=False,
    )
    x, y = arrays()
    data = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(4)
    # More steps asked for than it holds: Keras calls the step until the
    # iterator is empty.
    model.fit(
        kd.sampling.declare(data, "shuffle"), steps_per_epoch=10, verbose=0
    )  # 8 batches
    assert int(model.optimizer._micro_step.numpy()) == 8
    assert int(model.optimizer.iterations.numpy()) == 4
    assert sum(s.steps for s in model.privacy_ledger()) == 4


def test_a_half_accumulated_batch_is_dropped_at_the_next_fit():
    model = dense_model()
    model.compile(
        optimizer=dpsgd(accumulation_steps=2, batch_size=8), loss=LOSS
    )
    x, y = arrays()
    # Half a logical batch outside fit (fit itself takes whole ones).
    model.train_on_batch(x[:4], y[:4])
    assert int(model.optimizer._micro_step.numpy()) == 1
    data = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(4)
    with pytest.warns(UserWarning, match="half accumulated"):
        model.fit(kd.sampling.declare(data, "shuffle"), verbose=0)
    # The orphan batch never joined the fit's first batch.
    assert int(model.optimizer._micro_step.numpy()) == 0 + 4
    assert int(model.optimizer.iterations.numpy()) == 2
