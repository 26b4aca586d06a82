"""The Embedding rule against per-example gradients."""

import keras
import numpy as np
import pytest

from tests.rules import harness


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32"])
def test_embedding_with_repeated_ids(dtype):
    # 4 ids in sequences of 7: most examples look some id up twice.
    ids = np.random.default_rng(0).integers(0, 4, (12, 7)).astype(dtype)
    harness.check_rule(keras.layers.Embedding(4, 3), ids, views=2)


def test_negative_ids_read_the_row_from_the_end():
    # ops.take reads row id + input_dim for id < 0: the norms must too.
    ids = np.random.default_rng(1).integers(-4, 4, (12, 7)).astype("int32")
    harness.check_rule(keras.layers.Embedding(4, 3), ids)
