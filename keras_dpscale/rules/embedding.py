"""The rule of `Embedding`: looked-up rows of G added per id.

Example i's gradient of the table adds `g_s` to row `id_s` for each of its
lookups s; its squared norm is `sum_{s,t} [id_s = id_t] g_s . g_t`
(`ghost_norms.embedding_sq_norms`), and the clipped sum scatters the rows
of G scaled by the clip factors.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import rules
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import rows


@rules.register_rule(keras.layers.Embedding)
class EmbeddingRule(rules.Rule):
    """`o = take(embeddings, ids)`; saved: the ids (int32 or int64)."""

    def forward(self, layer, inputs):
        ids = inputs
        if inputs.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(inputs, "int32")
        # A negative id reads row id + input_dim (as `ops.take` does): the
        # norms must see the row that is read.
        ids = tf.where(ids < 0, ids + layer.input_dim, ids)
        o = ops.take(layer.embeddings, ids, axis=0)
        outputs = ops.cast(o, layer.compute_dtype)
        return rules.Recorded(outputs, [layer.embeddings], o, ids)

    def sq_norms(self, layer, recorded, grads, batch):
        ids = tf.reshape(recorded.saved, [batch, -1])
        return ghost_norms.embedding_sq_norms(
            ids, rows.rows(grads, batch)
        ), None

    def clipped_sums(self, layer, recorded, grads, factors, state):
        batch = factors.shape[0]
        table = recorded.variables[0]
        scaled = rows.scale(
            rows.rows(tf.cast(grads, tf.float32), batch), factors
        )
        return [
            tf.math.unsorted_segment_sum(
                tf.reshape(scaled, [-1, table.shape[-1]]),
                tf.reshape(recorded.saved, [-1]),
                table.shape[0],
            )
        ]
