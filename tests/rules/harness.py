"""One check for any clipping rule: against per-example gradients.

```python
from tests.rules import harness

harness.check_rule(keras.layers.Dense(3), x)            # x: [B*K, ...]
harness.check_rule(MyLayer(), x, views=2, rule=MyRule())
```

`check_rule` runs the rule as the fast engine does (its forward pass on the
whole batch, G by one backward pass, norms, then clipped sums) on a loss
that depends non-linearly on each row of the layer's outputs, and compares
with the layer's per-example gradients computed one example at a time:

- the rule's forward pass gives the layer's own outputs;
- it clips all of the layer's trainable variables;
- per-example norms agree to `rtol` (1e-4);
- clipped sums agree, with the clipping norm C at the median norm (about
  half of the examples clipped) and a mask that leaves some examples out.

`clipped_sum` runs a whole model's clipping engine on one batch (to check
that a model's layers all get their rules, for example), and
`assert_sums_close` compares sums.
"""

import logging

import keras
import numpy as np
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import rules
from keras_dpscale.rules import fallback
from keras_dpscale.rules import ghost_norms
from tests.conftest import LOSS
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum


def check_rule(layer, x, views=1, rule=None, mask=None, rtol=1e-4, seed=0):
    """Checks `rule` (by default the layer's registered rule) on `x`.

    Args:
        layer: a Keras layer (built on `x` if it is not).
        x: the layer's input, `[B*K, ...]`, K = `views` rows per example.
        views: K.
        rule: the rule; `rules.rule_for(layer)` if None. The fallback rule
            (`fallback.RULE`) records the layer's own call.
        mask: `[B]` 0/1; default: every third example left out.
        rtol: relative tolerance of the norms and the sums.
        seed: of the loss's random weights.

    Returns:
        The per-example norms `[B]` (computed one example at a time).
    """
    x = tf.convert_to_tensor(x)
    expected_outputs = layer(x)
    rule = rule or rules.rule_for(layer)
    assert rule is not None, f"no rule for {type(layer).__name__}"
    batch = x.shape[0] // views
    weights = np.random.default_rng(seed).normal(
        size=expected_outputs.shape[1:]
    )
    weights = tf.constant(weights, tf.float32)
    per_example = _loop_gradients(layer, x, views, weights)
    norms = np.sqrt(
        sum(np.sum(g.reshape(batch, -1) ** 2, 1) for g in per_example)
    )
    clip = float(np.median(norms))
    if mask is None:
        mask = (np.arange(batch) % 3 != 2).astype("float32")
    factors = np.minimum(1.0, clip / norms) * mask

    with tf.GradientTape() as tape:
        recorded = _record(rule, layer, x)
        total = tf.reduce_sum(_losses(recorded.outputs, weights, views))
    np.testing.assert_allclose(
        recorded.outputs, expected_outputs, rtol=1e-5, atol=1e-5
    )
    assert {id(v) for v in recorded.variables} == {
        id(v) for v in layer.trainable_variables
    }
    grads = tape.gradient(
        total,
        recorded.sources,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    sq_norms, state = rule.sq_norms(layer, recorded, grads, batch)
    assert sq_norms.dtype == tf.float32 and sq_norms.shape == [batch]
    np.testing.assert_allclose(np.sqrt(sq_norms), norms, rtol=rtol)

    sums = rule.clipped_sums(
        layer, recorded, grads, tf.constant(factors, tf.float32), state
    )
    order = [_index(layer.trainable_variables, v) for v in recorded.variables]
    assert len(sums) == len(recorded.variables)
    for got, i in zip(sums, order):
        want = np.tensordot(factors, per_example[i], axes=1)
        assert got.dtype == tf.float32 and got.shape == want.shape
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
    return norms


def clipped_sum(model, x, y, clip, clipping, mask=None, microbatch_size=None):
    """The clipped gradient sum of one batch (sigma = 0) by the engine that
    `model.compile(clipping=..., microbatch_size=...)` selects, under XLA."""
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1, l2_norm_clip=clip, noise_multiplier=0.0
        ),
        loss=LOSS,
        clipping=clipping,
        microbatch_size=microbatch_size,
    )
    step = tf.function(
        lambda x, y, m: model._dp_engine.clipped_gradient_sum(
            model, x, y, m, clip
        )[0],
        jit_compile=True,
    )
    return [g.numpy() for g in step(x, y, mask)]


def assert_sums_close(actual, expected, rtol=1e-4, across=False):
    """Sums equal up to `rtol` of each one's largest entry, or with
    `across` of the largest entry of all of them (for models with a sum
    that is exactly zero, as attention's key bias: softmax does not see a
    shift of all logits, and each engine computes rounding only)."""
    largest = max(np.max(np.abs(e)) for e in expected)
    for a, e in zip(actual, expected):
        scale = largest if across else np.max(np.abs(e))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def fast_without_fallback(model, caplog, examples=5):
    """The fast engine's clipped sum of `examples` examples, checked to
    take no fallback, and a loop's: `(fast, expected, (x, y, clip))`, with
    C at the median norm (half of the examples clipped)."""
    x, y = inputs_for(model, examples)
    expected, clip = reference_clipped_sum(model, x, y)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = clipped_sum(model, x, y, clip, "fast")
    assert "fast" in caplog.text  # the log is captured...
    assert "vectorized path" not in caplog.text  # ...and nothing fell back
    return fast, expected, (x, y, clip)


def force_form(monkeypatch, form):
    """Makes the linear rules use `form` wherever they have it (otherwise
    "per_example")."""
    monkeypatch.setattr(
        ghost_norms,
        "cheapest",
        lambda costs: form if form in costs else "per_example",
    )


def _record(rule, layer, x):
    if isinstance(rule, fallback.VectorizedRule):
        return rule.record(
            layer, layer.trainable_variables, layer.call, (x,), {}
        )
    recorded = rule.forward(layer, x)
    assert recorded is not None, f"the rule does not cover {layer.name}"
    return recorded


def _losses(outputs, weights, views):
    """Per-example losses `[B]`: the mean over an example's K rows of a
    non-linear function of each row."""
    out = tf.cast(outputs, tf.float32)
    row = tf.reduce_sum(tf.sin(out) * weights, list(range(1, out.shape.rank)))
    return tf.reduce_mean(tf.reshape(row, [-1, views]), 1)


def _loop_gradients(layer, x, views, weights):
    """Per-example gradients, one example at a time (float64): one array
    `[B, ...]` per trainable variable of `layer`."""
    grads = []
    for i in range(x.shape[0] // views):
        with tf.GradientTape() as tape:
            rows = layer(x[i * views : (i + 1) * views])
            loss = _losses(rows, weights, views)[0]
        grads.append(
            tape.gradient(
                loss,
                layer.trainable_variables,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
        )
    return [
        np.stack([np.float64(tf.convert_to_tensor(g[v])) for g in grads])
        for v in range(len(layer.trainable_variables))
    ]


def _index(variables, variable):
    return [id(v) for v in variables].index(id(variable))


def bfloat16_errors(build, clip=0.1):
    """The relative error of each engine's clipped sum in mixed bfloat16,
    against the float32 (vectorized) sum of the same weights and batch:
    `{"fast": e, "vectorized": e}`. `build()` makes the model."""
    model = build()
    weights = [v.numpy() for v in model.weights]
    x, y = inputs_for(model, 4)
    exact = clipped_sum(model, x, y, clip, "vectorized")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build()
        for v, w in zip(model.weights, weights):
            v.assign(w)
        errors = {}
        for engine in ("fast", "vectorized"):
            sums = clipped_sum(model, x, y, clip, engine)
            assert all(g.dtype == np.float32 for g in sums)
            errors[engine] = np.sqrt(
                sum(np.sum((a - b) ** 2) for a, b in zip(sums, exact))
                / sum(np.sum(b**2) for b in exact)
            )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return errors
