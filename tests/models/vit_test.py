"""The ViT: its position embedding's rule, every layer on the fast engine,
and LoRA fine-tuning."""

import logging

import keras
import numpy as np

import keras_dpscale as kd
from keras_dpscale import validators
from keras_dpscale.models.vit import PositionEmbedding
from keras_dpscale.models.vit import vit
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum
from tests.rules import harness

TINY = dict(
    depth=1,
    width=8,
    heads=2,
    patch_size=4,
    num_classes=3,
    input_shape=(8, 8, 3),
)


def assert_sums_close(actual, expected, rtol=1e-4):
    """Sums equal up to `rtol` of the largest entry of all of them: the
    attention's key bias has a gradient of zero (softmax does not see a
    shift of all logits), of which each engine computes rounding only."""
    scale = max(np.max(np.abs(e)) for e in expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def test_position_embedding_rule_equals_per_example_gradients():
    x = np.random.default_rng(0).normal(size=(6, 4, 5)).astype("float32")
    harness.check_rule(PositionEmbedding(), x, views=2)


def test_builds_by_name_and_saves(tmp_path):
    model = kd.models.get(
        "vit_1_8", heads=2, num_classes=3, input_shape=(8, 8, 3)
    )
    assert isinstance(model, kd.DPModel)
    assert model.output.shape == (None, 3)
    validators.check_layers(model)  # no layer mixes examples
    x, _ = inputs_for(model, 2)
    path = str(tmp_path / "vit.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )


def test_fast_engine_has_no_fallback_and_equals_per_example_clipping(caplog):
    model = vit(**TINY)
    x, y = inputs_for(model, 4)
    expected, clip = reference_clipped_sum(model, x, y)  # half clipped
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, clip, "fast")
    assert "fast" in caplog.text  # the log is captured...
    assert "vectorized path" not in caplog.text  # ...and nothing fell back
    assert_sums_close(fast, expected)
    assert_sums_close(
        fast, harness.clipped_sum(model, x, y, clip, "vectorized")
    )


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
    x, y = inputs_for(model, 4)
    expected, clip = reference_clipped_sum(model, x, y)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, clip, "fast")
    assert "vectorized path" not in caplog.text
    assert_sums_close(fast, expected)
