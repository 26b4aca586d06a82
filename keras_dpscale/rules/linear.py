"""The shared rule of linear layers: `o = (a @ U) * gain + bias`.

`a` are the rows of the input (image patches for a convolution), `U` the
kernel the layer uses: its kernel variable W, or W standardized per output
channel (weight standardization, with an optional per-channel gain).
`DenseRule` and `ConvRule` say what the rows are.

Norms and clipped sums are computed in float32 from the recorded tensors'
values (bfloat16 ones under mixed precision), and each form of the
kernel's norm sums what it normed, up to float32 rounding (`ghost_norms`):

- "per_example": the kernel's per-example gradients, normed and summed;
- "gram": the centred rows' `a^T g`, and the means that centring took away
  (`totals / p` on every fan-in entry);
- "input_gram": the shifted input's `a^T g`, and the shift's `1 tau^T`.

The gradient of a weight-standardized kernel sees neither the means nor
the shift. The gain's and the bias's per-example gradients are formed.
"""

import math
from typing import Any
from typing import NamedTuple

import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.rules import ghost_norms
from keras_dpscale.rules import rows


class Saved(NamedTuple):
    """What the forward pass of a linear layer keeps.

    Attributes:
        x: the layer's input.
        z: `a @ U`, before gain and bias.
        standardization: `(unit, inv_std, dlog, var)` of a standardized
            kernel (`ghost_norms.ws_kernel_gradients`; the last three
            `[O]`), or None.
        gain: the per-output-channel gain variable, or None.
    """

    x: Any
    z: Any
    standardization: Any = None
    gain: Any = None


class KernelState(NamedTuple):
    """What the kernel's norm formed, for its clipped sum.

    Attributes:
        form: "per_example", "gram" or "input_gram".
        per_example: "per_example": the kernel's per-example gradients...
        batch_axis: ...with the examples along this axis.
        centred: "gram": the centred rows, `[B, n, p]`.
        shifted: "input_gram": the padded input minus its shift...
        shift: ...and the shift, `[B*K]`.
        totals: the Gram forms of an unstandardized kernel: `sum v_o`,
            `[B, d]` (`ghost_norms.linear_sq_norms`).
    """

    form: str
    per_example: Any = None
    batch_axis: int = 0
    centred: Any = None
    shifted: Any = None
    shift: Any = None
    totals: Any = None


class LinearRule(rules.Rule):
    """Norms and clipped sums of `[kernel, gain, bias]` (those present).

    Subclasses implement `forward` (with `recorded`) and the hooks below;
    a standardized kernel also needs `standardized`.
    """

    # -- Hooks of the subclasses.
    def form(self, layer, saved, g_lin, batch):
        """The cheapest form of the kernel's norm (`ghost_norms.cheapest`)."""
        raise NotImplementedError

    def patch_rows(self, layer, saved, x, batch):
        """The rows a (patches) of the float32 input `x`, `[B, n, p]`."""
        raise NotImplementedError

    def per_example_gradients(self, layer, saved, x, g_lin, batch):
        """`(v, axis)`: `a_i^T g_i` for each example, batch along `axis`."""
        raise NotImplementedError

    def input_gram_sq_norms(self, layer, saved, x, g, batch):
        """`centred_sq_norms` by the "input_gram" form (convolutions)."""
        raise NotImplementedError

    def shifted_sum(self, layer, saved, kernel, g_lin, factors, keep):
        """The "input_gram" form's parts of the clipped sum."""
        raise NotImplementedError

    def z32(self, layer, saved, x):
        """`a @ U` in float32 (standardized kernels, gains)."""
        raise NotImplementedError

    def standardized(self, layer, kernel):
        """U as a function of the kernel variable (standardized kernels)."""
        raise NotImplementedError

    # -- The rule.
    def recorded(self, layer, saved, o):
        """The `Recorded` of a forward pass that computed `o`."""
        outputs = o if layer.activation is None else layer.activation(o)
        variables = [layer.kernel] + [
            v for v in (saved.gain, layer.bias) if v is not None
        ]
        return rules.Recorded(outputs, variables, o, saved)

    def sq_norms(self, layer, recorded, grads, batch):
        saved = recorded.saved
        g = tf.cast(grads, tf.float32)
        x = tf.cast(rows.after(saved.x, g), tf.float32)
        small = []
        # The gain's per-example gradient; times the gain it is also the
        # `v . U` of a weight-standardized kernel (`_aligned`).
        gain_grads = None
        if saved.gain is not None:
            gain_grads = rows.per_example_sum(
                g * self.z32(layer, saved, x), batch
            )
            small.append(gain_grads)
        if layer.bias is not None:
            small.append(rows.per_example_sum(g, batch))
        sq, kernel = self._kernel_sq_norms(
            layer, saved, x, _g_lin(saved, g), batch, gain_grads
        )
        for t in small:
            sq += tf.reduce_sum(tf.square(t), axis=1)
        return sq, (kernel, small)

    def clipped_sums(self, layer, recorded, grads, factors, state):
        kernel, small = state
        g_lin = _g_lin(recorded.saved, tf.cast(grads, tf.float32))
        total = self._kernel_sum(layer, recorded.saved, kernel, g_lin, factors)
        return [total] + [rows.weighted_sum(t, factors) for t in small]

    # -- The kernel's norm.
    def _kernel_sq_norms(self, layer, saved, x, g_lin, batch, gain_grads):
        form = self.form(layer, saved, g_lin, batch)
        if form == "per_example":
            v, axis = self.per_example_gradients(layer, saved, x, g_lin, batch)
            # Kept for the clipped sum: no second weight gradient (book-
            # keeping), and the sum adds exactly the tensors normed here.
            per_example = _kernel_gradients(saved, v, axis)
            others = [i for i in range(v.shape.rank) if i != axis]
            sq = tf.reduce_sum(tf.square(per_example), others)
            return sq, KernelState(form, per_example, axis)
        g = rows.rows(g_lin, batch)
        fan_in = _fan_in(layer)
        if saved.standardization is None:
            centred_sq, sums, _, kernel = self._centred_sq_norms(
                layer, saved, x, form, g, batch
            )
            totals = tf.einsum("bn,bnd->bd", sums, g)  # sum v_o
            sq = ghost_norms.linear_sq_norms(centred_sq, totals, fan_in)
            return sq, kernel._replace(totals=totals)
        unit, inv_std, dlog, var = saved.standardization
        centred_sq, _, row_norms, kernel = self._centred_sq_norms(
            layer, saved, x, form, g * inv_std, batch
        )
        # `v . U = sum_s g_s . z_s` adds terms of sizes up to |g_s| |a_s| |U|
        # (`z` is rounded at the scale of the rows).
        unit_norms = tf.norm(tf.reshape(unit, [-1, unit.shape[-1]]), axis=0)
        sizes = tf.reduce_sum(tf.abs(g) * row_norms[..., None], 1)
        if gain_grads is not None:  # `v . U` per example and channel
            aligned = gain_grads * tf.cast(saved.gain, tf.float32)
        else:
            z = self.z32(layer, saved, x)
            aligned = rows.per_example_sum(g_lin * z, batch)
        sq = ghost_norms.ws_kernel_sq_norms(
            centred_sq,
            aligned,
            inv_std,
            dlog,
            var,
            fan_in,
            aligned_sizes=sizes * unit_norms,
        )
        return sq, kernel

    def _centred_sq_norms(self, layer, saved, x, form, g, batch):
        """`sum_o ||v_o - mean(v_o)||^2` by a Gram form, for `g` `[B, n, d]`
        (weighted per channel for a standardized kernel); the rows' sums
        and norms, `[B, n]`; and the `KernelState` for the clipped sum."""
        if form == "input_gram":
            return self.input_gram_sq_norms(layer, saved, x, g, batch)
        a = self.patch_rows(layer, saved, x, batch)
        sums = tf.reduce_sum(a, -1)
        # Kept: the clipped sum adds the very rows normed here.
        a = ghost_norms.centred(a, sums)
        a_gram = ghost_norms.gram(a)
        row_norms = ghost_norms.row_norms(
            tf.linalg.diag_part(a_gram), sums, a.shape[-1]
        )
        sq = ghost_norms.gram_sq_norms(a_gram, g)
        return sq, sums, row_norms, KernelState(form, centred=a)

    # -- The kernel's clipped sum.
    def _kernel_sum(self, layer, saved, kernel, g_lin, factors):
        """Book-keeping: the sums of the parts (module docstring) with G
        scaled by c, or the weighted sum of the per-example gradients where
        the norms formed them."""
        if kernel.form == "per_example":
            return rows.weighted_sum(
                kernel.per_example, factors, kernel.batch_axis
            )
        keep = tf.cast(factors > 0, tf.float32)  # 0 * a non-finite row: 0
        if kernel.form == "gram":
            total, removed = _centred_rows_sum(
                layer, saved, kernel, g_lin, factors, keep
            )
        else:
            total, removed = self.shifted_sum(
                layer, saved, kernel, g_lin, factors, keep
            )
        total = tf.reshape(total, layer.kernel.shape)
        if saved.standardization is not None:
            with tf.GradientTape() as tape:
                unit = self.standardized(layer, layer.kernel)
            return tape.gradient(unit, layer.kernel, output_gradients=total)
        # The means (or the shift) on every fan-in entry.
        return total + rows.weighted_sum(removed, factors)


def _fan_in(layer):
    return math.prod(layer.kernel.shape[:-1])


def _g_lin(saved, g):
    """The gradient with respect to `a @ U` from the float32 G."""
    if saved.gain is None:
        return g
    return g * tf.cast(saved.gain, tf.float32)


def _kernel_gradients(saved, v, axis):
    """The per-example gradients of the kernel variable, from `a_i^T g_i`
    (`v`, examples along `axis`)."""
    if saved.standardization is None:
        return v
    unit, inv_std, dlog, _ = saved.standardization
    axes = [i for i in range(v.shape.rank - 1) if i != axis]
    return ghost_norms.ws_kernel_gradients(
        v, tf.expand_dims(unit, axis), inv_std, dlog, axes
    )


def _centred_rows_sum(layer, saved, kernel, g_lin, factors, keep):
    """The "gram" form's parts: `sum_i c_i a_i^T g_i` of the centred rows,
    and the means taken away (`totals / p`, per example)."""
    batch = factors.shape[0]
    g = rows.scale(rows.rows(g_lin, batch), factors)
    total = tf.einsum("bnp,bnd->pd", rows.scale(kernel.centred, keep), g)
    if saved.standardization is not None:
        return total, None
    return total, kernel.totals / _fan_in(layer)
