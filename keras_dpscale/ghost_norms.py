"""Per-example gradient norms of linear layers without per-example gradients.

A linear layer `o = a @ W` seen by example i through its rows `a_i` (`[n,
p]`: n positions, or K augmult views times positions) with output gradient
`g_i` (`[n, d]`) has the per-example gradient `a_i^T g_i` (`[p, d]`). Its
squared norm has two exact forms (Li et al. 2021; Bu et al. 2022):

- ghost (Gram) form: `<a_i a_i^T, g_i g_i^T>`, cost ~ n^2 (p + d) and
  memory n^2 per example;
- per-example form: `||a_i^T g_i||^2`, cost ~ n p d and memory p d.

`matmul_sq_norms` picks the cheaper one per layer ("mixed ghost
clipping"). Convolutions are linear layers on image patches (`patches`).
Weight-standardized kernels (`ws_kernel_sq_norms`) need three per-channel
quantities of the gradient with respect to the standardized kernel, which
both forms provide. Everything is computed in float32.
"""

import tensorflow as tf


def use_ghost(n, p, d):
    """True when the Gram form is cheaper: n^2 (p + d) < n p d."""
    return n * (p + d) < p * d


def gram_sq_norms(a, g):
    """`||a_i^T g_i||^2` by the Gram form, for `[B, n, p]`, `[B, n, d]`.

    Returns `[B]`: `sum_{s,t} (a_s . a_t) (g_s . g_t)`.
    """
    a = tf.cast(a, tf.float32)
    g = tf.cast(g, tf.float32)
    if a.shape[1] == 1:  # one row: ||a||^2 ||g||^2
        return tf.reduce_sum(tf.square(a), [1, 2]) * tf.reduce_sum(
            tf.square(g), [1, 2]
        )
    gram_a = tf.einsum("bnp,bmp->bnm", a, a)
    gram_g = tf.einsum("bnd,bmd->bnm", g, g)
    return tf.reduce_sum(gram_a * gram_g, [1, 2])


def outer(a, g):
    """Per-example gradients `a_i^T g_i`: `[B, p, d]` (float32)."""
    return tf.einsum(
        "bnp,bnd->bpd", tf.cast(a, tf.float32), tf.cast(g, tf.float32)
    )


def matmul_sq_norms(a, g):
    """`||a_i^T g_i||^2` for `[B, n, p]`, `[B, n, d]`, by the cheaper form."""
    _, n, p = a.shape
    d = g.shape[-1]
    if use_ghost(n, p, d):
        return gram_sq_norms(a, g)
    return tf.reduce_sum(tf.square(outer(a, g)), [1, 2])


def conv_padding(size, out, kernel, stride, dilation, padding):
    """`[before, after]` padding of one spatial axis, as TensorFlow pads."""
    total = 0
    if padding.upper() == "SAME":
        total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return [total // 2, total - total // 2]


def patches(x, kernel_size, strides, padding, dilations, out_size):
    """Image patches of a 2D convolution: `[N, H, W, C]` -> `[N, H', W', kh*kw*C]`.

    Ordered as the kernel `[kh, kw, C, O]` reshaped to `[kh*kw*C, O]`, so
    that the convolution is `patches @ kernel`. Built from strided slices
    (copies, no arithmetic).
    """
    _, height, width, _ = x.shape
    pads = [
        conv_padding(size, out, k, s, dl, padding)
        for size, out, k, s, dl in zip(
            (height, width), out_size, kernel_size, strides, dilations
        )
    ]
    x = tf.pad(x, [[0, 0], *pads, [0, 0]])
    (out_h, out_w), (sh, sw), (dh, dw) = out_size, strides, dilations
    windows = [
        x[
            :,
            i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
            j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
            :,
        ]
        for i in range(kernel_size[0])
        for j in range(kernel_size[1])
    ]
    return tf.concat(windows, axis=-1)


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
