"""Exact per-example clipping without per-example gradients of the network.

The "fast" engine. For a batch of B examples (each K rows with augmult):

1. Record: one batched forward pass, in which each layer that owns
   trainable variables runs through its rule (`keras_dpscale.rules`), which
   records the tensors it needs (its input, its output before the
   activation). A layer without a rule runs through the fallback rule
   (per-example gradients of that layer's call, `rules.fallback`).
2. Prove: every operation that the forward pass and the loss added to the
   traced graph keeps the examples apart (`separability`), and every
   recorded layer holds its examples' rows in order along axis 0. Then
   example i's rows of G, the gradient of `L = sum_i loss_i` with respect
   to the recorded tensors (one backward pass), are its own gradient.
3. Norms: each rule turns G into its variables' per-example squared norms;
   their sum over the layers is each example's squared norm.
4. Clip factors `c_i = min(1, C / norm_i)`; 0 for a non-finite norm and for
   padding rows of a Poisson batch.
5. Book-keeping (Bu et al. 2023): each rule's clipped sums, from G scaled
   by c and what the norms formed, without a second backward pass through
   the network.

Fails closed: a model that is not proved separable, or that the rules
cannot describe exactly, raises `Unsupported` at trace time, naming the
operation or layer, and `clipping="auto"` then uses the vectorized engine
(which computes each example alone): an operation that mixes examples or
that the check does not know, a layer called twice, a variable read outside
its owner's call (tied weights), or a random layer without a rule.
"""

import logging

import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.engines import clip
from keras_dpscale.engines import pfor_conv
from keras_dpscale.engines import recording
from keras_dpscale.engines import separability

__all__ = ["Unsupported", "clipped_gradient_sum"]

Unsupported = rules.Unsupported
_log = logging.getLogger("keras_dpscale")


def clipped_gradient_sum(
    model,
    loss_fn,
    variables,
    inputs,
    l2_norm_clip,
    microbatch_size=None,
    mask=None,
    num_seeds=0,
):
    """Sum over the batch of per-example gradients clipped to norm <= C.

    Same contract as `engines.vectorized.clipped_gradient_sum`, but
    `loss_fn` runs the whole batch at once.

    Args:
        model: the Keras model that `loss_fn` calls.
        loss_fn: `loss_fn(inputs) -> (losses, aux)`: the batched forward pass
            and the per-example losses `[B]`.
        variables: the variables to differentiate, all owned by `model`'s
            layers.
        inputs: a tuple of nests of batched tensors.
        l2_norm_clip: the clipping norm C.
        microbatch_size: optional chunk size (must divide the batch size).
        mask: optional `[B]` 0/1 weights: rows with 0 contribute nothing.
        num_seeds: the last `num_seeds` elements of `inputs` are random
            seeds, not data.

    Returns:
        `(grad_sum, losses, aux)`: one float32 sum per variable, the
        per-example losses and `aux`.

    Raises:
        Unsupported: at trace time, if the model is outside what the rules
            describe exactly, or if the traced computation is not proved to
            keep the examples apart (`separability`).
    """
    pfor_conv.install()  # for the fallback's vectorized conv gradients

    def chunk_sum(chunk):
        examples, chunk_mask = chunk
        batch = tf.nest.flatten(examples)[0].shape[0]
        if batch is None:
            raise Unsupported(
                "the batch size is not static (batch the data with "
                "drop_remainder=True)"
            )
        with recording.recording(model) as recorder:
            with tf.GradientTape() as tape:
                with separability.Region() as region:
                    losses, aux = loss_fn(examples)
                total = tf.reduce_sum(tf.cast(losses, tf.float32))
        recorder.check_reads(tape.watched_variables())
        if region.ops is None:  # eager: prove it on a trace of the pass
            _prove_separable_by_tracing(
                model, loss_fn, examples, num_seeds, batch
            )
        else:
            _prove_separable(
                region, recorder, examples, num_seeds, losses, batch
            )
        if recorder.fallbacks:
            _log.info(
                "fast clipping: per-example gradients by the vectorized path "
                "for the layers %s",
                ", ".join(recorder.fallbacks),
            )
        sums = _clipped_sums(
            recorder.layers, tape, total, batch, l2_norm_clip, chunk_mask
        )
        grad_sum = [
            sums.get(recording.key(v), tf.zeros(v.shape, tf.float32))
            for v in variables
        ]
        return grad_sum, losses, aux

    if mask is None:
        mask = tf.ones(tf.shape(tf.nest.flatten(inputs)[0])[:1])
    return clip.map_in_chunks(
        chunk_sum, (inputs, mask), microbatch_size, reduce="sum"
    )


def _clipped_sums(layers, tape, total, batch, l2_norm_clip, mask):
    """`{variable key: clipped sum}` from the rules of the recorded layers
    `[(layer, rule, recorded)]`: norms, clip factors, sums."""
    out_grads = tape.gradient(
        total,
        [recorded.sources for _, _, recorded in layers],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    norms_and_states = [
        rule.sq_norms(layer, recorded, g, batch)
        for (layer, rule, recorded), g in zip(layers, out_grads)
    ]
    sq_norms = [sq for sq, _ in norms_and_states]
    norms = tf.sqrt(tf.add_n(sq_norms) if sq_norms else tf.zeros([batch]))
    factors = clip.clip_factors(norms, l2_norm_clip)
    factors *= tf.cast(mask, tf.float32)
    sums = {}
    for (layer, rule, recorded), g, (_, state) in zip(
        layers, out_grads, norms_and_states
    ):
        layer_sums = rule.clipped_sums(layer, recorded, g, factors, state)
        for var, total_grad in zip(recorded.variables, layer_sums):
            if recording.key(var) in sums:
                raise Unsupported(
                    f"the variable '{var.path}' is owned by more than one layer"
                )
            sums[recording.key(var)] = tf.cast(total_grad, tf.float32)
    return sums


def _prove_separable(region, recorder, examples, num_seeds, losses, batch):
    """Raises `Unsupported` unless the recorded forward pass keeps the
    examples apart: each example's loss, and each recorded layer's rows,
    must come from that example's data alone (`separability`)."""
    if batch < 2:
        return  # one example: nothing to mix
    split = len(examples) - num_seeds
    inputs = [
        (t, separability.Rows(0)) for t in tf.nest.flatten(examples[:split])
    ] + [(t, separability.CONST) for t in tf.nest.flatten(examples[split:])]
    try:
        layout = region.check(inputs, batch)
        if layout(losses) not in (separability.CONST, separability.Rows(0)):
            raise separability.NotSeparable(
                "the per-example losses do not hold one entry per example, "
                f"in order (layout {layout(losses)})"
            )
        for name, batched, outputs in recorder.row_tensors:
            _check_layer_rows(layout, name, batched, outputs)
    except separability.NotSeparable as e:
        raise Unsupported(f"it cannot prove that examples stay apart: {e}")


def _check_layer_rows(layout, name, inputs, outputs):
    """A recorded layer must see and give the batch along axis 0, with its
    examples' rows in order (the rules reshape `[B*K, ...]` to `[B, ...]`)."""
    num_rows = outputs[0].shape[0] if outputs else None
    checked = [(t, False) for t in outputs] + [(t, True) for t in inputs]
    for t, data_free_allowed in checked:
        lay = layout(t)
        if lay is separability.CONST and data_free_allowed:
            continue
        if lay is separability.CONST or lay.axis != 0 or t.shape[0] != num_rows:
            raise separability.NotSeparable(
                f"layer '{name}' does not hold its examples' rows along "
                f"axis 0 of its inputs and outputs (a tensor of shape "
                f"{t.shape} has layout {lay})"
            )


def _prove_separable_by_tracing(model, loss_fn, examples, num_seeds, batch):
    """`_prove_separable` when executing eagerly: on a trace of the pass."""

    @tf.function(autograph=False)
    def forward(examples):
        with recording.recording(model) as recorder:
            with separability.Region() as region:
                losses, _ = loss_fn(examples)
        _prove_separable(region, recorder, examples, num_seeds, losses, batch)
        return losses

    forward.get_concrete_function(examples)
