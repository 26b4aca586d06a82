"""The fallback rule: per-example gradients of one layer's own call.

A layer that owns trainable variables and has no rule (or a configuration
its rule does not cover) gets its variables' per-example gradients by
`tf.vectorized_map` over its call, from its recorded inputs and G: exact
for any layer, and only that layer's work is per-example.
"""

import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale._compat import keras_private
from keras_dpscale.rules import rows


class VectorizedRule(rules.Rule):
    """Any layer: `record` runs its original call; `sq_norms` forms the
    per-example gradients, which `clipped_sums` weights."""

    def record(self, layer, variables, call, args, kwargs):
        """Runs `call(*args, **kwargs)` (the layer's own call) and records it.

        Raises:
            Unsupported: the layer is random (its per-example calls would
                need the batch's seeds).
        """
        if keras_private.seed_generators(layer):
            raise rules.Unsupported(
                f"layer '{layer.name}' ({type(layer).__name__}) is random and "
                "has no fast-clipping rule"
            )
        outputs = call(*args, **kwargs)
        return rules.Recorded(
            outputs, variables, tf.nest.flatten(outputs), (args, kwargs)
        )

    def sq_norms(self, layer, recorded, grads, batch):
        args, kwargs = recorded.saved
        num_rows = recorded.sources[0].shape[0]
        flat = tf.nest.flatten((args, kwargs))
        batched = [
            i
            for i, t in enumerate(flat)
            if tf.is_tensor(t) and t.shape.rank and t.shape[0] == num_rows
        ]

        def per_example(t):
            return tf.reshape(t, [batch, num_rows // batch, *t.shape[1:]])

        def one(example):
            tensors, out_grads = example
            values = list(flat)
            for i, t in zip(batched, tensors):
                values[i] = t
            args, kwargs = tf.nest.pack_sequence_as(recorded.saved, values)
            with tf.GradientTape() as tape:
                outputs = layer(*args, **kwargs)
            return tape.gradient(
                tf.nest.flatten(outputs),
                recorded.variables,
                output_gradients=out_grads,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        grads = tf.vectorized_map(
            one,
            (
                [per_example(flat[i]) for i in batched],
                [per_example(t) for t in grads],
            ),
        )
        sq_norms = tf.add_n(
            [
                tf.reduce_sum(
                    tf.reshape(tf.square(tf.cast(t, tf.float32)), [batch, -1]),
                    1,
                )
                for t in grads
            ]
        )
        return sq_norms, grads

    def clipped_sums(self, layer, recorded, grads, factors, state):
        return [rows.weighted_sum(t, factors) for t in state]


RULE = VectorizedRule()
