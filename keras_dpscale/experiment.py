"""One DP training run, configured by gin: data, model, DPSGD, fit, evaluate.

The launchers (`tools/train.py`, `tools/train_tpu.py`) parse the gin files,
create the strategy (`distribute.make_strategy`) and call
`train_and_evaluate`; everything a run needs is an argument of that one
function, so a config file reads as the run's full description
(`configs/*.gin`).
"""

import json
import os
import time

import gin
import keras
import tensorflow as tf

from keras_dpscale import checkpoint
from keras_dpscale import data
from keras_dpscale import models
from keras_dpscale import optimizers
from keras_dpscale import sampling as sampling_lib
from keras_dpscale import transfer
from keras_dpscale.data import imagenet

gin.external_configurable(imagenet.preprocess, "imagenet_preprocess")
gin.external_configurable(imagenet.augmult_crops, "imagenet_augmult_crops")


@gin.configurable(denylist=["model_dir", "strategy"])
def train_and_evaluate(
    model_dir,
    strategy=None,
    *,
    dataset="fashion_mnist",
    data_kwargs=None,
    random_access=False,
    eval_split="test",
    preprocess=None,
    eval_preprocess=None,
    augment=None,
    model="tanh_cnn",
    model_kwargs=None,
    init_checkpoint=None,
    freeze_until=None,
    batch_size=1024,
    accumulation_steps=1,
    microbatch_size=None,
    augmult=None,
    epochs=20,
    sampling="poisson",
    overflow_probability=1e-18,
    learning_rate=4.0,
    momentum=0.9,
    l2_norm_clip=0.1,
    rescale_to_unit_norm=False,
    noise_multiplier=None,
    target_epsilon=3.0,
    target_delta=1e-5,
    ema_momentum=None,
    eval_batch_size=1000,
    seed=0,
    checkpoint_every_n_steps=None,
    export=True,
    verbose="auto",
):
    """Trains a `DPModel` with DPSGD, evaluates it, exports it.

    Args:
        model_dir: where TensorBoard logs, the operative config, the result
            and the SavedModel go.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        dataset: a name for `data.load` ("fashion_mnist", "cifar10", ...).
        data_kwargs: `data.load` arguments (`image_folder`, `data_dir`,
            `manual_dir`).
        random_access: read the training set by index through
            `tfds.data_source` (ArrayRecord data; ImageNet) instead of
            holding it in memory (Poisson sampling only).
        eval_split: the split evaluated at the end.
        preprocess: per-example preprocessing of training images (e.g.
            `imagenet_preprocess` with `train=True`); default: scaling to
            [-1, 1]. `eval_preprocess`: the same for evaluation.
        augment: the augmentation of the augmult views (default: mirror
            padded crops and flips; `imagenet_augmult_crops()` for ImageNet).
        model: a `models.get` name; `model_kwargs` its arguments.
        init_checkpoint: weights to start from, all but the head: a
            published NFNet file (`*_haiku.npz`) or a `.keras` model.
        freeze_until: freeze the layers up to this one (head-only DP
            fine-tuning with "pool").
        batch_size: B, the (expected) logical batch size.
        accumulation_steps: physical batches per logical batch (one
            replica only, for now).
        microbatch_size: examples per chunk of the per-example gradient
            computation (memory only).
        augmult: K views per example (augmentation multiplicity), or None.
        epochs: training length: T = epochs * round(N / B) logical steps.
        sampling: "poisson" (the default pipeline) or "shuffle".
        overflow_probability: Poisson padding bound (see `data.poisson`).
        learning_rate, momentum, l2_norm_clip, rescale_to_unit_norm,
            noise_multiplier, target_epsilon, target_delta: `DPSGD`
            arguments; give `target_epsilon` to calibrate sigma.
        ema_momentum: parameter averaging (EMA) of the weights, or None;
            evaluation and export use the averaged weights.
        eval_batch_size: evaluation batch size.
        seed: seed of the initialization and the augmentations (public: it
            is written to the config). The Poisson sample is secret and
            fresh (`data.poisson`), never derived from it.
        checkpoint_every_n_steps: logical steps between checkpoints (in
            `model_dir/checkpoints`; also at each epoch end). A run started
            again with the same `model_dir` resumes from the newest one.
        export: write a SavedModel with the privacy record to
            `model_dir/saved_model`.
        verbose: `fit`'s verbosity.

    Returns:
        A dict: test accuracy, epsilon, delta, sigma, steps, seconds.
    """
    start = time.time()
    strategy = strategy or tf.distribute.get_strategy()
    os.makedirs(model_dir, exist_ok=True)
    keras.utils.set_random_seed(seed)
    if random_access:  # read by index (tfds ArrayRecord data; ImageNet)
        import tensorflow_datasets as tfds

        train_examples = tfds.data_source(
            dataset, split="train", **(data_kwargs or {})
        )
        num_examples = len(train_examples)
    else:
        train_examples = data.load(dataset, "train", **(data_kwargs or {}))
        num_examples = int(train_examples.cardinality())
        if num_examples < 0:
            num_examples = sum(1 for _ in train_examples)
    steps_per_epoch = max(1, round(num_examples / batch_size))
    steps = epochs * steps_per_epoch
    train_kwargs = dict(
        batch_size=batch_size,
        seed=seed,
        sampling=sampling,
        num_views=augmult,
        accumulation_steps=accumulation_steps,
    )
    if sampling == "poisson":
        train_kwargs.update(
            steps=steps, overflow_probability=overflow_probability
        )
    if preprocess is not None:
        train_kwargs["preprocess"] = preprocess
    if augment is not None:
        train_kwargs["augment"] = augment

    with strategy.scope():
        net = models.get(model, **(model_kwargs or {}))
        if init_checkpoint and init_checkpoint.endswith(".npz"):
            transfer.load_nfnet_checkpoint(net, init_checkpoint)
        elif init_checkpoint:
            transfer.load_backbone(net, init_checkpoint)
        if freeze_until:
            transfer.freeze(net, until=freeze_until)
        net.compile(
            optimizer=optimizers.DPSGD(
                learning_rate=learning_rate,
                momentum=momentum,
                l2_norm_clip=l2_norm_clip,
                rescale_to_unit_norm=rescale_to_unit_norm,
                noise_multiplier=noise_multiplier,
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                steps=steps if noise_multiplier is None else None,
                num_examples=num_examples,
                batch_size=batch_size,
                sampling=sampling,
                accumulation_steps=accumulation_steps,
                microbatch_size=microbatch_size,
                use_ema=ema_momentum is not None,
                ema_momentum=ema_momentum or 0.99,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    checkpoints = os.path.join(model_dir, "checkpoints")
    state = checkpoint.restore(net, checkpoints)
    initial_epoch = state.epoch if state else 0

    if sampling == "poisson":
        # Resuming: the steps left from the start of `initial_epoch`, from a
        # fresh secret sample (nothing is replayed; the `Checkpoint`
        # callback skips the batches of that epoch already trained on).
        train_kwargs["steps"] = steps - initial_epoch * steps_per_epoch
    drawn = []

    def train_fn(input_context=None):
        ds = data.train_dataset(
            train_examples, input_context=input_context, **train_kwargs
        )
        drawn.append(sampling_lib.of(ds))
        if sampling == "shuffle":  # a deterministic stream: resume in place
            done = initial_epoch * steps_per_epoch * accumulation_steps
            local = 1
            if input_context is not None:
                local = (
                    input_context.num_replicas_in_sync
                    // input_context.num_input_pipelines
                )
            ds = ds.skip(done * local)
        return ds

    if strategy.num_replicas_in_sync > 1:
        train = strategy.distribute_datasets_from_function(train_fn)
    else:
        train = train_fn()
    if drawn:
        sampling_lib.attach(train, drawn[0])

    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    if initial_epoch >= epochs:  # resumed a finished run: nothing to train
        if net.optimizer.use_ema:  # as `fit` does at its end
            net.optimizer.finalize_variable_values(net.trainable_variables)
    else:
        net.fit(
            train,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch * accumulation_steps,
            callbacks=[
                keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")),
                checkpoint.Checkpoint(checkpoints, checkpoint_every_n_steps),
            ],
            verbose=verbose,
        )
    optimizer = net.optimizer
    ledger = net.privacy_ledger()
    # After fit, Keras has put the EMA weights (if any) into the model.
    test = data.eval_dataset(
        data.load(dataset, eval_split, **(data_kwargs or {})),
        eval_batch_size,
        preprocess=eval_preprocess,
    )
    accuracy = net.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    result = {
        "test_accuracy": float(accuracy),
        "epsilon": float(net.epsilon(target_delta)),
        "delta": target_delta,
        "noise_multiplier": float(optimizer.noise_multiplier),
        "steps": sum(s.steps for s in ledger),
        "batch_size": batch_size,
        "num_examples": num_examples,
        "sampling": ", ".join(sorted({s.sampling for s in ledger})),
        "privacy_statement": net.privacy_statement(target_delta),
    }
    if export:
        from keras_dpscale import export as export_lib

        export_lib.export_saved_model(
            net, os.path.join(model_dir, "saved_model")
        )
    result["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    with open(os.path.join(model_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
