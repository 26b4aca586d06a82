"""The ConvNeXt: every layer on the fast engine."""

from keras_dpscale.models.convnext import convnext
from tests.rules import harness

# Every layer type, few layers (XLA compiles each engine's step); layer
# scale at 0.5, not 1e-6, so that the block's gradients are not tiny.
TINY = dict(
    widths=(4, 8),
    depths=(1, 0),  # the second stage: its downsampling only
    num_classes=3,
    input_shape=(8, 8, 3),
    kernel_size=3,
    layer_scale=0.5,
)


def test_fast_engine_has_no_fallback_and_equals_per_example_clipping(caplog):
    model = convnext(**TINY)
    fast, expected, (x, y, clip) = harness.fast_without_fallback(model, caplog)
    harness.assert_sums_close(fast, expected)
    vectorized = harness.clipped_sum(model, x, y, clip, "vectorized")
    harness.assert_sums_close(fast, vectorized)
