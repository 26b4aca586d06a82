"""The ViT: its position embedding's rule, every layer on the fast engine,
and LoRA fine-tuning."""

import numpy as np

from keras_dpscale.models.vit import PositionEmbedding
from keras_dpscale.models.vit import vit
from tests.rules import harness

TINY = dict(
    depth=1,
    width=8,
    heads=2,
    patch_size=4,
    num_classes=3,
    input_shape=(8, 8, 3),
)


def test_position_embedding_rule_equals_per_example_gradients():
    x = np.random.default_rng(0).normal(size=(6, 4, 5)).astype("float32")
    harness.check_rule(PositionEmbedding(), x, views=2)


def test_fast_engine_has_no_fallback_and_equals_per_example_clipping(caplog):
    model = vit(**TINY)
    fast, expected, (x, y, clip) = harness.fast_without_fallback(model, caplog)
    harness.assert_sums_close(fast, expected, across=True)
    vectorized = harness.clipped_sum(model, x, y, clip, "vectorized")
    harness.assert_sums_close(fast, vectorized, across=True)


def test_lora_trains_only_the_factors_and_the_head(caplog):
    model = vit(**TINY, lora_rank=2)
    names = sorted(v.path for v in model.trainable_variables)
    projections = ("query", "key", "value", "attention_output")
    lora = [
        f"block1_attn/{p}/lora_kernel_{f}" for p in projections for f in "ab"
    ]
    lora += [f"block1_mlp{i}/lora_kernel_{f}" for i in (1, 2) for f in "ab"]
    assert names == sorted(lora + ["head/bias", "head/kernel"])
    # LoRA's B starts at zero, which would leave A's gradient zero.
    rng = np.random.default_rng(1)
    for v in model.trainable_variables:
        if "lora_kernel_b" in v.path:
            v.assign(rng.normal(size=v.shape))
    fast, expected, _ = harness.fast_without_fallback(model, caplog)
    harness.assert_sums_close(fast, expected, across=True)
