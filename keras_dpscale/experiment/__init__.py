"""One DP training run, configured by gin: data, model, optimizer, run.

The launchers (`tools/train.py`, `tools/train_tpu.py`) parse the gin files
(`parse_config`), create the strategy (`distribute.make_strategy`) and call
`train_and_evaluate`, which calls one gin-configurable builder per part:

    train_and_evaluate  the public plan: B, epochs, accumulation, sampling,
                        seed, delta (`Plan`), shared by all the builders
    build_data          the dataset, its sources, augmult, preprocessing,
                        or fixed features (`featurize`; learned on public
                        data: `PublicPretraining`)
    build_model         the network: a registered name or any factory
    build_optimizer     DPSGD or DPAdam, learning rate (or schedule), C,
                        sigma or a target epsilon, EMA
    compile_model       the private step's settings: clipping, microbatches
    run                 fit (resuming), checkpoints, evaluation, export,
                        result.json

A config binds their arguments (`configs/*.gin`); it never names a data
location, which comes from the launcher (`build_data`, `--data_dir`).
"""

import contextlib
import os
import time

import gin
import keras
import tensorflow as tf

from keras_dpscale import storage
from keras_dpscale.experiment.inputs import DATA_DIR_ENV
from keras_dpscale.experiment.inputs import REPOSITORY
from keras_dpscale.experiment.inputs import Inputs
from keras_dpscale.experiment.inputs import build_data
from keras_dpscale.experiment.inputs import default_data_dir
from keras_dpscale.experiment.inputs import featurize
from keras_dpscale.experiment.model import build_model
from keras_dpscale.experiment.model import compile_model
from keras_dpscale.experiment.optimizer import OPTIMIZERS
from keras_dpscale.experiment.optimizer import build_optimizer
from keras_dpscale.experiment.plan import Plan
from keras_dpscale.experiment.public import PublicPretraining
from keras_dpscale.experiment.training import evaluate
from keras_dpscale.experiment.training import run


def parse_config(config_files, bindings=()):
    """Parses gin config files, then bindings that override them.

    A config may `include` another by its path in the repository
    (`include "configs/cifar10_wrn_base.gin"`): includes are read from the
    repository's root, whatever the working directory.

    Args:
        config_files: paths of gin files, parsed in order.
        bindings: gin binding strings, parsed last.
    """
    config_files = [os.path.abspath(path) for path in config_files]
    with contextlib.chdir(REPOSITORY):
        gin.parse_config_files_and_bindings(config_files, bindings)


@gin.configurable(denylist=["model_dir", "strategy", "data_dir"])
def train_and_evaluate(
    model_dir,
    strategy=None,
    data_dir=None,
    *,
    batch_size=1024,
    epochs=20,
    accumulation_steps=1,
    sampling="poisson",
    seed=0,
    target_delta=1e-5,
):
    """Trains a `DPModel` privately, evaluates it, exports it.

    Args:
        model_dir: where the run's outputs go (see `run`): a local path or
            a URL such as `gs://bucket/run`, read and written through
            `tf.io.gfile`; under a multi-worker strategy only the chief
            writes there.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        data_dir: the data directory (see `build_data`).
        batch_size, epochs, accumulation_steps, sampling, seed,
            target_delta: the run's `Plan`. T = epochs * round(N / B)
            logical steps.

    Returns:
        The result of `run`: test accuracy, epsilon, delta, sigma, steps,
        seconds, ...

    Raises:
        OSError: `model_dir` cannot be written (checked before anything
            else is done).
    """
    started = time.time()
    strategy = strategy or tf.distribute.get_strategy()
    storage.check_writable(model_dir, strategy)  # before any work
    keras.utils.set_random_seed(seed)
    plan = Plan(
        batch_size=batch_size,
        epochs=epochs,
        accumulation_steps=accumulation_steps,
        sampling=sampling,
        seed=seed,
        target_delta=target_delta,
    )
    inputs = build_data(plan, data_dir)
    with strategy.scope():
        model = build_model()
        compile_model(model, build_optimizer(plan, inputs.num_examples))
    return run(model, inputs, model_dir, strategy, started)


__all__ = [
    "DATA_DIR_ENV",
    "Inputs",
    "OPTIMIZERS",
    "Plan",
    "PublicPretraining",
    "REPOSITORY",
    "build_data",
    "build_model",
    "build_optimizer",
    "compile_model",
    "default_data_dir",
    "evaluate",
    "featurize",
    "parse_config",
    "run",
    "train_and_evaluate",
]
