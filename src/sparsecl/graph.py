"""The unit graph of a user's model, traced with torch.fx.

A *unit* is an output neuron of an ``nn.Linear`` or an output channel of an ``nn.Conv2d``.
Pruning and freezing act on units, so the neuron-level methods (EideticNets, CLNP) must know, for
every such layer, which units it reads. Operations that map channel *j* to channel *j* pass units
through: activations, dropout, BatchNorm (whose channel *j* then belongs to the unit too),
max/avg pooling, and ``flatten`` into a Linear (channel *j* becomes a block of H·W columns).

Couplings: a residual add couples the units of both branches: channel *j* of the sum is read as
one unit, so the layers that feed it form a *unit group*, owned, pruned and frozen together. A
depthwise convolution (``groups = in_channels = out_channels``) maps channel *j* to channel *j*
through a kernel of its own, so it joins the unit group of the layer it reads (unit *j* of both is
one unit). Any other grouped convolution is held as a ``BlockDiagonalConv2d``: the dense
``(out, in, kH, kW)`` weight of an ordinary convolution whose entries outside the groups' diagonal
blocks are exact zeros, so that each output channel is a unit reading the input channels of its
group through ordinary weight columns (exact, at ``groups`` times the layer's weights and
compute). ``torch.cat`` along the unit dimension gives *unit ranges*: the concatenation's units
are its inputs' units in order. A Linear or Conv2d reading a concatenation is split into one
layer per range (the first keeps the bias; their outputs are summed, which equals the layer on
the concatenation), coupled as a residual add's branches, and a BatchNorm over a concatenation is
split into one BatchNorm per range; the split layers are named ``{layer}__cat{k}`` for k >= 1.

What the graph refuses, and why (the error names the node):

* LayerNorm / GroupNorm / InstanceNorm: they normalize each sample over many units, so a frozen
  unit's output would move whenever a later task trains a free unit of the same layer. Making
  that exact needs a forward pass per task normalizing over the task's own units, which gives up
  the single dense pass the neuron-level methods rely on (DESIGN §2.5).
* Attention (``nn.MultiheadAttention``, ``scaled_dot_product_attention``): a head would be a unit
  only if its query/key/value rows of the packed ``in_proj_weight`` and its columns of
  ``out_proj`` were owned together; the unit ledger owns single rows of a Linear or Conv2d.

The weight-level methods (PackNet, WSN, DST-CL, TinySubNets) need no unit graph and take all of
these (``sparsecl.subnetworks``). ``trace`` refuses what the unit graph cannot follow;
``trace_network`` still cuts the head off such a model and records the refusal in the graph.
"""

from __future__ import annotations

import copy
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
_CAT = {torch.cat, torch.concat, torch.concatenate}

# Operations refused with a reason of their own (module doc).
_WEIGHT_LEVEL = ("Use a weight-level method (packnet, wsn, dst, tinysubnets): they mask every weight per task and "
                 "keep every other parameter per task, so they are exact on any module")
_SAMPLE_NORM = ("{what} normalizes each sample over many units, so every unit's output depends on the mean and "
                "variance of all of them: a frozen unit's output would move whenever a later task trains a free "
                "unit. An exact version would need a forward pass per task normalizing over that task's units "
                "only, giving up the single dense pass of the neuron-level methods (eidetic, clnp), so they "
                "refuse it. " + _WEIGHT_LEVEL + " (LayerNorm and GroupNorm affine parameters are per task)")
_ATTENTION = ("attention heads could be units only if a head's query, key and value rows of the packed "
              "in_proj_weight and its columns of out_proj were owned, pruned and frozen together; the "
              "neuron-level ledger owns single rows of a Linear or Conv2d, so the neuron-level methods "
              "(eidetic, clnp) refuse attention. " + _WEIGHT_LEVEL)
_SAMPLE_NORM_MODULES = {nn.LayerNorm: "LayerNorm", nn.GroupNorm: "GroupNorm", nn.InstanceNorm1d: "InstanceNorm",
                        nn.InstanceNorm2d: "InstanceNorm", nn.LocalResponseNorm: "LocalResponseNorm"}
_SAMPLE_NORM_FUNCTIONS = {F.layer_norm: "LayerNorm", F.group_norm: "GroupNorm", F.instance_norm: "InstanceNorm"}
_ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                      nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, F.multi_head_attention_forward}

INPUT = None  # the ``source`` of a layer that reads the model input
CAT_SUFFIX = "__cat"  # ``{layer}__cat{k}``: range k of a layer split at a concatenation


@dataclass(frozen=True)
class UnitLayer:
    """One layer of units: ``module`` is an ``nn.Linear`` (units: ``out_features`` rows) or an
    ``nn.Conv2d`` (units: ``out_channels``, its weight's dim 0).

    ``group`` names the unit group the layer's units belong to (its own name unless a residual
    add or a depthwise convolution couples it with other layers). ``source`` names the unit group
    whose units are this layer's inputs, or ``None`` when it reads no unit of another layer: the
    model input, or (``depthwise``) only the same-index units of its own group. ``fan`` is the
    number of input columns per source unit: 1, or H·W when a Linear reads flattened
    ``(C, H, W)`` feature maps (channel c owns columns ``c·fan .. (c+1)·fan − 1``).
    """

    name: str
    module: nn.Module
    source: str | None
    group: str = ""
    fan: int = 1
    depthwise: bool = False

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


class BlockDiagonalConv2d(nn.Conv2d):
    """A grouped convolution (``blocks`` groups) held as an ordinary one: ``weight`` is the dense
    ``(out_channels, in_channels, kH, kW)`` kernel whose entries outside the diagonal blocks
    (output channels of group b × input channels of group b) are exact zeros. The forward pass
    multiplies by the block mask (a non-persistent buffer), so those entries get zero gradients
    and no optimizer moves them (Adam, AdamW and SGD update a zero entry with a zero gradient and
    zero state by zero). ``reset_parameters`` draws the grouped convolution's default
    initialization into the blocks. Output equals ``nn.Conv2d(..., groups=blocks)`` with the
    blocks as its kernel (to float rounding: a dense sum over zeros)."""

    blocks = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 blocks: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode,
                         device=device, dtype=dtype)
        self.blocks = blocks
        rows = torch.arange(out_channels, device=self.weight.device) // (out_channels // blocks)
        cols = torch.arange(in_channels, device=self.weight.device) // (in_channels // blocks)
        mask = (rows[:, None] == cols[None, :]).to(self.weight.dtype)[:, :, None, None]
        self.register_buffer("block_mask", mask.expand_as(self.weight).contiguous(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.blocks == 1:  # nn.Conv2d.__init__ calls this before the blocks are known
            return super().reset_parameters()
        grouped = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, groups=self.blocks,
                            bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(self.expand(grouped.weight))
            if self.bias is not None:
                self.bias.copy_(grouped.bias)

    def expand(self, grouped_weight: torch.Tensor) -> torch.Tensor:
        """The dense kernel of a grouped kernel ``(out, in / blocks, kH, kW)``."""
        per_in = self.in_channels // self.blocks
        dense = grouped_weight.new_zeros(self.weight.shape)
        for b, rows in enumerate(torch.arange(self.out_channels).chunk(self.blocks)):
            dense[rows, b * per_in:(b + 1) * per_in] = grouped_weight[rows]
        return dense

    @classmethod
    @torch.no_grad()
    def replacing(cls, conv: nn.Conv2d) -> "BlockDiagonalConv2d":
        """The block-diagonal form of grouped ``conv`` (same values, options and mode)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                  dtype=conv.weight.dtype)
        new.weight.copy_(new.expand(conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.block_mask, self.bias)


@dataclass(frozen=True)
class UnitGroup:
    """Units owned, pruned and frozen together: the same-index output units of ``layers``
    (coupled by residual adds or depthwise convolutions; a single layer otherwise) and the
    channels of the BatchNorm modules ``norms`` that normalize them. Its name is its first
    layer's name."""

    name: str
    layers: tuple[str, ...]
    norms: tuple[str, ...]
    num_units: int


@dataclass(frozen=True)
class UnitGraph:
    """Unit layers in topological order, their unit groups, and the group the task heads read
    (``head_source``, ``None`` for a model without hidden layers; ``head_fan`` columns per unit);
    task heads copy the shape and bias setting of the model's final Linear.

    ``refusal``: why the model has no unit graph (``trace_network`` of a model the neuron-level
    methods cannot follow; ``layers`` and ``groups`` are then empty), else ``None``.
    ``head_name``: the final Linear's name in the user's model.
    """

    layers: dict[str, UnitLayer]
    head_source: str | None
    head_in_features: int
    head_out_features: int
    head_bias: bool = True
    groups: dict[str, UnitGroup] = field(default_factory=dict)
    head_fan: int = 1
    refusal: str | None = None
    head_name: str = ""

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


_SUPPORTED = ("The neuron-level methods (eidetic, clnp) trace networks of nn.Linear and nn.Conv2d layers "
              "(depthwise included) with BatchNorm, element-wise activations, dropout, pooling, flatten into a "
              "Linear, residual adds and concatenations along the unit dimension; the weight-level methods "
              "(packnet, wsn, dst, tinysubnets) take any module.")


def _unsupported(node: fx.Node, gm: fx.GraphModule, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{_describe(node, gm)}: {why}. {_SUPPORTED}")


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
    'add', 'cat', 'shape' or 'other'."""
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
        if node.target in _CAT:
            return "cat"
    elif node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target in _RESHAPE_METHODS:
            return "reshape"
        if node.target in _ADD_METHODS:
            return "add"
    return "other"


def _refusal(node: fx.Node, gm: fx.GraphModule) -> str:
    """Why an 'other' node cannot be traced."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for kind, what in _SAMPLE_NORM_MODULES.items():
            if isinstance(module, kind):
                return _SAMPLE_NORM.format(what=what)
        if isinstance(module, _ATTENTION_MODULES):
            return _ATTENTION
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return ("an embedding table's rows are looked up by token id, not computed from units; "
                    "the neuron-level methods (eidetic, clnp) refuse it. " + _WEIGHT_LEVEL)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{type(module).__name__} is not supported (BatchNorm1d and BatchNorm2d are)"
    if node.op == "call_function":
        if node.target in _SAMPLE_NORM_FUNCTIONS:
            return _SAMPLE_NORM.format(what=_SAMPLE_NORM_FUNCTIONS[node.target])
        if node.target in _ATTENTION_FUNCTIONS:
            return _ATTENTION
        if node.target in _FUNCTIONAL_DROPOUT:
            return ("use nn.Dropout instead: torch.fx freezes the functional form's training flag, so it "
                    "would drop out in eval mode too")
    if node.op == "get_attr":
        return ("the model uses a parameter or buffer directly in forward (a class token or a position "
                "embedding, say), which belongs to no unit")
    return "this operation is not supported"


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of ``node`` that carry units (sizes read off a tensor do not)."""
    return [a for a in node.all_input_nodes if not _is_shape(a)]


Part = tuple  # (source layer name or INPUT, number of units or None when unknown)


@dataclass(frozen=True)
class _Carry:
    """What a node's output holds: the units of layer ``source`` (a representative of its group;
    ``None``: the model input), as channels of feature maps (``spatial``) or as features, and
    whether it was reshaped since. ``parts``: a concatenation along the unit dimension, its
    ``(source, units)`` ranges in order (``source`` is then unused)."""

    source: str | None
    spatial: bool = False
    flat: bool = False
    parts: tuple[Part, ...] | None = None


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


def _is_depthwise(module: nn.Conv2d) -> bool:
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _check_module(node: fx.Node, gm: fx.GraphModule, kind: str) -> None:
    module = gm.get_submodule(node.target)
    if kind == "norm" and not (module.affine and module.track_running_stats):
        raise _unsupported(node, gm, "BatchNorm needs affine=True and track_running_stats=True: a "
                           "pruned channel is silenced through its affine parameters, and each "
                           "task keeps its own frozen running statistics (never test-batch ones)")
    if kind == "norm" and module.momentum is None:
        raise _unsupported(node, gm, "BatchNorm with momentum=None (a cumulative average) counts "
                           "batches for all channels at once, so a channel recycled for a new task "
                           "would barely learn its statistics; give it a momentum")


def _units(gm: fx.GraphModule, source: str | None) -> int | None:
    return None if source is INPUT else gm.get_submodule(source).weight.shape[0]


def _parts(c: _Carry, gm: fx.GraphModule) -> tuple[Part, ...]:
    return c.parts if c.parts is not None else ((c.source, _units(gm, c.source)),)


def _cat_carry(node: fx.Node, gm: fx.GraphModule, carry: dict) -> _Carry:
    """The carry of ``torch.cat(tensors, dim)``: unit ranges when ``dim`` is the unit dimension."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        raise _unsupported(node, gm, "it concatenates something other than a list of tensors")
    carries = [carry[t] for t in tensors]
    spatial = carries[0].spatial
    if any(c.flat for c in carries) or any(c.spatial != spatial for c in carries):
        raise _unsupported(node, gm, "it concatenates reshaped units, or feature maps with features")
    if dim != 1 and not (dim == -1 and not spatial):
        raise _unsupported(node, gm, f"it concatenates along dim={dim}; only the unit dimension (dim=1: "
                           "channels of feature maps or features) keeps units apart")
    parts = tuple(p for c in carries for p in _parts(c, gm))
    if all(source is INPUT for source, _ in parts):
        return _Carry(INPUT)
    return _Carry(None, spatial, False, parts)


def _resolve(node: fx.Node, gm: fx.GraphModule, parts: tuple[Part, ...], width: int, what: str) -> list[int]:
    """Units per range of a concatenation read through ``width`` channels/features; one range of
    the model input may be of unknown width (the rest of ``width``)."""
    unknown = [i for i, (_, n) in enumerate(parts) if n is None]
    known = sum(n for _, n in parts if n is not None)
    if len(unknown) > 1:
        raise _unsupported(node, gm, "it reads a concatenation holding the model input more than once")
    counts = [n for _, n in parts]
    if unknown:
        counts[unknown[0]] = width - known
    if any(n is None or n < 1 for n in counts) or sum(counts) != width:
        raise _unsupported(node, gm, f"it reads {width} {what} from a concatenation of "
                           f"{' + '.join('?' if n is None else str(n) for _, n in parts)} units")
    return counts


def _part_layer(module: nn.Module, start: int, width: int, bias: bool) -> nn.Module:
    """Columns ``start .. start + width − 1`` of a Linear/Conv2d as a layer of their own."""
    with torch.no_grad():
        w = module.weight
        if isinstance(module, nn.Conv2d):
            part = nn.Conv2d(width, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, bias=bias, padding_mode=module.padding_mode,
                             device=w.device, dtype=w.dtype)
        else:
            part = nn.Linear(width, module.out_features, bias=bias, device=w.device, dtype=w.dtype)
        part.weight.copy_(w[:, start:start + width])
        if bias:
            part.bias.copy_(module.bias)
    return part.train(module.training)


def _part_norm(bn: nn.Module, start: int, width: int) -> nn.Module:
    """Channels ``start .. start + width − 1`` of a BatchNorm as a BatchNorm of their own."""
    part = type(bn)(width, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, device=bn.running_mean.device,
                    dtype=bn.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(part, name).copy_(getattr(bn, name)[start:start + width])
        part.num_batches_tracked.copy_(bn.num_batches_tracked)
    return part.train(bn.training)


def _split(gm: fx.GraphModule, node: fx.Node, counts: list[int], fan: int, make) -> list[tuple[str, fx.Node]]:
    """Replace module node ``node`` reading a concatenation by one module per range: range k
    (``counts[k]·fan`` channels/features) is ``torch.narrow``-ed out of the input and fed to
    ``make(module, start, width, k)`` registered as ``{target}`` (k = 0) or ``{target}__cat{k}``.
    Returns ``[(name, node)]`` of the new module calls (inserted before ``node``, which stays)."""
    target = str(node.target)
    module = gm.get_submodule(target)
    (x,) = _tensor_inputs(node)
    out, start = [], 0
    with gm.graph.inserting_before(node):
        for k, n in enumerate(counts):
            width = n * fan
            name = target if k == 0 else f"{target}{CAT_SUFFIX}{k}"
            gm.add_submodule(name, make(module, start, width, k))
            piece = gm.graph.call_function(torch.narrow, (x, 1, start, width))
            out.append((name, gm.graph.call_module(name, (piece,))))
            start += width
    return out


def _principled_refusals(gm: fx.GraphModule) -> None:
    """Refuse LayerNorm-like normalization and attention wherever they are, before anything
    else: they are the reason a transformer has no unit graph, whatever node comes first."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            principled = isinstance(module, tuple(_SAMPLE_NORM_MODULES) + _ATTENTION_MODULES)
        else:
            principled = node.op == "call_function" and (node.target in _SAMPLE_NORM_FUNCTIONS
                                                          or node.target in _ATTENTION_FUNCTIONS)
        if principled:
            raise _unsupported(node, gm, _refusal(node, gm))


def _walk(gm: fx.GraphModule, head_node: fx.Node):
    """Follow units through the graph in topological order, splitting layers and BatchNorms that
    read a concatenation (the graph is changed in place). Returns ``(layers, norms, groups,
    head_carry)``: per unit layer its input carry and whether it is depthwise, per BatchNorm the
    layer whose units it normalizes, the coupling union-find, and what the head reads."""
    _principled_refusals(gm)
    carry: dict[fx.Node, _Carry] = {}
    layers: dict[str, tuple[_Carry, bool]] = {}
    norms: dict[str, str] = {}
    groups = _Groups()
    called: set[str] = set()
    head_carry = None
    for node in list(gm.graph.nodes):
        if node.op == "output":
            continue
        kind = _kind(node, gm)
        if kind == "other":
            raise _unsupported(node, gm, _refusal(node, gm))
        if kind == "input":
            carry[node] = _Carry(INPUT)
            continue
        if kind == "shape":
            continue
        if kind == "cat":
            carry[node] = _cat_carry(node, gm, carry)
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
            if a.parts is not None or b.parts is not None:
                raise _unsupported(node, gm, "it adds a concatenation, whose units belong to different layers")
            if a.source is INPUT or b.source is INPUT:
                raise _unsupported(node, gm, "a residual add with the model input couples units to "
                                   "input pixels, which no task owns")
            if a.flat or b.flat or a.spatial != b.spatial:
                raise _unsupported(node, gm, "it adds tensors of different layouts (feature maps and "
                                   "features, or reshaped ones)")
            if _units(gm, a.source) != _units(gm, b.source):
                raise _unsupported(node, gm, f"it adds the units of '{a.source}' and '{b.source}', "
                                   "which differ in number")
            carry[node] = _Carry(groups.union(a.source, b.source), a.spatial)
            continue
        if len(inputs) != 1:
            raise _unsupported(node, gm, f"it combines {len(inputs)} tensors")
        c = carry[inputs[0]]
        if kind in ("linear", "conv"):
            _check_module(node, gm, kind)
            if c.source is not INPUT or c.parts is not None:
                if kind == "conv" and (c.flat or not c.spatial):
                    raise _unsupported(node, gm, "a Conv2d must read feature maps of a Conv2d (or the "
                                       "input), not features")
                if kind == "linear" and c.spatial and not c.flat:
                    raise _unsupported(node, gm, "a Linear reads feature maps without flattening them")
                if kind == "linear" and not c.spatial and c.flat:
                    what = f"Linear '{c.source}'" if c.parts is None else "a concatenation"
                    raise _unsupported(inputs[0], gm, f"it reshapes the units of {what} before another Linear "
                                       "reads them, so units cannot be matched to input columns")
            if node is head_node:
                if c.parts is not None:
                    raise _unsupported(node, gm, "the head reads a concatenation of several layers' units, but a "
                                       "task head reads one unit group; put a Linear or Conv2d after the "
                                       "concatenation")
                head_carry = c
                continue
            module = gm.get_submodule(node.target)
            if kind == "conv" and module.groups != 1:
                if c.parts is not None:
                    raise _unsupported(node, gm, "a grouped or depthwise convolution of a concatenation is not "
                                       "supported")
                if not _is_depthwise(module):  # its output channels then read ordinary weight columns
                    module = BlockDiagonalConv2d.replacing(module)
                    gm.add_submodule(str(node.target), module)
            if c.parts is not None:
                _split_reader(gm, node, c, kind, carry, layers, groups)
                continue
            name = str(node.target)
            groups.add(name)
            if kind == "conv" and module.groups != 1 and c.source is not INPUT:
                if _units(gm, c.source) != module.in_channels:
                    raise _unsupported(node, gm, f"it has in_channels={module.in_channels} but reads "
                                       f"{_units(gm, c.source)} channels of '{c.source}'")
                groups.union(c.source, name)  # depthwise: unit j reads only unit j of its source
                layers[name] = (_Carry(INPUT, spatial=True), True)
            else:
                layers[name] = (c, False)
            carry[node] = _Carry(name, spatial=kind == "conv")
        elif kind == "norm":
            _check_module(node, gm, kind)
            if c.source is INPUT and c.parts is None:
                raise _unsupported(node, gm, "BatchNorm of the model input would be shared by every "
                                   "task (its statistics would move); normalize the data instead")
            if c.flat:
                raise _unsupported(node, gm, "BatchNorm of reshaped units is not supported")
            if c.parts is not None:
                _split_norm(gm, node, c, carry, norms)
                continue
            norms[str(node.target)] = c.source
            carry[node] = c
        elif kind == "reshape":
            if c.spatial and not _is_full_flatten(node, gm):
                raise _unsupported(node, gm, "feature maps may only be flattened whole, to (N, C·H·W) "
                                   "(nn.Flatten(), x.flatten(1) or x.view(x.size(0), -1)): another "
                                   "reshape would mix channels")
            carry[node] = replace(c, flat=c.source is not INPUT or c.parts is not None)
        elif kind == "pool":
            if (c.source is not INPUT or c.parts is not None) and (c.flat or not c.spatial):
                raise _unsupported(node, gm, "pooling of reshaped units or of features mixes units")
            carry[node] = c
        else:  # elementwise
            carry[node] = c
    return layers, norms, groups, head_carry


def _split_reader(gm, node, c: _Carry, kind: str, carry, layers, groups) -> None:
    """A Linear/Conv2d reading a concatenation: one layer per unit range, outputs summed (the
    first range keeps the bias), the ranges' layers coupled like a residual add's branches."""
    module = gm.get_submodule(node.target)
    width = module.in_channels if kind == "conv" else module.in_features
    if kind == "linear" and c.spatial:  # flattened feature maps: the same H·W block per channel
        if any(n is None for _, n in c.parts):
            raise _unsupported(node, gm, "a Linear reading flattened maps concatenated with the model input "
                               "cannot tell how many of its features are the input's")
        channels = sum(n for _, n in c.parts)
        if width % channels:
            raise _unsupported(node, gm, f"it reads {width} flattened features from {channels} concatenated "
                               "channels, which is not a whole number of features per channel")
        fan, counts = width // channels, [n for _, n in c.parts]
    else:
        fan, counts = 1, _resolve(node, gm, c.parts, width, "channels" if kind == "conv" else "features")
    pieces = _split(gm, node, counts, fan, lambda m, start, w, k: _part_layer(m, start, w, bias=k == 0 and m.bias is not None))
    total = None
    with gm.graph.inserting_before(node):
        for (name, piece), (source, _) in zip(pieces, c.parts):
            groups.add(name)
            layers[name] = (_Carry(source, spatial=c.spatial, flat=c.flat), False)
            total = piece if total is None else gm.graph.call_function(operator.add, (total, piece))
    for name, _ in pieces[1:]:
        groups.union(pieces[0][0], name)
    node.replace_all_uses_with(total)
    gm.graph.erase_node(node)
    carry[total] = _Carry(pieces[0][0], spatial=kind == "conv")


def _split_norm(gm, node, c: _Carry, carry, norms) -> None:
    """A BatchNorm over a concatenation: one BatchNorm per unit range, concatenated again."""
    if any(source is INPUT for source, _ in c.parts):
        raise _unsupported(node, gm, "BatchNorm of a concatenation holding the model input would normalize "
                           "input channels shared by every task; normalize the data instead")
    bn = gm.get_submodule(node.target)
    counts = _resolve(node, gm, c.parts, bn.num_features, "channels")
    pieces = _split(gm, node, counts, 1, lambda m, start, w, k: _part_norm(m, start, w))
    with gm.graph.inserting_before(node):
        joined = gm.graph.call_function(torch.cat, ([p for _, p in pieces], 1))
    for (name, _), (source, _) in zip(pieces, c.parts):
        norms[name] = source
    node.replace_all_uses_with(joined)
    gm.graph.erase_node(node)
    carry[joined] = c


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


def _symbolic(model: nn.Module) -> tuple[fx.GraphModule, fx.Node, nn.Linear]:
    """``(gm, head_node, head)``: ``model`` traced by torch.fx and its final Linear.

    Raises:
        UnsupportedModelError: tracing fails, or the model does not end with an ``nn.Linear``
            whose output is used nowhere else.
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
    if len(head_node.users) != 1:
        raise UnsupportedModelError(f"{_describe(head_node, gm)}: the final Linear's output is used inside the model")
    return gm, head_node, gm.get_submodule(head_node.target)


def _cut_head(gm: fx.GraphModule, head_node: fx.Node, norms) -> set[str]:
    """Make ``gm`` return what the head reads; drop what no longer reaches the output; replace
    the BatchNorms named in ``norms`` (``None``: every BatchNorm1d/2d) by task-exact ones
    (``norm.TaskBatchNorm*d``). Returns the names of the modules still called."""
    (head_input,) = _tensor_inputs(head_node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (head_input,)
    gm.graph.erase_node(head_node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    live = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name in live if norms is None else live & set(norms):
        bn = gm.get_submodule(name)
        if type(bn) in TASK_NORMS and bn.track_running_stats:
            gm.set_submodule(name, TASK_NORMS[type(bn)].replacing(bn))
    gm.recompile()
    return live


def trace(model: nn.Module) -> tuple[fx.GraphModule, UnitGraph, nn.Linear]:
    """Trace ``model`` and return ``(body, graph, head)``.

    ``body`` is a ``torch.fx.GraphModule`` equal to ``model`` without its final ``nn.Linear``
    (the head prototype): it maps an input batch to the features the task heads read, shape
    ``(N, head_in_features)``. Its BatchNorm modules are replaced by task-exact ones
    (``norm.TaskBatchNorm*d``, same parameters and state-dict keys); layers and BatchNorms that
    read a concatenation are split per unit range (module doc). ``graph`` lists the unit layers
    and unit groups of ``body``; ``head`` is the final Linear that was cut off (the prototype of
    every task head).

    Raises:
        UnsupportedModelError: tracing fails, the model does not end with an ``nn.Linear``, a
            module is called twice, a node between layers does not keep channels apart (LayerNorm,
            attention, a grouped convolution: the message says why), or a layer's input width
            does not match the units it reads (the message names the node).
    """
    gm, head_node, head_module = _symbolic(model)
    walked, norms, groups, head_carry = _walk(gm, head_node)
    live = _cut_head(gm, head_node, norms)

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
    for name, (c, depthwise) in walked.items():
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
        layers[name] = UnitLayer(name, module, source, group_of(name), fan, depthwise)
    head_source = group_of(head_carry.source) if head_carry is not None else None
    head_fan = 1
    if head_source is not None:
        head_fan = _fan(str(head_node.target), head_carry, head_module.in_features, unit_groups[head_source].num_units)
    graph = UnitGraph(layers, head_source, head_module.in_features, head_module.out_features,
                      head_module.bias is not None, unit_groups, head_fan, head_name=str(head_node.target))
    return gm, graph, head_module


def trace_network(model: nn.Module) -> tuple[fx.GraphModule, UnitGraph, nn.Linear]:
    """``trace(model)`` for any module: when the unit graph cannot follow the model (LayerNorm,
    attention, a grouped convolution, ...), the body is still ``model`` without its final
    Linear (every BatchNorm1d/2d task-exact) and the graph has no unit layers, with the reason in
    ``graph.refusal``. ``model`` is not changed (the trace works on copies).

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model, or it does not end with an
            ``nn.Linear`` whose output is used nowhere else.
    """
    _symbolic(model)  # the errors that no method can work around
    try:
        return trace(copy.deepcopy(model))
    except UnsupportedModelError as exc:
        refusal = str(exc)
    gm, head_node, head = _symbolic(copy.deepcopy(model))
    _cut_head(gm, head_node, None)
    graph = UnitGraph({}, None, head.in_features, head.out_features, head.bias is not None, refusal=refusal,
                      head_name=str(head_node.target))
    return gm, graph, head
