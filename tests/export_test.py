"""SavedModel export: served by TensorFlow alone, EMA weights, privacy."""

import json
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import experiment
from tests.conftest import LOSS
from tests.conftest import inputs_for
from tests.conftest import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process with TensorFlow alone: Keras and keras_dpscale are
# made unimportable, as if not installed (TensorFlow itself would otherwise
# import Keras). Prints what each SavedModel serves and says about privacy.
READER = """
import json, os, sys

for name in ("keras", "keras_dpscale", "tf_keras"):
    sys.modules[name] = None  # import fails, find_spec says not installed
import numpy as np
import tensorflow as tf

x = np.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    loaded = tf.saved_model.load(path)
    default = loaded.signatures["serving_default"]
    with open(os.path.join(path, "assets", "privacy.json")) as f:
        asset = f.read()
    out[path] = {
        "serve": loaded.serve(tf.constant(x)).numpy().tolist(),
        "serving_default": default(images=tf.constant(x))[
            "output_0"
        ].numpy().tolist(),
        "variable": loaded.privacy_json.numpy().decode(),
        "signature": loaded.signatures["privacy"]()["privacy_json"]
        .numpy()
        .decode(),
        "asset": asset,
    }
out["modules"] = sorted(
    name
    for name, module in sys.modules.items()
    if module is not None
    and name.split(".")[0] in ("keras", "keras_dpscale", "tf_keras")
)
print(json.dumps(out))
"""


def run_python(args, cwd):
    result = subprocess.run(
        [sys.executable] + args,
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def predict(model, x, weights=None):
    """softmax(model(x)), with `weights` in place of the trainable ones."""
    saved = [v.numpy() for v in model.trainable_variables]
    for v, w in zip(model.trainable_variables, weights or saved):
        v.assign(w)
    probabilities = keras.ops.softmax(model(x, training=False)).numpy()
    for v, w in zip(model.trainable_variables, saved):
        v.assign(w)
    return probabilities


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny DPModel trained 3 steps with EMA, exported with and without it,
    then read back by a fresh TensorFlow-only process."""
    keras.utils.set_random_seed(0)
    tmp = tmp_path_factory.mktemp("export")
    model = kd.make_private(tiny_models()[1])
    optimizer = kd.DPSGD(
        learning_rate=0.5,
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        noise_seed=3,
        batch_size=8,
        num_examples=64,
        target_delta=1e-5,
        use_ema=True,
        ema_momentum=0.5,
    )
    model.compile(optimizer=optimizer, loss=LOSS)
    optimizer.build(model.trainable_variables)
    x, y = inputs_for(model, 8)
    # train_on_batch, unlike fit, leaves the raw weights in the model.
    for _ in range(3):
        model.train_on_batch(x, y)
    x_test = inputs_for(model, 5, seed=1)[0]
    averages = [a.numpy() for a in optimizer._model_variables_moving_average]
    before = [w.copy() for w in model.get_weights()]
    expected_ema = predict(model, x_test, averages)
    expected_raw = predict(model, x_test)
    # Else the EMA tests could not tell the two sets of weights apart.
    assert np.abs(expected_ema - expected_raw).max() > 1e-3
    ema_dir, raw_dir = str(tmp / "ema"), str(tmp / "raw")
    record_ema = kd.export_saved_model(model, ema_dir)
    after_ema = model.get_weights()
    record_raw = kd.export_saved_model(model, raw_dir, use_ema=False)
    model.save(str(tmp / "model.keras"))
    np.save(tmp / "x.npy", x_test)
    stdout = run_python(
        ["-c", READER, str(tmp / "x.npy"), ema_dir, raw_dir], cwd=str(tmp)
    )
    return dict(
        tmp=tmp,
        model=model,
        optimizer=optimizer,
        x=x_test,
        before=before,
        after_ema=after_ema,
        after_raw=model.get_weights(),
        averages=averages,
        averages_after=[
            a.numpy() for a in optimizer._model_variables_moving_average
        ],
        expected_ema=expected_ema,
        expected_raw=expected_raw,
        record_ema=record_ema,
        record_raw=record_raw,
        epsilon=model.epsilon(),
        statement=model.privacy_statement(),
        fresh=json.loads(stdout.strip().splitlines()[-1]),
        ema_dir=ema_dir,
        raw_dir=raw_dir,
    )


def test_fresh_tensorflow_process_serves_ema_probabilities(exported):
    fresh = exported["fresh"]
    assert fresh["modules"] == []  # TensorFlow alone
    served = fresh[exported["ema_dir"]]
    for key in ("serve", "serving_default"):
        np.testing.assert_allclose(
            served[key], exported["expected_ema"], atol=1e-5
        )
    np.testing.assert_allclose(np.sum(served["serve"], -1), 1.0, atol=1e-5)


def test_export_leaves_the_model_weights_unchanged(exported):
    for before, ema, raw in zip(
        exported["before"], exported["after_ema"], exported["after_raw"]
    ):
        np.testing.assert_array_equal(ema, before)
        np.testing.assert_array_equal(raw, before)
    for a, b in zip(exported["averages"], exported["averages_after"]):
        np.testing.assert_array_equal(a, b)


def test_privacy_record_in_asset_variable_and_signature(exported):
    record = exported["record_ema"]
    assert record["epsilon"] == pytest.approx(exported["epsilon"], rel=1e-12)
    assert 0 < record["epsilon"] < 1e3
    expected = {
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "l2_norm_clip": 1.0,
        "steps": 3,
        "batch_size": 8,
        "num_examples": 64,
        "sampling": "unknown",  # train_on_batch: outside fit's knowledge
        "accountant": "pld",
        "non_private_steps": 0,
        "not_covered": [],
        "statement": exported["statement"],
        "ema_weights": True,
        "ema_momentum": 0.5,
        "outputs": "probabilities",
        "keras_dpscale_version": kd.__version__,
    }
    assert {k: record[k] for k in expected} == expected
    assert record["ledger"] == [
        {
            "noise_multiplier": 1.0,
            "batch_size": 8,
            "sampling": "unknown",
            "steps": 3,
            "max_batch_size": 8,
            "num_examples": 64,
            "overflow_probability": 0.0,
            "declared": False,
        }
    ]
    served = exported["fresh"][exported["ema_dir"]]
    for where in ("asset", "variable", "signature"):
        assert json.loads(served[where]) == record, where


def test_no_ema_exports_the_raw_weights(exported):
    served = exported["fresh"][exported["raw_dir"]]
    np.testing.assert_allclose(
        served["serve"], exported["expected_raw"], atol=1e-5
    )
    assert json.loads(served["asset"])["ema_weights"] is False
    assert exported["record_raw"]["ema_weights"] is False
    assert (
        exported["record_raw"]["epsilon"] == exported["record_ema"]["epsilon"]
    )


def test_a_model_without_a_privacy_record_is_refused(tmp_path):
    model = tiny_models()[1]
    with pytest.raises(ValueError, match="DP model"):
        kd.export_saved_model(model, str(tmp_path / "uncompiled"))
    model.compile(optimizer=keras.optimizers.SGD(), loss=LOSS)
    with pytest.raises(ValueError, match="DP model"):
        kd.export_saved_model(model, str(tmp_path / "sgd"))
    dp = kd.make_private(tiny_models()[1])
    dp.compile(
        optimizer=kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=LOSS
    )
    with pytest.raises(ValueError, match="delta"):
        kd.export_saved_model(dp, str(tmp_path / "no_delta"))
    dp.train_on_batch(*inputs_for(dp, 4))
    with pytest.raises(ValueError, match="num_examples"):
        kd.export_saved_model(dp, str(tmp_path / "no_n"), delta=1e-5)
    for name in ("sgd", "no_delta", "no_n"):
        assert not os.path.exists(tmp_path / name)


def test_untrained_dp_model_exports_epsilon_zero(tmp_path):
    model = kd.make_private(tiny_models()[1])
    model.compile(
        optimizer=kd.DPSGD(
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            num_examples=64,
            target_delta=1e-5,
            use_ema=True,
        ),
        loss=LOSS,
    )
    record = kd.export_saved_model(model, str(tmp_path), delta=1e-6)
    assert (record["epsilon"], record["steps"], record["delta"]) == (0, 0, 1e-6)
    assert record["ledger"] == [] and record["ema_weights"] is False
    # It never claims that the weights do not depend on the data: only that
    # no DP step is recorded, and what the user must vouch for.
    assert "No DP step is recorded" in record["statement"]
    assert "the user's claim" in record["statement"]
    with open(tmp_path / "assets" / "privacy.json") as f:
        assert json.load(f) == record
    x = inputs_for(model, 3)[0]
    loaded = tf.saved_model.load(str(tmp_path))  # kept alive while it runs
    np.testing.assert_allclose(
        loaded.serve(x).numpy(), predict(model, x), atol=1e-5
    )


def test_tool_exports_a_saved_keras_file(exported):
    out = str(exported["tmp"] / "tool")
    stdout = run_python(
        [
            os.path.join(ROOT, "tools", "export.py"),
            "--model_path",
            str(exported["tmp"] / "model.keras"),
            "--output_dir",
            out,
        ],
        cwd=ROOT,
    )
    assert f"SavedModel written to {out}" in stdout
    with open(os.path.join(out, "assets", "privacy.json")) as f:
        record = json.load(f)
    assert record["epsilon"] == pytest.approx(exported["epsilon"], rel=1e-12)
    assert (record["steps"], record["ema_weights"]) == (3, True)
    assert f'"epsilon": {record["epsilon"]}' in stdout
    loaded = tf.saved_model.load(out)
    np.testing.assert_allclose(
        loaded.serve(exported["x"]).numpy(), exported["expected_ema"], atol=1e-5
    )


def untrained_dp_model(model=None):
    """`model` (default: a tiny private one) compiled with DPSGD."""
    if model is None:
        model = kd.make_private(tiny_models()[1])
    model.compile(
        optimizer=kd.DPSGD(
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            num_examples=64,
            target_delta=1e-5,
        ),
        loss=LOSS,
    )
    return model


class BatchCentredScatter(keras.layers.Layer):
    """Scattering coefficients minus half their batch mean: a map that mixes
    the examples of a batch (what `featurize` makes harmless)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn  # a constructor argument get_config cannot describe
        self.scatter = kd.layers.Scattering2D(J=1, L=2)

    def call(self, x):
        s = self.scatter(x)
        return s - 0.5 * tf.reduce_mean(s, axis=0, keepdims=True)


def test_a_model_on_features_serves_images_as_trained_and_names_the_map(
    tmp_path,
):
    # ScatterNet + linear on 8x8x3 images: the model takes the [4, 4, 9]
    # coefficients; the SavedModel takes the (normalized) images.
    mix = BatchCentredScatter(np.tanh)
    model = untrained_dp_model(
        kd.models.scatternet_linear(
            num_classes=3, input_shape=(4, 4, 9), groups=3
        )
    )
    rng = np.random.default_rng(1)  # else every logit is 0 (zero-init head)
    model.layers[-1].set_weights(
        [rng.normal(size=w.shape) for w in model.layers[-1].get_weights()]
    )
    raw = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    trained_on = np.stack(  # the features as training computed them
        [
            x.numpy()
            for x, _ in experiment.featurize(
                tf.data.Dataset.from_tensor_slices((raw, np.zeros(5))), mix
            )
        ]
    )
    for shape in (None, (8, None, 3)):
        with pytest.raises(ValueError, match="input_shape"):
            kd.export_saved_model(
                model, str(tmp_path / "no"), input_shape=shape, features=mix
            )
    record = kd.export_saved_model(
        model, str(tmp_path), input_shape=(8, 8, 3), features=mix
    )
    loaded = tf.saved_model.load(str(tmp_path))
    images = kd.data.normalize(tf.constant(raw))
    served = loaded.serve(images).numpy()
    np.testing.assert_allclose(served, predict(model, trained_on), atol=1e-5)
    # Each image is served as alone, whatever else is in the request.
    np.testing.assert_allclose(
        loaded.serve(images[1:2]).numpy(), served[1:2], atol=1e-5
    )
    assert np.ptp(served, axis=0).max() > 1e-3  # the images matter
    # The record names the map; a layer without a configuration by its
    # class, a Keras layer by its configuration, a function by its name.
    assert record["features"] == "BatchCentredScatter(...)"
    with open(tmp_path / "assets" / "privacy.json") as f:
        assert json.load(f)["features"] == record["features"]
    name = kd.export.feature_map_name
    assert name(kd.layers.Scattering2D(J=1, L=2)) == "Scattering2D(J=1, L=2)"
    assert name(np.tanh) == "tanh"
    assert "features" not in kd.export_saved_model(model, str(tmp_path / "p"))


def test_export_to_a_gs_like_path_quietly(tmp_path, monkeypatch, caplog):
    # TensorFlow's in-memory filesystem stands in for gs://.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    path = f"ram://export_test/{os.getpid()}-{id(tmp_path)}/saved_model"
    model = untrained_dp_model()
    tf_logger = tf.get_logger()
    level = tf_logger.level
    caplog.set_level(logging.INFO)  # the root logger: absl's INFO lines
    caplog.set_level(logging.INFO, logger="tensorflow")
    try:
        record = kd.export_saved_model(model, path)
        after = tf_logger.level
    finally:
        tf_logger.setLevel(level)
    assert after == logging.INFO  # restored after the export
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "Assets written" in m], said
    assert not [m for m in said if "fingerprint" in m], said
    assert tf.io.gfile.exists(f"{path}/saved_model.pb")
    with tf.io.gfile.GFile(f"{path}/assets/privacy.json") as f:
        assert json.load(f) == record
    x = inputs_for(model, 3)[0]
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        loaded.serve(x).numpy(), predict(model, x), atol=1e-5
    )
    assert os.listdir(tmp_path) == []  # no local folder named "ram:"


def test_a_worker_that_is_not_chief_exports_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"worker": ["localhost:1", "localhost:2"]},
                "task": {"type": "worker", "index": 1},
            }
        ),
    )
    record = kd.export_saved_model(untrained_dp_model(), str(tmp_path / "m"))
    assert record["steps"] == 0
    assert not (tmp_path / "m").exists()
