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

Convolutions are linear layers on image patches (`patches`). Weight-
standardized kernels (`ws_kernel_sq_norms`) need three per-channel
quantities of the gradient with respect to the standardized kernel, which
all forms provide. Everything is computed in float32.
"""

import tensorflow as tf


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
    `[B, n, n]` and `g` `[B, n, d]`: `[B]`."""
    return tf.reduce_sum(a_gram * gram(g), [1, 2])


def outer(a, g):
    """Per-example gradients `a_i^T g_i`: `[B, p, d]` (float32)."""
    return tf.einsum(
        "bnp,bnd->bpd", tf.cast(a, tf.float32), tf.cast(g, tf.float32)
    )


def matmul_sq_norms(a, g):
    """`||a_i^T g_i||^2` for `[B, n, p]`, `[B, n, d]`, by the cheaper form."""
    _, n, p = a.shape
    if cheapest(matmul_costs(n, p, g.shape[-1])) == "gram":
        return gram_sq_norms(gram(a), g)
    return tf.reduce_sum(tf.square(outer(a, g)), [1, 2])


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


def ws_kernel_sq_norms(weighted_sq, sums, aligned, inv_std, dlog, var, fan_in):
    """Squared norms of per-example gradients of a weight-standardized kernel.

    The kernel used is `U = (W - mean(W)) * r(var(W))` per output channel o
    (fan-in N). For the gradient `v` with respect to `U`, the gradient with
    respect to `W` is `r (v - mean(v)) + (2 r' / N) (W - mean(W)) (v . (W -
    mean(W)))`, whose squared norm per channel is

        r^2 (||v||^2 - (sum v)^2 / N) + (4 rho / N) (1 + rho var) (v . U)^2

    with `rho = r' / r`.

    Args:
        weighted_sq: `[B]`: `sum_o r_o^2 ||v_o||^2`.
        sums: `[B, O]`: `sum_j v_jo`.
        aligned: `[B, O]`: `v_o . U_o`.
        inv_std, dlog, var: `[O]`: r, rho = d log r / d var, and var(W).
        fan_in: N.

    Returns:
        `[B]` squared norms.
    """
    coef = 4.0 * dlog / fan_in * (1.0 + dlog * var)
    return (
        weighted_sq
        - tf.reduce_sum(tf.square(sums) * tf.square(inv_std), -1) / fan_in
        + tf.reduce_sum(coef * tf.square(aligned), -1)
    )


def embedding_sq_norms(ids, g):
    """`||per-example embedding gradient||^2` for ids `[B, n]`, g `[B, n, d]`.

    Rows that look up the same id add up: `sum_{s,t} [id_s = id_t] g_s . g_t`.
    """
    g = tf.cast(g, tf.float32)
    same = tf.cast(ids[:, :, None] == ids[:, None, :], tf.float32)
    return tf.reduce_sum(same * tf.einsum("bnd,bmd->bnm", g, g), [1, 2])
