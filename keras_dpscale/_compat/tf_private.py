"""Private TensorFlow names that keras_dpscale uses, all in one place.

Checked against TensorFlow 2.20.
"""

# pfor's converter registry: `engines/pfor_conv` registers a converter for
# per-example conv filter gradients (installed explicitly, once).
from tensorflow.python.framework import tensor_util
from tensorflow.python.ops.parallel_for import pfor

__all__ = ["pfor", "pfor_converter_registry", "tensor_util"]


def pfor_converter_registry():
    """pfor's op -> converter dict (`pfor._pfor_converter_registry`)."""
    return pfor._pfor_converter_registry


# A graph's function by name (`Graph._get_function`): the separability
# check (`engines/separability`) reads the bodies of called functions and
# branches. Checked against TensorFlow 2.20.
def graph_function(graph, name):
    """The function `name` of `graph` (its `.graph` is the body), or None."""
    return graph._get_function(name)


__all__ += ["graph_function"]
