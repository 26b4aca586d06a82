"""Recording the fast engine's forward pass: each layer through its rule.

While the batch goes forward, every layer's `call` is wrapped: a layer that
owns trainable variables runs through its registered rule
(`keras_dpscale.rules`), or through the fallback rule where it has none or
its rule does not cover the call; the `Recorder` keeps each layer's rule
and what it recorded, and the tensors whose rows the engine checks. It
raises `rules.Unsupported` for what no rule describes exactly: a layer
called twice, a variable read outside its owner's call (tied weights), a
layer with its own `call` attribute.
"""

import contextlib

import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale._compat import keras_private
from keras_dpscale.rules import fallback

Unsupported = rules.Unsupported


def key(variable):
    """The identity of a variable as a GradientTape sees it."""
    return id(keras_private.backend_variable(variable))


class Recorder:
    """The layers of one recorded forward pass (`recording`)."""

    def __init__(self, trainable):
        self._trainable = {key(v) for v in trainable}
        self.layers = []  # (layer, rule, recorded) of each layer with variables
        self.fallbacks = []
        # (layer name, input tensors, output tensors) of each recorded layer.
        self.row_tensors = []
        self._called = set()
        self._frames = [set()]  # variables read inside each open call

    def call(self, layer, original, args, kwargs):
        own = keras_private.own_trainable_variables(layer)
        self._frames.append(set())
        with tf.GradientTape() as reads:
            if own:
                if id(layer) in self._called:
                    raise Unsupported(
                        f"layer '{layer.name}' is called more than once"
                    )
                self._called.add(id(layer))
                rule, recorded = _record(layer, own, args, kwargs)
                if recorded is None:
                    rule = fallback.RULE
                    recorded = rule.record(layer, own, original, args, kwargs)
                    self.fallbacks.append(
                        f"{layer.name} ({type(layer).__name__})"
                    )
                outputs = recorded.outputs
                self.layers.append((layer, rule, recorded))
                self.row_tensors.append(
                    (layer.name, _tensors((args, kwargs)), _tensors(outputs))
                )
            else:
                outputs = original(*args, **kwargs)
        read = {id(v) for v in reads.watched_variables()} & self._trainable
        inner = self._frames.pop()
        stray = read - inner - {key(v) for v in own}
        if stray:
            raise Unsupported(
                f"layer '{layer.name}' reads trainable variables that it does "
                "not own (shared or tied weights)"
            )
        self._frames[-1] |= read
        return outputs

    def check_reads(self, watched):
        """Raises unless every trainable variable `watched` by the pass's
        tape was read inside its owner's call."""
        stray = {id(v) for v in watched} & self._trainable - self._frames[0]
        if stray:
            raise Unsupported(
                "trainable variables are read outside the layers' calls "
                "(weight regularizers, or a loss that reads weights)"
            )


def _tensors(nest):
    """The tensors of rank >= 1 in `nest`."""
    return [
        t
        for t in tf.nest.flatten(nest)
        if tf.is_tensor(t) and t.shape.rank is not None and t.shape.rank > 0
    ]


@contextlib.contextmanager
def recording(model):
    """Wraps the calls of `model`'s layers; yields the `Recorder`."""
    recorder = Recorder(model.trainable_variables)
    patched = []
    try:
        for layer in keras_private.flatten_layers(model, include_self=True):
            if "call" in layer.__dict__:
                raise Unsupported(f"layer '{layer.name}' has its own `call`")
            original = layer.call

            def call(*args, _layer=layer, _original=original, **kwargs):
                return recorder.call(_layer, _original, args, kwargs)

            object.__setattr__(layer, "call", call)
            patched.append(layer)
        yield recorder
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


def _record(layer, own, args, kwargs):
    """`(rule, recorded)` by the registered rule of `layer`, or `(None,
    None)` where it has none or its rule does not cover this call: one input
    tensor, a layer not quantized, and a rule that clips
    all of the layer's trainable variables (some frozen: fall back)."""
    rule = rules.rule_for(layer)
    x = _single_input(args, kwargs)
    if (
        rule is None
        or x is None
        or getattr(layer, "quantization_mode", None) is not None
    ):
        return None, None
    recorded = rule.forward(layer, x)
    if recorded is None or {key(v) for v in own} != {
        key(v) for v in recorded.variables
    }:
        return None, None
    return rule, recorded


def _single_input(args, kwargs):
    """The one tensor input of a layer call, or None."""
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"inputs"}:
        return kwargs["inputs"]
    return None
