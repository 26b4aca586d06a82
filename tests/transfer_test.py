"""Transfer learning: backbone loading, freezing, head-only DP fine-tuning."""

import logging
import os
import pickle

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import experiment
from tests.conftest import LOSS
from tests.conftest import inputs_for
from tests.rules import harness

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def wrn(num_classes, width=1):
    return kd.models.wide_resnet(
        depth=10, width=width, num_classes=num_classes,
        input_shape=(8, 8, 3), groups=4,
    )  # fmt: skip


def perturbed(model, seed=0):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(v.numpy() + rng.normal(size=v.shape).astype("float32"))
    return model


def test_load_backbone_copies_all_but_the_new_head(tmp_path):
    source = perturbed(wrn(10))
    target = wrn(3)
    head = target.get_layer("head").kernel.numpy()
    copied = kd.transfer.load_backbone(target, source)
    assert "head" not in copied and "stem_conv" in copied
    for layer in target.layers:
        if layer.name in copied:
            for a, b in zip(
                layer.weights, source.get_layer(layer.name).weights
            ):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(target.get_layer("head").kernel, head)
    # From a .keras file too.
    path = str(tmp_path / "source.keras")
    source.save(path)
    other = wrn(3)
    kd.transfer.load_backbone(other, path)
    np.testing.assert_array_equal(
        other.get_layer("stem_conv").kernel,
        source.get_layer("stem_conv").kernel,
    )


def test_load_backbone_fails_loudly_on_a_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        kd.transfer.load_backbone(wrn(3, width=2), wrn(10))
    with pytest.raises(ValueError, match="shapes"):
        kd.transfer.load_backbone(wrn(3), wrn(10), exclude=())
    with pytest.raises(ValueError, match="no counterpart"):
        kd.transfer.load_backbone(
            wrn(3), keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        )


def test_freeze_by_name_count_and_list():
    model = wrn(3)
    frozen = kd.transfer.freeze(model, until="pool")
    assert [v.path.split("/")[0] for v in model.trainable_variables] == [
        "head", "head",
    ]  # fmt: skip
    assert "stem_conv" in frozen and "head" not in frozen
    model = wrn(3)
    assert kd.transfer.freeze(model, num_layers=2) == [
        model.layers[0].name, "stem_conv",
    ]  # fmt: skip
    model = wrn(3)
    kd.transfer.freeze(model, names=["head"])
    assert not model.get_layer("head").trainable
    with pytest.raises(ValueError, match="No layers"):
        kd.transfer.freeze(model, names=["nope"])


@pytest.mark.parametrize("head_only", [True, False])
def test_dp_fine_tuning_of_the_head_or_of_all_layers(head_only):
    model = wrn(3)
    kd.transfer.load_backbone(model, perturbed(wrn(10)))
    if head_only:
        kd.transfer.freeze(model, until="pool")
    # The layers' weights: the model's own privacy ledger changes by design.
    weights = [v for layer in model.layers for v in layer.weights]
    before = {v.path: v.numpy() for v in weights}
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.5, l2_norm_clip=1.0, noise_multiplier=1.0
        ),
        loss=LOSS,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=8)
    model.fit(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8, True), verbose=0
    )
    changed = {v.path for v in weights if not np.array_equal(before[v.path], v)}
    assert {p.split("/")[0] for p in changed} >= {"head"}
    if head_only:
        assert {p.split("/")[0] for p in changed} == {"head"}
    else:
        assert "stem_conv/kernel" in changed


def tiny_nfnet(num_classes):
    return kd.models.nfnet(
        num_classes=num_classes, width=1 / 16, group_size=8,
        depth=(1, 1, 1, 1), input_shape=(16, 16, 3),
    )  # fmt: skip


def official_keys(num_blocks, shortcut_blocks):
    """Haiku module paths of the published NFNet checkpoints, by hand."""
    modules = [f"NFNet/~/stem_conv{i}" for i in range(4)]
    params = {m: ("w", "b", "gain") for m in modules}
    for i in range(num_blocks):
        block = "NFNet/~/nf_block" + (f"_{i}" if i else "")
        params[block] = ("skip_gain",)
        convs = ["conv0", "conv1", "conv1b", "conv2"]
        convs += ["conv_shortcut"] if i in shortcut_blocks else []
        for conv in convs:
            params[f"{block}/~/{conv}"] = ("w", "b", "gain")
        for linear in ("linear", "linear_1"):
            params[f"{block}/~/squeeze_excite/~/{linear}"] = ("w", "b")
    params["NFNet/~/final_conv"] = ("w", "b", "gain")
    params["NFNet/~/linear"] = ("w", "b")
    return params


def test_nfnet_key_map_has_the_published_module_count():
    # The published F0 and F1 files hold 94 and 178 Haiku modules.
    for variant, count in (("F0", 94), ("F1", 178)):
        keys = kd.transfer.nfnet_key_map(
            kd.models.nfnet(variant, input_shape=(None, None, 3))
        )
        assert len({k.rsplit("/", 1)[0] for k in keys}) == count


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_load_nfnet_checkpoint_from_a_file_with_the_official_keys(
    fmt, tmp_path
):
    # A synthetic checkpoint: the official key names, values by shape.
    source = tiny_nfnet(1000)
    by_key = kd.transfer.nfnet_key_map(source)
    params = official_keys(num_blocks=4, shortcut_blocks={0, 1, 2, 3})
    assert {f"{m}/{p}" for m, ps in params.items() for p in ps} == set(by_key)
    rng = np.random.default_rng(0)
    tree = {
        m: {
            p: rng.normal(size=by_key[f"{m}/{p}"].shape).astype("float32")
            for p in ps
        }
        for m, ps in params.items()
    }
    path = str(tmp_path / "F0_haiku.npz")
    if fmt == "pickle":  # how the published files are stored
        with open(path, "wb") as f:
            pickle.dump(tree, f)
    else:
        np.savez(
            path, **{f"{m}/{p}": a for m in tree for p, a in tree[m].items()}
        )
    model = tiny_nfnet(3)  # a new head
    head = model.get_layer("head").kernel.numpy()
    assert kd.transfer.load_nfnet_checkpoint(model, path) == len(by_key) - 2
    conv1b = model.get_layer("block2_conv1b")
    np.testing.assert_array_equal(
        conv1b.kernel, tree["NFNet/~/nf_block_2/~/conv1b"]["w"]
    )
    np.testing.assert_array_equal(
        model.get_layer("block1_skip_gain").gain,
        tree["NFNet/~/nf_block_1"]["skip_gain"],
    )
    se = model.get_layer("block0_squeeze_excite")
    np.testing.assert_array_equal(
        se.fc1.bias, tree["NFNet/~/nf_block/~/squeeze_excite/~/linear_1"]["b"]
    )
    np.testing.assert_array_equal(model.get_layer("head").kernel, head)
    # With the head: 1000 classes load; a missing key fails loudly.
    full = tiny_nfnet(1000)
    kd.transfer.load_nfnet_checkpoint(full, path, exclude_head=False)
    np.testing.assert_array_equal(
        full.get_layer("head").kernel, tree["NFNet/~/linear"]["w"]
    )
    del tree["NFNet/~/final_conv"]
    with open(path, "wb") as f:
        pickle.dump(tree, f)
    with pytest.raises(ValueError, match="missing"):
        kd.transfer.load_nfnet_checkpoint(tiny_nfnet(3), path)


# -- A keras.applications backbone with frozen BatchNormalization (issue 19).


def backbone_weights(model):
    """`{path: value}` of every weight of the backbone (moving statistics
    of its BatchNormalization layers included)."""
    return {v.path: v.numpy() for v in model.layers[1].weights}


def fit_dp(model, steps=2, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = (steps * batch,) + tuple(model.inputs[0].shape[1:])
    x = rng.uniform(0, 255, size=shape).astype("float32")
    y = rng.integers(0, 3, size=steps * batch).astype("int32")
    model.compile(
        optimizer=kd.DPSGD(
            learning_rate=0.5, momentum=0.9, l2_norm_clip=1.0,
            noise_multiplier=1.0, batch_size=batch, target_delta=1e-5,
        ),
        loss=LOSS,
    )  # fmt: skip
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    return model


def test_frozen_applications_backbone_trains_its_head_with_dp():
    model = kd.transfer.backbone_classifier(
        "MobileNetV3Small", num_classes=3, input_shape=(32, 32, 3)
    )
    norms = kd.transfer.batch_normalization_layers(model)
    assert len(norms) > 10 and not any(n.trainable for n in norms)
    assert [v.path for v in model.trainable_variables] == [
        "head/kernel", "head/bias",
    ]  # fmt: skip
    before = backbone_weights(model)
    head = model.get_layer("head").kernel.numpy()
    fit_dp(model)
    for path, value in backbone_weights(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    assert not np.array_equal(model.get_layer("head").kernel, head)
    assert 0 < model.epsilon() < np.inf


def test_last_block_fine_tuned_with_its_batch_normalization_frozen(
    clean_gin,
):
    # The example config builds it; a few DP steps train the last block's
    # convolutions, while every BatchNormalization stays as it was.
    experiment.parse_config(
        [os.path.join(CONFIGS, "transfer_frozen_backbone.gin")]
    )
    model = experiment.build_model()
    gin.clear_config()
    assert isinstance(model, kd.DPModel)
    trained = {v.path.split("/")[0] for v in model.trainable_variables}
    assert trained == {
        "expanded_conv_10_project", "conv_1", "head",
    }  # fmt: skip
    norms = kd.transfer.batch_normalization_layers(model)
    stats = {v.path: v.numpy() for n in norms for v in n.weights}
    project = model.layers[1].get_layer("expanded_conv_10_project")
    kernel = project.kernel.numpy()
    fit_dp(model)
    assert model._dp_engine.chosen == "fast"
    for n in norms:
        for v in n.weights:
            np.testing.assert_array_equal(v.numpy(), stats[v.path])
    assert not np.array_equal(project.kernel.numpy(), kernel)


def test_backbone_weights_from_a_file(tmp_path):
    base = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3),
        pooling="avg",
    )  # fmt: skip
    perturbed(base)
    path = str(tmp_path / "public.weights.h5")
    base.save_weights(path)
    model = kd.transfer.backbone_classifier(
        "MobileNetV3Small", num_classes=3, input_shape=(32, 32, 3),
        weights=path,
    )  # fmt: skip
    for a, b in zip(model.layers[1].weights, base.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_unfreeze_never_unfreezes_batch_normalization():
    i = keras.Input((4,))
    h = keras.layers.Dense(3, name="a")(i)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dense(3, name="b")(h)
    model = keras.Model(i, keras.layers.Dense(2, name="c")(h))
    model.trainable = False
    assert kd.transfer.unfreeze(model, from_layer="bn") == ["b", "c"]
    assert not model.get_layer("bn").trainable
    assert not model.get_layer("a").trainable
    assert kd.transfer.unfreeze(model, names=["a"]) == ["a"]
    assert kd.transfer.freeze_batch_normalization(model) == ["bn"]
    with pytest.raises(ValueError, match="No layers"):
        kd.transfer.unfreeze(model, from_layer="nope")
    kd.make_private(model).compile(
        optimizer=kd.DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0
        ),
        loss=LOSS,
    )  # the frozen BatchNormalization is accepted


def test_fast_engine_is_exact_through_the_frozen_backbone(caplog):
    # The fast engine proves the frozen MobileNetV3 (inference-mode
    # BatchNormalization, hard-swish, squeeze-excite) keeps examples apart
    # and its clipped sum equals the one of a loop over single examples.
    from tests.conftest import reference_clipped_sum

    model = kd.transfer.backbone_classifier(
        "MobileNetV3Small", num_classes=3, input_shape=(32, 32, 3),
        trainable_from="expanded_conv_10_project",
    )  # fmt: skip
    x, y = inputs_for(model, 4)
    expected, clip = reference_clipped_sum(model, x, y)  # half clipped
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, clip, "fast")
    assert "vectorized" not in caplog.text  # no fallback, no layer alone
    harness.assert_sums_close(fast, expected, rtol=1e-5)


def test_convnext_tiny_config_fine_tunes_its_last_block_on_the_fast_engine(
    clean_gin, caplog
):
    # keras.applications.ConvNeXtTiny, frozen but its last block (depthwise
    # convolution, LayerNorm, the MLP's Dense layers, layer scale) and a
    # Dense head: every trainable layer through its rule (each rule is
    # checked against per-example gradients on its own, and a whole
    # ConvNeXt in tests/models/convnext_test.py).
    experiment.parse_config(
        [os.path.join(CONFIGS, "transfer_convnext_tiny.gin")],
        ["backbone_classifier.num_classes = 3"],
    )
    model = experiment.build_model()
    trained = {v.path.split("/")[-2] for v in model.trainable_variables}
    assert "convnext_tiny_stage_3_block_2_layer_scale" in trained
    x, y = inputs_for(model, 2)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, 1.0, "fast")
    assert "fast" in caplog.text  # the log is captured...
    assert "vectorized path" not in caplog.text  # ...and nothing fell back
    assert len(fast) == len(model.trainable_variables)
    assert all(np.all(np.isfinite(g)) for g in fast)


def test_lora_config_loads_the_checkpoint_then_trains_the_factors(
    tmp_path, clean_gin
):
    tiny = dict(depth=1, width=6, heads=2, input_shape=(8, 8, 3))
    public = kd.models.vit(**tiny, num_classes=5, private=False)
    perturbed(public)
    path = str(tmp_path / "vit_public.keras")
    public.save(path)
    experiment.parse_config(
        [os.path.join(CONFIGS, "vit_lora.gin")],
        [
            f"build_model.model_kwargs = {dict(tiny, num_classes=3)!r}",
            f"build_model.init_checkpoint = {path!r}",
            "build_model.lora_rank = 2",
        ],
    )
    model = experiment.build_model()
    names = {v.path for v in model.trainable_variables}
    assert {n for n in names if not n.startswith("head/")} == {
        f"block1_{p}/lora_kernel_{f}"
        for p in (
            "attn/query",
            "attn/key",
            "attn/value",
            "attn/attention_output",
            "mlp1",
            "mlp2",
        )
        for f in "ab"
    }
    # The frozen kernels are the checkpoint's (copied before LoRA).
    mlp = model.get_layer("block1_mlp1")
    np.testing.assert_array_equal(
        mlp._kernel.numpy(), public.get_layer("block1_mlp1").kernel.numpy()
    )


def test_enable_lora_refuses_what_it_would_silently_get_wrong():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    inputs = keras.Input((4,))
    nested = kd.DPModel(
        inputs, keras.layers.Dense(2, name="head")(inner(inputs))
    )
    with pytest.raises(ValueError, match="are models"):
        kd.transfer.enable_lora(nested, 2)
    flat = kd.DPSequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="No layer named 'head'"):
        kd.transfer.enable_lora(flat, 2)
