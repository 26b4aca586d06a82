"""The 2-D scattering transform: fixed wavelet features (a "ScatterNet").

Tramer & Boneh 2021 ("Differentially Private Learning Needs Better
Features (or Much More Data)") train DP-SGD models on the scattering
coefficients of Mallat 2012 / Bruna & Mallat 2013 instead of raw pixels:
hand-crafted, data-independent features that a linear model separates well,
so that few weights need noisy training. `Scattering2D` computes the
coefficients of orders 0, 1 and 2 with Kymatio's Morlet filter bank and
algorithm (Andreux et al. 2020, BSD-3-Clause; ported here because Kymatio
0.3 no longer imports with current SciPy): reflect padding to the next
multiple of 2^J plus 2^J (28 -> 36), convolutions in the Fourier domain,
modulus, low-pass averaging by a Gaussian of width 0.8 * 2^(J-1),
subsampling by 2^J.

For an `[n, H, W, C]` input the output is `[n, H', W', C * K]`, H' and W'
being H / 2^J and W / 2^J rounded down, with K = 1 + J L + L^2 J (J - 1) / 2
coefficients per input channel (81 for J = 2, L = 8: Fashion-MNIST's 28 x 28
image gives 7 x 7 x 81), in Kymatio's order per channel: order 0, then
order 1 by (j1, theta1), then order 2 by (j1, theta1, j2, theta2) with
j2 > j1.

The layer has no weights and treats every example and channel apart (2-D
FFTs over the two image axes only). The fast clipping engine has no rule for
FFTs, so inside a `DPModel` the layer needs the vectorized engine; the
intended use computes the features once, before training
(`experiment.build_data(features=Scattering2D())`, `experiment.featurize`).
"""

import numpy as np
import tensorflow as tf
import keras


def gabor_2d(size, sigma, theta, xi, slant=1.0):
    """A 2-D Gabor filter in space, periodized on a `size` grid (Kymatio)."""
    m, n = size
    rotation = np.array(
        [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    )
    curvature = (rotation @ np.diag([1.0, slant * slant]) @ rotation.T) / (
        2 * sigma * sigma
    )
    gabor = np.zeros((m, n), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.mgrid[ex * m : (ex + 1) * m, ey * n : (ey + 1) * n]
            gabor += np.exp(
                -(
                    curvature[0, 0] * xx * xx
                    + (curvature[0, 1] + curvature[1, 0]) * xx * yy
                    + curvature[1, 1] * yy * yy
                )
                + 1j * xi * (xx * np.cos(theta) + yy * np.sin(theta))
            )
    return gabor / (2 * np.pi * sigma * sigma / slant)


def morlet_2d(size, sigma, theta, xi, slant=0.5):
    """A Morlet filter: a Gabor filter minus its envelope, of zero mean."""
    wave = gabor_2d(size, sigma, theta, xi, slant)
    envelope = gabor_2d(size, sigma, theta, 0.0, slant)
    return wave - np.sum(wave) / np.sum(envelope) * envelope


def periodize(filter_fourier, res):
    """The filter for a signal subsampled by 2^res (Fourier domain)."""
    m, n = filter_fourier.shape
    k = 2**res
    masked = filter_fourier.copy()
    start, length = int(m * 2 ** (-res - 1)), int(m * (1 - 2 ** (-res)))
    masked[start : start + length, :] = 0
    start, length = int(n * 2 ** (-res - 1)), int(n * (1 - 2 ** (-res)))
    masked[:, start : start + length] = 0
    return masked.reshape(k, m // k, k, n // k).sum(axis=(0, 2))


def filter_bank(size, J, L=8):
    """Kymatio's Morlet filter bank, in the Fourier domain.

    Args:
        size: `(M, N)`, the padded signal's size (multiples of 2^J).
        J: the number of scales.
        L: the number of orientations.

    Returns:
        `(phi, psi)`: `phi[res]` the low-pass filter at resolution 2^-res
        (res < J); `psi[j][res]` a `[L, M / 2^res, N / 2^res]` stack of the
        L wavelets of scale j at resolution 2^-res (res <= j, res < J - 1
        unless J = 1).
    """
    phi_fourier = np.real(np.fft.fft2(gabor_2d(size, 0.8 * 2 ** (J - 1), 0, 0)))
    phi = [periodize(phi_fourier, res) for res in range(J)]
    psi = []
    for j in range(J):
        stack = [
            np.real(
                np.fft.fft2(
                    morlet_2d(
                        size,
                        0.8 * 2**j,
                        (int(L - L / 2 - 1) - theta) * np.pi / L,
                        3.0 / 4.0 * np.pi / 2**j,
                        4.0 / L,
                    )
                )
            )
            for theta in range(L)
        ]
        levels = range(min(j + 1, max(J - 1, 1)))
        psi.append(
            [np.stack([periodize(f, res) for f in stack]) for res in levels]
        )
    return phi, psi


def padded_size(height, width, J):
    """Kymatio's padded size: the next multiple of 2^J, plus 2^J."""
    k = 2**J
    return ((height + k) // k + 1) * k, ((width + k) // k + 1) * k


def num_coefficients(J, L=8):
    """K, the coefficients per input channel (orders 0, 1 and 2)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def _subsample(x, k):
    """Subsamples `[..., M, N]` complex signals by k, in Fourier."""
    if k == 1:
        return x
    m, n = x.shape[-2], x.shape[-1]
    y = tf.reshape(x, [-1, k, m // k, k, n // k])
    y = tf.reduce_mean(y, axis=[1, 3])
    return tf.reshape(y, tf.concat([tf.shape(x)[:-2], [m // k, n // k]], 0))


def _reflect_pad(x, pads, axis):
    """`tf.pad(mode="REFLECT")` along one axis, by slices (which
    `tf.vectorized_map` vectorizes; it loops over MirrorPad)."""
    before, after = pads
    size = x.shape[axis]
    parts = []
    if before:
        parts.append(
            tf.reverse(tf.gather(x, tf.range(1, before + 1), axis=axis), [axis])
        )
    parts.append(x)
    if after:
        parts.append(
            tf.reverse(
                tf.gather(x, tf.range(size - after - 1, size - 1), axis=axis),
                [axis],
            )
        )
    return tf.concat(parts, axis=axis)


@keras.saving.register_keras_serializable(package="keras_dpscale")
class Scattering2D(keras.layers.Layer):
    """Scattering coefficients of orders 0, 1, 2 of each image channel.

    Args:
        J: the number of scales (the output is 2^J times smaller).
        L: the number of orientations of the wavelets.
        **kwargs: `keras.layers.Layer` arguments.

    Input `[n, H, W, C]`, output `[n, H', W', C K]` with H' = H / 2^J
    rounded down (Kymatio's size),
    float32, K = `num_coefficients(J, L)`. No weights.
    """

    def __init__(self, J=2, L=8, **kwargs):
        super().__init__(**kwargs)
        if J < 1 or L < 1:
            raise ValueError(f"J and L must be >= 1, got J={J}, L={L}.")
        self.J = int(J)
        self.L = int(L)

    def build(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        if height is None or width is None:
            raise ValueError(
                f"Scattering2D needs static image sizes, got {input_shape}."
            )
        m, n = self._size = padded_size(height, width, self.J)
        # Reflection repeats no edge pixel: it pads at most size - 1.
        if (m - height + 1) // 2 >= height or (n - width + 1) // 2 >= width:
            raise ValueError(
                f"Scattering2D(J={self.J}) pads {input_shape[1:3]} to "
                f"{(m, n)} by reflection, which needs a larger image."
            )
        phi, psi = filter_bank(self._size, self.J, self.L)
        # numpy, made constants in each trace (a tf.function's own graph)
        self._phi = [f.astype(np.complex64) for f in phi]
        self._psi = [[f.astype(np.complex64) for f in p] for p in psi]
        self._pads = (  # reflect padding of the rows, of the columns
            ((m - height) // 2, (m - height + 1) // 2),
            ((n - width) // 2, (n - width + 1) // 2),
        )

    def call(self, inputs):
        J = self.J
        x = tf.transpose(tf.cast(inputs, tf.float32), [0, 3, 1, 2])
        x = _reflect_pad(x, self._pads[0], axis=2)
        x = _reflect_pad(x, self._pads[1], axis=3)  # [n, C, M, N]
        u0 = tf.signal.fft2d(tf.complex(x, tf.zeros_like(x)))

        def low_pass(u, res):  # [..., M', N'] Fourier at 2^-res -> space
            s = _subsample(u * self._phi[res], 2 ** (J - res))
            return tf.math.real(tf.signal.ifft2d(s))[..., 1:-1, 1:-1]

        out = [low_pass(u0, 0)[:, :, None]]  # [n, C, 1, H', W']
        order2 = []
        for j1 in range(J):
            u1 = u0[:, :, None] * self._psi[j1][0]  # [n, C, L, M, N]
            u1 = tf.signal.ifft2d(_subsample(u1, 2**j1))
            u1 = tf.signal.fft2d(tf.cast(tf.abs(u1), tf.complex64))
            out.append(low_pass(u1, j1))
            by_j2 = []
            for j2 in range(j1 + 1, J):
                u2 = u1[:, :, :, None] * self._psi[j2][j1]  # [n,C,L,L,.,.]
                u2 = tf.signal.ifft2d(_subsample(u2, 2 ** (j2 - j1)))
                u2 = tf.signal.fft2d(tf.cast(tf.abs(u2), tf.complex64))
                by_j2.append(low_pass(u2, j2))
            if by_j2:  # [n, C, theta1, (j2, theta2), H', W']
                s2 = tf.concat(by_j2, axis=3)
                n, c = tf.shape(s2)[0], tf.shape(s2)[1]
                order2.append(
                    tf.reshape(s2, [n, c, -1, s2.shape[-2], s2.shape[-1]])
                )
        s = tf.concat(out + order2, axis=2)  # [n, C, K, H', W']
        s = tf.transpose(s, [0, 3, 4, 1, 2])  # channel-major, then K
        c = inputs.shape[-1]  # static where known: a model may follow
        k = -1 if c is None else c * num_coefficients(J, self.L)
        return tf.reshape(s, [tf.shape(s)[0], s.shape[1], s.shape[2], k])

    def compute_output_shape(self, input_shape):
        m, n = padded_size(input_shape[1], input_shape[2], self.J)
        k = 2**self.J
        channels = input_shape[3] * num_coefficients(self.J, self.L)
        return (input_shape[0], m // k - 2, n // k - 2, channels)

    def get_config(self):
        return {**super().get_config(), "J": self.J, "L": self.L}
