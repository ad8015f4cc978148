"""The unit graph of a user's model, traced with torch.fx.

A *unit* is an output neuron of an ``nn.Linear``. Pruning and freezing act on units, so the
engine must know, for every Linear layer, which layer's units it reads: an activation or dropout
between two Linears maps unit *j* to unit *j*, so the reading layer's column *j* belongs to the
source layer's unit *j*. The graph is traced from the model itself (``nn.Sequential`` or a custom
``forward``), never wired by hand; anything the tracer cannot follow unit-for-unit is refused with
an error naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedModelError

# Modules and functions that map unit j to unit j (element-wise), so a Linear reading their output
# reads the units of whatever Linear feeds them.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Dropout, nn.AlphaDropout, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.hardtanh, F.hardswish, F.softplus,
}
# torch.fx records F.dropout's ``training`` argument as the constant it had while tracing, so the
# traced model would drop out in eval mode (or never while training): nn.Dropout is required.
_FUNCTIONAL_DROPOUT = {F.dropout, F.alpha_dropout, F.dropout1d, F.feature_alpha_dropout}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
# Reshapes are only followed between the model input and the first Linear (flattening images).
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}

INPUT = None  # the ``source`` of a layer that reads the model input


@dataclass(frozen=True)
class UnitLayer:
    """One layer of units: ``module`` is an ``nn.Linear`` whose ``out_features`` rows are units.

    ``source`` names the unit layer whose units are this layer's input columns, or ``None`` when
    the layer reads the model input.
    """

    name: str
    module: nn.Linear
    source: str | None

    @property
    def num_units(self) -> int:
        return self.module.out_features


@dataclass(frozen=True)
class UnitGraph:
    """Unit layers in topological order and the layer the task heads read (``head_source``,
    ``None`` for a model without hidden layers); task heads copy the shape and bias setting of
    the model's final Linear."""

    layers: dict[str, UnitLayer]
    head_source: str | None
    head_in_features: int
    head_out_features: int
    head_bias: bool = True

    def readers(self, name: str) -> list[str]:
        """Names of the unit layers that read layer ``name``'s units (heads not included)."""
        return [l.name for l in self.layers.values() if l.source == name]


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"node '{node.name}' (module '{node.target}' of type {type(gm.get_submodule(node.target)).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node '{node.name}' ({node.op} {target})"


def _unsupported(node: fx.Node, gm: fx.GraphModule, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{_describe(node, gm)}: {why}. sparsecl traces MLPs built from nn.Linear, element-wise "
        "activations and dropout (with flatten/reshape only before the first Linear)."
    )


def _is_shape(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.shape`` or an item of either: an integer, not a tensor of units."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and _is_shape(node.args[0]))


def _kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """Classify a node: 'input', 'linear', 'elementwise', 'reshape', 'shape' or 'other'."""
    if node.op == "placeholder":
        return "input"
    if _is_shape(node):
        return "shape"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.Linear:
            return "linear"
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, _RESHAPE_MODULES):
            return "reshape"
    elif node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in _RESHAPE_FUNCTIONS:
            return "reshape"
    elif node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target in _RESHAPE_METHODS:
            return "reshape"
    return "other"


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of ``node`` that carry units (sizes read off a tensor do not)."""
    return [a for a in node.all_input_nodes if not _is_shape(a)]


def _source_of(node: fx.Node, gm: fx.GraphModule, passed_reshape: bool = False) -> str | None:
    """Follow ``node`` (the input of a Linear) back to the Linear whose units it carries."""
    kind = _kind(node, gm)
    if kind == "input":
        return INPUT
    if kind == "linear":
        if passed_reshape:
            raise _unsupported(node, gm, "its output is reshaped before another Linear reads it, "
                               "so units cannot be matched to input columns")
        return str(node.target)
    if kind in ("elementwise", "reshape"):
        inputs = _tensor_inputs(node)
        if len(inputs) != 1:
            raise _unsupported(node, gm, f"it combines {len(inputs)} tensors")
        return _source_of(inputs[0], gm, passed_reshape or kind == "reshape")
    if node.op == "get_attr":
        raise _unsupported(node, gm, "the model uses a parameter or buffer directly in forward")
    raise _unsupported(node, gm, "this operation is not supported between layers")


def trace(model: nn.Module) -> tuple[fx.GraphModule, UnitGraph, nn.Linear]:
    """Trace ``model`` and return ``(body, graph, head)``.

    ``body`` is a ``torch.fx.GraphModule`` equal to ``model`` without its final ``nn.Linear``
    (the head prototype): it maps an input batch to the features the task heads read, shape
    ``(N, head_in_features)``. ``graph`` lists the unit layers of ``body``; ``head`` is the
    final Linear that was cut off (the prototype of every task head).

    Raises:
        UnsupportedModelError: tracing fails, the model does not end with an ``nn.Linear``, a
            Linear module is called twice, or a node between layers is not element-wise.
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

    seen: set[str] = set()
    layers: dict[str, UnitLayer] = {}
    for node in gm.graph.nodes:
        kind = _kind(node, gm)
        if node.op == "output":
            continue
        if kind == "other" and node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT:
            raise _unsupported(node, gm, "use nn.Dropout instead: torch.fx freezes the functional "
                               "form's training flag, so it would drop out in eval mode too")
        if kind == "other":
            raise _unsupported(node, gm, "this operation is not supported")
        if kind != "linear":
            continue
        if node.target in seen:
            raise _unsupported(node, gm, "the same Linear is called more than once (shared weights)")
        seen.add(node.target)
        inputs = _tensor_inputs(node)
        if len(inputs) != 1:
            raise _unsupported(node, gm, "a Linear must take exactly one tensor")
        source = _source_of(inputs[0], gm)
        if node is head_node:
            head_source = source
            continue
        layers[str(node.target)] = UnitLayer(str(node.target), gm.get_submodule(node.target), source)
    for layer in layers.values():
        if layer.source is not None:
            expected = layers[layer.source].num_units
            if layer.module.in_features != expected:
                raise UnsupportedModelError(
                    f"layer '{layer.name}' has in_features={layer.module.in_features} but reads "
                    f"layer '{layer.source}' with {expected} units")

    # Cut the head off: the body returns what the head read.
    (head_input,) = _tensor_inputs(head_node)
    outputs[0].args = (head_input,)
    gm.graph.erase_node(head_node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # A Linear whose output never reaches the head was just removed: it holds no capacity.
    live = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    layers = {name: layer for name, layer in layers.items() if name in live}
    graph = UnitGraph(layers, head_source, head_module.in_features, head_module.out_features,
                      head_module.bias is not None)
    return gm, graph, head_module
