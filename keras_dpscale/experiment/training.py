"""`run`: fit (resuming from checkpoints), evaluate, export, write results.

Every file under `model_dir` goes through `tf.io.gfile`
(`keras_dpscale.storage`), so `model_dir` may be `gs://bucket/run`; under a
multi-worker strategy only the chief writes there.
"""

import json
import time

import gin
import keras

from keras_dpscale import checkpoint
from keras_dpscale import export as export_lib
from keras_dpscale import storage


@gin.configurable(
    denylist=["model", "inputs", "model_dir", "strategy", "started"]
)
def run(
    model,
    inputs,
    model_dir,
    strategy,
    started=None,
    *,
    checkpoint_every_n_steps=None,
    export=True,
    verbose="auto",
    callbacks=(),
):
    """Trains a compiled model for the plan's epochs and reports the result.

    A run started again with the same `model_dir` resumes from the newest
    checkpoint (a finished run only evaluates and exports again). Only the
    chief writes under `model_dir` (`storage.is_chief`); every worker
    resumes from it.

    Args:
        model: a compiled `DPModel` (`compile_model`).
        inputs: the run's `Inputs` (`build_data`).
        model_dir: where TensorBoard logs (`logs`), checkpoints
            (`checkpoints`), the config (`config.gin`), the operative config
            (`operative_config.gin`, written at the start and the end), the
            result (`result.json`) and the SavedModel (`saved_model`) go: a
            local path or a URL such as `gs://bucket/run`. It must be
            writable (checked first).
        strategy: the `tf.distribute.Strategy` the model was built in.
        started: `time.time()` at the start of the run (default: now).
        checkpoint_every_n_steps: logical steps between checkpoints (also
            taken at each epoch end).
        export: write a SavedModel with the privacy record.
        verbose: `fit`'s verbosity.
        callbacks: more Keras callbacks for `fit`, after the TensorBoard and
            checkpoint ones.

    Returns:
        The result: test accuracy, epsilon, delta, sigma, steps, B, N,
        sampling, the privacy statement and the seconds taken.
    """
    started = time.time() if started is None else started
    storage.check_writable(model_dir, strategy)
    plan = inputs.plan
    checkpoints = storage.join(model_dir, "checkpoints")
    state = checkpoint.restore(model, checkpoints)
    initial_epoch = state.epoch if state else 0
    train = inputs.train_dataset(strategy, initial_epoch)
    _write(model_dir, "config.gin", gin.config_str(), strategy)
    _write_operative_config(model_dir, strategy)
    if initial_epoch >= plan.epochs:  # resumed a finished run: no training
        if model.optimizer.use_ema:  # as `fit` does at its end
            model.optimizer.finalize_variable_values(model.trainable_variables)
    else:
        logs = storage.join(model_dir, "logs")
        with storage.writer_dir(logs, strategy) as logs:
            model.fit(
                train,
                epochs=plan.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=inputs.steps_per_epoch
                * plan.accumulation_steps,
                callbacks=[
                    keras.callbacks.TensorBoard(logs),
                    checkpoint.Checkpoint(
                        checkpoints, checkpoint_every_n_steps
                    ),
                    *(callbacks or ()),
                ],
                verbose=verbose,
            )
    # After fit, Keras has put the EMA weights (if any) into the model.
    result = evaluate(model, inputs)
    if export:
        export_lib.export_saved_model(
            model,
            storage.join(model_dir, "saved_model"),
            input_shape=inputs.image_shape,
            features=inputs.features,
        )
    result["seconds"] = round(time.time() - started, 1)
    _write_operative_config(model_dir, strategy)
    _write(model_dir, "result.json", json.dumps(result, indent=2), strategy)
    return result


def evaluate(model, inputs):
    """Test accuracy and the privacy guarantee of a trained model.

    Args:
        model: the trained `DPModel`.
        inputs: the run's `Inputs` (evaluation split, B, N, delta).

    Returns:
        A dict: the accuracy on the evaluation split (`test_accuracy`,
        whatever the split's tfds name), or on the examples held out of
        the training set (`validation_accuracy`),
        epsilon at the plan's delta, sigma, the steps in the ledger, B, N,
        the sampling, the data's source and the privacy statement; with
        a fixed feature map (`build_data(features=...)`), its name
        (`features`), and the statement says that epsilon does not cover
        it.
    """
    delta = inputs.plan.target_delta
    ledger = model.privacy_ledger()
    test = inputs.eval_dataset()
    accuracy = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    statement, features = model.privacy_statement(delta), {}
    if inputs.features is not None:
        statement += " " + export_lib.feature_map_claim(inputs.features)
        features["features"] = export_lib.feature_map_name(inputs.features)
    return {
        f"{inputs.eval_name}_accuracy": float(accuracy),
        "epsilon": float(model.epsilon(delta)),
        "delta": delta,
        "noise_multiplier": float(model.optimizer.noise_multiplier),
        "steps": sum(s.steps for s in ledger),
        "batch_size": inputs.plan.batch_size,
        "num_examples": inputs.num_examples,
        "sampling": ", ".join(sorted({s.sampling for s in ledger})),
        "data_source": inputs.source,
        "privacy_statement": statement,
        **features,
    }


def _write(model_dir, name, text, strategy):
    """Writes `model_dir/name` on the chief; another worker writes nothing."""
    if storage.is_chief(strategy):
        storage.write_text(storage.join(model_dir, name), text)


def _write_operative_config(model_dir, strategy):
    """The parameters that the run's configurables have used so far."""
    _write(
        model_dir, "operative_config.gin", gin.operative_config_str(), strategy
    )
