"""The privacy ledger: every DP step that trained a model's weights.

The ledger belongs to the model, not to its optimizer: it is a set of the
model's own (non-trainable) variables, so it accumulates across `compile`
calls and optimizers, and travels with the weights through `model.save` /
`keras.models.load_model`, the checkpoints (`keras_dpscale.checkpoint`) and
the SavedModel export. Each row is a segment of consecutive logical steps
with the same settings (`accounting.Segment`); a step whose settings differ
from the last row's (sigma changed, another batch size, dataset or
sampling) opens a new row, so a change is recorded, not lost. When all
`CAPACITY` rows are used, the last row absorbs further steps with the
settings that can only overstate epsilon (the smaller sigma, the larger
B/N, the weaker sampling).

The ledger also records the steps that a non-DP optimizer took on the
weights before they were wrapped (`make_private`), which no guarantee
covers, and it holds the sampling of the data being trained on now
(`set_sampling`, by `fit`), which each recorded step reads.
"""

import weakref

import tensorflow as tf

from keras_dpscale import accounting
from keras_dpscale import sampling as sampling_lib

CAPACITY = 32
COLUMNS = (
    "noise_multiplier",
    "batch_size",
    "num_examples",
    "sampling",
    "max_batch_size",
    "overflow_probability",
    "declared",
    "steps",
)
_SETTINGS = len(COLUMNS) - 1
# Sampling codes, from the strongest assumption to the weakest: a merged row
# keeps the larger code.
_CODES = ("poisson", "shuffle", "public", "unknown")
_MARK = "_keras_dpscale_ledger"


class PrivacyLedger:
    """The DP steps of a model's weights, in the model's own variables.

    Args:
        model: the `DPModel` (or `DPSequential`) that owns it.
    """

    def __init__(self, model):
        def weight(name, shape, dtype):
            return model.add_weight(
                name=name,
                shape=shape,
                dtype=dtype,
                initializer="zeros",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )

        self.table = weight("dp_ledger", (CAPACITY, len(COLUMNS)), "float64")
        self.size = weight("dp_ledger_size", (), "int64")
        self.non_private_steps = weight("dp_non_private_steps", (), "int64")
        # [code, overflow probability, declared] of the data trained on now:
        # set by `fit`, and deliberately not one of the model's weights, so
        # that a saved or restored value never outlives the `fit` it was for.
        self.current = tf.Variable(
            tf.zeros([3], tf.float64), trainable=False, name="dp_sampling"
        )
        self.set_sampling(sampling_lib.UNKNOWN)

    # -- Trace time: one logical step. -------------------------------------

    def record(self, noise_multiplier, batch_size, num_examples, rows):
        """Appends one logical step, in the graph (see the module docstring).

        Args:
            noise_multiplier: sigma of this step (a tensor).
            batch_size: B, the public divisor.
            num_examples: N (None if unknown: 0 is recorded).
            rows: the rows of the logical batch in the pipeline.
        """
        current = tf.convert_to_tensor(self.current)
        row = tf.stack(
            [
                tf.cast(noise_multiplier, tf.float64),
                tf.constant(batch_size, tf.float64),
                tf.constant(num_examples or 0, tf.float64),
                current[0],
                tf.constant(rows, tf.float64),
                current[1],
                current[2],
            ]
        )
        table = tf.convert_to_tensor(self.table)
        size = tf.convert_to_tensor(self.size)
        last = tf.maximum(size - 1, 0)
        # A gather, not `table[last]`: XLA needs a strided slice's bounds at
        # compile time and would recompile the step for each ledger size.
        last_row = tf.gather(table, last)
        same = (size > 0) & tf.reduce_all(tf.equal(last_row[:_SETTINGS], row))
        full = size >= CAPACITY
        # Merged: the smaller sigma and N, the larger B, rows, sampling code,
        # overflow probability and claim flag (all overstate epsilon).
        merged = tf.concat(
            [
                tf.minimum(last_row[:1], row[:1]),
                tf.maximum(last_row[1:2], row[1:2]),
                tf.minimum(last_row[2:3], row[2:3]),
                tf.maximum(last_row[3:_SETTINGS], row[3:]),
                last_row[_SETTINGS:] + 1,
            ],
            0,
        )
        new_row = tf.concat([row, [1.0]], 0)
        new_row = tf.where(same, last_row + _one_step(), new_row)
        new_row = tf.where(full & ~same, merged, new_row)
        index = tf.where(same | full, last, size)
        self.table.assign(
            tf.tensor_scatter_nd_update(table, [[index]], [new_row])
        )
        self.size.assign(tf.where(same | full, size, size + 1))

    # -- Eager. --------------------------------------------------------------

    def set_sampling(self, sampling):
        """The sampling that the coming steps' data were drawn with."""
        self.current.assign(
            [
                _CODES.index(sampling.kind),
                sampling.overflow_probability,
                float(sampling.declared),
            ]
        )

    def sampling(self):
        """The `sampling.Sampling` that coming steps will be recorded with."""
        code, overflow, declared = self.current.numpy().tolist()
        return sampling_lib.Sampling(
            _CODES[int(code)], overflow, bool(declared)
        )

    def segments(self):
        """The steps recorded so far, as a list of `accounting.Segment`."""
        rows = self.table.numpy()[: int(self.size.numpy())]
        return [
            accounting.Segment(
                noise_multiplier=float(sigma),
                batch_size=int(batch),
                sampling=_CODES[int(code)],
                steps=int(steps),
                max_batch_size=int(max_rows),
                num_examples=int(n) or None,
                overflow_probability=float(overflow),
                declared=bool(declared),
            )
            for sigma, batch, n, code, max_rows, overflow, declared, steps in rows
        ]

    def add_non_private_steps(self, steps):
        """Records steps that trained the weights without DP."""
        self.non_private_steps.assign_add(int(steps))

    def adopt(self, variables):
        """Makes this the ledger of `variables`; a ledger that held them
        before (another DP model over the same layers) is copied in first,
        so that its steps stay on the record."""
        for v in variables:
            previous = getattr(v, _MARK, lambda: None)()
            if previous is not None and previous is not self:
                self._copy(previous)
            object.__setattr__(v, _MARK, weakref.ref(self))

    def _copy(self, other):
        """Prepends `other`'s rows and non-DP steps (once)."""
        copied = getattr(self, "_copied", set())
        if id(other) in copied or int(other.size.numpy()) == 0:
            copied.add(id(other))
            self._copied = copied
            return
        mine = self.table.numpy()[: int(self.size.numpy())]
        theirs = other.table.numpy()[: int(other.size.numpy())]
        rows = list(theirs) + list(mine)
        while len(rows) > CAPACITY:  # merge the oldest rows conservatively
            a, b = rows.pop(0), rows.pop(0)
            rows.insert(0, _merge_rows(a, b))
        table = self.table.numpy() * 0
        table[: len(rows)] = rows
        self.table.assign(table)
        self.size.assign(len(rows))
        self.non_private_steps.assign_add(int(other.non_private_steps.numpy()))
        copied.add(id(other))
        self._copied = copied


def _one_step():
    step = [0.0] * len(COLUMNS)
    step[-1] = 1.0
    return tf.constant(step, tf.float64)


def _merge_rows(a, b):
    """Two rows as one that overstates the epsilon of both."""
    merged = [
        min(a[0], b[0]),
        max(a[1], b[1]),
        min(a[2], b[2]),
        *[max(x, y) for x, y in zip(a[3:_SETTINGS], b[3:_SETTINGS])],
        a[_SETTINGS] + b[_SETTINGS],
    ]
    return merged


def of(model):
    """The ledger of a DP model, or None."""
    return getattr(model, "_dp_ledger", None)
