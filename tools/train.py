"""DP training from a gin config: the README's first command.

    python tools/train.py                                 # configs/fashion_mnist.gin
    python tools/train.py --config configs/cifar10_wrn_16_4_eps8.gin \
        --gin_bindings "train_and_evaluate.epochs = 1" --strategy mirrored
    python tools/train.py --config configs/imagenet_nfnet_f3.gin --dry_run

The config states the data, the model and the DP settings (the builders of
`keras_dpscale.experiment`, called by `train_and_evaluate`). It names no
location: the data are read from --data_dir (default: the environment
variable KERAS_DPSCALE_DATA_DIR, else ../shared/data beside the
repository; see `experiment.default_data_dir`). The run prints a progress
bar with epsilon, writes TensorBoard logs, the operative config, result.json
and a SavedModel with the privacy record to --model_dir, and ends with one
line: test accuracy and epsilon. `tools/train_tpu.py` is the same launcher
with `--strategy tpu` as its default.

`--dry_run` checks a config without training: it builds the config's data
(a small synthetic ImageFolder stand-in when the dataset is absent), model
and optimizer, compiles one DP step (XLA, the padded Poisson batch's static
shape, a batch of --dry_run_batch_size) and runs it, then exits. It writes
nothing to --model_dir.
"""

import glob
import os
import sys
import tempfile
import time

# C++ logs: INFO and WARNING off. On a host without an NVIDIA driver the
# CUDA build of TensorFlow also logs an ERROR ("failed call to cuInit") on
# import; it means only "no GPU", so there the ERRORs go too. Python-side
# warnings (the library's privacy warnings) are not affected. Set the
# variable yourself to see everything.
os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2" if glob.glob("/dev/nvidia*") else "3"
)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from keras_dpscale import distribute  # noqa: E402
from keras_dpscale import experiment  # noqa: E402
from keras_dpscale import storage  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_multi_string(
    "config",
    [os.path.join(_ROOT, "configs", "fashion_mnist.gin")],
    "Gin config files.",
)
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (override).")
flags.DEFINE_string("model_dir", "/tmp/keras_dpscale", "Output directory.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Data directory: the config's image_folder/manual_dir are relative to "
    "it, and tfds reads prepared datasets from it (local or gs://). "
    f"Default: ${experiment.DATA_DIR_ENV}, else ../shared/data beside the "
    "repository.",
)
flags.DEFINE_enum(
    "strategy", "default", distribute.STRATEGIES, "tf.distribute strategy."
)
flags.DEFINE_string("tpu", None, "TPU name or address (--strategy tpu).")
flags.DEFINE_bool(
    "dry_run",
    False,
    "Build the config's data (synthetic if absent), model and optimizer, "
    "compile and run one DP step under XLA, and exit; no training, no "
    "output files.",
)
flags.DEFINE_integer(
    "dry_run_batch_size",
    8,
    "--dry_run: the expected logical batch size B of the step (the "
    "config's accumulation_steps are kept).",
)
flags.DEFINE_bool(
    "dry_run_step",
    True,
    "--dry_run: compile and run the DP step (false: build only).",
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    experiment.parse_config(FLAGS.config, FLAGS.gin_bindings)
    tool = os.path.basename(sys.argv[0])
    if not FLAGS.dry_run:
        try:  # before connecting to a TPU (train_and_evaluate checks again)
            storage.check_writable(FLAGS.model_dir)
        except OSError as e:
            sys.exit(f"{tool}: {e}")
    try:
        strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
    except distribute.StrategyUnavailableError as e:
        if not FLAGS.dry_run:
            sys.exit(f"{tool}: {e}")
        print(f"dry run: {e}\ndry run: continuing on the default strategy.")
        strategy = distribute.make_strategy("default")
    if FLAGS.dry_run:
        dry_run(
            strategy,
            FLAGS.data_dir,
            FLAGS.dry_run_batch_size,
            ", ".join(os.path.basename(c) for c in FLAGS.config),
            step=FLAGS.dry_run_step,
        )
        return
    result = experiment.train_and_evaluate(
        FLAGS.model_dir, strategy, FLAGS.data_dir
    )
    # `fit` has printed the privacy statement (the PrivacyBudget callback);
    # it is also in result.json.
    split = next(k for k in result if k.endswith("_accuracy"))
    print(
        f"{split.replace('_', ' ')} {result[split]:.4f}, epsilon "
        f"{result['epsilon']:.3f} at delta {result['delta']:g} "
        f"({result['steps']} steps of batch {result['batch_size']}, "
        f"noise multiplier {result['noise_multiplier']:.4g}, "
        f"{result['seconds']:.0f} s); model in {FLAGS.model_dir}"
    )


# --dry_run -----------------------------------------------------------------

# Synthetic stand-ins: the raw image shape of a dataset (the config's
# preprocessing, if any, resizes them as it would the real ones).
_RAW_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1)}
_DEFAULT_RAW_SHAPE = (32, 32, 3)


def _plan(batch_size):
    """The config's `Plan` (`train_and_evaluate`'s bindings), B replaced."""
    import inspect

    import gin

    signature = inspect.signature(experiment.train_and_evaluate)
    settings = {
        name: p.default
        for name, p in signature.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    settings.update(gin.get_bindings("train_and_evaluate"))
    settings["batch_size"] = batch_size * settings["accumulation_steps"]
    return experiment.Plan(**settings)


def _synthetic_image_folder(root, shape, per_class=8, num_classes=2):
    """A tiny ImageFolder tree (`train/`, `test/`) of random PNG images."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(num_classes):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                png = tf.io.encode_png(image).numpy()
                with open(os.path.join(folder, f"{i}.png"), "wb") as f:
                    f.write(png)
    return root


def _build_data(plan, data_dir, scratch):
    """The config's data, or the same builder on a synthetic stand-in."""
    import dataclasses

    import gin

    try:
        inputs = experiment.build_data(plan, data_dir)
        return inputs, f"N={inputs.num_examples} from {data_dir or 'default'}"
    except Exception as e:  # noqa: BLE001 -- any absent source: stand in
        reason = str(e).splitlines()[0]
    dataset = gin.get_bindings("build_data").get("dataset", "fashion_mnist")
    shape = _RAW_SHAPES.get(dataset, _DEFAULT_RAW_SHAPE)
    if dataset.startswith("imagenet"):
        shape = (48, 48, 3)  # resized by the config's preprocessing
    # 4 B examples (Poisson rate 1/4), at least 16.
    per_class = max(8, 2 * plan.batch_size)
    root = _synthetic_image_folder(
        os.path.join(scratch, "synthetic"), shape, per_class
    )
    random_access = gin.get_bindings("build_data").get("random_access")
    with gin.unlock_config():
        gin.bind_parameter("build_data.image_folder", root)
        gin.bind_parameter("build_data.source", "image_folder")
        gin.bind_parameter("build_data.random_access", False)
        gin.bind_parameter("build_data.eval_split", "test")
    inputs = experiment.build_data(plan, data_dir)
    if random_access:  # read by index, as the config's tfds.data_source
        pairs = [(x.numpy(), y.numpy()) for x, y in inputs.examples]
        inputs = dataclasses.replace(inputs, examples=pairs)
    kind = " (random access)" if random_access else ""
    return inputs, (
        f"synthetic stand-in{kind}, N={inputs.num_examples} images of "
        f"{'x'.join(map(str, shape))} ({dataset} not found: {reason[:120]})"
    )


def dry_run(strategy, data_dir, batch_size, config="config", step=True):
    """Builds the parsed config's parts; compiles and runs one DP step.

    Args:
        strategy: the `tf.distribute.Strategy` to build in.
        data_dir: the data directory (`build_data`); where the dataset is
            absent, a small synthetic ImageFolder stands in.
        batch_size: the expected physical batch size (B is this times the
            config's accumulation steps).
        config: the config's name, for the printed lines.
        step: also compile (XLA) and run one logical DP step.

    Returns:
        A dict: the model's name and parameter count, N, the noise
        multiplier, the batches' shapes and the steps run.
    """
    import keras
    import tensorflow as tf

    started = time.time()
    plan = _plan(batch_size)
    keras.utils.set_random_seed(plan.seed)
    with tempfile.TemporaryDirectory() as scratch:
        inputs, where = _build_data(plan, data_dir, scratch)
        print(f"dry run: {config}: data: {where}")
        with strategy.scope():
            model = experiment.build_model()
            optimizer = experiment.build_optimizer(plan, inputs.num_examples)
            experiment.compile_model(model, optimizer)
        print(
            f"dry run: model {model.name}: {model.count_params():,} "
            f"parameters, input {tuple(model.inputs[0].shape)}; optimizer "
            f"{type(optimizer).__name__}, noise multiplier "
            f"{float(optimizer.noise_multiplier):.4g}, B={plan.batch_size}, "
            f"accumulation {plan.accumulation_steps}; "
            f"{time.time() - started:.0f} s"
        )
        summary = {
            "model": model.name,
            "params": model.count_params(),
            "num_examples": inputs.num_examples,
            "noise_multiplier": float(optimizer.noise_multiplier),
            "steps": 0,
        }
        if not step:
            print("dry run: ok (built; no step: --nodry_run_step)")
            return summary
        xla = bool(model.jit_compile or getattr(model, "_jit_per_replica", 0))
        if not xla:
            raise RuntimeError("the DP step is not XLA-compiled (jit_compile)")
        train = inputs.train_dataset(strategy)
        spec = getattr(train, "element_spec", None)
        if spec is not None:
            shapes = [s.shape for s in tf.nest.flatten(spec)]
            if not all(s.is_fully_defined() for s in shapes):
                raise RuntimeError(
                    f"the batches' shapes are not static: {spec}"
                )
            summary["shapes"] = [tuple(s) for s in shapes]
            print(
                "dry run: batch shapes (static): "
                + ", ".join(str(tuple(s)) for s in shapes)
            )
        step_started = time.time()
        model.fit(
            train,
            epochs=1,
            steps_per_epoch=plan.accumulation_steps,
            verbose=0,
        )
        steps = int(optimizer.iterations)
        if steps < 1:
            raise RuntimeError("the DP step did not run")
        print(
            f"dry run: ok: {steps} DP step compiled (XLA) and run in "
            f"{time.time() - step_started:.0f} s; {time.time() - started:.0f} s "
            "in all"
        )
        summary["steps"] = steps
        return summary


if __name__ == "__main__":
    app.run(main)
