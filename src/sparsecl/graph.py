"""The unit graph of a user's model, traced with torch.fx.

A *unit* is an output neuron of an ``nn.Linear`` or an output channel of an ``nn.Conv2d``.
Pruning and freezing act on units, so the engine must know, for every such layer, which units it
reads. Operations that map channel *j* to channel *j* pass units through: activations, dropout,
BatchNorm (whose channel *j* then belongs to the unit too), max/avg pooling, and ``flatten`` into
a Linear (channel *j* becomes a block of H·W columns). A residual add couples the units of both
branches: channel *j* of the sum is read as one unit, so the layers that feed it form a *unit
group*, owned, pruned and frozen together. The graph is traced from the model itself
(``nn.Sequential`` or a custom ``forward``), never wired by hand; anything the tracer cannot
follow unit-for-unit is refused with an error naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedModelError
from .norm import TASK_NORMS

# Modules and functions that map unit j to unit j, so a layer reading their output reads the
# units of whatever layer feeds them.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.hardtanh, F.hardswish, F.softplus,
}
# Spatial pooling keeps channels apart and maps an all-zero (pruned) channel to zeros, but only
# on feature maps (N, C, H, W): on a reshaped tensor it would mix channels.
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d, torch._C._nn.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# torch.fx records F.dropout's ``training`` argument as the constant it had while tracing, so the
# traced model would drop out in eval mode (or never while training): nn.Dropout is required.
_FUNCTIONAL_DROPOUT = {F.dropout, F.alpha_dropout, F.dropout1d, F.dropout2d, F.feature_alpha_dropout}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_ADD = {operator.add, torch.add}
_ADD_METHODS = {"add"}

INPUT = None  # the ``source`` of a layer that reads the model input


@dataclass(frozen=True)
class UnitLayer:
    """One layer of units: ``module`` is an ``nn.Linear`` (units: ``out_features`` rows) or an
    ``nn.Conv2d`` (units: ``out_channels``, its weight's dim 0).

    ``group`` names the unit group the layer's units belong to (its own name unless a residual
    add couples it with other layers). ``source`` names the unit group whose units are this
    layer's inputs, or ``None`` when it reads the model input. ``fan`` is the number of input
    columns per source unit: 1, or H·W when a Linear reads flattened ``(C, H, W)`` feature maps
    (channel c owns columns ``c·fan .. (c+1)·fan − 1``).
    """

    name: str
    module: nn.Module
    source: str | None
    group: str = ""
    fan: int = 1

    @property
    def num_units(self) -> int:
        return self.module.weight.shape[0]

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """Bool mask over the input columns (dim 1 of the weight) from a mask ``(source units,)``."""
        return units.repeat_interleave(self.fan) if self.fan > 1 else units


def units_read(weight: torch.Tensor, rows: torch.Tensor, fan: int = 1) -> torch.Tensor:
    """Bool mask ``(source units,)``, on the CPU, of the source units that ``weight``'s ``rows``
    (bool ``(out,)``) read through a nonzero entry; ``fan`` input columns per source unit (the
    inverse of ``UnitLayer.columns``)."""
    columns = (weight[rows.to(weight.device)] != 0).transpose(0, 1).flatten(1).any(1).cpu()
    return columns.view(-1, fan).any(1) if fan > 1 else columns


@dataclass(frozen=True)
class UnitGroup:
    """Units owned, pruned and frozen together: the same-index output units of ``layers``
    (coupled by residual adds; a single layer otherwise) and the channels of the BatchNorm
    modules ``norms`` that normalize them. Its name is its first layer's name."""

    name: str
    layers: tuple[str, ...]
    norms: tuple[str, ...]
    num_units: int


@dataclass(frozen=True)
class UnitGraph:
    """Unit layers in topological order, their unit groups, and the group the task heads read
    (``head_source``, ``None`` for a model without hidden layers; ``head_fan`` columns per unit);
    task heads copy the shape and bias setting of the model's final Linear."""

    layers: dict[str, UnitLayer]
    head_source: str | None
    head_in_features: int
    head_out_features: int
    head_bias: bool = True
    groups: dict[str, UnitGroup] = field(default_factory=dict)
    head_fan: int = 1

    def readers(self, group: str) -> list[str]:
        """Names of the unit layers that read group ``group``'s units (heads not included)."""
        return [l.name for l in self.layers.values() if l.source == group]

    def head_columns(self, units: torch.Tensor) -> torch.Tensor:
        """Bool mask over the head's input features from a mask over ``head_source``'s units."""
        return units.repeat_interleave(self.head_fan) if self.head_fan > 1 else units


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"node '{node.name}' (module '{node.target}' of type {type(gm.get_submodule(node.target)).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node '{node.name}' ({node.op} {target})"


def _unsupported(node: fx.Node, gm: fx.GraphModule, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{_describe(node, gm)}: {why}. sparsecl traces networks of nn.Linear and nn.Conv2d layers "
        "with BatchNorm, element-wise activations, dropout, pooling, flatten into a Linear and "
        "residual adds.")


def _is_shape(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.shape`` or an item of either: an integer, not a tensor of units."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and _is_shape(node.args[0]))


def _kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """Classify a node: 'input', 'linear', 'conv', 'norm', 'elementwise', 'pool', 'reshape',
    'add', 'shape' or 'other'."""
    if node.op == "placeholder":
        return "input"
    if _is_shape(node):
        return "shape"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.Linear:
            return "linear"
        if type(module) is nn.Conv2d:
            return "conv"
        if type(module) in TASK_NORMS or type(module) in TASK_NORMS.values():
            return "norm"
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, _POOL_MODULES):
            return "pool"
        if isinstance(module, _RESHAPE_MODULES):
            return "reshape"
    elif node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
        if node.target in _RESHAPE_FUNCTIONS:
            return "reshape"
        if node.target in _ADD:
            return "add"
    elif node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target in _RESHAPE_METHODS:
            return "reshape"
        if node.target in _ADD_METHODS:
            return "add"
    return "other"


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of ``node`` that carry units (sizes read off a tensor do not)."""
    return [a for a in node.all_input_nodes if not _is_shape(a)]


@dataclass(frozen=True)
class _Carry:
    """What a node's output holds: the units of layer ``source`` (a representative of its group;
    ``None``: the model input), as channels of feature maps (``spatial``) or as features, and
    whether it was reshaped since."""

    source: str | None
    spatial: bool = False
    flat: bool = False


class _Groups:
    """Union-find over layer names: layers whose units a residual add couples."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent[name] = name

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        self.parent[rb] = ra
        return ra


def _check_module(node: fx.Node, gm: fx.GraphModule, kind: str) -> None:
    module = gm.get_submodule(node.target)
    if kind == "conv" and module.groups != 1:
        raise _unsupported(node, gm, f"grouped convolution (groups={module.groups}) mixes no "
                           "channels across groups, so its units cannot be matched to inputs")
    if kind == "norm" and not (module.affine and module.track_running_stats):
        raise _unsupported(node, gm, "BatchNorm needs affine=True and track_running_stats=True: a "
                           "pruned channel is silenced through its affine parameters, and each "
                           "task keeps its own frozen running statistics (never test-batch ones)")
    if kind == "norm" and module.momentum is None:
        raise _unsupported(node, gm, "BatchNorm with momentum=None (a cumulative average) counts "
                           "batches for all channels at once, so a channel recycled for a new task "
                           "would barely learn its statistics; give it a momentum")


def _walk(gm: fx.GraphModule, head_node: fx.Node):
    """Follow units through the graph in topological order. Returns ``(layers, norms, groups,
    head_carry)``: per unit layer its input carry, per BatchNorm the layer whose units it
    normalizes, the coupling union-find, and what the head reads."""
    carry: dict[fx.Node, _Carry] = {}
    layers: dict[str, tuple[fx.Node, _Carry]] = {}
    norms: dict[str, str] = {}
    groups = _Groups()
    called: set[str] = set()
    head_carry = None
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        kind = _kind(node, gm)
        if kind == "other" and node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT:
            raise _unsupported(node, gm, "use nn.Dropout instead: torch.fx freezes the functional "
                               "form's training flag, so it would drop out in eval mode too")
        if kind == "other":
            if node.op == "get_attr":
                raise _unsupported(node, gm, "the model uses a parameter or buffer directly in forward")
            raise _unsupported(node, gm, "this operation is not supported")
        if kind == "input":
            carry[node] = _Carry(INPUT)
            continue
        if kind == "shape":
            continue
        inputs = _tensor_inputs(node)
        if node.op == "call_module":
            if node.target in called:
                raise _unsupported(node, gm, "the same module is called more than once (shared weights)")
            called.add(node.target)
        if kind == "add":
            if len(inputs) != 2:
                raise _unsupported(node, gm, "an add of a constant shifts pruned units away from zero; "
                                   "only the residual add of two tensors is supported")
            a, b = carry[inputs[0]], carry[inputs[1]]
            if a.source is INPUT or b.source is INPUT:
                raise _unsupported(node, gm, "a residual add with the model input couples units to "
                                   "input pixels, which no task owns")
            if a.flat or b.flat or a.spatial != b.spatial:
                raise _unsupported(node, gm, "it adds tensors of different layouts (feature maps and "
                                   "features, or reshaped ones)")
            if gm.get_submodule(a.source).weight.shape[0] != gm.get_submodule(b.source).weight.shape[0]:
                raise _unsupported(node, gm, f"it adds the units of '{a.source}' and '{b.source}', "
                                   "which differ in number")
            carry[node] = _Carry(groups.union(a.source, b.source), a.spatial)
            continue
        if len(inputs) != 1:
            raise _unsupported(node, gm, f"it combines {len(inputs)} tensors")
        c = carry[inputs[0]]
        if kind in ("linear", "conv"):
            _check_module(node, gm, kind)
            if c.source is not INPUT:
                if kind == "conv" and (c.flat or not c.spatial):
                    raise _unsupported(node, gm, "a Conv2d must read feature maps of a Conv2d (or the "
                                       "input), not features")
                if kind == "linear" and c.spatial and not c.flat:
                    raise _unsupported(node, gm, "a Linear reads feature maps without flattening them")
                if kind == "linear" and not c.spatial and c.flat:
                    raise _unsupported(inputs[0], gm, f"it reshapes the units of Linear '{c.source}' before "
                                       "another Linear reads them, so units cannot be matched to input columns")
            if node is head_node:
                head_carry = c
                continue
            layers[str(node.target)] = (node, c)
            groups.add(str(node.target))
            carry[node] = _Carry(str(node.target), spatial=kind == "conv")
        elif kind == "norm":
            _check_module(node, gm, kind)
            if c.source is INPUT:
                raise _unsupported(node, gm, "BatchNorm of the model input would be shared by every "
                                   "task (its statistics would move); normalize the data instead")
            if c.flat:
                raise _unsupported(node, gm, "BatchNorm of reshaped units is not supported")
            norms[str(node.target)] = c.source
            carry[node] = c
        elif kind == "reshape":
            if c.spatial and not _is_full_flatten(node, gm):
                raise _unsupported(node, gm, "feature maps may only be flattened whole, to (N, C·H·W) "
                                   "(nn.Flatten(), x.flatten(1) or x.view(x.size(0), -1)): another "
                                   "reshape would mix channels")
            carry[node] = replace(c, flat=c.source is not INPUT)
        elif kind == "pool":
            if c.source is not INPUT and (c.flat or not c.spatial):
                raise _unsupported(node, gm, "pooling of reshaped units or of features mixes units")
            carry[node] = c
        else:  # elementwise
            carry[node] = c
    return layers, norms, groups, head_carry


def _is_full_flatten(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a reshape node turns (N, C, H, W) into (N, C·H·W)."""
    args = node.args[1:]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    if node.target in (torch.flatten, "flatten"):
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    # view / reshape: (N, -1), N given as x.size(0), x.shape[0] or a number
    shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    return len(shape) == 2 and shape[1] == -1


def _fan(name: str, c: _Carry, in_features: int, units: int) -> int:
    """Input columns per source unit of Linear ``name`` reading carry ``c``; raises when they do
    not fit."""
    if c.spatial:
        if in_features % units:
            raise UnsupportedModelError(
                f"layer '{name}' reads {in_features} flattened features from {units} channels, which "
                "is not a whole number of features per channel")
        return in_features // units
    if in_features != units:
        raise UnsupportedModelError(f"layer '{name}' has in_features={in_features} but reads {units} units")
    return 1


def trace(model: nn.Module) -> tuple[fx.GraphModule, UnitGraph, nn.Linear]:
    """Trace ``model`` and return ``(body, graph, head)``.

    ``body`` is a ``torch.fx.GraphModule`` equal to ``model`` without its final ``nn.Linear``
    (the head prototype): it maps an input batch to the features the task heads read, shape
    ``(N, head_in_features)``. Its BatchNorm modules are replaced by task-exact ones
    (``norm.TaskBatchNorm*d``, same parameters and state-dict keys). ``graph`` lists the unit
    layers and unit groups of ``body``; ``head`` is the final Linear that was cut off (the
    prototype of every task head).

    Raises:
        UnsupportedModelError: tracing fails, the model does not end with an ``nn.Linear``, a
            module is called twice, a node between layers does not keep channels apart, or a
            layer's input width does not match the units it reads (the message names the node).
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; name the model and the reason
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__}: {exc}") from exc

    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    head_node = outputs[0].args[0]
    if not isinstance(head_node, fx.Node) or _kind(head_node, gm) != "linear":
        what = _describe(head_node, gm) if isinstance(head_node, fx.Node) else repr(head_node)
        raise UnsupportedModelError(
            f"{type(model).__name__} must return the output of a final nn.Linear (the head "
            f"prototype, replaced by one head per task); its output is {what}")
    head_module: nn.Linear = gm.get_submodule(head_node.target)
    if len(head_node.users) != 1:
        raise _unsupported(head_node, gm, "the final Linear's output is used inside the model")

    walked, norms, groups, head_carry = _walk(gm, head_node)

    # Cut the head off: the body returns what the head read.
    (head_input,) = _tensor_inputs(head_node)
    outputs[0].args = (head_input,)
    gm.graph.erase_node(head_node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    # A layer whose output never reaches the head was just removed: it holds no capacity.
    live = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in live & set(norms):
        bn = gm.get_submodule(name)
        if type(bn) in TASK_NORMS:
            gm.set_submodule(name, TASK_NORMS[type(bn)].replacing(bn))
    gm.recompile()

    members: dict[str, list[str]] = {}
    for name in walked:
        if name in live:
            members.setdefault(groups.find(name), []).append(name)
    group_name = {rep: names[0] for rep, names in members.items()}  # named by the first layer

    def group_of(source: str | None) -> str | None:
        return None if source is INPUT else group_name[groups.find(source)]

    unit_groups = {
        group_name[rep]: UnitGroup(
            group_name[rep], tuple(names),
            tuple(n for n, src in norms.items() if n in live and groups.find(src) == rep),
            gm.get_submodule(names[0]).weight.shape[0])
        for rep, names in members.items()}
    layers: dict[str, UnitLayer] = {}
    for name, (_, c) in walked.items():
        if name not in live:
            continue
        module = gm.get_submodule(name)
        source = group_of(c.source)
        fan = 1
        if source is not None:
            units = unit_groups[source].num_units
            if isinstance(module, nn.Conv2d):
                if module.in_channels != units:
                    raise UnsupportedModelError(f"layer '{name}' has in_channels={module.in_channels} "
                                                f"but reads {units} channels of unit group '{source}'")
            else:
                fan = _fan(name, c, module.in_features, units)
        layers[name] = UnitLayer(name, module, source, group_of(name), fan)
    head_source = group_of(head_carry.source) if head_carry is not None else None
    head_fan = 1
    if head_source is not None:
        head_fan = _fan(str(head_node.target), head_carry, head_module.in_features, unit_groups[head_source].num_units)
    graph = UnitGraph(layers, head_source, head_module.in_features, head_module.out_features,
                      head_module.bias is not None, unit_groups, head_fan)
    return gm, graph, head_module
