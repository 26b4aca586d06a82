"""Per-example gradient norms of linear layers without per-example gradients.

A linear layer `o = a @ W` seen by example i through its rows `a_i` (`[n,
p]`: n positions, or K augmult views times positions) with output gradient
`g_i` (`[n, d]`) has the per-example gradient `a_i^T g_i` (`[p, d]`). Its
squared norm has exact forms of different costs (Li et al. 2021; Bu et al.
2022), and `cheapest` picks one per layer ("mixed ghost clipping"):

- "per_example": `||a_i^T g_i||^2`, cost ~ n p d and memory p d;
- "gram" (ghost): `<a_i a_i^T, g_i g_i^T>`, cost ~ n^2 (p + d), memory n^2;
- "input_gram", convolutions only: the same Gram form, with `a_i a_i^T`
  (the patches' Gram) summed from the Gram of the input's pixels
  (`input_gram`) instead of formed from the patches, which are kh*kw times
  larger than the input: cost ~ N^2 c_in + n^2 (d + kh kw) for N input
  positions of c_in channels.

Convolutions are linear layers on image patches (`patches`); their
"per_example" form is `per_example_filter_gradient`, one batched matmul per
kernel offset (also the vectorized engine's conv filter gradient, through
`engines.pfor_conv`).

Rounding. The clip factor of example i is only as safe as its norm: a norm
computed too small lets the example's clipped gradient exceed C. Float32
loses most where an example's rows share a large part (a near-constant
image, an offset) that its gradient cancels, so:

- "per_example" forms each example's gradient in full (for a weight-
  standardized kernel, `ws_kernel_gradients`), and the rules sum
  exactly the tensors whose norms they take.
- Centring: with `v_o` the gradient of output channel o (p = fan-in
  entries), `||v_o||^2 = ||v_o - mean(v_o)||^2 + (sum v_o)^2 / p`, two
  non-negative terms (`linear_sq_norms`); weight standardization keeps
  only the first (`ws_kernel_sq_norms`). The "gram" form centres each row
  before its Gram (`centred`), which subtracts `mean(v_o)` exactly.
- "input_gram" never forms the rows, and subtracts `(sum v_o)^2 / p` from
  the uncentred Gram form instead (`centred_sq_norms`). It works on the
  input shifted by its mean (`shift`), which removes an offset shared by
  all rows exactly: the shift changes the gradient only by a constant
  along each channel's fan-in (`1 tau^T`), which the first term does not
  see, and which the rules add back to the clipped sum exactly.
- Allowances: a Gram form adds n^2 terms that can cancel far below their
  sizes, and is raised by `KAPPA_GRAM` times the sum of those sizes
  (`gram_sq_norms`), which also covers "input_gram"'s subtraction; the
  norm of a standardized kernel subtracts a term, and is raised for its
  rounding (`ws_kernel_sq_norms`). A larger norm only clips more.

Everything is computed in float32.
"""

import tensorflow as tf

# Allowances for rounding (module docstring). float32's epsilon is 2^-23,
# about 1.2e-7. A subtraction `x - y` of non-negative terms, each accurate
# to ~80 epsilons, is raised by `KAPPA * y` (`ws_kernel_sq_norms`).
KAPPA = 1e-5
# A Gram form is raised by `KAPPA_GRAM` (~8 epsilons) times the sum of its
# terms' sizes (`gram_sq_norms`). The rounding of the float32 Gram and
# sums is typically about one epsilon times those sizes: a margin of ~8,
# not a worst-case bound (which grows with the number of terms). On
# ordinary inputs the sizes add up to a few times the result: norms grow
# by < 1e-5 (3e-6 measured on a WRN-16-4).
KAPPA_GRAM = 1e-6


def cheapest(costs):
    """The form of least cost, from `{form: multiply-adds per example}`."""
    return min(costs, key=costs.get)


def matmul_costs(n, p, d):
    """Costs of the forms of a linear layer with n rows per example."""
    return {"per_example": n * p * d, "gram": n * n * (p + d)}


def conv_costs(n, p, d, in_positions, c_in, kernel_positions):
    """Costs of the forms of a convolution (`matmul_costs` on its patches,
    and "input_gram" from `in_positions` padded input positions)."""
    return dict(
        matmul_costs(n, p, d),
        input_gram=in_positions**2 * c_in + n * n * (d + kernel_positions),
    )


def gram(a):
    """`a_i a_i^T` for `[B, n, p]`: `[B, n, n]` (float32)."""
    a = tf.cast(a, tf.float32)
    return tf.einsum("bnp,bmp->bnm", a, a)


def gram_sq_norms(a_gram, g):
    """`||a_i^T g_i||^2 = <a_i a_i^T, g_i g_i^T>` from the rows' Gram
    `[B, n, n]` and `g` `[B, n, d]`: `[B]`, raised by an allowance for its
    rounding.

    The Gram form adds n^2 products `(a_s . a_t)(g_s . g_t)` that can cancel
    far below their sizes (rows with large equal parts, or a subtracted
    mean: `centred_sq_norms`), and float32 rounding is a fraction of those
    sizes, not of the result. The allowance is `KAPPA_GRAM * sum_st |a_s|
    |a_t| |g_s . g_t|`, with the rows' norms from the Gram's diagonal.
    """
    g_gram = gram(g)
    norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(a_gram), 0.0))
    sizes = norms[:, :, None] * norms[:, None, :] * tf.abs(g_gram)
    # One pass over the Grams: the result and its allowance together.
    return tf.reduce_sum(a_gram * g_gram + KAPPA_GRAM * sizes, [1, 2])


def shift(x):
    """Each row of `x` (axis 0) minus its mean: `(x - m, m)`, float32.

    Shifting a convolution's input by m shifts every entry of its patches
    by m, which changes its gradient by `m 1 (sum_s g_s)^T`: a constant
    along each output channel's fan-in (module docstring).

    Args:
        x: `[rows, ...]`, a convolution's input already zero-padded (`pad`),
            so that the padding's zeros are shifted with the pixels.

    Returns:
        `x - m` (float32, shaped as `x`) and `m` (`[rows]`).
    """
    x = tf.cast(x, tf.float32)
    m = tf.reduce_mean(x, list(range(1, x.shape.rank)), keepdims=True)
    return x - m, tf.reshape(m, [-1])


def centred(a, sums):
    """Rows `[B, n, p]` minus their means, from their sums `[B, n]`."""
    return a - sums[..., None] / a.shape[-1]


def centred_sq_norms(a_gram, sums, g, fan_in):
    """`sum_o ||v_o - mean(v_o)||^2` from the uncentred rows' Gram.

    With `v_o = a^T g_o` (`a`: n rows of `fan_in` entries with sums
    `sums`), `||v_o - mean(v_o)||^2 = ||v_o||^2 - (sum v_o)^2 / p` and
    `sum v_o = sums . g_o`: a difference of two non-negative terms, which
    nearly cancel where rows are near-constant, each at its own level.
    `gram_sq_norms`'s allowance, from the uncentred rows' norms, covers the
    rounding of both (`|sums_s| <= sqrt(p) |a_s|`).

    Args:
        a_gram: `[B, n, n]`: the rows' Gram.
        sums: `[B, n]`: the rows' sums.
        g: `[B, n, d]` (weighted per channel where the norm is).
        fan_in: p.

    Returns:
        `[B]`.
    """
    mean_sq = tf.reduce_sum(tf.square(tf.einsum("bn,bnd->bd", sums, g)), -1)
    return gram_sq_norms(a_gram, g) - mean_sq / fan_in


def row_norms(centred_sq, sums, fan_in):
    """Rows' norms `|a_s|`, `[B, n]`, from the squared norms of the centred
    rows and the rows' sums: `|a_s|^2 = |a_s - mean(a_s)|^2 + sums_s^2 / p`
    (a computed first term below 0 counts as 0)."""
    return tf.sqrt(tf.maximum(centred_sq, 0.0) + tf.square(sums) / fan_in)


def linear_sq_norms(centred_sq, totals, fan_in):
    """`||v||^2 = sum_o ||v_o - mean(v_o)||^2 + (sum v_o)^2 / p`: `[B]`.

    Args:
        centred_sq: `[B]`: the first term, summed over the channels o.
        totals: `[B, d]`: `sum v_o`, the sum of channel o's gradient over
            its fan-in.
        fan_in: p.
    """
    return centred_sq + tf.reduce_sum(tf.square(totals), -1) / fan_in


def outer(a, g):
    """Per-example gradients `a_i^T g_i`: `[B, p, d]` (float32)."""
    return tf.einsum(
        "bnp,bnd->bpd", tf.cast(a, tf.float32), tf.cast(g, tf.float32)
    )


def conv_padding(size, out, kernel, stride, dilation, padding):
    """`[before, after]` padding of one spatial axis, as TensorFlow pads."""
    total = 0
    if padding.upper() == "SAME":
        total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return [total // 2, total - total // 2]


def _pads(height, width, kernel_size, strides, padding, dilations, out_size):
    return [
        conv_padding(size, out, k, s, dl, padding)
        for size, out, k, s, dl in zip(
            (height, width), out_size, kernel_size, strides, dilations
        )
    ]


def padded_positions(height, width, **conv):
    """The number of positions of the padded input (`pad`)."""
    (top, bottom), (left, right) = _pads(height, width, **conv)
    return (height + top + bottom) * (width + left + right)


def pad(x, kernel_size, strides, padding, dilations, out_size):
    """`[N, H, W, ...]` zero-padded as the convolution pads its input."""
    pads = _pads(
        *x.shape[1:3], kernel_size, strides, padding, dilations, out_size
    )
    return tf.pad(x, [[0, 0], *pads] + [[0, 0]] * (len(x.shape) - 3))


def offsets(kernel_size, strides, dilations, out_size):
    """For each kernel offset (row-major), the slices of the padded input's
    rows and columns that it meets: `[(rows, cols), ...]`."""
    (out_h, out_w), (sh, sw), (dh, dw) = out_size, strides, dilations
    return [
        (
            slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh),
            slice(j * dw, j * dw + (out_w - 1) * sw + 1, sw),
        )
        for i in range(kernel_size[0])
        for j in range(kernel_size[1])
    ]


def windows(x, kernel_size, strides, padding, dilations, out_size):
    """What each kernel offset sees: kh*kw tensors `[N, H', W', C]`."""
    x = pad(x, kernel_size, strides, padding, dilations, out_size)
    return [
        x[:, rows, cols, :]
        for rows, cols in offsets(kernel_size, strides, dilations, out_size)
    ]


def patches(x, kernel_size, strides, padding, dilations, out_size):
    """Image patches of a 2D convolution: `[N, H, W, C]` -> `[N, H', W', kh*kw*C]`.

    Ordered as the kernel `[kh, kw, C, O]` reshaped to `[kh*kw*C, O]`, so
    that the convolution is `patches @ kernel`. Built from strided slices
    (copies, no arithmetic).
    """
    return tf.concat(
        windows(x, kernel_size, strides, padding, dilations, out_size), -1
    )


def input_gram(x, batch, kernel_size, strides, padding, dilations, out_size):
    """The Gram of each example's patch rows, from the Gram of its pixels.

    Patch s of a convolution reads the padded input at `s * stride + k *
    dilation` for the kernel offsets k, so `a_s . a_t = sum_k X[s * stride +
    k * dilation, t * stride + k * dilation]` with `X` the Gram of the
    padded input's pixels: kh*kw strided slices of X, added.

    Args:
        x: `[B*K, H, W, C]`: the input, K rows (augmult views) per example.
        batch: B.
        kernel_size, strides, padding, dilations, out_size: as `patches`.

    Returns:
        `[B, n, n]` with `n = K * out_h * out_w`, rows ordered as
        `patches(x, ...)` reshaped to `[B, n, kh*kw*C]`.
    """
    rows, _, _, channels = x.shape
    views = rows // batch
    conv = (kernel_size, strides, padding, dilations, out_size)
    x = pad(tf.cast(x, tf.float32), *conv)
    _, hp, wp, _ = x.shape
    pixels = tf.reshape(x, [batch, views * hp * wp, channels])
    pixel_gram = tf.reshape(
        tf.matmul(pixels, pixels, transpose_b=True),
        [batch, views, hp, wp, views, hp, wp],
    )
    total = 0.0
    for r, c in offsets(kernel_size, strides, dilations, out_size):
        total += pixel_gram[:, :, r, c, :, r, c]
    out_h, out_w = out_size
    n = views * out_h * out_w
    return tf.reshape(total, [batch, n, n])


def per_example_filter_gradient(
    inputs, out_grads, kernel_size, strides, padding, dilations, groups=1
):
    """Per-example gradients of a 2D convolution's filter (NHWC).

    The filter gradient at kernel offset k, `dW[k, c, o] = sum_s x[s*stride +
    k*dilation, c] g[s, o]`, is a matmul of the input window that offset k
    sees with the output gradient; one matmul per offset, batched over the
    examples (and the groups of a grouped convolution), gives all examples'
    gradients at that offset.

    The offsets run in a loop (`tf.map_fn`), so that one window exists at a
    time: unrolled, XLA slices all kh*kw windows (each as large as the
    output gradient) before the first matmul and holds them together.

    Args:
        inputs: `[N, b, H, W, C_in]`: the convolution's inputs, per example.
        out_grads: `[N, b, H', W', C_out]`: gradients of its outputs.
        kernel_size: `(kh, kw)`.
        strides: `(sh, sw)`.
        padding: "SAME" or "VALID".
        dilations: `(dh, dw)`.
        groups: the convolution's groups: group j maps input channels
            `[j*c, (j+1)*c)` to output channels `[j*o, (j+1)*o)`.

    Returns:
        `[kh, kw, N, C_in / groups, C_out]`: example n's filter gradient
        (summed over its `b` rows) is `[:, :, n]`.
    """
    n, b, height, width, c_in = inputs.shape
    _, _, out_h, out_w, c_out = out_grads.shape
    c, o = c_in // groups, c_out // groups
    x = pad(
        tf.reshape(inputs, [-1, height, width, c_in]),
        kernel_size,
        strides,
        padding,
        dilations,
        (out_h, out_w),
    )
    rows = b * out_h * out_w  # per example
    batch = -1 if n is None else n  # unknown in a partial last batch
    g = tf.reshape(out_grads, [batch, rows, groups, o])
    (sh, sw), (dh, dw) = strides, dilations
    extent = [x.shape[0] or -1, (out_h - 1) * sh + 1, (out_w - 1) * sw + 1]
    extent += [c_in]
    starts = tf.constant(
        [
            [0, i * dh, j * dw, 0]
            for i in range(kernel_size[0])
            for j in range(kernel_size[1])
        ],
        tf.int32,
    )

    def offset_gradient(k):
        window = tf.slice(x, starts[k], extent)[:, ::sh, ::sw, :]
        window = tf.reshape(window, [batch, rows, groups, c])
        return tf.einsum("bngc,bngo->bcgo", window, g)

    grads = tf.map_fn(
        offset_gradient,
        tf.range(kernel_size[0] * kernel_size[1]),
        fn_output_signature=tf.TensorSpec([n, c, groups, o], x.dtype),
    )
    return tf.reshape(grads, [*kernel_size, batch, c, c_out])


def ws_kernel_gradients(v, unit, inv_std, dlog, axes):
    """Gradients with respect to the weights W of weight-standardized kernels.

    The kernel used is `U = (W - mean(W)) * r(var(W))` per output channel
    o (fan-in N). For the gradient `v` with respect to `U`, the gradient with
    respect to `W` is `r (v - mean(v)) + (2 r' / N) (W - mean(W)) (v . (W -
    mean(W)))`, that is `r (v - mean(v)) + (2 rho / (N r)) U (v . U)` with
    `rho = r' / r`. Formed for the per-example form, whose norms and
    clipped sum then come from the same tensor.

    Args:
        v: per-example gradients with respect to U, output channels last.
        unit: U, broadcastable against `v`.
        inv_std, dlog: `[O]`: r and rho = d log r / d var.
        axes: the fan-in axes of `v`.

    Returns:
        The gradients with respect to W, shaped as `v`.
    """
    fan_in = 1
    for axis in axes:
        fan_in *= v.shape[axis]
    # Centred first (two passes): `v . U` then carries no rounding of
    # the mean, which U's zero mean would cancel anyway.
    v = v - tf.reduce_mean(v, axes, keepdims=True)
    aligned = tf.reduce_sum(v * unit, axes, keepdims=True)
    return inv_std * v + (2.0 * dlog / (fan_in * inv_std)) * unit * aligned


def ws_kernel_sq_norms(
    centred_sq, aligned, inv_std, dlog, var, fan_in, aligned_sizes=0.0
):
    """Squared norms of per-example gradients of a weight-standardized kernel.

    The squared norm of `ws_kernel_gradients` per channel is

        r^2 ||v - mean(v)||^2 + (4 rho / N) (1 + rho var) (v . U)^2.

    rho < 0 for WSConv2D and ScaledWSConv2D: the second term is subtracted,
    and nearly cancels the first where `v - mean(v)` is nearly parallel to
    U (weight standardization is invariant to W's scale, so the gradient is
    orthogonal to W - mean(W)). The result is raised by `KAPPA` times the
    second term's magnitude, which on ordinary gradients is about 1/N of
    the first, and by what `v . U`'s rounding can change it: up to
    `e = KAPPA_GRAM * aligned_sizes`, the second term up to
    `|coef| (2 |v . U| e + e^2)`.

    Args:
        centred_sq: `[B]`: `sum_o r_o^2 ||v_o - mean(v_o)||^2`.
        aligned: `[B, O]`: `v_o . U_o`.
        inv_std, dlog, var: `[O]`: r, rho = d log r / d var, and var(W).
        fan_in: N.
        aligned_sizes: `[B, O]`: the sum of the sizes of the terms that
            `aligned` adds (as `gram_sq_norms`), where it is computed from
            rows larger than the gradient's (`z` of unshifted rows).

    Returns:
        `[B]` squared norms.
    """
    coef = 4.0 * dlog / fan_in * (1.0 + dlog * var)
    second = coef * tf.square(aligned)
    error = KAPPA_GRAM * aligned_sizes
    rounding = tf.abs(coef) * (2.0 * tf.abs(aligned) + error) * error
    return centred_sq + tf.reduce_sum(
        second + KAPPA * tf.abs(second) + rounding, -1
    )


def embedding_sq_norms(ids, g):
    """`||per-example embedding gradient||^2` for ids `[B, n]`, g `[B, n, d]`.

    Rows that look up the same id add up: `sum_{s,t} [id_s = id_t] g_s . g_t`.
    """
    g = tf.cast(g, tf.float32)
    same = tf.cast(ids[:, :, None] == ids[:, None, :], tf.float32)
    return tf.reduce_sum(same * tf.einsum("bnd,bmd->bnm", g, g), [1, 2])
