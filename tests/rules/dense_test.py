"""The Dense rule against per-example gradients, in each of its forms."""

import keras
import numpy as np
import pytest

from tests.rules import harness


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("form", ["per_example", "gram"])
@pytest.mark.parametrize(
    "shape, views",
    [((6, 5), 1), ((12, 5), 2), ((6, 4, 5), 1), ((12, 3, 5), 2)],
    ids=["vectors", "views", "sequence", "sequence_views"],
)
def test_dense(form, shape, views, monkeypatch):
    harness.force_form(monkeypatch, form)
    harness.check_rule(
        keras.layers.Dense(3, activation="tanh"), inputs(shape), views
    )


def test_dense_without_bias_and_on_rows_with_a_large_offset(monkeypatch):
    # Rows sharing a large part are what the centred Gram form is for.
    harness.force_form(monkeypatch, "gram")
    x = inputs((6, 4, 5)) + 100.0
    harness.check_rule(keras.layers.Dense(3, use_bias=False), x, rtol=1e-3)
