"""Proof, on the traced computation, that examples of a batch stay apart.

The fast clipping engine runs the whole batch through the model at once and
reads each example's gradient norm off the batch's tensors. That is exact
only if every example's loss depends on that example's rows alone: one
`keras.ops.mean(h, axis=0)` between two layers, a loss that centres the
predictions on the batch mean, or `MixUp` makes one example move every
other example's gradient, and the clipping bound C no longer holds.

Nothing here trusts a class name. `check` walks the operations that the
forward pass and the loss created in the graph (`Region` records them at
trace time, once per trace) and derives, operation by operation, where each
tensor keeps its examples:

- `Rows(axis, per_example)`: the tensor's dimension `axis` holds the batch,
  `per_example` consecutive entries per example (K augmult views, or the
  positions of a sequence flattened into it), and entry j along it belongs
  to example `j // per_example` only;
- `CONST`: the tensor does not depend on the data at all (weights, seeds,
  random draws, shapes).

Each operation type has a rule (an allowlist): elementwise operations with
broadcasting, reductions that leave the batch axis alone, reshapes that keep
each example's entries contiguous, contractions (matmul, einsum,
convolutions) whose summed indices are not the batch's, gathers from
weights, slicing and padding that leave the batch axis whole, and so on.
Anything else that touches data (an unknown operation, a reduction, sort,
shuffle, roll or gather along the batch axis, a data-dependent branch, a
write of data into a variable, a Python function) raises `NotSeparable`,
naming the operation and the layer it belongs to. The rules are sound
without being complete: they may refuse a separable model, never accept a
mixing one.
"""

import dataclasses
import math
import re

import tensorflow as tf

from keras_dpscale._compat import tf_private


class NotSeparable(Exception):
    """An operation may let one example's data reach another's loss."""


@dataclasses.dataclass(frozen=True)
class Rows:
    """Dimension `axis` holds the batch, `per_example` entries per example."""

    axis: int
    per_example: int = 1


# A tensor that does not depend on the data.
CONST = None


class Region:
    """Records the operations that a block of code adds to the current graph.

    ```python
    with separability.Region() as region:
        losses = forward(inputs)
    layouts = region.check({inputs: Rows(0)}, batch_size=B)
    ```

    Under `tf.function` (the train step), the operations are those of the
    traced step itself, so the proof is about exactly what runs. When
    executing eagerly there is no graph: `region.ops` is None.
    """

    def __enter__(self):
        self.ops = None
        self._graph = None
        if not tf.executing_eagerly():
            self._graph = tf.compat.v1.get_default_graph()
            self._start = len(self._graph.get_operations())
        return self

    def __exit__(self, *exc):
        if self._graph is not None:
            self.ops = self._graph.get_operations()[self._start :]
        return False

    def check(self, inputs, batch_size):
        """Derives every recorded tensor's layout; raises `NotSeparable`.

        Args:
            inputs: `[(tensor, layout), ...]`: where each input of the block
                keeps its examples (`Rows(0)` for a batch, `CONST` for seeds).
            batch_size: B, static.

        Returns:
            `layout(tensor)`: the layout of any tensor the block used.
        """
        if self.ops is None:
            raise ValueError("Region.check needs a graph (trace the step).")
        return Analysis(self._graph, inputs, batch_size).run(self.ops)


class Analysis:
    """The layout of every tensor of a recorded block (see `Region`)."""

    def __init__(self, graph, inputs, batch_size):
        self.graph = graph
        self.batch_size = int(batch_size)
        self.layouts = {t.ref(): layout for t, layout in inputs}
        self._outer = {}
        self._arguments = _data_arguments(graph)

    def run(self, ops):
        for op in ops:
            if op.outputs and op.outputs[0].ref() in self.layouts:
                continue  # an argument, whose layout is given
            self.layouts.update(zip(_refs(op.outputs), self._apply(op)))
        return self.layout

    def layout(self, tensor):
        """The layout of `tensor`, computed by `run` or from outside it."""
        ref = tensor.ref()
        if ref in self.layouts:
            return self.layouts[ref]
        return self._outside(tensor)

    def _apply(self, op):
        ins = [self.layout(t) for t in op.inputs]
        if all(lay is CONST for lay in ins):
            # Whatever it does, it does not read the data.
            return [CONST] * len(op.outputs)
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            return self._function(op, op.get_attr("f").name, op.inputs, ins)
        if op.type in ("If", "StatelessIf"):
            return self._branches(op, ins)
        rule = _RULES.get(op.type)
        if rule is None:
            if op.type in _WRITES:
                _refuse(op, "writes data of the batch into a variable")
            _refuse(
                op,
                f"is a '{op.type}' operation, which is not known to keep "
                "the examples of a batch apart",
            )
        outs = rule(_Op(op, ins, self.batch_size))
        for t, lay in zip(op.outputs, outs):
            if lay is not CONST:
                _check_rows(op, t, lay, self.batch_size)
        return outs

    def _function(self, op, name, tensors, ins):
        """The layouts of a called function's outputs, from its body."""
        graph = getattr(
            tf_private.graph_function(op.graph, name), "graph", None
        )
        if graph is None or len(graph.inputs) != len(tensors):
            _refuse(op, f"calls the function '{name}', whose body is unknown")
        inner = Analysis(graph, list(zip(graph.inputs, ins)), self.batch_size)
        inner._arguments = set()  # every argument has its layout
        inner.run(graph.get_operations())
        outs = [inner.layout(t) for t in graph.outputs]
        if len(outs) != len(op.outputs):
            _refuse(op, f"calls the function '{name}' with unknown outputs")
        for t, lay in zip(op.outputs, outs):
            if lay is not CONST:
                _check_rows(op, t, lay, self.batch_size)
        return outs

    def _branches(self, op, ins):
        """`If`: both branches, on a data-free condition."""
        if ins[0] is not CONST:
            _refuse(op, "branches on a condition computed from the batch")
        branches = [
            self._function(op, op.get_attr(b).name, op.inputs[1:], ins[1:])
            for b in ("then_branch", "else_branch")
        ]
        outs = []
        for then, other in zip(*branches):
            if then is not CONST and other is not CONST and then != other:
                _refuse(op, "has branches that keep the examples differently")
            outs.append(then if then is not CONST else other)
        return outs

    def _outside(self, tensor):
        """A tensor made before the block: data-free, or refused."""
        ref = tensor.ref()
        if ref not in self._outer:
            self._outer[ref] = self._trace_back(tensor)
        if self._outer[ref]:
            raise NotSeparable(
                f"'{tensor.op.name}' ({tensor.op.type}) is computed from the "
                "batch outside the model's inputs and enters the forward "
                "pass, which the check cannot follow."
            )
        return CONST

    def _trace_back(self, tensor):
        """True if `tensor` may depend on the data (graph arguments, input
        iterators) by a path that does not go through the block's inputs."""
        seen, stack = set(), [tensor]
        while stack:
            t = stack.pop()
            if t.ref() in seen:
                continue
            seen.add(t.ref())
            if t.ref() in self.layouts:
                if self.layouts[t.ref()] is not CONST:
                    return True
                continue
            if t.ref() in self._arguments or t.op.type in _DATA_SOURCES:
                return True
            if t.op.type in _SHAPES:
                continue
            stack.extend(t.op.inputs)
        return False


def _refs(tensors):
    return [t.ref() for t in tensors]


def _data_arguments(graph):
    """The graph's arguments that may carry data (not variables, and not
    captured constants)."""
    captured = {}
    for external, internal in getattr(graph, "captures", []):
        captured[internal.ref()] = external
    arguments = set()
    for t in getattr(graph, "inputs", []):
        if t.dtype == tf.resource:
            continue
        external = captured.get(t.ref())
        if external is not None and not tf.is_symbolic_tensor(external):
            continue  # a constant captured at trace time
        arguments.add(t.ref())
    return arguments


_DATA_SOURCES = {
    "IteratorGetNext",
    "IteratorGetNextSync",
    "IteratorGetNextAsOptional",
    "OptionalGetValue",
    "MultiDeviceIteratorGetNextFromShard",
}
_SHAPES = {"Shape", "ShapeN", "Size", "Rank", "VariableShape"}
_WRITES = {
    "AssignVariableOp",
    "AssignAddVariableOp",
    "AssignSubVariableOp",
    "ResourceScatterUpdate",
    "ResourceScatterAdd",
    "ResourceScatterSub",
    "ResourceScatterMul",
    "ResourceScatterDiv",
    "ResourceScatterMin",
    "ResourceScatterMax",
    "ResourceScatterNdUpdate",
    "ResourceScatterNdAdd",
    "ResourceScatterNdSub",
    "TensorArrayWriteV3",
    "TensorArrayScatterV3",
    "StackPushV2",
    "QueueEnqueueV2",
}


def _layer_of(op):
    """The name scope of `op` (Keras layers name their operations)."""
    scope = op.name.rsplit("/", 1)[0] if "/" in op.name else ""
    scope = re.sub(r"(^|/)(while|cond)(_\d+)?(/|$)", r"\1", scope)
    return scope


def _refuse(op, reason):
    scope = _layer_of(op)
    where = f" in '{scope}'" if scope else ""
    raise NotSeparable(f"operation '{op.name}'{where} {reason}")


def _check_rows(op, tensor, lay, batch_size):
    """The rows invariant: `shape[axis] == B * per_example`."""
    shape = tensor.shape
    if shape.rank is None or lay.axis >= shape.rank:
        _refuse(op, "gives a tensor whose batch axis cannot be located")
    size = shape[lay.axis]
    if size is None or size != batch_size * lay.per_example:
        _refuse(
            op,
            f"gives a tensor of shape {shape} whose axis {lay.axis} does not "
            f"hold the {batch_size} examples in order",
        )


# ---------------------------------------------------------------------------
# The rules: one function per family of operation types, registered by type.

_RULES = {}


def _rule(*types):
    def register(fn):
        for t in types:
            _RULES[t] = fn
        return fn

    return register


class _Op:
    """An operation with its inputs' layouts, for the rules."""

    def __init__(self, op, ins, batch_size):
        self.op = op
        self.ins = ins
        self.batch_size = batch_size

    def refuse(self, reason):
        _refuse(self.op, reason)

    def attr(self, name, default=None):
        try:
            return self.op.get_attr(name)
        except ValueError:
            return default

    def value(self, i):
        """The static value of input `i` (axes, shapes, paddings)."""
        value = tf.get_static_value(self.op.inputs[i])
        if value is None:
            self.refuse("has an argument that is not a constant")
        return value

    def rank(self, i):
        rank = self.op.inputs[i].shape.rank
        if rank is None:
            self.refuse("has an input of unknown rank")
        return rank

    def shape(self, tensor):
        shape = tensor.shape
        if shape.rank is None or any(d is None for d in shape):
            self.refuse(f"has a tensor of unknown shape {shape}")
        return list(shape)

    def data(self, *indices):
        """The layouts of the given inputs that depend on the data."""
        return [(i, self.ins[i]) for i in indices if self.ins[i] is not CONST]

    def only_data(self, i, others=()):
        """The layout of input `i`; the inputs `others` must be data-free."""
        for j in others:
            if self.ins[j] is not CONST:
                self.refuse(
                    f"combines data of the batch in its argument {j}, which "
                    "must not depend on the data"
                )
        return self.ins[i]

    def outputs(self, lay):
        return [lay] * len(self.op.outputs)


def _normalize(axis, rank):
    return int(axis) + rank if axis < 0 else int(axis)


def _one_layout(x, layouts):
    """The common layout of several data inputs (they must agree)."""
    layouts = [lay for lay in layouts if lay is not CONST]
    if not layouts:
        return CONST
    if any(lay != layouts[0] for lay in layouts[1:]):
        x.refuse(
            "combines tensors that hold the examples along different axes "
            f"({', '.join(str(lay) for lay in layouts)})"
        )
    return layouts[0]


@_rule(
    "Identity",
    "Snapshot",
    "StopGradient",
    "PreventGradient",
    "CheckNumerics",
    "EnsureShape",
    "Cast",
    "Neg",
    "Abs",
    "Exp",
    "Expm1",
    "Log",
    "Log1p",
    "Sqrt",
    "Rsqrt",
    "Square",
    "Reciprocal",
    "Inv",
    "Tanh",
    "Sigmoid",
    "Relu",
    "Relu6",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "LeakyRelu",
    "Erf",
    "Erfc",
    "Erfinv",
    "Ndtri",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
    "Rint",
    "Sin",
    "Cos",
    "Tan",
    "Asin",
    "Acos",
    "Atan",
    "Sinh",
    "Cosh",
    "Asinh",
    "Acosh",
    "Atanh",
    "Lgamma",
    "Digamma",
    "IsNan",
    "IsInf",
    "IsFinite",
    "LogicalNot",
    "Real",
    "Imag",
    "ComplexAbs",
    "Angle",
    "Conj",
)
def _unary(x):
    return x.outputs(x.ins[0])


@_rule("IdentityN")
def _identity_n(x):
    return list(x.ins)


@_rule("ZerosLike", "OnesLike")
def _like(x):
    return x.outputs(CONST)


@_rule(
    "Add",
    "AddV2",
    "Sub",
    "Mul",
    "MulNoNan",
    "Div",
    "RealDiv",
    "DivNoNan",
    "TruncateDiv",
    "FloorDiv",
    "FloorMod",
    "Mod",
    "TruncateMod",
    "Maximum",
    "Minimum",
    "Pow",
    "SquaredDifference",
    "Atan2",
    "Xlogy",
    "Xdivy",
    "Xlog1py",
    "Equal",
    "NotEqual",
    "Less",
    "LessEqual",
    "Greater",
    "GreaterEqual",
    "LogicalAnd",
    "LogicalOr",
    "SelectV2",
    "ClipByValue",
    "AddN",
    "BiasAdd",
    "BiasAddV1",
    "Complex",
    "ApproximateEqual",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
)
def _broadcast(x):
    """Elementwise with NumPy broadcasting: aligned from the right."""
    out = x.op.outputs[0]
    out_shape = x.shape(out)
    if x.op.type in ("BiasAdd", "BiasAddV1"):
        # The bias is added along the channels: it must be data-free.
        x.only_data(0, others=[1])
        if x.attr("data_format", b"NHWC") not in (b"NHWC", "NHWC"):
            if x.ins[0].axis != 0:
                x.refuse("adds a bias along the batch axis")
        return [x.ins[0]]
    layouts = []
    for i, lay in x.data(*range(len(x.op.inputs))):
        in_shape = x.shape(x.op.inputs[i])
        axis = lay.axis + len(out_shape) - len(in_shape)
        if in_shape[lay.axis] != out_shape[axis]:
            x.refuse("broadcasts its batch axis")
        layouts.append(Rows(axis, lay.per_example))
    return x.outputs(_one_layout(x, layouts))


@_rule("Select")
def _select(x):
    """`Select` (v1): a vector condition picks rows of the other inputs."""
    cond, then = x.op.inputs[0], x.op.inputs[1]
    if cond.shape.rank == 1 and then.shape.rank not in (None, 1):
        layouts = [lay for _, lay in x.data(1, 2)]
        if x.ins[0] is not CONST:
            if x.ins[0].axis != 0:
                x.refuse("selects along the batch axis")
            layouts.append(x.ins[0])
        return x.outputs(_one_layout(x, layouts))
    return _broadcast(x)


@_rule(
    "Sum",
    "Mean",
    "Max",
    "Min",
    "Prod",
    "All",
    "Any",
    "EuclideanNorm",
)
def _reduce(x):
    lay = x.only_data(0, others=[1])
    rank = x.rank(0)
    axes = {_normalize(a, rank) for a in x.value(1).reshape(-1).tolist()}
    if lay.axis in axes:
        x.refuse("reduces over the batch axis")
    if x.attr("keep_dims"):
        return [lay]
    return [Rows(lay.axis - sum(a < lay.axis for a in axes), lay.per_example)]


@_rule("ArgMax", "ArgMin")
def _arg_reduce(x):
    lay = x.only_data(0, others=[1])
    axis = _normalize(int(x.value(1)), x.rank(0))
    if axis == lay.axis:
        x.refuse("reduces over the batch axis")
    return [Rows(lay.axis - (axis < lay.axis), lay.per_example)]


@_rule("Cumsum", "Cumprod", "CumulativeLogsumexp")
def _cumulative(x):
    lay = x.only_data(0, others=[1])
    if _normalize(int(x.value(1)), x.rank(0)) == lay.axis:
        x.refuse("accumulates along the batch axis")
    return [lay]


@_rule("Softmax", "LogSoftmax")
def _last_axis(x):
    lay = x.ins[0]
    if lay.axis == x.rank(0) - 1:
        x.refuse("normalizes along the batch axis")
    return [lay]


@_rule("TopKV2", "TopK")
def _top_k(x):
    lay = x.only_data(0, others=range(1, len(x.op.inputs)))
    if lay.axis == x.rank(0) - 1:
        x.refuse("sorts along the batch axis")
    return [lay, lay]


@_rule("ReverseV2")
def _reverse(x):
    lay = x.only_data(0, others=[1])
    axes = {_normalize(a, x.rank(0)) for a in x.value(1).reshape(-1).tolist()}
    if lay.axis in axes:
        x.refuse("reverses the order of the examples")
    return [lay]


@_rule("Reshape")
def _reshape(x):
    lay = x.only_data(0, others=[1])
    in_shape = x.shape(x.op.inputs[0])
    out_shape = x.shape(x.op.outputs[0])
    if math.prod(in_shape[: lay.axis]) != 1:
        x.refuse("flattens the batch axis into another one")
    block = lay.per_example * math.prod(in_shape[lay.axis + 1 :])
    axis = next(
        (i for i, d in enumerate(out_shape) if d != 1), len(out_shape) - 1
    )
    inner = math.prod(out_shape[axis + 1 :])
    if inner == 0 or block % inner:
        x.refuse(
            f"reshapes {in_shape} to {out_shape}, splitting an example's "
            "entries"
        )
    per_example = block // inner
    if out_shape[axis] != x.batch_size * per_example:
        x.refuse(f"reshapes {in_shape} to {out_shape} across examples")
    return [Rows(axis, per_example)]


@_rule("Squeeze")
def _squeeze(x):
    lay = x.ins[0]
    shape = x.shape(x.op.inputs[0])
    dims = [_normalize(d, len(shape)) for d in x.attr("squeeze_dims") or []]
    if not dims:
        dims = [i for i, d in enumerate(shape) if d == 1]
    if lay.axis in dims:
        x.refuse("removes the batch axis")
    return [Rows(lay.axis - sum(d < lay.axis for d in dims), lay.per_example)]


@_rule("ExpandDims")
def _expand_dims(x):
    lay = x.only_data(0, others=[1])
    axis = _normalize(int(x.value(1)), x.rank(0) + 1)
    return [Rows(lay.axis + (axis <= lay.axis), lay.per_example)]


@_rule("Transpose")
def _transpose(x):
    lay = x.only_data(0, others=[1])
    perm = [int(p) for p in x.value(1).reshape(-1)]
    return [Rows(perm.index(lay.axis), lay.per_example)]


@_rule("ConcatV2")
def _concat(x):
    n = len(x.op.inputs) - 1
    lay = _one_layout(
        x,
        [x.only_data(i, others=[n]) for i in range(n) if x.ins[i] is not CONST],
    )
    if _normalize(int(x.value(n)), x.rank(0)) == lay.axis:
        x.refuse("concatenates along the batch axis")
    for i in range(n):  # data-free parts must not extend the batch axis
        if x.ins[i] is CONST and x.shape(x.op.inputs[i])[lay.axis] != (
            x.batch_size * lay.per_example
        ):
            x.refuse("concatenates along the batch axis")
    return [lay]


@_rule("Pack")
def _pack(x):
    lay = _one_layout(x, x.ins)
    axis = _normalize(x.attr("axis"), x.rank(0) + 1)
    return [Rows(lay.axis + (axis <= lay.axis), lay.per_example)]


@_rule("Unpack")
def _unpack(x):
    lay = x.ins[0]
    axis = _normalize(x.attr("axis"), x.rank(0))
    if axis == lay.axis:
        x.refuse("splits the batch into its examples")
    return x.outputs(Rows(lay.axis - (axis < lay.axis), lay.per_example))


@_rule("Split")
def _split(x):
    lay = x.only_data(1, others=[0])
    if _normalize(int(x.value(0)), x.rank(1)) == lay.axis:
        x.refuse("splits along the batch axis")
    return x.outputs(lay)


@_rule("SplitV")
def _split_v(x):
    lay = x.only_data(0, others=[1, 2])
    if _normalize(int(x.value(2)), x.rank(0)) == lay.axis:
        x.refuse("splits along the batch axis")
    return x.outputs(lay)


def _whole(x, lay, begin, end, stride, size):
    """Refuses unless a slice keeps the batch axis whole and in order."""
    if begin is not None and begin not in (0, -size):
        x.refuse("takes part of the batch")
    if end is not None and end < size:
        x.refuse("takes part of the batch")
    if stride != 1:
        x.refuse("takes part of the batch, or reorders it")


@_rule("Slice")
def _slice(x):
    lay = x.only_data(0, others=[1, 2])
    size = x.shape(x.op.inputs[0])[lay.axis]
    begin = int(x.value(1)[lay.axis])
    length = int(x.value(2)[lay.axis])
    _whole(x, lay, begin, size if length == -1 else begin + length, 1, size)
    return [lay]


@_rule("StridedSlice")
def _strided_slice(x):
    lay = x.only_data(0, others=[1, 2, 3])
    shape = x.shape(x.op.inputs[0])
    begin, end, strides = (x.value(i).reshape(-1).tolist() for i in (1, 2, 3))
    masks = {
        k: x.attr(k)
        for k in (
            "begin_mask",
            "end_mask",
            "ellipsis_mask",
            "new_axis_mask",
            "shrink_axis_mask",
        )
    }
    out_axis, dense = None, 0  # the output axis of the batch; input dim
    out = 0
    sparse = len(begin)
    if not masks["ellipsis_mask"]:  # an implicit ellipsis at the end
        begin, end, strides = begin + [0], end + [0], strides + [1]
        masks["ellipsis_mask"] = 1 << sparse
        sparse += 1
    for i in range(sparse):
        bit = 1 << i
        if masks["ellipsis_mask"] & bit:
            after = sum(
                1
                for j in range(i + 1, sparse)
                if not masks["new_axis_mask"] & (1 << j)
            )
            stop = len(shape) - after
            if dense <= lay.axis < stop:
                out_axis = out + lay.axis - dense
            out += max(stop - dense, 0)
            dense = max(stop, dense)
        elif masks["new_axis_mask"] & bit:
            out += 1
        else:
            if dense == lay.axis:
                if masks["shrink_axis_mask"] & bit:
                    x.refuse("selects one example of the batch")
                _whole(
                    x,
                    lay,
                    None if masks["begin_mask"] & bit else begin[i],
                    None if masks["end_mask"] & bit else end[i],
                    strides[i],
                    shape[dense],
                )
                out_axis = out
            if not masks["shrink_axis_mask"] & bit:
                out += 1
            dense += 1
    if out_axis is None or out != x.op.outputs[0].shape.rank:
        x.refuse("is a slice that the check cannot interpret")
    return [Rows(out_axis, lay.per_example)]


def _same_size(x, lay, reason):
    """Refuses unless the batch axis keeps its size from input 0 to the
    output (padding and tiling only add to a dimension)."""
    size = x.shape(x.op.inputs[0])[lay.axis]
    if x.shape(x.op.outputs[0])[lay.axis] != size:
        x.refuse(reason)


@_rule("Pad", "PadV2", "MirrorPad")
def _pad(x):
    lay = x.only_data(0, others=range(1, len(x.op.inputs)))
    _same_size(x, lay, "pads the batch axis")
    return [lay]


@_rule("Tile")
def _tile(x):
    lay = x.only_data(0, others=[1])
    _same_size(x, lay, "repeats the batch")
    return [lay]


@_rule("BroadcastTo")
def _broadcast_to(x):
    lay = x.only_data(0, others=[1])
    in_shape = x.shape(x.op.inputs[0])
    out_shape = x.shape(x.op.outputs[0])
    axis = lay.axis + len(out_shape) - len(in_shape)
    if out_shape[axis] != in_shape[lay.axis]:
        x.refuse("broadcasts its batch axis")
    return [Rows(axis, lay.per_example)]


@_rule("Fill")
def _fill(x):
    x.refuse("fills a tensor with a value computed from the batch")


def _contraction(x, operands, output):
    """Einsum-like products: `operands` are `(layout, labels)` of the data
    inputs and `output` the output's labels. The batch's label must be
    shared by all data operands and kept in the output (not summed)."""
    labels = set()
    layouts = []
    for lay, names in operands:
        if lay is CONST:
            continue
        label = names[lay.axis]
        if names.count(label) != 1:
            x.refuse("takes a diagonal across the batch axis")
        labels.add(label)
        layouts.append(lay)
    if len(labels) != 1 or len({lay.per_example for lay in layouts}) != 1:
        x.refuse("multiplies tensors that hold the examples on different axes")
    (label,) = labels
    if label not in output:
        x.refuse("sums over the batch axis")
    return Rows(output.index(label), layouts[0].per_example)


@_rule("MatMul")
def _matmul(x):
    a = ["k", "m"] if x.attr("transpose_a") else ["m", "k"]
    b = ["n", "k"] if x.attr("transpose_b") else ["k", "n"]
    return [_contraction(x, [(x.ins[0], a), (x.ins[1], b)], ["m", "n"])]


@_rule("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
def _batch_matmul(x):
    ranks = [x.rank(0), x.rank(1)]
    out_rank = x.op.outputs[0].shape.rank
    batch = [f"b{out_rank - 2 - i}" for i in range(out_rank - 2)][::-1]

    def labels(rank, last_two):
        return [f"b{rank - 2 - i}" for i in range(rank - 2)][::-1] + last_two

    a = ["k", "m"] if x.attr("adj_x") else ["m", "k"]
    b = ["n", "k"] if x.attr("adj_y") else ["k", "n"]
    return [
        _contraction(
            x,
            [
                (x.ins[0], labels(ranks[0], a)),
                (x.ins[1], labels(ranks[1], b)),
            ],
            batch + ["m", "n"],
        )
    ]


def _einsum_labels(spec, rank):
    """Labels of one einsum operand; `...` expands to positional labels."""
    if "..." in spec:
        head, tail = spec.split("...")
        middle = rank - len(head) - len(tail)
        return (
            list(head) + [f".{middle - i}" for i in range(middle)] + list(tail)
        )
    return list(spec)


@_rule("Einsum")
def _einsum(x):
    equation = x.attr("equation")
    if isinstance(equation, bytes):
        equation = equation.decode()
    equation = equation.replace(" ", "")
    if "->" not in equation:
        x.refuse("has an implicit einsum output")
    inputs, output = equation.split("->")
    operands = [
        (lay, _einsum_labels(spec, x.rank(i)))
        for i, (lay, spec) in enumerate(zip(x.ins, inputs.split(",")))
    ]
    out = _einsum_labels(output, x.op.outputs[0].shape.rank)
    return [_contraction(x, operands, out)]


@_rule(
    "Conv2D",
    "Conv3D",
    "DepthwiseConv2dNative",
    "Conv",
)
def _convolution(x):
    lay = x.only_data(0, others=[1])
    if lay.axis != 0:
        x.refuse("convolves over the batch axis")
    return [lay]


@_rule("Conv2DBackpropInput", "Conv3DBackpropInputV2")
def _transposed_convolution(x):
    lay = x.only_data(2, others=[0, 1])
    if lay.axis != 0:
        x.refuse("convolves over the batch axis")
    return [lay]


@_rule(
    "MaxPool",
    "AvgPool",
    "MaxPool3D",
    "AvgPool3D",
    "MaxPoolV2",
    "ResizeBilinear",
    "ResizeBicubic",
    "ResizeNearestNeighbor",
    "ResizeArea",
    "DepthToSpace",
    "SpaceToDepth",
    "ExtractImagePatches",
)
def _per_image(x):
    lay = x.only_data(0, others=range(1, len(x.op.inputs)))
    if lay.axis != 0:
        x.refuse("treats the batch axis as an image axis")
    for name in ("ksize", "strides"):
        value = x.attr(name)
        if value and int(value[0]) != 1:
            x.refuse("pools over the batch axis")
    return x.outputs(lay)


@_rule("ImageProjectiveTransformV2", "ImageProjectiveTransformV3")
def _image_transform(x):
    lay = _one_layout(x, [x.ins[0], x.ins[1]])
    x.only_data(0, others=range(2, len(x.op.inputs)))
    if lay.axis != 0:
        x.refuse("treats the batch axis as an image axis")
    return [lay]


@_rule("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _fused_batch_norm(x):
    if x.attr("is_training"):
        x.refuse("normalizes with the statistics of the batch")
    lay = x.only_data(0, others=range(1, len(x.op.inputs)))
    return [lay] + [CONST] * (len(x.op.outputs) - 1)


@_rule("GatherV2")
def _gather(x):
    params, indices = x.ins[0], x.ins[1]
    x.only_data(0, others=[2])
    p_rank, i_rank = x.rank(0), x.rank(1)
    axis = _normalize(int(x.value(2)), p_rank)
    batch_dims = _normalize(x.attr("batch_dims") or 0, i_rank)
    if params is CONST:
        if indices.axis < batch_dims:
            return [indices]
        return [Rows(axis + indices.axis - batch_dims, indices.per_example)]
    if params.axis == axis:
        x.refuse("gathers along the batch axis")
    if indices is not CONST:
        if params.axis != indices.axis or params.axis >= batch_dims:
            x.refuse("gathers across examples")
        return [_one_layout(x, [params, indices])]
    if params.axis < axis:
        return [params]
    return [Rows(params.axis - 1 + i_rank - batch_dims, params.per_example)]


@_rule("ResourceGather")
def _resource_gather(x):
    indices = x.ins[1]
    batch_dims = x.attr("batch_dims") or 0
    if indices.axis < batch_dims:
        return [indices]
    return [Rows(indices.axis, indices.per_example)]


@_rule("GatherNd")
def _gather_nd(x):
    indices = x.only_data(1, others=[0])
    if indices.axis == x.rank(1) - 1:
        x.refuse("indexes with the batch axis")
    return [indices]


@_rule("OneHot")
def _one_hot(x):
    lay = x.only_data(0, others=[1, 2, 3])
    axis = x.attr("axis")
    if axis == -1 or axis > lay.axis:
        return [lay]
    return [Rows(lay.axis + 1, lay.per_example)]


@_rule(
    "SparseSoftmaxCrossEntropyWithLogits",
    "SoftmaxCrossEntropyWithLogits",
)
def _cross_entropy(x):
    lay = _one_layout(x, x.ins)
    if lay.axis != 0:
        x.refuse("computes a cross-entropy across the batch axis")
    return [lay, lay]


@_rule(
    "StatelessRandomUniform",
    "StatelessRandomNormal",
    "StatelessTruncatedNormal",
    "StatelessRandomUniformInt",
    "StatelessRandomUniformV2",
    "StatelessRandomNormalV2",
    "StatelessTruncatedNormalV2",
    "StatelessRandomUniformIntV2",
    "StatelessRandomUniformFullIntV2",
    "StatelessRandomGetKeyCounter",
    "StatelessRandomGetKeyCounterAlg",
    "RandomUniform",
    "RandomStandardNormal",
    "TruncatedNormal",
)
def _random(x):
    x.refuse("draws random numbers from a seed or shape computed from data")


_PYTHON = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def check_no_data_writes(region, inputs):
    """Raises `NotSeparable` if the recorded block writes data of `inputs`
    into state, or hands it to Python code.

    For a computation that runs one example at a time (`tf.vectorized_map`):
    there, the only way for one example to reach another's loss is through
    state that outlives it, such as a variable that one example writes and
    the next reads.

    Args:
        region: a `Region` that recorded the block.
        inputs: the block's input tensors (the example).
    """
    if region.ops is None:
        return
    tainted = {t.ref() for t in tf.nest.flatten(inputs) if tf.is_tensor(t)}
    for op in region.ops:
        if not any(t.ref() in tainted for t in op.inputs):
            continue
        if op.type in _WRITES:
            _refuse(op, "writes data of an example into a variable")
        if op.type in _PYTHON:
            _refuse(op, "hands data of an example to Python code")
        tainted.update(_refs(op.outputs))


def call_alone(fn, example, what):
    """`fn(example)` for one example of a `tf.vectorized_map`, refusing
    state that would carry the example's data to another one
    (`check_no_data_writes`).

    Args:
        fn: the per-example computation.
        example: its input (one example).
        what: how the error names `fn`.

    Returns:
        `fn(example)`.

    Raises:
        ValueError: `fn` writes data of `example` into a variable or hands
            it to Python code.
    """
    with Region() as region:
        out = fn(example)
    try:
        check_no_data_writes(region, example)
    except NotSeparable as e:
        raise ValueError(
            f"{what} lets one example reach another through state: {e}. "
            "Remove the operation."
        ) from None
    return out
