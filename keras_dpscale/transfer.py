"""Transfer learning: load a pre-trained backbone, freeze, fine-tune with DP.

Kurakin et al. 2022 and De et al. 2022 get their best ImageNet results by
DP fine-tuning a model pre-trained on public data. The recipe here:

    model = kd.models.get("nfnet_f3", num_classes=1000)
    kd.transfer.load_nfnet_checkpoint(model, "F3_haiku.npz")  # or
    kd.transfer.load_backbone(model, pretrained_model_or_keras_file)
    kd.transfer.freeze(model, until="final_act")   # head-only fine-tuning
    model.compile(optimizer=kd.DPSGD(...), ...)

Only the trainable variables get per-example gradients, so head-only DP
fine-tuning costs little more than a forward pass.

A `keras.applications` backbone with BatchNormalization (ResNet,
MobileNet, EfficientNet) trains with DP once its BatchNormalization layers
are frozen: Keras 3 then normalizes each example with the fixed moving
statistics (pre-trained on public data) and updates none of them, so the
layers neither mix the examples nor learn from them
(`validators.frozen_batch_normalization`):

    model = kd.transfer.backbone_classifier(
        "MobileNetV3Small", num_classes=10, input_shape=(224, 224, 3),
        weights="mobilenet_v3_small_notop.weights.h5",  # public weights
        trainable_from="expanded_conv_10_expand",  # or None: head only
    )
    model.compile(optimizer=kd.DPSGD(...), ...)

`freeze_batch_normalization` and `unfreeze` do the same on a model of
your own: whatever else is trainable, every BatchNormalization stays
frozen.
"""

import pickle
import re

import keras
import numpy as np

from keras_dpscale import dp_model
from keras_dpscale import saving
from keras_dpscale._compat import keras_private


def load_backbone(model, source, exclude=("head",)):
    """Copies weights layer by layer, by name, from `source` into `model`.

    Every layer of `model` that has weights and is not in `exclude` must
    exist in `source` with the same weight shapes: a silent partial load
    would fine-tune a randomly initialized backbone.

    Args:
        model: the model to fill (for example with a new head).
        source: a `keras.Model` or the path of a `.keras` file.
        exclude: names of layers of `model` left as initialized.

    Returns:
        The names of the layers whose weights were copied.
    """
    if isinstance(source, str):
        source = saving.load_model(source, compile=False)
    by_name = {layer.name: layer for layer in source.layers}
    copied = []
    for layer in model.layers:
        if not layer.weights or layer.name in exclude:
            continue
        if layer.name not in by_name:
            raise ValueError(
                f"Layer {layer.name!r} has no counterpart in the source "
                "model; add it to `exclude` to keep its initialization."
            )
        weights = by_name[layer.name].get_weights()
        shapes = [w.shape for w in layer.get_weights()]
        if [w.shape for w in weights] != shapes:
            raise ValueError(
                f"Layer {layer.name!r}: source weights have shapes "
                f"{[w.shape for w in weights]}, the model {shapes}."
            )
        layer.set_weights(weights)
        copied.append(layer.name)
    return copied


def freeze(model, until=None, num_layers=None, names=()):
    """Freezes a prefix of `model.layers`, or the named layers.

    Args:
        model: a functional or Sequential model.
        until: freeze all layers up to and including the one of this name.
        num_layers: freeze the first `num_layers` layers.
        names: freeze these layers (in addition).

    Returns:
        The names of the layers frozen. Compile (again) after freezing.
    """
    layers = model.layers
    count = 0
    if until is not None:
        index = [layer.name for layer in layers].index(until)
        count = index + 1
    if num_layers is not None:
        count = max(count, num_layers)
    frozen = [layer for layer in layers[:count]]
    missing = set(names) - {layer.name for layer in layers}
    if missing:
        raise ValueError(f"No layers named {sorted(missing)}.")
    frozen += [layer for layer in layers if layer.name in names]
    for layer in frozen:
        layer.trainable = False
    return [layer.name for layer in frozen]


def batch_normalization_layers(model):
    """Every `keras.layers.BatchNormalization` of `model`, nested too."""
    return [
        layer
        for layer in keras_private.flatten_layers(model, include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def freeze_batch_normalization(model):
    """Sets `trainable = False` on every BatchNormalization of `model`.

    Keras 3 then runs them in inference mode even in training: each example
    is normalized by the moving statistics, which stay as they are. Call it
    after anything that sets `trainable` on a parent layer (which sets it on
    every sublayer), and compile afterwards.

    Returns:
        The names of the BatchNormalization layers.
    """
    found = batch_normalization_layers(model)
    for layer in found:
        layer.trainable = False
    return [layer.name for layer in found]


def unfreeze(model, from_layer=None, names=()):
    """Makes the layers of `model` from `from_layer` on (in `model.layers`
    order), and the named ones, trainable; every other layer, and every
    BatchNormalization, frozen.

    Args:
        model: a functional model (a `keras.applications` backbone).
        from_layer: the first layer to train, or None.
        names: more layers to train.

    Returns:
        The names of the layers made trainable (BatchNormalization never).
    """
    layer_names = [layer.name for layer in model.layers]
    missing = set(names) - set(layer_names)
    if from_layer is not None and from_layer not in layer_names:
        missing.add(from_layer)
    if missing:
        raise ValueError(f"No layers named {sorted(missing)}.")
    start = (
        len(layer_names)
        if from_layer is None
        else layer_names.index(from_layer)
    )
    model.trainable = True  # a frozen parent hides its sublayers' variables
    trained = []
    for index, layer in enumerate(model.layers):
        train = index >= start or layer.name in names
        layer.trainable = train
        if train and layer.weights:
            trained.append(layer.name)
    frozen = set(freeze_batch_normalization(model))
    return [name for name in trained if name not in frozen]


def enable_lora(model, rank, head="head"):
    """LoRA fine-tuning (Hu et al. 2022): LoRA of `rank` on every `Dense`
    and `EinsumDense` of `model` (the projections of `MultiHeadAttention`
    included) but the head; only their factors and the head train.

    Every other layer is frozen, and so are the biases of the layers with
    LoRA. Load pre-trained weights first (`load_backbone`): with LoRA on,
    the layers hold two more variables each. The fast engine clips the
    factors by `rules.lora`.

    Args:
        model: a functional model whose layers are not models themselves
            (their layers would be frozen without LoRA: refused).
        rank: the factors' rank r.
        head: the name of the layer left fully trainable.

    Returns:
        The names of the layers given LoRA.

    Raises:
        ValueError: if no layer is named `head`, or a layer is a model.
    """
    names = [layer.name for layer in model.layers]
    if head not in names:
        raise ValueError(
            f"No layer named {head!r} (the head, left fully trainable)."
        )
    nested = [l.name for l in model.layers if isinstance(l, keras.Model)]
    if nested:
        raise ValueError(
            f"enable_lora takes the layers of one functional model; "
            f"{nested} are models: enable LoRA on their layers yourself."
        )
    lora = []
    for layer in model.layers:
        if layer.name == head:
            continue
        if isinstance(layer, keras.layers.MultiHeadAttention):
            targets = [
                layer.query_dense,
                layer.key_dense,
                layer.value_dense,
                layer.output_dense,
            ]
        elif isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            targets = [layer]
        else:
            layer.trainable = False
            continue
        for target in targets:
            target.enable_lora(rank)
            if target.bias is not None:
                target.bias.trainable = False
        lora.append(layer.name)
    return lora


def backbone_classifier(
    backbone="MobileNetV3Small",
    num_classes=10,
    input_shape=(224, 224, 3),
    weights=None,
    trainable_from=None,
    private=True,
    **backbone_kwargs,
):
    """A `keras.applications` backbone, frozen, with a new Dense head.

    The backbone is frozen, its BatchNormalization layers included (they
    run in inference mode, on their moving statistics); only the head, and
    the backbone's layers from `trainable_from` on (but no
    BatchNormalization), are trained.

    Args:
        backbone: the name of a `keras.applications` model without its top
            (`include_top=False`, average pooling).
        num_classes: the head's outputs (logits).
        input_shape: the images' shape.
        weights: the backbone's weights: None (random initialization), the
            path of a weights file without the top (public pre-training),
            or "imagenet" (downloaded by Keras).
        trainable_from: the first backbone layer to fine-tune, or None
            (head only).
        private: a `DPModel` (True) or a `keras.Model`.
        **backbone_kwargs: more arguments of the backbone's constructor.

    Returns:
        The model, uncompiled; the head is the layer named "head".
    """
    base = getattr(keras.applications, backbone)(
        include_top=False,
        weights=weights,
        input_shape=tuple(input_shape),
        pooling="avg",
        **backbone_kwargs,
    )
    base.trainable = False
    if trainable_from is not None:
        unfreeze(base, from_layer=trainable_from)
    freeze_batch_normalization(base)
    inputs = keras.Input(tuple(input_shape))
    features = base(inputs)
    outputs = keras.layers.Dense(num_classes, name="head")(features)
    cls = dp_model.DPModel if private else keras.Model
    return cls(inputs, outputs, name=f"{backbone}_classifier")


def read_haiku_checkpoint(path):
    """Reads a Haiku parameter file as `{"module/param": array}`.

    Accepts the pickled nested dict `{module: {param: array}}` of the
    published NFNet checkpoints (`F0_haiku.npz` ... are pickles despite the
    extension; they hold plain dicts of NumPy arrays, which `pickle` reads
    without `dill`) and a real `.npz` with flat "module/param" keys.
    """
    if _is_zip(path):
        with np.load(path) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    with open(path, "rb") as f:
        tree = pickle.load(f)
    return {
        f"{module}/{param}": np.asarray(value)
        for module, params in tree.items()
        for param, value in params.items()
    }


def _is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def nfnet_key_map(model):
    """Maps `model`'s variables to the published NFNet checkpoint keys.

    The keys are Haiku module paths of deepmind-research/nfnets: stem
    `NFNet/~/stem_conv{i}`, block i `NFNet/~/nf_block` (i = 0) or
    `NFNet/~/nf_block_{i}` with sub-modules `conv0`, `conv1`, `conv1b`,
    `conv2`, `conv_shortcut` and `squeeze_excite/~/linear(_1)`, then
    `NFNet/~/final_conv` and the classifier `NFNet/~/linear`. Parameters
    are `w`, `b`, `gain` (convolutions), `w`, `b` (linear) and `skip_gain`.

    Returns:
        `{checkpoint key: keras variable}`.
    """
    keys = {}
    conv_params = (("kernel", "w"), ("bias", "b"), ("gain", "gain"))
    for layer in model.layers:
        name = layer.name
        match = re.fullmatch(r"block(\d+)_(.+)", name)
        if match:
            i, part = int(match.group(1)), match.group(2)
            block = "NFNet/~/nf_block" + (f"_{i}" if i else "")
            if part == "skip_gain":
                keys[f"{block}/skip_gain"] = layer.gain
            elif part == "squeeze_excite":
                for dense, hk in (
                    (layer.fc0, "linear"),
                    (layer.fc1, "linear_1"),
                ):
                    prefix = f"{block}/~/squeeze_excite/~/{hk}"
                    keys[f"{prefix}/w"] = dense.kernel
                    keys[f"{prefix}/b"] = dense.bias
            elif layer.weights:
                for attr, hk in conv_params:
                    keys[f"{block}/~/{part}/{hk}"] = getattr(layer, attr)
        elif name.startswith("stem_conv") or name == "final_conv":
            for attr, hk in conv_params:
                keys[f"NFNet/~/{name}/{hk}"] = getattr(layer, attr)
        elif name == "head":
            keys["NFNet/~/linear/w"] = layer.kernel
            keys["NFNet/~/linear/b"] = layer.bias
    return keys


def load_nfnet_checkpoint(model, path, exclude_head=True):
    """Loads published NFNet weights (`F{0-6}_haiku.npz`) into `model`.

    Args:
        model: an `nfnet(variant)` of the checkpoint's variant (any number
            of classes when the head is excluded).
        path: the checkpoint file (see `read_haiku_checkpoint`).
        exclude_head: keep the model's own classifier (a new head).

    Returns:
        The number of variables loaded.

    Raises:
        ValueError: a key is missing, unexpected, or has another shape.
    """
    params = read_haiku_checkpoint(path)
    keys = nfnet_key_map(model)
    if exclude_head:
        for suffix in ("w", "b"):
            keys.pop(f"NFNet/~/linear/{suffix}")
            params.pop(f"NFNet/~/linear/{suffix}", None)
    missing = sorted(set(keys) - set(params))
    unexpected = sorted(set(params) - set(keys))
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint does not match the model: missing {missing[:5]}"
            f" ({len(missing)}), unexpected {unexpected[:5]}"
            f" ({len(unexpected)})."
        )
    for key, variable in keys.items():
        value = params[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{key}: checkpoint shape {value.shape}, model "
                f"{tuple(variable.shape)}."
            )
        variable.assign(value)
    return len(keys)
