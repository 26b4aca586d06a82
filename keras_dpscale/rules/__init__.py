"""Per-layer clipping rules: how the fast engine clips a layer's variables.

The fast engine (`keras_dpscale.engines.fast`) runs the whole batch through
the model once, and asks each layer that owns trainable variables for its
rule (`rule_for`). The rule replaces the layer's call in that pass and
turns the gradient of the summed loss with respect to some of the layer's
tensors (`G`, one row per example's row) into each example's squared
gradient norm over the layer's variables, and later, given each example's
clip factor, into the sum over the batch of the clipped gradients. Nothing
per-example is formed for the whole network (Li et al. 2021, Bu et al.
2023). A layer without a rule falls back to per-example gradients of its
own call (`rules.fallback`), which is exact for any layer, only slower.

A rule has three steps, and keeps nothing on itself: what a later step
needs from an earlier one is returned by the earlier and passed back in.

1. `forward(layer, inputs) -> Recorded | None`: computes the layer's
   outputs from its one input tensor (exactly what `layer.call(inputs)`
   returns), and records the tensors `sources` whose gradient G the engine
   takes, with anything else the next steps need (`saved`). None if the
   rule does not cover this layer's configuration (the fallback then
   takes it). The engine asks only for a call with one input tensor
   (besides `training`) of a layer that is not quantized.
2. `sq_norms(layer, recorded, grads, batch) -> (sq_norms, state)`: from
   `grads` (G, the gradient of the summed loss with respect to
   `recorded.sources`, same structure), each example's squared L2 norm
   `[B]` (float32) of its gradient with respect to `recorded.variables`;
   and `state`: what it formed that the sum reuses (per-example
   gradients, centred rows, ...), any value, returned to step 3 as is.
3. `clipped_sums(layer, recorded, grads, factors, state) -> [sum, ...]`:
   `sum_i factors[i] * (example i's gradient)`, one float32 tensor per
   variable of `recorded.variables`, in that order, shaped as the
   variable. A factor of 0 must give exactly nothing of its example, even
   where its gradient is not finite (`rows.weighted_sum`, `rows.scale`).

Rows. Tensors of the forward pass hold the batch along axis 0: `B * K`
rows for B examples of K rows each (augmult views), example i's rows
together and in order (the engine proves it, `engines.separability`); `batch`
is B.

Soundness. A norm computed too small lets an example's clipped gradient
exceed the clipping norm C: the norms must be exact, or larger (rounding
allowances, `ghost_norms`), and the clipped sums must add what the norms
measured. The engine proves on the traced pass that examples do not mix,
including inside `forward`; each rule is checked against per-example
gradients (`tests/rules/harness.py`).

A custom layer gets fast clipping by registering a rule for its class:

```python
import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale.rules import rows


@rules.register_rule(MyScale)
class MyScaleRule(rules.Rule):
    # MyScale.call(x) = x * scale (scale of shape [d]).

    def forward(self, layer, inputs):
        outputs = inputs * layer.scale
        return rules.Recorded(
            outputs, [layer.scale], sources=outputs, saved=inputs
        )

    def sq_norms(self, layer, recorded, grads, batch):
        # d loss_i / d scale = sum over example i's rows of G * x.
        per_example = rows.per_example_sum(grads * recorded.saved, batch)
        return tf.reduce_sum(tf.square(per_example), 1), per_example

    def clipped_sums(self, layer, recorded, grads, factors, state):
        return [rows.weighted_sum(state, factors)]
```

A subclass of a registered class inherits its rule unless it changes its
computation (`rule_for`). Check a rule with `tests/rules/harness.py` (norms
and clipped sums against per-example gradients). The built-in rules cover
`Dense`, `EinsumDense` (and so `MultiHeadAttention`, whose projections are
`EinsumDense`s), `Conv1D`, `Conv2D`, `Conv3D`, `Conv1DTranspose`,
`Conv2DTranspose`, `DepthwiseConv1D`, `DepthwiseConv2D`, `SeparableConv1D`,
`SeparableConv2D`, `Embedding`, `GroupNormalization`,
`LayerNormalization` (with or without RMS scaling) and `RMSNormalization`,
and `Dense`, `EinsumDense` and `Embedding` with LoRA (`rules.lora`); the
layers of `keras_dpscale.layers` register their own.
Each rule's module says which configurations fall back.
"""

import dataclasses
from typing import Any


class Unsupported(Exception):
    """The fast engine cannot compute this model's per-example norms exactly."""


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a rule's `forward` records of one layer call.

    Attributes:
        outputs: the layer's outputs, as `layer.call(inputs)` returns them.
        variables: the layer's trainable variables that the rule clips, in
            the order of its clipped sums; they must be all of the layer's
            own trainable variables (otherwise the fallback takes the
            layer).
        sources: a nest of tensors of the forward pass, computed from the
            inputs and the variables; the engine passes the gradient of the
            summed loss with respect to them to `sq_norms` and
            `clipped_sums`.
        saved: anything else from the forward pass that the rule needs
            (its inputs, intermediate tensors), in a form of its choice.
    """

    outputs: Any
    variables: list
    sources: Any
    saved: Any = None


class Rule:
    """How to clip the variables of one family of layers (module docstring).

    Subclasses implement `forward`, `sq_norms` and `clipped_sums`, and are
    registered for their layer classes with `register_rule`. A rule keeps
    no state: one instance serves every layer of its classes.
    """

    def forward(self, layer, inputs):
        """The layer's outputs on its one input tensor, recorded.

        Args:
            layer: the layer.
            inputs: its one input tensor, `[B*K, ...]`.

        Returns:
            A `Recorded`, or None if the rule does not cover the layer's
            configuration.
        """
        raise NotImplementedError

    def sq_norms(self, layer, recorded, grads, batch):
        """Each example's squared gradient norm over `recorded.variables`.

        Args:
            layer: the layer.
            recorded: what `forward` returned.
            grads: the gradients of the summed loss with respect to
                `recorded.sources` (the same nest; zeros where unconnected).
            batch: the number of examples B.

        Returns:
            `(sq_norms, state)`: `[B]` float32, and what `clipped_sums`
            reuses.
        """
        raise NotImplementedError

    def clipped_sums(self, layer, recorded, grads, factors, state):
        """The clipped sums `sum_i factors[i] * grad_i`, per variable.

        Args:
            layer, recorded, grads: as `sq_norms`.
            factors: `[B]` clip factors (0 for an example left out).
            state: the second value `sq_norms` returned.

        Returns:
            One float32 tensor per variable of `recorded.variables`, shaped
            as the variable.
        """
        raise NotImplementedError


_RULES = {}
# Methods a subclass may define and still inherit its ancestor's rule:
# they configure the layer, and do not change what its call computes.
_CONFIGURATION = frozenset({"__init__", "get_config", "from_config"})


def register_rule(*layer_classes):
    """Class decorator: the decorated `Rule` clips these layer classes.

    A later registration for the same class replaces the earlier one.

    Args:
        *layer_classes: the Keras layer classes the rule covers.

    Returns:
        The decorator; it returns the rule class unchanged.
    """
    if not layer_classes:
        raise ValueError("register_rule needs at least one layer class.")

    def register(rule_class):
        rule = rule_class()
        for layer_class in layer_classes:
            _RULES[layer_class] = rule
        return rule_class

    return register


def rule_for(layer):
    """The registered rule of `layer`, or None.

    The most specific registered class of `type(layer).__mro__` wins. A
    subclass inherits that class's rule only if no class between them
    defines methods other than `__init__`, `get_config` and `from_config`:
    a subclass that changes its computation (its `call`, `build`, or a
    method the call uses) needs a rule of its own, or falls back.
    """
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
        if _changes_computation(cls):
            return None
    return None


# Class attributes that every class has and that change nothing.
_HARMLESS = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
    }
)


def _changes_computation(cls):
    """True if `cls` defines anything that could change what its parent
    computes: any function, descriptor or other callable (a decorated
    `call`, a property, a `tf.function`) but the configuration methods."""
    return any(
        name not in _CONFIGURATION
        and name not in _HARMLESS
        and (callable(value) or hasattr(value, "__get__"))
        for name, value in vars(cls).items()
    )


# The built-in rules register themselves on import.
from keras_dpscale.rules import conv  # noqa: E402,F401
from keras_dpscale.rules import conv1d  # noqa: E402,F401
from keras_dpscale.rules import conv3d  # noqa: E402,F401
from keras_dpscale.rules import conv_transpose  # noqa: E402,F401
from keras_dpscale.rules import dense  # noqa: E402,F401
from keras_dpscale.rules import depthwise  # noqa: E402,F401
from keras_dpscale.rules import depthwise1d  # noqa: E402,F401
from keras_dpscale.rules import einsum_dense  # noqa: E402,F401
from keras_dpscale.rules import embedding  # noqa: E402,F401
from keras_dpscale.rules import layer_scale  # noqa: E402,F401
from keras_dpscale.rules import lora  # noqa: E402,F401  (after dense)
from keras_dpscale.rules import normalization  # noqa: E402,F401
from keras_dpscale.rules import rms_norm  # noqa: E402,F401
from keras_dpscale.rules import separable  # noqa: E402,F401
