"""Image classifiers ready for DP training, and a registry by name.

    model = keras_dpscale.models.get("wrn_16_4", num_classes=10)
    model = keras_dpscale.models.get("nfnet_f3", num_classes=1000)
    model = keras_dpscale.models.get("vit", lora_rank=8)

Names: `wrn_{depth}_{width}`, `nf_resnet_{depth}`, `nfnet_{variant}` (f0 to
f6), `tanh_cnn`, `scatternet_linear` (on scattering features; the same model
on any fixed features: `linear_on_features`), `vit` or
`vit_{depth}_{width}`, `convnext`, `dpnasnet`. Keyword arguments go to the
builder (`wide_resnet`, `nf_resnet`, `nfnet`, `tanh_cnn`,
`scatternet_linear`, `vit`, `convnext`, `dpnasnet`).
"""

import re

from keras_dpscale.models.convnext import convnext
from keras_dpscale.models.dpnasnet import dpnasnet
from keras_dpscale.models.nf_resnet import nf_resnet
from keras_dpscale.models.nfnet import nfnet
from keras_dpscale.models.scatternet import scatternet_linear
from keras_dpscale.models.tanh_cnn import tanh_cnn
from keras_dpscale.models.vit import vit
from keras_dpscale.models.wide_resnet import wide_resnet

_PATTERNS = (
    (
        r"wrn_(\d+)_(\d+)",
        lambda d, w: dict(depth=int(d), width=int(w)),
        wide_resnet,
    ),
    (r"nf_resnet_(\d+)", lambda d: dict(depth=int(d)), nf_resnet),
    (r"nfnet_(f\d)", lambda v: dict(variant=v.upper()), nfnet),
    (r"tanh_cnn", lambda: {}, tanh_cnn),
    (r"scatternet_linear", lambda: {}, scatternet_linear),
    (
        r"linear_on_features",
        lambda: dict(name="linear_on_features"),
        scatternet_linear,
    ),
    (r"vit", lambda: {}, vit),
    (
        r"vit_(\d+)_(\d+)",
        lambda d, w: dict(depth=int(d), width=int(w)),
        vit,
    ),
    (r"convnext", lambda: {}, convnext),
    (r"dpnasnet", lambda: {}, dpnasnet),
)


def get(name, **kwargs):
    """Builds the model registered under `name`.

    Args:
        name: e.g. "wrn_16_4", "wrn_40_4", "nf_resnet_50", "nfnet_f0",
            "vit", "convnext".
        **kwargs: builder arguments (num_classes, input_shape, ...).

    Returns:
        A functional `DPModel` (or `keras.Model` with `private=False`).
    """
    for pattern, parse, builder in _PATTERNS:
        match = re.fullmatch(pattern, name.lower())
        if match:
            return builder(**parse(*match.groups()), **kwargs)
    raise ValueError(
        f"Unknown model {name!r}: expected wrn_<depth>_<width>, "
        "nf_resnet_<depth>, nfnet_f<0-6>, tanh_cnn, scatternet_linear, "
        "linear_on_features, vit, "
        "vit_<depth>_<width>, convnext or dpnasnet."
    )


__all__ = [
    "convnext",
    "dpnasnet",
    "get",
    "nf_resnet",
    "nfnet",
    "scatternet_linear",
    "tanh_cnn",
    "vit",
    "wide_resnet",
]
