"""The model zoo: reference sizes, and every model ready for the DP step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import validators
from tests.conftest import LOSS
from tests.conftest import TINY
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum
from tests.conftest import tiny


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("wrn_16_4", 10, 2.75e6),
        ("wrn_40_4", 10, 8.9e6),
        ("nf_resnet_50", 1000, 25.5e6),
        ("nfnet_f0", 1000, 71.5e6),
        ("nfnet_f1", 1000, 132.6e6),
        ("nfnet_f2", 1000, 193.8e6),
        ("nfnet_f3", 1000, 254.9e6),
    ],
)
def test_parameter_counts_match_the_reference_architectures(
    name, num_classes, expected
):
    # Symbolic build only; the large ones are never run in tests.
    model = kd.models.get(
        name, num_classes=num_classes, input_shape=(None, None, 3)
    )
    assert isinstance(model, kd.DPModel)
    assert abs(model.count_params() - expected) <= 0.01 * expected


def test_dpnasnet_is_the_authors_fashion_mnist_network():
    # DPNASNet_FMNIST in the authors' dp_evaluate/models.py (C = 16), by
    # hand: stem 3x3 to 32; per cell a 1x1 projection to 32, 32 then 64
    # channels and 7 depthwise 3x3 convolutions (the 3 "none" edges have no
    # weights); adapt 1x1 320 to 128; Dense 1152 to 128; head 128 to 10.
    expected = (
        9 * 32
        + (32 * 32 + 7 * 9 * 32)
        + (160 * 32 + 7 * 9 * 32)
        + (160 * 64 + 7 * 9 * 64)
        + 320 * 128
        + (1152 * 128 + 128)
        + (128 * 10 + 10)
    )
    model = kd.models.get("dpnasnet")
    assert isinstance(model, kd.DPModel)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert count == expected == 214_570
    cells = [
        tuple(layer.output.shape)
        for layer in model.layers
        if isinstance(layer, keras.layers.Concatenate)
    ]  # nodes 1 to 5 of each cell
    assert cells == [
        (None, 28, 28, 160),
        (None, 14, 14, 160),
        (None, 7, 7, 320),
    ]
    validators.check_layers(model)
    with pytest.raises(ValueError, match="Unknown DPNAS operation"):
        kd.models.dpnasnet(genotype=(("avg_pool", 0, 1),))


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown model"):
        kd.models.get("resnet_50")
    with pytest.raises(ValueError, match="variant"):
        kd.models.get("nfnet_f9")


def test_no_layer_mixes_examples_or_normalizes_batches():
    for name in ("wrn_16_4", "nf_resnet_50", "nfnet_f0"):
        validators.check_layers(kd.models.get(name, input_shape=(8, 8, 3)))


@pytest.mark.parametrize("name", sorted(TINY))
def test_zero_noise_dp_step_is_clipped_sgd_then_save_and_load(name, tmp_path):
    model = tiny(name)
    x, y = inputs_for(model, 4)
    initial = [v.numpy() for v in model.trainable_variables]
    grad_sum, clip = reference_clipped_sum(model, x, y)
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.5, l2_norm_clip=clip, noise_multiplier=0.0
        ),
        loss=LOSS,
    )
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, True)
    model.fit(data, verbose=0)
    for w0, g, w in zip(initial, grad_sum, model.trainable_variables):
        np.testing.assert_allclose(
            w.numpy(), w0 - 0.5 * g / 4, rtol=1e-4, atol=1e-6
        )
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kd.DPModel)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )


@pytest.mark.parametrize("name", sorted(TINY))
def test_dp_step_in_mixed_bfloat16(name, mixed_bfloat16):
    # With stochastic depth and dropout on, and gradient accumulation.
    kwargs = dict(stochdepth_rate=0.5, dropout_rate=0.2) if "nf" in name else {}
    model = tiny(name, **kwargs)
    x, y = inputs_for(model, 8)
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            accumulation_steps=2,
        ),
        loss=LOSS,
    )
    assert model.layers[-1].compute_dtype == "bfloat16"
    before = [v.numpy() for v in model.trainable_variables]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, True)
    history = model.fit(data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    assert {v.dtype for v in model.optimizer._grad_sums} == {"float32"}
    assert int(model.optimizer.iterations) == 2
    for a, b in zip(before, model.trainable_variables):
        assert not np.array_equal(a, b.numpy())


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_1_8", dict(heads=2, input_shape=(8, 8, 3))),
        ("convnext", dict(widths=(4, 8), depths=(1, 0), kernel_size=3,
                          input_shape=(8, 8, 3))),
    ],
)  # fmt: skip
def test_modern_backbones_build_by_name_and_save(name, kwargs, tmp_path):
    model = kd.models.get(name, num_classes=3, **kwargs)
    assert isinstance(model, kd.DPModel)
    assert model.output.shape == (None, 3)
    validators.check_layers(model)  # no layer mixes examples
    x, _ = inputs_for(model, 2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )
