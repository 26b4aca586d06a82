"""Atomic checkpoints of DP training, and resuming it where it stopped.

A checkpoint holds every variable of the model (weights, non-trainable
variables, the privacy ledger and the layers' `SeedGenerator` states, so
dropout continues its random stream) and of its optimizer (`iterations`,
the learning rate, momentum and EMA averages, and the DP state: the
micro-step, sigma and the gradient accumulators), with the training
position: the logical step, the epoch and the physical batch within it.
Checkpoints are taken at logical-step boundaries only, so the accumulators
are empty and no half-accumulated batch is ever lost or counted twice.

Storage. Every file goes through `tf.io.gfile` (`keras_dpscale.storage`),
so the directory may be local or a `gs://` URL (a preempted Cloud TPU run
resumes from its bucket). The format stays one `.npz` file per checkpoint,
not `tf.train.Checkpoint`, by choice: one file is one object on GCS, which
appears complete or not at all, while `tf.train.Checkpoint` writes an index
and data shards that a preemption can leave half-written; the npz keeps the
checks this module makes (variables matched by count, order and shape,
every array's CRC read back, the position and the batch size B in the same
file as the weights and the ledger, so they cannot disagree), and the
checkpoints of earlier runs still load. The whole file is built in memory,
then written in one piece.

Atomicity. Each checkpoint is written under a temporary name in the same
directory (flushed and, on a local disk, fsynced), then renamed
(`tf.io.gfile.rename`, atomic in POSIX; on GCS the object appears only
when complete) to `ckpt-<step>.npz`; only then is the small pointer file
`checkpoint.json` (the newest name and position, for people and tools)
replaced the same way, and the oldest checkpoints beyond `keep` deleted. A
process killed at any moment (SIGKILL included) leaves the previous
checkpoints intact and at worst a temporary file, which readers ignore and
the next `Checkpoint` deletes. `restore` loads the newest checkpoint that
reads back completely (zip CRCs checked), falling back to older ones.

Several workers. Every worker restores from the directory, but only the
chief writes to it: another worker writes its checkpoints to a temporary
local directory that is deleted at once (`storage.writer_dir`).

The noise seed is not saved (it is a secret: who knows it can remove the
noise), so a resumed run draws fresh noise, which is as private. With a
`noise_seed` given for tests, the noise of step t depends only on t, and a
resumed run repeats an uninterrupted one exactly.

Resuming (the launcher's recipe):

```python
ckpt = keras_dpscale.checkpoint.Checkpoint(directory, every_n_steps=100)
state = keras_dpscale.checkpoint.restore(model, directory)  # None: fresh
model.fit(
    dataset,  # positioned at the start of epoch `state.epoch` (see below)
    epochs=epochs,
    initial_epoch=state.epoch if state else 0,
    callbacks=[ckpt],
)
```

`restore` runs before `fit`, so that `callbacks.PrivacyBudget` starts from
the restored ledger; the final epsilon and step count are those of an
uninterrupted run. In the first epoch the `Checkpoint` callback skips the
`state.batch` physical batches that the interrupted run already trained on:
it draws them from the dataset without training on them, so Keras' epochs,
logs and callbacks keep their usual boundaries. The dataset must therefore
hold the batches from where epoch `state.epoch` started:

- a Poisson stream (`data.train_dataset`, `data.poisson_dataset`): a new
  stream of the steps left from the start of that epoch. Its sample is
  secret and fresh, so the resumed run never replays a step that the
  ledger already counted, and the skipped batches were never trained on;
- a shuffled stream over all epochs with `steps_per_epoch=S` physical
  batches: `stream.skip(state.epoch * S)`; a dataset that `fit` iterates
  anew each epoch: the same dataset.
"""

import dataclasses
import io
import json
import logging
import os
import re
import weakref
import zipfile

import keras
import numpy as np
import tensorflow as tf

from keras_dpscale import storage

FORMAT_VERSION = 1
POINTER = "checkpoint.json"
_PREFIX = "ckpt-"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")

# States that `restore` returned, for the `Checkpoint` callback of the next
# `fit` to skip the batches of the current epoch that were already used.
_RESTORED = weakref.WeakKeyDictionary()

_log = logging.getLogger("keras_dpscale")


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """Where a checkpointed run stood.

    Attributes:
        step: logical steps taken (`optimizer.iterations`).
        epoch: the epoch to resume in: `fit(..., initial_epoch=epoch)`.
        batch: physical batches of that epoch already trained on (Keras'
            batch count; 0 at an epoch boundary).
        path: the checkpoint file.
    """

    step: int
    epoch: int
    batch: int
    path: str


def _accumulation_steps(optimizer):
    return int(getattr(optimizer, "accumulation_steps", 1))


def _at_step_boundary(optimizer):
    """True if no logical batch is half accumulated."""
    micro_step = getattr(optimizer, "_micro_step", None)
    if micro_step is None:
        return True
    return int(micro_step.numpy()) % _accumulation_steps(optimizer) == 0


def _checked_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError("Checkpointing needs a compiled model.")
    return optimizer


def _variables(model):
    """`(model variables, optimizer variables)`, in their fixed order."""
    return list(model.variables), list(_checked_optimizer(model).variables)


def checkpoints(directory):
    """The checkpoint files in `directory`, newest (highest step) first."""
    found = []
    for name in storage.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), storage.join(directory, name)))
    return [path for _, path in sorted(found, reverse=True)]


def save(model, directory, epoch, batch=0, keep=2):
    """Writes a checkpoint of `model` and its optimizer, atomically.

    Args:
        model: a built, compiled model.
        directory: where checkpoints go (created if missing): a local path
            or a URL such as `gs://bucket/run/checkpoints`.
        epoch: the epoch that a resumed run starts in.
        batch: physical batches of `epoch` already trained on.
        keep: how many checkpoints to keep (the newest ones; at least 1).

    Returns:
        The path of the new checkpoint. Only the chief writes it: another
        worker of a multi-worker strategy writes to a temporary directory,
        deleted at once (see the module docstring).

    Raises:
        ValueError: in the middle of a logical batch (the optimizer holds
            gradients accumulated for a step not yet taken).
    """
    optimizer = _checked_optimizer(model)
    if not optimizer.built:
        raise ValueError(
            "The optimizer has no variables yet: checkpoint after training "
            "has started, or build it with optimizer.build(...)."
        )
    if not _at_step_boundary(optimizer):
        raise ValueError(
            "Checkpoints are taken between logical steps only: the optimizer "
            "is in the middle of accumulating a logical batch."
        )
    step = int(optimizer.iterations.numpy())
    model_vars, optimizer_vars = _variables(model)
    arrays = {f"model/{i}": v.numpy() for i, v in enumerate(model_vars)}
    arrays.update(
        {f"optimizer/{i}": v.numpy() for i, v in enumerate(optimizer_vars)}
    )
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": int(epoch),
        "batch": int(batch),
        "accumulation_steps": _accumulation_steps(optimizer),
        "noise_multiplier": getattr(optimizer, "noise_multiplier", None),
        "batch_size": getattr(optimizer, "batch_size", None),
        "model_variables": [v.path for v in model_vars],
        "optimizer_variables": [v.path for v in optimizer_vars],
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with io.BytesIO() as buffer:
        np.savez(buffer, **arrays)
        del arrays
        data = buffer.getvalue()
    name = f"{_PREFIX}{step:010d}.npz"
    pointer = {
        "latest": name,
        **{k: meta[k] for k in ("step", "epoch", "batch")},
    }
    directory = os.fspath(directory)
    with storage.writer_dir(directory, model.distribute_strategy) as target:
        storage.makedirs(target)
        storage.write_bytes(storage.join(target, name), data)
        storage.write_text(storage.join(target, POINTER), json.dumps(pointer))
        for old in checkpoints(target)[max(int(keep), 1) :]:
            storage.remove(old)
    return storage.join(directory, name)


def _load(path):
    """`(meta, arrays)` of a checkpoint, or None if it does not read back."""
    try:
        data = io.BytesIO(storage.read_bytes(path))
        with np.load(data, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}  # checks the CRCs
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown format {meta.get('format')}")
        for kind in ("model", "optimizer"):
            for i in range(len(meta[f"{kind}_variables"])):
                if f"{kind}/{i}" not in arrays:
                    raise KeyError(f"{kind} variable {i} is missing")
        return meta, arrays
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        tf.errors.OpError,
    ) as e:
        _log.warning("Skipping the unreadable checkpoint %s: %s", path, e)
        return None


def latest(directory):
    """The path of the newest complete checkpoint in `directory`, or None."""
    for path in checkpoints(directory):
        if _load(path) is not None:
            return path
    return None


def _assign(variables, arrays, kind, paths):
    if len(variables) != len(paths):
        raise ValueError(
            f"The checkpoint has {len(paths)} {kind} variables, this model "
            f"{len(variables)}: it was written for another model or "
            "optimizer configuration (accumulation_steps, use_ema, momentum)."
        )
    values = [arrays[f"{kind}/{i}"] for i in range(len(paths))]
    for v, value, path in zip(variables, values, paths):
        if tuple(v.shape) != value.shape:
            raise ValueError(
                f"The checkpoint's {kind} variable '{path}' has shape "
                f"{value.shape}, but '{v.path}' here has {tuple(v.shape)}."
            )
    for v, value in zip(variables, values):
        v.assign(value)


def restore(model, directory):
    """Loads the newest complete checkpoint into a built, compiled model.

    Restores every variable of the model and optimizer (see the module
    docstring) and the optimizer's sigma and batch size (set
    `optimizer.noise_multiplier` afterwards to change sigma: the ledger
    records each step's), and remembers the position for the `Checkpoint`
    callback of the next `fit`, which skips the batches of the current epoch
    that were already used.

    Args:
        model: built and compiled as the checkpointed one was (the same
            layers, optimizer class and options).
        directory: the `Checkpoint` directory.

    Returns:
        A `TrainingState`, or None if there is no complete checkpoint (a
        fresh start).
    """
    for path in checkpoints(directory):
        loaded = _load(path)
        if loaded is not None:
            break
    else:
        return None
    meta, arrays = loaded
    if not model.built:
        raise ValueError(
            "restore needs a built model: build it (or call it on a batch) "
            "before restoring."
        )
    optimizer = _checked_optimizer(model)
    accumulation_steps = _accumulation_steps(optimizer)
    if meta["batch"] and meta["accumulation_steps"] != accumulation_steps:
        raise ValueError(
            f"The checkpoint stopped within an epoch with "
            f"accumulation_steps={meta['accumulation_steps']}; resume with "
            f"the same (not {accumulation_steps}), or from an epoch end."
        )
    if not optimizer.built:
        with model.distribute_strategy.scope():
            optimizer.build(model.trainable_variables)
    model_vars, optimizer_vars = _variables(model)
    _assign(model_vars, arrays, "model", meta["model_variables"])
    _assign(optimizer_vars, arrays, "optimizer", meta["optimizer_variables"])
    if meta.get("noise_multiplier") is not None and hasattr(
        optimizer, "noise_multiplier"
    ):
        have, saved = optimizer.batch_size, meta["batch_size"]
        if None not in (have, saved) and have != saved:
            raise ValueError(
                f"The checkpoint was trained with batch_size={saved}, but "
                f"the optimizer has batch_size={have}: the ledger would "
                "record the wrong sampling rate. Resume with the same "
                "batch size, or start a new model_dir."
            )
        optimizer.dp_config = optimizer.dp_config.with_noise_multiplier(
            meta["noise_multiplier"],
            batch_size=have if saved is None else saved,
        )
    state = TrainingState(meta["step"], meta["epoch"], meta["batch"], path)
    _RESTORED[model] = state
    _log.info(
        "Restored %s: step %d, epoch %d, batch %d.",
        path,
        state.step,
        state.epoch,
        state.batch,
    )
    return state


class Checkpoint(keras.callbacks.Callback):
    """Saves atomic checkpoints during `fit`; resumes at the saved batch.

    Saves every `every_n_steps` logical steps (at the first logical-step
    boundary after them) and at the end of each epoch, keeping the newest
    `keep`. After `restore(model, directory)`, the first epoch of the next
    `fit` skips the `state.batch` batches already trained on; `fit` must
    then start at `initial_epoch=state.epoch` (it raises otherwise). See
    the module docstring for the whole recipe.

    Args:
        directory: where the checkpoints go.
        every_n_steps: logical steps between checkpoints; None: at epoch
            ends only.
        save_at_epoch_end: also save at the end of each epoch (when it ends
            on a logical-step boundary).
        keep: how many checkpoints to keep (>= 1).
    """

    def __init__(
        self, directory, every_n_steps=None, save_at_epoch_end=True, keep=2
    ):
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(
                f"every_n_steps must be None or >= 1, got {every_n_steps}."
            )
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        self.directory = os.fspath(directory)
        self.every_n_steps = every_n_steps
        self.save_at_epoch_end = save_at_epoch_end
        self.keep = int(keep)
        self._resume = None
        self._skip = 0
        self._train_function = None

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def save(self, epoch, batch):
        """Saves now (at a logical-step boundary); returns the path."""
        path = save(self.model, self.directory, epoch, batch, self.keep)
        self._last_saved = self._step()
        _log.debug("Saved %s.", path)
        return path

    def on_train_begin(self, logs=None):
        if storage.is_chief(self.model.distribute_strategy):
            storage.makedirs(self.directory)
            for name in storage.listdir(self.directory):  # a killed writer's
                if storage.is_temporary(name):
                    storage.remove(storage.join(self.directory, name))
        self._last_saved = self._step()
        self._epoch, self._batches = None, 0
        self._resume = _RESTORED.pop(self.model, None)
        if self._resume is not None and self._resume.batch:
            self._skip = self._resume.batch
            self._train_function = self.model.train_function
            self.model.train_function = self._skipping_train_function

    def _skipping_train_function(self, iterator):
        """Draws `steps_per_execution` batches without training on them."""
        for _ in range(int(self.model.steps_per_execution or 1)):
            if self._skip == 0:
                break
            try:
                next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise StopIteration from None
            self._skip -= 1
        if self._skip == 0:
            self._stop_skipping()
        return {}

    def _stop_skipping(self):
        self._skip = 0
        if self._train_function is not None:
            self.model.train_function = self._train_function
            self._train_function = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._resume is not None:
            if epoch != self._resume.epoch:
                self._stop_skipping()
                raise ValueError(
                    f"The restored run stopped in epoch {self._resume.epoch} "
                    f"(batch {self._resume.batch}); pass initial_epoch="
                    f"{self._resume.epoch} to fit, not {epoch}."
                )
            self._resume = None
        elif self._epoch is not None:
            self._stop_skipping()  # the dataset ended within the skip
        self._epoch, self._batches = epoch, 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches = batch + 1
        if (
            self.every_n_steps is not None
            and self._step() - self._last_saved >= self.every_n_steps
            and _at_step_boundary(self.model.optimizer)
        ):
            self.save(self._epoch, self._batches)

    def on_epoch_end(self, epoch, logs=None):
        if not self.save_at_epoch_end:
            return
        if not _at_step_boundary(self.model.optimizer):
            _log.warning(
                "Epoch %d ends within a logical batch (its batch count is "
                "not a multiple of accumulation_steps): no checkpoint.",
                epoch,
            )
            return
        steps = (self.params or {}).get("steps")
        complete = steps is not None and self._batches >= steps
        if self.model.stop_training and not complete:  # stopped within it
            self.save(epoch, self._batches)
        else:
            self.save(epoch + 1, 0)

    def on_train_end(self, logs=None):
        self._stop_skipping()
