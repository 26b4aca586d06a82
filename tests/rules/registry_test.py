"""The rule registry: lookup by class, and a custom layer's own rule."""

import functools
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dpscale as kd
from keras_dpscale import rules
from keras_dpscale.layers.ws_conv import WSConvRule
from keras_dpscale.rules import conv
from keras_dpscale.rules import dense
from keras_dpscale.rules import rows
from tests.conftest import inputs_for
from tests.conftest import reference_clipped_sum
from tests.rules import harness

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


class MyScale(keras.layers.Layer):
    """`x * scale`: a custom layer with the rule of the rules' docstring."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, inputs):
        return inputs * self.scale


def documented_rule():
    """Runs the custom rule of `keras_dpscale.rules`' docstring as written
    (it registers itself for `MyScale`) and returns its class."""
    code = rules.__doc__.split("```python")[1].split("```")[0]
    namespace = {"MyScale": MyScale, "tf": tf}
    exec(code, namespace)  # noqa: S102 -- the documentation's own example
    return namespace["MyScaleRule"]


MyScaleRule = documented_rule()


class WiderDense(keras.layers.Dense):
    """Configures Dense differently; computes as Dense."""

    def __init__(self, units, **kwargs):
        super().__init__(2 * units, **kwargs)


class NoisyDense(keras.layers.Dense):
    """Changes what Dense computes."""

    def call(self, inputs):
        return super().call(inputs) + 1.0


def test_the_most_specific_registered_class_wins():
    assert isinstance(rules.rule_for(keras.layers.Dense(2)), dense.DenseRule)
    assert type(rules.rule_for(keras.layers.Conv2D(2, 1))) is conv.ConvRule
    assert isinstance(rules.rule_for(kd.layers.WSConv2D(2, 1)), WSConvRule)
    assert isinstance(rules.rule_for(WiderDense(2)), dense.DenseRule)
    assert rules.rule_for(keras.layers.Dropout(0.5)) is None


class TracedDense(keras.layers.Dense):
    @tf.function(autograph=False)
    def call(self, inputs):
        return 3.0 * keras.layers.Dense.call(self, inputs)


class PartialDense(keras.layers.Dense):
    def _scaled(self, inputs, scale):
        return scale * keras.layers.Dense.call(self, inputs)

    call = functools.partialmethod(_scaled, scale=3.0)


def test_a_subclass_that_changes_the_computation_has_no_rule():
    assert rules.rule_for(NoisyDense(2)) is None
    # Overrides that are not plain functions change the computation too.
    assert rules.rule_for(TracedDense(2)) is None
    assert rules.rule_for(PartialDense(2)) is None
    reversible = keras.layers.ReversibleEmbedding(4, 3)
    assert rules.rule_for(reversible) is None


def test_a_later_registration_replaces_and_classes_are_required():
    class Layer(keras.layers.Layer):
        pass

    @rules.register_rule(Layer)
    class First(rules.Rule):
        pass

    @rules.register_rule(Layer)
    class Second(rules.Rule):
        pass

    assert isinstance(rules.rule_for(Layer()), Second)
    with pytest.raises(ValueError, match="layer class"):
        rules.register_rule()


def test_a_custom_rule_passes_the_harness():
    x = np.random.default_rng(0).normal(size=(8, 3, 2)).astype("float32")
    layer = MyScale()
    layer(x)
    layer.scale.assign([0.5, -2.0])
    harness.check_rule(layer, x, views=2)


class SmallNorms(MyScaleRule):
    """Wrong: norms too small (clipping would let gradients exceed C)."""

    def sq_norms(self, layer, recorded, grads, batch):
        sq_norms, state = super().sq_norms(layer, recorded, grads, batch)
        return 0.99 * sq_norms, state


class UnclippedSums(MyScaleRule):
    """Wrong: sums that ignore the clip factors."""

    def clipped_sums(self, layer, recorded, grads, factors, state):
        return [rows.weighted_sum(state, tf.ones_like(factors))]


@pytest.mark.parametrize("wrong", [SmallNorms, UnclippedSums])
def test_the_harness_catches_a_wrong_rule(wrong):
    x = np.random.default_rng(0).normal(size=(8, 3, 2)).astype("float32")
    layer = MyScale()
    with pytest.raises(AssertionError):
        harness.check_rule(layer, x, views=2, rule=wrong())


def test_a_custom_rule_gives_fast_clipping_without_fallback(caplog):
    i = keras.Input((5, 4))
    h = MyScale(name="my_scale")(keras.layers.Dense(4, activation="tanh")(i))
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = kd.DPModel(i, keras.layers.Dense(3)(h))
    x, y = inputs_for(model, 6)
    expected, clip = reference_clipped_sum(model, x, y)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, clip, "fast")
    assert "vectorized" not in caplog.text
    harness.assert_sums_close(fast, expected)


def test_the_worked_example_of_the_docs_runs_as_written(caplog):
    # docs/writing_rules.md: its code blocks, in order, as a user runs them
    # (the layer, its rule, the harness check); then a model of the layer
    # on the fast engine with no fallback, equal to per-example clipping.
    path = os.path.join(ROOT, "docs", "writing_rules.md")
    with open(path) as f:
        blocks = [b.split("```")[0] for b in f.read().split("```python")[1:]]
    namespace = {}
    exec("\n".join(blocks), namespace)  # noqa: S102 -- the docs' example
    model = kd.DPSequential(
        [
            keras.Input((4, 3)),
            namespace["ScaleShift"](),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    x, y = inputs_for(model, 6)
    expected, clip = reference_clipped_sum(model, x, y)
    with caplog.at_level(logging.INFO, logger="keras_dpscale"):
        fast = harness.clipped_sum(model, x, y, clip, "fast")
    assert "vectorized path" not in caplog.text
    harness.assert_sums_close(fast, expected)
