"""Export one task's subnetwork as a standalone model, physically smaller where the task leaves
whole units (neurons, channels) unused. A model without a unit graph (LayerNorm, attention: the
weight-level methods only) is exported whole, with the task's masked weights and tensors.

Task t needs a unit (a neuron or a channel) when a path of nonzero weights leads from it to task
t's logits: its own units and the earlier tasks' units they read. With weight-level subnetworks
the weights are the task's masked weights (``task_body``), so units the task's mask leaves empty
are dropped; the weights it masks inside kept units stay as zeros in dense tensors (the compact
form of such a network is ``sparsecl.compact``). Everything else (later tasks' units, free and
pruned units, and with a single head the other tasks' final-hidden units) reaches task t only
through exact zeros, so dropping it changes nothing but the order of the sums (the exported
logits match the full model's to float rounding). The rule reads only the weights, so it holds
for every method; a method without isolation simply keeps every unit.

The file is a ``torch.export`` program (``torch.export.load(path).module()(x)``), loadable with
plain PyTorch; the batch dimension is dynamic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .atomic import write_atomic
from .errors import ConfigError
from .graph import units_read
from .network import ContinualNetwork


class TaskModel(nn.Module):
    """Task t's subnetwork: the task's per-channel input normalization (if any), the pruned body,
    then its head; ``forward(x) -> (N, C_t)`` logits."""

    def __init__(self, body: nn.Module, head: nn.Linear, normalize=None):
        super().__init__()
        self.body, self.head = body, head
        self.normalize = normalize is not None
        if self.normalize:
            shape = (1, -1, 1, 1)
            self.register_buffer("mean", torch.tensor(normalize[0], dtype=torch.float32).view(shape))
            self.register_buffer("std", torch.tensor(normalize[1], dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.head(self.body(x))


def task_body(net: ContinualNetwork, task: int) -> nn.Module:
    """The body that computes task ``task``'s features: the network's own, or with weight-level
    subnetworks a copy holding the task's masked weights, biases and BatchNorm; a body kept for
    the task (single-task training, ``ContinualNetwork.keep_task_body``) is the task's own."""
    net.check_task_id(task)
    if str(task) in net.task_bodies:
        return net.task_bodies[str(task)]
    return net.body if net.subnetworks is None else net.subnetworks.materialize(net.body, task)


@torch.no_grad()
def needed_units(net: ContinualNetwork, task: int, body: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Per unit group, a bool mask ``(num_units,)`` of the units task ``task``'s logits depend
    on through nonzero weights (computed from the head backwards); ``body``: ``task_body``."""
    body = task_body(net, task) if body is None else body
    graph = net.graph
    needed = {name: torch.zeros(g.num_units, dtype=torch.bool) for name, g in graph.groups.items()}
    if graph.head_source is not None:
        w = net.head_weight if net.single_head else net.heads[task].weight
        if net.single_head:  # the other tasks' columns of the shared head are not task t's
            w = w.masked_fill(~net.heads[task].mask, 0.0)
        needed[graph.head_source] = units_read(w, torch.ones(w.shape[0], dtype=torch.bool), graph.head_fan)
    # A group coupled by residual adds spans several depths, so one backward sweep can reach a
    # member before all of the group's readers: sweep until nothing changes (masks only grow).
    changed = True
    while changed:
        changed = False
        for layer in reversed(list(graph.layers.values())):  # layers are in topological order
            if layer.source is None:
                continue
            reads = units_read(body.get_submodule(layer.name).weight, needed[layer.group], layer.fan)
            grown = needed[layer.source] | reads
            if not torch.equal(grown, needed[layer.source]):
                needed[layer.source], changed = grown, True
    return needed


def _sliced(module: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> nn.Module:
    """A plain copy of a Linear/Conv2d with only output units ``rows`` and input columns ``cols``
    (a depthwise convolution keeps one group per kept channel)."""
    w = module.weight.detach().cpu()
    if hasattr(module, "block_mask"):  # a BlockDiagonalConv2d: its dense kernel as it computes
        w = w * module.block_mask.cpu()
    w = w[rows][:, cols]
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        groups = w.shape[0] if module.groups > 1 else 1
        small = nn.Conv2d(w.shape[1] * groups, w.shape[0], module.kernel_size, module.stride, module.padding,
                          module.dilation, groups=groups, bias=bias, padding_mode=module.padding_mode, dtype=w.dtype)
    else:
        small = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    small.weight.copy_(w)
    if bias:
        small.bias.copy_(module.bias.detach().cpu()[rows])
    return small


def _sliced_norm(bn: nn.Module, channels: torch.Tensor) -> nn.Module:
    """A plain eval-mode BatchNorm of the same kind holding only ``channels``."""
    kind = nn.BatchNorm2d if isinstance(bn, nn.BatchNorm2d) else nn.BatchNorm1d
    small = kind(int(channels.sum()), eps=bn.eps, momentum=bn.momentum, dtype=bn.weight.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(small, name).data.copy_(getattr(bn, name).detach().cpu()[channels])
    small.num_batches_tracked.copy_(bn.num_batches_tracked.cpu())
    return small.eval()


@torch.no_grad()
def task_model(net: ContinualNetwork, task: int, normalize=None) -> TaskModel:
    """A plain-PyTorch copy of task ``task``'s subnetwork with only its needed units (channels),
    BatchNorm channels included. ``normalize``: ``(mean, std)`` per input channel applied first
    (``TaskData.normalize``), or ``None``.

    Raises:
        ConfigError: ``task`` is out of range.
    """
    source = task_body(net, task)
    needed = needed_units(net, task, source)
    graph = net.graph
    for mask in needed.values():
        # A layer of zero units cannot be built; one unit read through exact zeros changes nothing
        # (e.g. a residual block the task skips, whose output only the stream carries on).
        if not mask.any():
            mask[0] = True
    for layer in graph.layers.values():
        # a depthwise convolution of the input reads input channel j for unit j: it keeps them all
        if layer.source is None and not layer.depthwise and getattr(layer.module, "groups", 1) > 1:
            needed[layer.group][:] = True
    body = copy.deepcopy(source).cpu().eval()
    _narrow_to(body, graph, needed)
    for name, layer in graph.layers.items():
        if layer.source is not None:
            cols = layer.columns(needed[layer.source])
        else:
            cols = torch.ones(layer.module.weight.shape[1], dtype=torch.bool)
        body.set_submodule(name, _sliced(source.get_submodule(name), needed[layer.group], cols))
    for name, group in graph.groups.items():
        for norm in group.norms:
            body.set_submodule(norm, _sliced_norm(source.get_submodule(norm), needed[name]))
    if graph.head_source is not None:
        cols = graph.head_columns(needed[graph.head_source])
    else:
        cols = torch.ones(net.head_features, dtype=torch.bool)
    src = net.heads[task]
    weight = (net.head_weight if net.single_head else src.weight).detach().cpu()
    head = nn.Linear(int(cols.sum()), weight.shape[0], bias=src.bias is not None, dtype=weight.dtype)
    head.weight.copy_(weight[:, cols])
    if src.bias is not None:
        head.bias.copy_(src.bias.detach().cpu())
    return TaskModel(body, head, normalize).eval()


def _narrow_to(body: nn.Module, graph, needed: dict[str, torch.Tensor]) -> None:
    """Re-aim the ``torch.narrow`` ranges of layers split at a concatenation (``graph`` module
    doc) at the kept units: range k starts after the kept units of ranges 0..k-1."""
    if not isinstance(body, fx.GraphModule):
        return
    norm_group = {n: g.name for g in graph.groups.values() for n in g.norms}
    siblings: dict[fx.Node, list[fx.Node]] = {}
    for node in body.graph.nodes:
        if node.op == "call_function" and node.target is torch.narrow and len(node.users) == 1:
            siblings.setdefault(node.args[0], []).append(node)
    changed = False
    for nodes in siblings.values():
        start = 0
        for node in sorted(nodes, key=lambda n: n.args[2]):
            (user,) = node.users
            name = str(user.target)
            if name in graph.layers:
                layer = graph.layers[name]
                if layer.source is None:  # a range of the model input: every column stays
                    width = node.args[3]
                else:
                    width = int(needed[layer.source].sum()) * layer.fan
            elif name in norm_group:
                width = int(needed[norm_group[name]].sum())
            else:
                continue
            node.args = (node.args[0], 1, start, width)
            start += width
            changed = True
    if changed:
        body.recompile()


def export_task(net: ContinualNetwork, task: int, input_shape: tuple[int, ...], path: Path,
                normalize=None) -> TaskModel:
    """Write task ``task``'s subnetwork (with its input ``normalize``, see ``task_model``) to
    ``path`` as a ``torch.export`` program (atomically).

    Raises:
        ConfigError: ``task`` is out of range.
    """
    model = task_model(net, task, normalize)
    example = torch.zeros(2, *input_shape)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch.export raises many types; say what failed
        raise ConfigError(f"torch.export could not export task {task}'s subnetwork: {exc}") from exc
    write_atomic(Path(path), lambda f: torch.export.save(program, f))
    return model
