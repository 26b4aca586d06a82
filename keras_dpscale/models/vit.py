"""A small Vision Transformer (Dosovitskiy et al. 2021) for 32x32 images.

Patches embedded by a strided `Conv2D`, a learned position embedding, pre-LN
Transformer blocks of `MultiHeadAttention` and an MLP (`Dense`, GELU),
mean-pooled tokens and a `Dense` head. LayerNorm works per example, so the
model is ready for per-example clipping as it is. With `lora_rank`, the
attention projections (`EinsumDense`) and the MLP's `Dense` layers train
LoRA factors only (Hu et al. 2022), with the head.

Every trainable layer has a fast clipping rule: the position embedding
registers its own (`PositionEmbeddingRule`).
"""

import keras
import tensorflow as tf

from keras_dpscale import dp_model
from keras_dpscale import rules
from keras_dpscale import transfer
from keras_dpscale.rules import rows


@keras.saving.register_keras_serializable(package="keras_dpscale")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned table `[tokens, width]` to a sequence of tokens.

    Args:
        initializer: of the table.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, initializer="truncated_normal", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=tuple(input_shape[1:]),
            initializer=self.initializer,
        )

    def call(self, inputs):
        return inputs + keras.ops.cast(self.embeddings, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "initializer": keras.initializers.serialize(self.initializer),
        }


@rules.register_rule(PositionEmbedding)
class PositionEmbeddingRule(rules.Rule):
    """`o = x + table`: example i's gradient of the table is G summed over
    its rows (`[B, tokens * width]`, formed, normed and weighted)."""

    def forward(self, layer, inputs):
        outputs = inputs + keras.ops.cast(layer.embeddings, inputs.dtype)
        return rules.Recorded(outputs, [layer.embeddings], sources=outputs)

    def sq_norms(self, layer, recorded, grads, batch):
        flat = tf.reshape(grads, [grads.shape[0], 1, -1])
        per_example = rows.per_example_sum(flat, batch)
        return tf.reduce_sum(tf.square(per_example), 1), per_example

    def clipped_sums(self, layer, recorded, grads, factors, state):
        total = rows.weighted_sum(state, factors)
        return [tf.reshape(total, layer.embeddings.shape)]


def vit(
    depth=6,
    width=192,
    heads=3,
    patch_size=4,
    num_classes=10,
    input_shape=(32, 32, 3),
    mlp_ratio=4,
    lora_rank=None,
    private=True,
    name=None,
):
    """Builds a ViT of `depth` pre-LN blocks.

    Args:
        depth: the number of Transformer blocks.
        width: the token width D.
        heads: attention heads (`width // heads` channels each).
        patch_size: the side of the square patches (divides the image).
        num_classes: size of the output (logits).
        input_shape: image shape (H, W, C).
        mlp_ratio: the MLP's hidden width, in multiples of `width`.
        lora_rank: if set, LoRA of this rank on the attention projections
            and the MLP's `Dense` layers; only their factors and the head
            train (the factors B start at zero, as `enable_lora` makes
            them).
        private: return a `DPModel` (True) or a plain `keras.Model` (False,
            for non-private baselines).
        name: model name; defaults to `vit_{depth}_{width}`.

    Returns:
        A functional `DPModel` (or `keras.Model`) producing logits. The
        classifier is the layer named "head".
    """
    if input_shape[0] % patch_size or input_shape[1] % patch_size:
        raise ValueError(
            f"patch_size {patch_size} must divide the image {input_shape}."
        )
    tokens = (input_shape[0] // patch_size) * (input_shape[1] // patch_size)

    def norm(h, name):
        return keras.layers.LayerNormalization(epsilon=1e-6, name=name)(h)

    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(
        width, patch_size, strides=patch_size, name="patch_embed"
    )(inputs)
    h = keras.layers.Reshape((tokens, width), name="tokens")(h)
    h = PositionEmbedding(name="position_embed")(h)
    for block in range(depth):
        prefix = f"block{block + 1}"
        a = norm(h, f"{prefix}_norm1")
        a = keras.layers.MultiHeadAttention(
            heads, width // heads, name=f"{prefix}_attn"
        )(a, a)
        h = keras.layers.Add(name=f"{prefix}_add1")([h, a])
        m = norm(h, f"{prefix}_norm2")
        m = keras.layers.Dense(
            mlp_ratio * width, activation="gelu", name=f"{prefix}_mlp1"
        )(m)
        m = keras.layers.Dense(width, name=f"{prefix}_mlp2")(m)
        h = keras.layers.Add(name=f"{prefix}_add2")([h, m])
    h = norm(h, "final_norm")
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = keras.layers.Dense(num_classes, name="head")(h)
    cls = dp_model.DPModel if private else keras.Model
    model = cls(inputs, outputs, name=name or f"vit_{depth}_{width}")
    if lora_rank:
        transfer.enable_lora(model, lora_rank)
    return model
