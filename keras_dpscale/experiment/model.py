"""`build_model` and `compile_model`: the network of a run and its DP step.

A config names a registered model (`build_model.model = "wrn_16_4"`, with
`model_kwargs`) or binds any factory that gin knows, the builders of
`keras_dpscale.models` included:

    build_model.model = @wide_resnet
    wide_resnet.depth = 16

or a `keras.applications` backbone with a new head, frozen BatchNormalization
included (`transfer.backbone_classifier`):

    build_model.model = @backbone_classifier
    backbone_classifier.backbone = "MobileNetV3Small"

The settings of the private step (how clipping is computed, in chunks of
how many examples) are the trainer's, given to `model.compile`
(`compile_model.clipping`, `compile_model.microbatch_size`).
"""

import gin
import keras

from keras_dpscale import models
from keras_dpscale import transfer

for _factory in (
    models.nf_resnet,
    models.nfnet,
    models.tanh_cnn,
    models.wide_resnet,
):
    gin.external_configurable(_factory, module="keras_dpscale.models")
gin.external_configurable(
    transfer.backbone_classifier, module="keras_dpscale.transfer"
)


@gin.configurable
def build_model(
    model="tanh_cnn",
    model_kwargs=None,
    init_checkpoint=None,
    freeze_until=None,
    lora_rank=None,
):
    """Builds the network (call it in the strategy's scope).

    Args:
        model: a `models.get` name, or a function returning a `DPModel`
            (bound in a config as `@factory`).
        model_kwargs: the arguments of `models.get` or of the function.
        init_checkpoint: weights to start from, all but the head: a
            published NFNet file (`*_haiku.npz`) or a `.keras` model.
        freeze_until: freeze the layers up to this one (head-only DP
            fine-tuning with "pool").
        lora_rank: LoRA fine-tuning of this rank, after the checkpoint is
            loaded (`transfer.enable_lora`): only the factors of the
            `Dense`/`EinsumDense` layers and the head train.

    Returns:
        The uncompiled model.
    """
    kwargs = model_kwargs or {}
    net = (
        models.get(model, **kwargs)
        if isinstance(model, str)
        else model(**kwargs)
    )
    if init_checkpoint and init_checkpoint.endswith(".npz"):
        transfer.load_nfnet_checkpoint(net, init_checkpoint)
    elif init_checkpoint:
        transfer.load_backbone(net, init_checkpoint)
    if freeze_until:
        transfer.freeze(net, until=freeze_until)
    if lora_rank:
        transfer.enable_lora(net, lora_rank)
    return net


@gin.configurable(denylist=["model", "optimizer"])
def compile_model(model, optimizer, *, clipping="auto", microbatch_size=None):
    """Compiles `model` for DP training with cross-entropy and accuracy.

    Args:
        model: a `DPModel` (`build_model`).
        optimizer: its DP optimizer (`build_optimizer`).
        clipping: "auto", "fast" or "vectorized": how per-example clipping
            is computed (the result is the same; `DPModel.compile`).
        microbatch_size: examples per chunk of the per-example work (memory
            only), or None.

    Returns:
        `model`, compiled.
    """
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        clipping=clipping,
        microbatch_size=microbatch_size,
    )
    return model
