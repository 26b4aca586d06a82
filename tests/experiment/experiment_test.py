"""The launcher, the experiment's builders and the configs."""

import json
import os
import re
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import checkpoint
from keras_dpscale import experiment
from keras_dpscale import storage

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
CONFIGS = os.path.join(ROOT, "configs")
SMOKE = os.path.join(CONFIGS, "smoke.gin")
CIFAR_EPSILONS = {1: 73, 2: 94, 4: 133, 8: 206}  # epsilon: epochs

# A model factory of the user's own, which a config binds by gin.
FACTORY = """
import gin
import keras

import keras_dpscale as kd


@gin.configurable
def tiny_cnn(num_classes=2, input_shape=(8, 8, 3), filters=4):
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(filters, 3, strides=2, activation="tanh")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return kd.DPModel(inputs, keras.layers.Dense(num_classes)(h))
"""

# smoke.gin, made tiny: 32 examples of 8x8, B = 8, 2 epochs, a 2-layer CNN,
# the RDP accountant (calibrating sigma with PLD takes ~10 s here).
TINY = [
    "import tiny_factories",
    'build_data.dataset = "tiny"',
    'build_data.image_folder = "images"',  # in the data directory
    "build_model.model = @tiny_cnn",
    "train_and_evaluate.batch_size = 8",
    "train_and_evaluate.epochs = 2",
    "build_data.eval_batch_size = 10",
    "build_optimizer.ema_momentum = 0.9",
    'build_optimizer.accountant = "rdp"',
]


def importable_factories(tmp_path, monkeypatch):
    """Writes FACTORY as the module `tiny_factories`, which TINY imports."""
    (tmp_path / "factories").mkdir()
    (tmp_path / "factories" / "tiny_factories.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "factories"))


def make_image_folder(root, n_train=32, n_test=10):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(["dark", "bright"]):
            os.makedirs(root / split / cls)
            for i in range(n // 2):
                image = rng.integers(0, 100, (8, 8, 3)) + 120 * label
                png = tf.io.encode_png(image.astype(np.uint8))
                (root / split / cls / f"{i}.png").write_bytes(png.numpy())


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_train_py_runs_a_config_end_to_end(tmp_path, monkeypatch, clean_gin):
    data_dir = tmp_path / "data"
    make_image_folder(data_dir / "images")
    (tmp_path / "factories").mkdir()
    (tmp_path / "factories" / "tiny_factories.py").write_text(FACTORY)
    model_dir = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(ROOT, "tools", "train.py"),
        "--config",
        SMOKE,
        "--model_dir",
        str(model_dir),
        "--data_dir",
        str(data_dir),
    ] + [f"--gin_bindings={b}" for b in TINY]
    path = os.pathsep.join([ROOT, str(tmp_path / "factories")])
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy ") and "epsilon" in last
    result = json.loads((model_dir / "result.json").read_text())
    # 32 examples, B = 8: 4 steps per epoch, 2 epochs.
    assert result["steps"] == 8
    assert result["num_examples"] == 32
    assert 0 < result["epsilon"] <= 3.0 + 1e-9  # smoke.gin's target
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["sampling"] == "poisson"
    assert result["data_source"] == "image_folder"
    operative = (model_dir / "operative_config.gin").read_text()
    assert "train_and_evaluate.batch_size = 8" in operative
    assert "build_model.model = @tiny_cnn" in operative
    assert os.listdir(model_dir / "logs")  # TensorBoard
    assert (model_dir / "saved_model" / "saved_model.pb").exists()
    # A quiet console: the export's INFO lines do not show.
    for noise in ("Writing fingerprint", "Sharding callback", "input name(s)"):
        assert noise not in run.stderr + run.stdout, noise
    record = json.loads(
        (model_dir / "saved_model" / "assets" / "privacy.json").read_text()
    )
    assert record["epsilon"] == result["epsilon"]
    # The same run again (in this process; the data directory from the
    # environment) resumes from the last checkpoint (epoch 2 of 2): no new
    # step, the same guarantee.
    monkeypatch.setenv(experiment.DATA_DIR_ENV, str(data_dir))
    monkeypatch.syspath_prepend(str(tmp_path / "factories"))
    experiment.parse_config([SMOKE], TINY + ["run.export = False"])
    resumed = experiment.train_and_evaluate(str(model_dir))
    assert resumed == json.loads((model_dir / "result.json").read_text())
    assert resumed["steps"] == 8
    assert resumed["epsilon"] == result["epsilon"]


def test_resumed_inputs_start_where_the_epoch_starts(tmp_path, clean_gin):
    make_image_folder(tmp_path / "images")
    strategy = tf.distribute.get_strategy()
    # 32 examples, B = 8: 4 logical steps per epoch, 3 epochs.
    shuffle = experiment.Plan(batch_size=8, epochs=3, sampling="shuffle")
    inputs = experiment.build_data(
        shuffle, str(tmp_path), dataset="tiny", image_folder="images"
    )
    assert (inputs.num_examples, inputs.steps_per_epoch) == (32, 4)
    fresh = list(inputs.train_dataset(strategy).take(6))
    resumed = inputs.train_dataset(strategy, initial_epoch=1)
    assert kd.sampling.of(resumed).kind == "shuffle"
    # The deterministic stream goes on from batch 4 (epoch 1's first).
    for (x, y), (want_x, want_y) in zip(resumed.take(2), fresh[4:]):
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(x, want_x)
    # Poisson: a fresh secret sample of the 2 epochs left, nothing replayed.
    poisson = experiment.Plan(batch_size=8, epochs=3)
    inputs = experiment.build_data(
        poisson, str(tmp_path), dataset="tiny", image_folder="images"
    )
    assert sum(1 for _ in inputs.train_dataset(strategy)) == 12
    resumed = inputs.train_dataset(strategy, initial_epoch=1)
    assert kd.sampling.of(resumed).kind == "poisson"
    assert sum(1 for _ in resumed) == 8


def test_build_optimizer_takes_a_schedule_and_dpadam(clean_gin):
    gin.parse_config(
        """
        build_optimizer.optimizer = "dpadam"
        build_optimizer.beta_2 = 0.99
        build_optimizer.learning_rate = @CosineDecay()
        CosineDecay.initial_learning_rate = 2.0
        CosineDecay.decay_steps = 100
        build_optimizer.l2_norm_clip = 1.0
        build_optimizer.target_epsilon = 8.0
        build_optimizer.accountant = "rdp"
        """
    )
    plan = experiment.Plan(batch_size=100, epochs=3, target_delta=1e-5)
    optimizer = experiment.build_optimizer(plan, num_examples=1000)
    assert isinstance(optimizer, kd.DPAdam)
    config = optimizer.get_config()
    assert config["beta_2"] == 0.99
    assert config["learning_rate"]["class_name"] == "CosineDecay"
    assert config["learning_rate"]["config"]["decay_steps"] == 100
    dp = optimizer.dp_config
    assert (dp.batch_size, dp.num_examples, dp.steps) == (100, 1000, 30)
    assert dp.target_epsilon == 8.0 and dp.target_delta == 1e-5
    assert dp.accountant == "rdp" and dp.noise_multiplier > 0
    gin.clear_config()
    sgd = experiment.build_optimizer(
        plan, 1000, noise_multiplier=1.0, target_epsilon=None
    )
    assert isinstance(sgd, kd.DPSGD)
    assert sgd.get_config()["momentum"] == 0.9  # the launcher's default
    with pytest.raises(ValueError, match="optimizer must be one of"):
        experiment.build_optimizer(plan, 1000, optimizer="dpsgdd")


def test_compile_model_gives_the_trainer_settings_to_compile(clean_gin):
    gin.parse_config(
        """
        build_model.model = @tanh_cnn
        tanh_cnn.num_classes = 3
        compile_model.clipping = "vectorized"
        compile_model.microbatch_size = 4
        """
    )
    model = experiment.build_model()
    assert model.name == "tanh_cnn" and model.output_shape == (None, 3)
    optimizer = kd.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0)
    experiment.compile_model(model, optimizer)
    compiled = model.get_compile_config()
    assert compiled["clipping"] == "vectorized"
    assert compiled["microbatch_size"] == 4
    assert model.optimizer is optimizer
    # A registered name with its arguments, as the configs give it.
    named = experiment.build_model("tanh_cnn", {"num_classes": 4})
    assert isinstance(named, kd.DPModel)
    assert named.output_shape == (None, 4)


def test_data_dir_comes_from_the_launcher_or_the_environment(monkeypatch):
    monkeypatch.delenv(experiment.DATA_DIR_ENV, raising=False)
    default = experiment.default_data_dir()
    assert default == os.path.normpath(
        os.path.join(ROOT, os.pardir, "shared", "data")
    )
    monkeypatch.setenv(experiment.DATA_DIR_ENV, "/somewhere/data")
    assert experiment.default_data_dir() == "/somewhere/data"


def test_plan_steps():
    plan = experiment.Plan(batch_size=4096, epochs=206)
    assert plan.steps_per_epoch(50_000) == 12
    assert plan.steps(50_000) == 2472
    assert experiment.Plan(batch_size=64, epochs=3).steps_per_epoch(10) == 1


def config_names():
    return sorted(n for n in os.listdir(CONFIGS) if not n.startswith("audit_"))


def test_every_config_parses(clean_gin):
    names = config_names()
    assert {
        "fashion_mnist.gin",
        "fashion_mnist_tanh_cnn.gin",
        "fashion_mnist_dpnas.gin",
        "fashion_mnist_scatternet.gin",
        "fashion_mnist_eps1.gin",
        "fashion_mnist_eps2.gin",
        "fashion_mnist_eps8.gin",
        "smoke.gin",
        "cifar10_wrn_base.gin",
        "cifar10_wrn_16_4_eps1.gin",
        "cifar10_wrn_16_4_eps2.gin",
        "cifar10_wrn_16_4_eps4.gin",
        "cifar10_wrn_16_4_eps8.gin",
        "cifar10_wrn_40_4_eps8.gin",
        "imagenet_nf_resnet50_eps8.gin",
        "imagenet_nfnet_f3.gin",
    } <= set(names)
    for name in names:
        gin.clear_config()
        experiment.parse_config([os.path.join(CONFIGS, name)])
        text = open(os.path.join(CONFIGS, name)).read()
        # big_vision-style header: the command, the hardware, the result.
        assert "python tools/train" in text and "Hardware:" in text
        assert "Expected" in text


def test_configs_name_no_location_outside_the_repository():
    for name in config_names():
        text = open(os.path.join(CONFIGS, name)).read()
        assert "../" not in text and "/work" not in text, name
        assert "/usr/" not in text and "~/" not in text, name
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            for value in re.findall(r"[\"']([^\"']*)[\"']", line):
                assert not os.path.isabs(value), (name, line)


def bound(text):
    """The parameters a config file binds itself (not by `include`)."""
    return [
        line.split(" = ")[0]
        for line in text.splitlines()
        if " = " in line and not line.startswith("#")
    ]


def test_privacy_utility_configs_differ_from_the_main_job_in_epsilon_only(
    clean_gin,
):
    experiment.parse_config([os.path.join(CONFIGS, "fashion_mnist.gin")])
    main_text = open(os.path.join(CONFIGS, "fashion_mnist.gin")).read()
    main = {key: gin.query_parameter(key) for key in bound(main_text)}
    assert main["build_optimizer.target_epsilon"] == 3.0
    for epsilon in (1, 2, 8):
        name = f"fashion_mnist_eps{epsilon}.gin"
        text = open(os.path.join(CONFIGS, name)).read()
        assert 'include "configs/fashion_mnist.gin"' in text
        assert bound(text) == ["build_optimizer.target_epsilon"], name
        gin.clear_config()
        experiment.parse_config([os.path.join(CONFIGS, name)])
        for key, value in main.items():
            want = float(epsilon) if key.endswith("target_epsilon") else value
            assert gin.query_parameter(key) == want, (name, key)


def test_validation_size_holds_out_the_last_training_examples(
    tmp_path, clean_gin
):
    make_image_folder(tmp_path / "images")
    plan = experiment.Plan(batch_size=8, epochs=1)
    full = experiment.build_data(
        plan, str(tmp_path), dataset="tiny", image_folder="images"
    )
    held = experiment.build_data(
        plan,
        str(tmp_path),
        dataset="tiny",
        image_folder="images",
        validation_size=12,
    )
    assert (full.num_examples, held.num_examples) == (32, 20)
    assert (full.eval_name, held.eval_name) == ("test", "validation")
    assert full.source == held.source == "image_folder"
    train = [y.numpy() for _, y in full.examples]
    assert [y.numpy() for _, y in held.examples] == train[:20]
    assert [y.numpy() for _, y in held.eval_examples()] == train[20:]
    # The accountant's N is the smaller one, and the Poisson pipeline samples
    # from those 20 examples only: its rate is B / 20.
    optimizer = experiment.build_optimizer(plan, held.num_examples)
    assert optimizer.num_examples == 20
    train = held.train_dataset(tf.distribute.get_strategy())
    assert kd.sampling.of(train).num_examples == 20
    # An optimizer told N = 32 (the rate a held-out run does not have, an
    # under-counted epsilon) is refused before any step.
    model = kd.DPSequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=experiment.build_optimizer(plan, full.num_examples),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.raises(ValueError, match="num_examples"):
        model.fit(train, verbose=0)
    assert int(model.optimizer.iterations) == 0
    with pytest.raises(ValueError, match="validation_size"):
        experiment.build_data(
            plan,
            str(tmp_path),
            dataset="tiny",
            image_folder="images",
            validation_size=32,
        )


def test_cifar_configs_share_a_base_and_differ_in_what_differs(clean_gin):
    base_text = open(os.path.join(CONFIGS, "cifar10_wrn_base.gin")).read()
    experiment.parse_config([os.path.join(CONFIGS, "cifar10_wrn_base.gin")])
    base = {key: gin.query_parameter(key) for key in bound(base_text)}
    # Only the target, the length and (at epsilon 8) the learning rate.
    own = {
        "build_optimizer.target_epsilon",
        "train_and_evaluate.epochs",
        "build_optimizer.learning_rate",
    }
    for epsilon, epochs in CIFAR_EPSILONS.items():
        name = f"cifar10_wrn_16_4_eps{epsilon}.gin"
        text = open(os.path.join(CONFIGS, name)).read()
        assert 'include "configs/cifar10_wrn_base.gin"' in text
        assert set(bound(text)) <= own, name
        gin.clear_config()
        experiment.parse_config([os.path.join(CONFIGS, name)])
        assert gin.query_parameter("build_optimizer.target_epsilon") == epsilon
        assert gin.query_parameter("train_and_evaluate.epochs") == epochs
        assert gin.query_parameter("build_optimizer.learning_rate") == (
            4.0 if epsilon == 8 else 2.0
        )
        for key, value in base.items():
            if key not in own:
                assert gin.query_parameter(key) == value, (name, key)
    gin.clear_config()
    experiment.parse_config(
        [os.path.join(CONFIGS, "cifar10_wrn_40_4_eps8.gin")]
    )
    assert gin.query_parameter("build_model.model") == "wrn_40_4"
    assert gin.query_parameter("build_optimizer.target_epsilon") == 8.0
    assert gin.query_parameter("build_data.augmult") == 16


class Preempted(Exception):
    pass


class Preempt(keras.callbacks.Callback):
    """Stops the run as a preemption would, after `after` physical batches."""

    def __init__(self, after):
        super().__init__()
        self.after, self.seen = after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after:
            raise Preempted(f"preempted after {self.seen} batches")


def tiny_run(tmp_path, monkeypatch, model_dir, *bindings):
    """`train_and_evaluate` of the TINY config, from `tmp_path`'s data."""
    gin.clear_config()
    experiment.parse_config([SMOKE], TINY + list(bindings))
    return experiment.train_and_evaluate(model_dir, None, str(tmp_path / "d"))


def test_a_gs_model_dir_trains_resumes_and_leaves_no_local_folder(
    tmp_path, monkeypatch, clean_gin
):
    # TensorFlow's in-memory filesystem stands in for gs://.
    make_image_folder(tmp_path / "d" / "images")
    importable_factories(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    root = f"ram://experiment_test/{os.getpid()}-{id(tmp_path)}"
    every_step = "run.checkpoint_every_n_steps = 1"
    want = tiny_run(tmp_path, monkeypatch, f"{root}/whole", every_step)
    # A run preempted in epoch 1 (after 6 of 8 steps), then started again.
    preempted = f"{root}/preempted"
    gin.clear_config()
    experiment.parse_config([SMOKE], TINY + [every_step, "run.export = False"])
    with gin.unlock_config():
        gin.bind_parameter("run.callbacks", [Preempt(after=6)])
    with pytest.raises(Preempted):
        experiment.train_and_evaluate(preempted, None, str(tmp_path / "d"))
    checkpoints = f"{preempted}/checkpoints"
    pointer = json.loads(storage.read_text(f"{checkpoints}/checkpoint.json"))
    assert (pointer["step"], pointer["epoch"], pointer["batch"]) == (6, 1, 2)
    assert not storage.exists(f"{preempted}/result.json")
    got = tiny_run(tmp_path, monkeypatch, preempted, every_step)
    # The same steps, ledger and guarantee as the uninterrupted run.
    for key in ("steps", "epsilon", "noise_multiplier", "sampling"):
        assert got[key] == want[key], key
    assert got["privacy_statement"] == want["privacy_statement"]
    assert got["steps"] == 8
    for model_dir, result in ((f"{root}/whole", want), (preempted, got)):
        names = storage.listdir(model_dir)
        assert {"checkpoints", "logs", "config.gin", "result.json"} <= set(
            names
        ), names
        saved = json.loads(storage.read_text(f"{model_dir}/result.json"))
        assert saved == result
        operative = storage.read_text(f"{model_dir}/operative_config.gin")
        assert "train_and_evaluate.batch_size = 8" in operative
        assert checkpoint.latest(f"{model_dir}/checkpoints").endswith(
            "ckpt-0000000008.npz"
        )
        record = json.loads(
            storage.read_text(f"{model_dir}/saved_model/assets/privacy.json")
        )
        assert record["epsilon"] == result["epsilon"]
    # Nothing under the working directory: no local folder named "ram:".
    assert sorted(os.listdir(tmp_path)) == ["d", "factories"]


def test_an_unwritable_model_dir_fails_before_training(
    tmp_path, monkeypatch, clean_gin
):
    # TINY imports tiny_factories: importable here, whatever ran before.
    importable_factories(tmp_path, monkeypatch)
    experiment.parse_config([SMOKE], TINY)
    with pytest.raises(OSError, match="model_dir '/proc/forbidden/run'"):
        # The data directory does not exist: the model_dir is checked first.
        experiment.train_and_evaluate(
            "/proc/forbidden/run", None, str(tmp_path / "none")
        )


def test_a_worker_that_is_not_chief_writes_nothing(
    tmp_path, monkeypatch, clean_gin
):
    make_image_folder(tmp_path / "d" / "images")
    importable_factories(tmp_path, monkeypatch)
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"worker": ["localhost:1", "localhost:2"]},
                "task": {"type": "worker", "index": 1},
            }
        ),
    )
    model_dir = tmp_path / "run"
    result = tiny_run(
        tmp_path,
        monkeypatch,
        str(model_dir),
        "train_and_evaluate.epochs = 1",
        "run.checkpoint_every_n_steps = 1",
    )
    assert result["steps"] == 4
    assert not model_dir.exists()  # no checkpoint, log, config or export


def test_features_are_computed_once_per_example_and_trained_on(
    tmp_path, monkeypatch, clean_gin
):
    make_image_folder(tmp_path / "images")
    plan = experiment.Plan(batch_size=8, epochs=1)
    scatter = kd.layers.Scattering2D(J=1, L=2)  # [8, 8, 3] -> [4, 4, 9]
    kwargs = dict(dataset="tiny", image_folder="images")
    images = experiment.build_data(plan, str(tmp_path), **kwargs)
    inputs = experiment.build_data(
        plan, str(tmp_path), features=scatter, validation_size=12, **kwargs
    )
    raw = np.stack([x.numpy() for x, _ in images.examples])
    want = scatter(kd.data.normalize(tf.constant(raw))).numpy()
    got = np.stack([x.numpy() for x, _ in inputs.examples])
    assert got.shape == (20, 4, 4, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, want[:20], atol=1e-5)
    held = np.stack([x.numpy() for x, _ in inputs.eval_examples()])
    np.testing.assert_allclose(held, want[20:], atol=1e-5)
    # The Poisson batches carry the features as they are (not rescaled
    # as uint8 images would be), sampled from the 20 kept examples.
    train = inputs.train_dataset(tf.distribute.get_strategy())
    assert kd.sampling.of(train).num_examples == 20
    x, _, extra = next(iter(train))
    rows = x.numpy()[extra["dp_mask"].numpy() > 0]
    assert len(rows) and all(
        np.abs(want[:20] - row).max(axis=(1, 2, 3)).min() < 1e-5 for row in rows
    )
    # The launcher trains the ScatterNet model on them.
    (tmp_path / "d").mkdir()
    os.rename(tmp_path / "images", tmp_path / "d" / "images")
    importable_factories(tmp_path, monkeypatch)
    result = tiny_run(
        tmp_path,
        monkeypatch,
        str(tmp_path / "run"),
        "build_data.features = @keras_dpscale.layers.Scattering2D()",
        "keras_dpscale.layers.Scattering2D.J = 1",
        "keras_dpscale.layers.Scattering2D.L = 2",
        'build_model.model = "scatternet_linear"',
        "build_model.model_kwargs = "
        "{'num_classes': 2, 'input_shape': (4, 4, 9), 'groups': 3}",
    )
    assert result["steps"] == 8 and 0 <= result["test_accuracy"] <= 1
    # The result and the SavedModel name the map; the SavedModel takes the
    # images (normalized), not the features.
    assert result["features"] == "Scattering2D(J=1, L=2)"
    saved = str(tmp_path / "run" / "saved_model")
    with open(os.path.join(saved, "assets", "privacy.json")) as f:
        assert json.load(f)["features"] == result["features"]
    loaded = tf.saved_model.load(saved)
    assert loaded.serve(kd.data.normalize(tf.constant(raw[:3]))).shape == (3, 2)
    with pytest.raises(ValueError, match="augmult"):
        experiment.build_data(
            plan, str(tmp_path / "d"), features=scatter, augmult=2, **kwargs
        )


def featurized(images, features, batch_size=4):
    labels = np.arange(len(images))
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    out = list(experiment.featurize(ds, features, batch_size=batch_size))
    assert [y.numpy() for _, y in out] == list(labels)  # order kept
    return np.stack([x.numpy() for x, _ in out])


def test_featurize_maps_each_example_alone_even_with_a_mixing_map():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4, 1)).astype(np.uint8)
    scale = lambda x: 2.0 * x  # noqa: E731
    np.testing.assert_allclose(
        featurized(images, scale),
        2.0 * kd.data.normalize(images).numpy(),
        atol=1e-6,
    )

    # A map that centres a batch on its mean mixes the examples of a batch;
    # applied to one example at a time it cannot: changing example 1 leaves
    # every other example's features as they were.
    def centre(x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True) + x

    before = featurized(images, centre)
    changed = images.copy()
    changed[1] = 255 - changed[1]
    after = featurized(changed, centre)
    np.testing.assert_array_equal(
        np.delete(after, 1, 0), np.delete(before, 1, 0)
    )
    np.testing.assert_allclose(
        before, kd.data.normalize(images).numpy(), atol=1e-6
    )


def test_featurize_refuses_a_map_that_keeps_state():
    # One example's pixels written into a variable that the next example's
    # features read: vectorizing alone would not keep them apart.
    total = tf.Variable(0.0)

    def remember(x):
        total.assign_add(tf.reduce_sum(x))
        return x * 0.0 + total.read_value()

    images = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="through state"):
        featurized(images, remember)
