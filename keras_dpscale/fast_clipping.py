"""Exact per-example clipping without per-example gradients of the network.

The "fast" engine of `DPSGD(clipping=...)`. For a batch of B examples (each
K rows with augmult):

1. One batched forward pass records, for each layer that owns trainable
   variables, its input and its output before the activation, `o` (a tap).
2. One backward pass of `L = sum_i loss_i` gives `G = dL/do` for all taps at
   once. Examples do not mix (proved on the traced pass, below), so example
   i's rows of G are its own gradient.
3. Each tap computes its variables' per-example squared gradient norms from
   its input and G (`ghost_norms`: the per-example form, the Gram form, or
   for convolutions the Gram form from the input's pixel Gram, whichever
   costs least for that layer). Their sum over the taps is each
   example's squared norm over all variables.
4. Clip factors `c_i = min(1, C / norm_i)`; 0 for a non-finite norm and for
   padding rows of a Poisson batch.
5. Book-keeping (Bu et al. 2023): each variable's clipped sum is its
   layer's weight gradient with G scaled by c, from the recorded tensors,
   without a second backward pass through the network.

Registered layers (exact types): `Dense`, `Conv2D` and the weight-
standardized `WSConv2D`/`ScaledWSConv2D` (channels last), `Embedding`,
`GroupNormalization`, `LayerNormalization`, `SkipInitGain`. A layer of any
other type that owns trainable variables falls back to the vectorized
path for its own variables only: per-example gradients of that layer's
call, from its recorded inputs and G, by `tf.vectorized_map`.

Separability is proved, not trusted: every operation that the forward pass
and the loss add to the traced graph (layers, `keras.ops` calls between
them, the loss, random layers) is checked by `separability` to keep the
examples of the batch apart, and every tapped layer must hold its examples'
rows in order along axis 0. This runs once per trace.

Fails closed: a model that is not proved separable, or that the taps cannot
describe exactly, raises `Unsupported` at trace time, naming the operation
or layer, and `DPSGD(clipping="auto")` then uses the vectorized engine
(which computes each example alone): an operation that mixes examples or
that the check does not know, a layer called twice, a variable read outside
its owner's call (tied weights), losses added in the forward pass, or a
random layer that would need the fallback.
"""

import contextlib
import logging
import math

import keras
import tensorflow as tf
from keras import ops

from keras_dpscale import clipping
from keras_dpscale import ghost_norms
from keras_dpscale import pfor_conv
from keras_dpscale import separability
from keras_dpscale.layers import skip_init
from keras_dpscale.layers import ws_conv

_log = logging.getLogger("keras_dpscale")


class Unsupported(Exception):
    """The fast engine cannot compute this model's per-example norms exactly."""


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

    Same contract as `clipping.clipped_gradient_sum`, but `loss_fn` runs the
    whole batch at once.

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
        `(grad_sum, losses, aux)` as `clipping.clipped_gradient_sum`.

    Raises:
        Unsupported: at trace time, if the model is outside what the taps
            describe exactly, or if the traced computation is not proved to
            keep the examples apart (`separability`).
    """

    def chunk_sum(chunk):
        examples, chunk_mask = chunk
        batch = tf.nest.flatten(examples)[0].shape[0]
        if batch is None:
            raise Unsupported(
                "the batch size is not static (batch the data with "
                "drop_remainder=True)"
            )
        with _recording(model) as recorder:
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
        taps = recorder.taps
        if recorder.fallbacks:
            _log.info(
                "fast clipping: per-example gradients by the vectorized path "
                "for the layers %s",
                ", ".join(recorder.fallbacks),
            )
        out_grads = tape.gradient(
            total,
            [tap.sources for tap in taps],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        sq_norms = [tap.sq_norms(g, batch) for tap, g in zip(taps, out_grads)]
        norms = tf.sqrt(tf.add_n(sq_norms) if sq_norms else tf.zeros([batch]))
        factors = clipping.clip_factors(norms, l2_norm_clip)
        factors *= tf.cast(chunk_mask, tf.float32)
        sums = {}
        for tap, g in zip(taps, out_grads):
            for var, total_grad in tap.clipped_sums(g, factors):
                sums[_key(var)] = tf.cast(total_grad, tf.float32)
        grad_sum = [
            sums.get(_key(v), tf.zeros(v.shape, tf.float32)) for v in variables
        ]
        return grad_sum, losses, aux

    if mask is None:
        mask = tf.ones(tf.shape(tf.nest.flatten(inputs)[0])[:1])
    return clipping._map_in_chunks(
        chunk_sum, (inputs, mask), microbatch_size, reduce="sum"
    )


def _prove_separable(region, recorder, examples, num_seeds, losses, batch):
    """Raises `Unsupported` unless the recorded forward pass keeps the
    examples apart: each example's loss, and each tapped layer's rows, must
    come from that example's data alone (`separability`)."""
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
            _check_tap_rows(layout, name, batched, outputs)
    except separability.NotSeparable as e:
        raise Unsupported(f"it cannot prove that examples stay apart: {e}")


def _check_tap_rows(layout, name, inputs, outputs):
    """A tapped layer must see and give the batch along axis 0, with its
    examples' rows in order (the taps reshape `[B*K, ...]` to `[B, ...]`)."""
    rows = outputs[0].shape[0] if outputs else None
    checked = [(t, False) for t in outputs] + [(t, True) for t in inputs]
    for t, data_free_allowed in checked:
        lay = layout(t)
        if lay is separability.CONST and data_free_allowed:
            continue
        if lay is separability.CONST or lay.axis != 0 or t.shape[0] != rows:
            raise separability.NotSeparable(
                f"layer '{name}' does not hold its examples' rows along "
                f"axis 0 of its inputs and outputs (a tensor of shape "
                f"{t.shape} has layout {lay})"
            )


def _prove_separable_by_tracing(model, loss_fn, examples, num_seeds, batch):
    """`_prove_separable` when executing eagerly: on a trace of the pass."""

    @tf.function(autograph=False)
    def forward(examples):
        with _recording(model) as recorder:
            with separability.Region() as region:
                losses, _ = loss_fn(examples)
        _prove_separable(region, recorder, examples, num_seeds, losses, batch)
        return losses

    forward.get_concrete_function(examples)


def _key(variable):
    """The identity of a variable as a GradientTape sees it (a Keras
    variable's TensorFlow variable; `.value` would be a cast under mixed
    precision)."""
    return id(getattr(variable, "_value", variable))


def _own_trainable(layer):
    return [
        v for v in getattr(layer, "_trainable_variables", []) if v.trainable
    ]


# ---------------------------------------------------------------------------
# Recording: every layer's `call` is wrapped while the batch goes forward.


class _Recorder:
    def __init__(self, trainable):
        self._trainable = {_key(v) for v in trainable}
        self.taps = []
        self.fallbacks = []
        # (layer name, input tensors, output tensors) of each tapped layer.
        self.row_tensors = []
        self._called = set()
        self._frames = [set()]  # variables read inside each open call

    def call(self, layer, original, args, kwargs):
        own = _own_trainable(layer)
        self._frames.append(set())
        with tf.GradientTape() as reads:
            if own:
                if id(layer) in self._called:
                    raise Unsupported(
                        f"layer '{layer.name}' is called more than once"
                    )
                self._called.add(id(layer))
                outputs, tap = _tap(layer, own, args, kwargs)
                if tap is None:
                    outputs, tap = _VectorizedTap.record(
                        layer, own, original, args, kwargs
                    )
                    self.fallbacks.append(
                        f"{layer.name} ({type(layer).__name__})"
                    )
                self.taps.append(tap)
                self.row_tensors.append(
                    (layer.name, _tensors((args, kwargs)), _tensors(outputs))
                )
            else:
                outputs = original(*args, **kwargs)
        read = {id(v) for v in reads.watched_variables()} & self._trainable
        inner = self._frames.pop()
        stray = read - inner - {_key(v) for v in own}
        if stray:
            raise Unsupported(
                f"layer '{layer.name}' reads trainable variables that it does "
                "not own (shared or tied weights)"
            )
        self._frames[-1] |= read
        return outputs

    def check_reads(self, watched):
        stray = {id(v) for v in watched} & self._trainable - self._frames[0]
        if stray:
            raise Unsupported(
                "trainable variables are read outside the layers' calls "
                "(weight regularizers, or a loss that reads weights)"
            )


def _tensors(nest):
    """The tensors of rank >= 1 in `nest`."""
    return [
        t
        for t in tf.nest.flatten(nest)
        if tf.is_tensor(t) and t.shape.rank is not None and t.shape.rank > 0
    ]


@contextlib.contextmanager
def _recording(model):
    recorder = _Recorder(model.trainable_variables)
    patched = []
    try:
        for layer in model._flatten_layers(include_self=True):
            if "call" in layer.__dict__:
                raise Unsupported(f"layer '{layer.name}' has its own `call`")
            original = layer.call

            def call(*args, _layer=layer, _original=original, **kwargs):
                return recorder.call(_layer, _original, args, kwargs)

            object.__setattr__(layer, "call", call)
            patched.append(layer)
        yield recorder
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


def _single_input(args, kwargs):
    """The one tensor input of a layer call, or None."""
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"inputs"}:
        return kwargs["inputs"]
    return None


def _tap(layer, own, args, kwargs):
    """`(outputs, tap)` from the registered tap of `layer`, or `(None, None)`."""
    record = _TAPS.get(type(layer))
    x = _single_input(args, kwargs)
    if (
        record is None
        or x is None
        or getattr(layer, "quantization_mode", None) is not None
        or getattr(layer, "lora_enabled", False)
    ):
        return None, None
    result = record(layer, x)
    if result is None:  # an unusual configuration of the layer
        return None, None
    outputs, tap = result
    if {_key(v) for v in own} != {_key(v) for v in tap.variables}:
        return None, None  # some of its variables are frozen: fall back
    return outputs, tap


# ---------------------------------------------------------------------------
# Taps: per-example squared norms and clipped sums of one layer's variables.


def _rows(t, batch):
    """`[B*K, ..., d]` -> `[B, K*..., d]`: an example's rows together."""
    return tf.reshape(t, [batch, -1, t.shape[-1]])


def _per_example_sum(t, batch):
    """`[B*K, ..., d]` -> `[B, d]`: summed over an example's rows, float32."""
    return tf.reduce_sum(_rows(tf.cast(t, tf.float32), batch), axis=1)


def _scale(t, factors):
    """Row i of `t` (`[B, ...]`) times `factors[i]`; exactly 0 where it is 0."""
    f = tf.reshape(tf.cast(factors, t.dtype), [-1] + [1] * (t.shape.rank - 1))
    return tf.math.multiply_no_nan(t, f)


def _weighted_sum(per_example, factors, axis=0):
    """`sum_i factors[i] * per_example[i]` over the examples' `axis`
    (float32); exactly 0 where a factor is 0."""
    t = tf.cast(per_example, tf.float32)
    shape = [1] * t.shape.rank
    shape[axis] = -1
    f = tf.reshape(tf.cast(factors, t.dtype), shape)
    return tf.reduce_sum(tf.math.multiply_no_nan(t, f), axis)


def _after(x, g):
    """`x`, for XLA computed no earlier than `g` (both `[rows, ...]`).

    XLA schedules work that needs only a tap's input (a transpose, a Gram)
    as soon as the forward pass made it, and then holds the result through
    the whole backward pass. Adding zero times an entry of each row's `g`
    makes the work wait for that row's `g`. A non-finite `g` makes its own
    row's norm non-finite, as it would anyway.
    """
    first = tf.reshape(g, [g.shape[0], -1])[:, :1]
    zero = tf.reshape(
        tf.cast(first, x.dtype) * 0, [-1] + [1] * (x.shape.rank - 1)
    )
    return x + zero


def _expand(factors, rows):
    """Per-example factors `[B]` -> per-row `[B*K]`."""
    return tf.repeat(factors, rows // factors.shape[0])


class _SmallTap:
    """Variables with small per-example gradients (normalization scale and
    offset, SkipInit gains): those are formed, `[B, ...]`, and summed with
    the factors."""

    def __init__(self, variables, per_example_fn, sources):
        self.variables = variables
        self.sources = sources
        self._per_example_fn = per_example_fn

    def sq_norms(self, g, batch):
        self._grads = self._per_example_fn(g, batch)
        return tf.add_n(
            [tf.reduce_sum(tf.square(t), axis=[1]) for t in self._grads]
        )

    def clipped_sums(self, g, factors):
        return [
            (v, tf.reshape(_weighted_sum(t, factors), v.shape))
            for v, t in zip(self.variables, self._grads)
        ]


def _normalization(layer, x, xhat):
    """`o = xhat * gamma + beta` (float32), tapped for gamma and beta."""
    shape = [1] * (x.shape.rank - 1) + [x.shape[-1]]
    o = xhat
    variables, factors = [], []
    if layer.scale:
        o = o * tf.reshape(tf.cast(layer.gamma, tf.float32), shape)
        variables.append(layer.gamma)
        factors.append(xhat)
    if layer.center:
        o = o + tf.reshape(tf.cast(layer.beta, tf.float32), shape)
        variables.append(layer.beta)
        factors.append(None)

    def per_example(g, batch):
        return [
            _per_example_sum(g if f is None else g * f, batch) for f in factors
        ]

    return ops.cast(o, layer.compute_dtype), _SmallTap(
        variables, per_example, o
    )


def _group_norm(layer, x):
    if layer.axis not in (-1, x.shape.rank - 1):
        return None
    grouped = tf.cast(layer._reshape_into_groups(x), tf.float32)
    axes = list(range(1, grouped.shape.rank - 2)) + [grouped.shape.rank - 1]
    mean, var = tf.nn.moments(grouped, axes=axes, keepdims=True)
    xhat = (grouped - mean) * tf.math.rsqrt(var + layer.epsilon)
    return _normalization(layer, x, tf.reshape(xhat, [-1, *x.shape[1:]]))


def _layer_norm(layer, x):
    if layer.rms_scaling or list(layer.axis) not in ([-1], [x.shape.rank - 1]):
        return None
    x32 = tf.cast(x, tf.float32)
    mean, var = tf.nn.moments(x32, axes=[-1], keepdims=True)
    return _normalization(
        layer, x, (x32 - mean) * tf.math.rsqrt(var + layer.epsilon)
    )


def _skip_gain(layer, x):
    o = x * ops.cast(layer.gain, x.dtype)

    def per_example(g, batch):
        g_x = tf.reshape(tf.cast(g * x, tf.float32), [batch, -1])
        return [tf.reduce_sum(g_x, axis=1, keepdims=True)]

    return o, _SmallTap([layer.gain], per_example, o)


class _EmbeddingTap:
    def __init__(self, layer, ids, o):
        self.variables = [layer.embeddings]
        self.sources = o
        self._ids = ids

    def sq_norms(self, g, batch):
        return ghost_norms.embedding_sq_norms(
            tf.reshape(self._ids, [batch, -1]), _rows(g, batch)
        )

    def clipped_sums(self, g, factors):
        batch = factors.shape[0]
        table = self.variables[0]
        scaled = _scale(_rows(tf.cast(g, tf.float32), batch), factors)
        return [
            (
                table,
                tf.math.unsorted_segment_sum(
                    tf.reshape(scaled, [-1, table.shape[-1]]),
                    tf.reshape(self._ids, [-1]),
                    table.shape[0],
                ),
            )
        ]


def _embedding(layer, x):
    ids = tf.cast(x, "int32") if x.dtype not in (tf.int32, tf.int64) else x
    o = ops.take(layer.embeddings, ids, axis=0)
    return ops.cast(o, layer.compute_dtype), _EmbeddingTap(layer, ids, o)


class _LinearTap:
    """Dense and Conv2D: `o = (a @ kernel) * gain + bias` on the rows a of
    the input (image patches for a convolution).

    Norms and clipped sums are computed in float32 from the recorded
    tensors' values (bfloat16 ones under mixed precision), and each form
    sums what it normed, up to float32 rounding (`ghost_norms`):

    - "per_example": the kernel's per-example gradients, normed and summed;
    - "gram": the centred rows' `a^T g`, and the means that centring took
      away (`totals / p` on every fan-in entry);
    - "input_gram": the shifted input's `a^T g`, and the shift's `1 tau^T`.

    The gradient of a weight-standardized kernel sees neither the means nor
    the shift.
    """

    def __init__(self, layer, x, z, o, standardization=None):
        self.layer = layer
        self.sources = o
        self._x = x
        self._z = z  # a @ kernel, before gain and bias
        self._ws = standardization
        self._gain = getattr(layer, "gain", None) if standardization else None
        self.variables = [layer.kernel] + [
            v for v in (self._gain, layer.bias) if v is not None
        ]

    # The conv / dense specific parts.
    def _form(self, g_lin, batch):
        raise NotImplementedError

    def _rows_of(self, batch):
        """The rows a (patches), `[B, n, p]`."""
        raise NotImplementedError

    def _per_example_gradients(self, g_lin, batch):
        """`(v, axis)`: `a_i^T g_i` for each example, batch along `axis`."""
        raise NotImplementedError

    def _input_gram_sq_norms(self, g, batch):
        """`_centred_sq_norms` by the "input_gram" form (convolutions)."""
        raise NotImplementedError

    def _shifted_sum(self, g_lin, factors, keep):
        """The "input_gram" form's parts of the clipped sum."""
        raise NotImplementedError

    def _z32(self):
        """`a @ U` in float32 (weight-standardized convolutions)."""
        raise NotImplementedError

    def _fan_in(self):
        return math.prod(self.layer.kernel.shape[:-1])

    def _g_lin(self, g):
        """The gradient with respect to `a @ kernel` (float32)."""
        g = tf.cast(g, tf.float32)
        if self._gain is None:
            return g
        return g * tf.cast(self._gain, tf.float32)

    def sq_norms(self, g, batch):
        g = tf.cast(g, tf.float32)
        self._input = tf.cast(_after(self._x, g), tf.float32)
        self._small = []
        # The gain's per-example gradient; times the gain it is also the
        # `v . U` of a weight-standardized kernel (`_aligned`).
        self._gain_grads = None
        if self._gain is not None:
            self._gain_grads = _per_example_sum(g * self._z32(), batch)
            self._small.append(self._gain_grads)
        if self.layer.bias is not None:
            self._small.append(_per_example_sum(g, batch))
        sq = self._kernel_sq_norms(self._g_lin(g), batch)
        for t in self._small:
            sq += tf.reduce_sum(tf.square(t), axis=1)
        return sq

    def _kernel_sq_norms(self, g_lin, batch):
        self._per_example = None
        self._form_used = self._form(g_lin, batch)
        if self._form_used == "per_example":
            v, axis = self._per_example_gradients(g_lin, batch)
            # Kept for the clipped sum: no second weight gradient (book-
            # keeping), and the sum adds exactly the tensors normed here.
            self._per_example = self._kernel_gradients(v, axis)
            self._batch_axis = axis
            others = [i for i in range(v.shape.rank) if i != axis]
            return tf.reduce_sum(tf.square(self._per_example), others)
        g = _rows(g_lin, batch)
        fan_in = self._fan_in()
        if self._ws is None:
            centred_sq, sums, _ = self._centred_sq_norms(g, batch)
            self._totals = tf.einsum("bn,bnd->bd", sums, g)  # sum v_o
            return ghost_norms.linear_sq_norms(centred_sq, self._totals, fan_in)
        unit, inv_std, dlog, var = self._ws
        centred_sq, _, row_norms = self._centred_sq_norms(g * inv_std, batch)
        # `v . U = sum_s g_s . z_s` adds terms of sizes up to |g_s| |a_s| |U|
        # (`z` is rounded at the scale of the rows).
        unit_norms = tf.norm(tf.reshape(unit, [-1, unit.shape[-1]]), axis=0)
        sizes = tf.reduce_sum(tf.abs(g) * row_norms[..., None], 1)
        return ghost_norms.ws_kernel_sq_norms(
            centred_sq,
            self._aligned(g_lin, batch),
            inv_std,
            dlog,
            var,
            fan_in,
            aligned_sizes=sizes * unit_norms,
        )

    def _centred_sq_norms(self, g, batch):
        """`sum_o ||v_o - mean(v_o)||^2` by a Gram form, for `g` `[B, n, d]`
        (weighted per channel for a standardized kernel); and the rows'
        sums and norms, `[B, n]`."""
        if self._form_used == "input_gram":
            return self._input_gram_sq_norms(g, batch)
        a = self._rows_of(batch)
        sums = tf.reduce_sum(a, -1)
        # Kept: the clipped sum adds the very rows normed here.
        a = self._centred = ghost_norms.centred(a, sums)
        a_gram = ghost_norms.gram(a)
        row_norms = ghost_norms.row_norms(
            tf.linalg.diag_part(a_gram), sums, a.shape[-1]
        )
        return ghost_norms.gram_sq_norms(a_gram, g), sums, row_norms

    def _kernel_gradients(self, v, axis):
        """The per-example gradients of the kernel variable, from `a_i^T
        g_i` (`v`, examples along `axis`)."""
        if self._ws is None:
            return v
        unit, inv_std, dlog, _ = self._ws
        axes = [i for i in range(v.shape.rank - 1) if i != axis]
        return ghost_norms.ws_kernel_gradients(
            v, tf.expand_dims(unit, axis), inv_std, dlog, axes
        )

    def _aligned(self, g_lin, batch):
        """`v . U` per example and output channel: `sum_t g_lin * z`."""
        if self._gain_grads is not None:
            return self._gain_grads * tf.cast(self._gain, tf.float32)
        return _per_example_sum(g_lin * self._z32(), batch)

    def _kernel_sum(self, g_lin, factors):
        """Book-keeping: the sums of the parts (class docstring) with G
        scaled by c, or the weighted sum of the per-example gradients where
        the norms formed them."""
        if self._per_example is not None:
            return _weighted_sum(self._per_example, factors, self._batch_axis)
        kernel = self.layer.kernel
        keep = tf.cast(factors > 0, tf.float32)  # 0 * a non-finite row: 0
        if self._form_used == "gram":
            total, removed = self._centred_rows_sum(g_lin, factors, keep)
        else:
            total, removed = self._shifted_sum(g_lin, factors, keep)
        total = tf.reshape(total, kernel.shape)
        if self._ws is not None:
            with tf.GradientTape() as tape:
                unit = self.layer.standardization(kernel)[0]
            return tape.gradient(unit, kernel, output_gradients=total)
        return total + _weighted_sum(removed, factors)  # on every fan-in entry

    def _centred_rows_sum(self, g_lin, factors, keep):
        """The "gram" form's parts: `sum_i c_i a_i^T g_i` of the centred
        rows, and the means taken away (`totals / p`, per example)."""
        batch = factors.shape[0]
        a = self._centred
        g = _scale(_rows(g_lin, batch), factors)
        total = tf.einsum("bnp,bnd->pd", _scale(a, keep), g)
        if self._ws is not None:
            return total, None
        return total, self._totals / self._fan_in()

    def clipped_sums(self, g, factors):
        sums = [(self.layer.kernel, self._kernel_sum(self._g_lin(g), factors))]
        small = [v for v in (self._gain, self.layer.bias) if v is not None]
        return sums + [
            (v, _weighted_sum(t, factors)) for v, t in zip(small, self._small)
        ]


class _DenseTap(_LinearTap):
    def _form(self, g_lin, batch):
        _, n, d = _rows(g_lin, batch).shape
        return ghost_norms.cheapest(
            ghost_norms.matmul_costs(n, self.layer.kernel.shape[0], d)
        )

    def _rows_of(self, batch):
        return _rows(self._input, batch)

    def _per_example_gradients(self, g_lin, batch):
        v = ghost_norms.outer(self._rows_of(batch), _rows(g_lin, batch))
        return v, 0


def _dense(layer, x):
    z = ops.matmul(x, layer.kernel)
    o = z if layer.bias is None else ops.add(z, layer.bias)
    out = o if layer.activation is None else layer.activation(o)
    return out, _DenseTap(layer, x, z, o)


class _ConvTap(_LinearTap):
    def _geometry(self, padded=False):
        """The convolution's geometry (`ghost_norms`), on its input, or on
        its input already padded ("VALID")."""
        layer = self.layer
        return dict(
            kernel_size=tuple(layer.kernel.shape[:2]),
            strides=tuple(layer.strides),
            padding="VALID" if padded else layer.padding.upper(),
            dilations=tuple(layer.dilation_rate),
            out_size=tuple(self.sources.shape[1:3]),
        )

    def _z32(self):
        if self._z.dtype == tf.float32:
            return self._z
        # Rounded to a lower precision by the forward pass: recomputed.
        unit = self._ws[0]
        return keras.layers.Conv2D.convolution_op(self.layer, self._input, unit)

    def _form(self, g_lin, batch):
        kh, kw, c_in, d = self.layer.kernel.shape
        rows, height, width, _ = self._input.shape
        _, out_h, out_w, _ = g_lin.shape
        views = rows // batch
        if self.layer.groups != 1:
            return "per_example"
        in_positions = views * ghost_norms.padded_positions(
            height, width, **self._geometry()
        )
        n = views * out_h * out_w
        return ghost_norms.cheapest(
            ghost_norms.conv_costs(
                n, kh * kw * c_in, d, in_positions, c_in, kh * kw
            )
        )

    def _rows_of(self, batch):
        patches = ghost_norms.patches(self._input, **self._geometry())
        return _rows(patches, batch)

    def _per_example_gradients(self, g_lin, batch):
        conv = self._geometry()
        del conv["out_size"]
        x = self._input
        views = x.shape[0] // batch
        # [kh, kw, B, C_in, O]: example i's gradient is [:, :, i].
        v = pfor_conv.per_example_filter_gradient(
            tf.reshape(x, [batch, views, *x.shape[1:]]),
            tf.reshape(g_lin, [batch, views, *g_lin.shape[1:]]),
            groups=self.layer.groups,
            **conv,
        )
        return v, 2

    def _patch_sums(self, x, batch):
        """Each patch's sum over its entries, `[B, n]`, for the padded
        input `x`: the patches of `x` summed over its channels."""
        channel_sums = tf.reduce_sum(x, -1, keepdims=True)
        patches = ghost_norms.patches(channel_sums, **self._geometry(True))
        return tf.reduce_sum(_rows(patches, batch), -1)

    def _input_gram_sq_norms(self, g, batch):
        """The patches' Gram from the pixels of the padded input, shifted by
        its mean (`ghost_norms.shift`), kept for the clipped sum."""
        padded = ghost_norms.pad(self._input, **self._geometry())
        self._shifted, self._shift = ghost_norms.shift(padded)
        fan_in = self._fan_in()
        shifted_sums = self._patch_sums(self._shifted, batch)
        # The patches' own sums: their shifted sums and p times the shift.
        positions = math.prod(self.sources.shape[1:3])
        shift = tf.reshape(tf.repeat(self._shift, positions), [batch, -1])
        sums = shifted_sums + fan_in * shift
        a_gram = ghost_norms.input_gram(
            self._shifted, batch, **self._geometry(True)
        )
        centred_rows_sq = tf.linalg.diag_part(a_gram) - (
            tf.square(shifted_sums) / fan_in
        )
        return (
            ghost_norms.centred_sq_norms(a_gram, shifted_sums, g, fan_in),
            sums,
            ghost_norms.row_norms(centred_rows_sq, sums, fan_in),
        )

    def _shifted_sum(self, g_lin, factors, keep):
        """The "input_gram" form's parts: the weight gradient on the shifted
        input with G scaled by c, and the shift's `tau` (per example)."""
        layer = self.layer
        rows = g_lin.shape[0]
        x = _scale(self._shifted, _expand(keep, rows))
        zero = tf.zeros(layer.kernel.shape)  # the convolution is linear in it
        with tf.GradientTape() as tape:
            tape.watch(zero)
            z = ops.conv(
                x,
                zero,
                strides=layer.strides,
                padding="valid",
                data_format="channels_last",
                dilation_rate=layer.dilation_rate,
            )
        g = _scale(g_lin, _expand(factors, rows))
        total = tape.gradient(z, zero, output_gradients=g)
        if self._ws is not None:
            return total, None
        shift = tf.reshape(self._shift, [-1, 1, 1, 1])
        return total, _per_example_sum(g_lin * shift, factors.shape[0])


def _conv(layer, x):
    if layer.data_format != "channels_last" or layer.padding not in (
        "same",
        "valid",
    ):
        return None
    standardization = None
    if isinstance(layer, ws_conv.WSConv2D):
        unit, inv_std, dlog, var = layer.standardization(layer.kernel)
        standardization = (unit,) + tuple(
            tf.reshape(t, [-1]) for t in (inv_std, dlog, var)
        )
        kernel = ops.cast(unit, x.dtype)
        z = keras.layers.Conv2D.convolution_op(layer, x, kernel)
        o = z
        if isinstance(layer, ws_conv.ScaledWSConv2D):
            o = z * ops.cast(layer.gain, z.dtype)
    else:
        z = o = layer.convolution_op(x, layer.kernel)
    if layer.use_bias:
        o = o + ops.cast(layer.bias, o.dtype)
    out = o if layer.activation is None else layer.activation(o)
    return out, _ConvTap(layer, x, z, o, standardization)


_TAPS = {
    keras.layers.Dense: _dense,
    keras.layers.Conv2D: _conv,
    ws_conv.WSConv2D: _conv,
    ws_conv.ScaledWSConv2D: _conv,
    keras.layers.Embedding: _embedding,
    keras.layers.GroupNormalization: _group_norm,
    keras.layers.LayerNormalization: _layer_norm,
    skip_init.SkipInitGain: _skip_gain,
}


class _VectorizedTap:
    """Any other layer: per-example gradients of its own variables by
    `tf.vectorized_map` over its call, given its inputs and G."""

    def __init__(self, layer, variables, args, kwargs, outputs):
        self.layer = layer
        self.variables = variables
        self._args, self._kwargs = args, kwargs
        self._outputs = outputs
        self.sources = tf.nest.flatten(outputs)

    @classmethod
    def record(cls, layer, own, original, args, kwargs):
        if any(
            getattr(sub, "_seed_generators", None)
            for sub in layer._flatten_layers(include_self=True)
        ):
            raise Unsupported(
                f"layer '{layer.name}' ({type(layer).__name__}) is random and "
                "has no fast-clipping tap"
            )
        outputs = original(*args, **kwargs)
        return outputs, cls(layer, own, args, kwargs, outputs)

    def sq_norms(self, g, batch):
        rows = self.sources[0].shape[0]
        flat = tf.nest.flatten((self._args, self._kwargs))
        batched = [
            i
            for i, t in enumerate(flat)
            if tf.is_tensor(t) and t.shape.rank and t.shape[0] == rows
        ]

        def per_example(t):
            return tf.reshape(t, [batch, rows // batch, *t.shape[1:]])

        def one(example):
            tensors, out_grads = example
            values = list(flat)
            for i, t in zip(batched, tensors):
                values[i] = t
            args, kwargs = tf.nest.pack_sequence_as(
                (self._args, self._kwargs), values
            )
            with tf.GradientTape() as tape:
                outputs = self.layer(*args, **kwargs)
            return tape.gradient(
                tf.nest.flatten(outputs),
                self.variables,
                output_gradients=out_grads,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        self._grads = tf.vectorized_map(
            one,
            (
                [per_example(flat[i]) for i in batched],
                [per_example(t) for t in g],
            ),
        )
        return tf.add_n(
            [
                tf.reduce_sum(
                    tf.reshape(tf.square(tf.cast(t, tf.float32)), [batch, -1]),
                    1,
                )
                for t in self._grads
            ]
        )

    def clipped_sums(self, g, factors):
        return [
            (v, _weighted_sum(t, factors))
            for v, t in zip(self.variables, self._grads)
        ]
