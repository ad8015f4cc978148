"""A user's model prepared for continual learning: traced body plus the task heads."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, UnsupportedModelError
from .graph import UnitGraph, trace_network
from .subnetworks import TaskSubnetworks, per_task_names
from .widen import WidenedLinear, block_linear


class MaskedHead(nn.Module):
    """Task t's share of a single-head output layer: its own output bias ``(C,)`` and a bool
    ``mask`` ``(F,)`` over the final hidden layer's units (CLNP Sec. 2.1, Fig. 2 right). The
    weight ``(C, F)`` is the network's ``head_weight``, shared by all tasks."""

    def __init__(self, num_features: int, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias)
        self.register_buffer("mask", torch.ones(num_features, dtype=torch.bool, device=device))


def _blocked(linear: nn.Linear, blocks: dict) -> WidenedLinear:
    """A ``WidenedLinear`` with the saved block structure, in place of ``linear``."""
    rows, cols = blocks["row_ends"], blocks["col_ends"]
    return WidenedLinear(cols[-1], rows[-1], linear.bias is not None, rows, cols,
                         device=linear.weight.device, dtype=linear.weight.dtype)


def _with_layers(graph: UnitGraph, layers: dict, head_in_features: int) -> UnitGraph:
    """``graph`` with its layers' modules replaced (widened): group sizes follow the modules."""
    groups = {name: replace(g, num_units=layers[g.layers[0]].num_units) for name, g in graph.groups.items()}
    return replace(graph, layers=layers, groups=groups, head_in_features=head_in_features)


class ContinualNetwork(nn.Module):
    """Wraps a user's ``nn.Module`` whose last operation is an ``nn.Linear``.

    The model is traced (``graph.trace``): its body computes the features, shape
    ``(N, graph.head_in_features)``, and its final Linear is replaced by ``heads``, one per task,
    created when the task begins (the number of tasks is open-ended).

    * multi-head (default): ``heads[t]`` is an ``nn.Linear`` of its own with the task's number of
      classes.
    * ``single_head=True``: one output layer shared by every task (CLNP's single head). Its
      weight ``head_weight`` ``(C, F)`` is shared; ``heads[t]`` is a ``MaskedHead`` with the
      task's own bias (a shared bias would move old tasks' logits) and a mask of the final hidden
      layer's units the task reads. Every task must have ``C`` classes, the model's final Linear
      width. Without an isolation method the masks stay all-ones: a plain shared head.

    The forward pass is the plain dense body (DESIGN §2.5); the only mask is the single head's.
    Weight-level methods install ``subnetworks`` (``install_subnetworks``): then each task's
    features come from its own subnetwork of the body (``sparsecl.subnetworks``), which works for
    any module. Neuron-level methods need the unit graph (``graph``, ``sparsecl.graph``); for a
    model it cannot follow (LayerNorm, attention, ...), ``graph`` has no unit layers and
    ``graph.refusal`` says why, and ``require_unit_graph`` raises it.

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model, or it does not end with an
            ``nn.Linear``.
        ConfigError: a ``sparsecl_per_task`` attribute names no parameter (``subnetworks``).
    """

    def __init__(self, model: nn.Module, single_head: bool = False):
        super().__init__()
        self.per_task = per_task_names(model)
        # nn.Sequential children named by the user (the built-in MLP's fc1, fc2, ...) were
        # numbered before: checkpoints of that time name them by index (see _legacy_keys)
        children = [n for n, _ in model.named_children()] if isinstance(model, nn.Sequential) else []
        self._legacy = {str(i): n for i, n in enumerate(children) if n != str(i)}
        self.body, self.graph, prototype = trace_network(copy.deepcopy(model))
        self.single_head = single_head
        self.heads = nn.ModuleList()
        self.head_classes: list[int] = []  # number of classes of each task's head
        # Follows .to(): new heads take the device and dtype of the model's final Linear.
        self.register_buffer("_head_like", prototype.weight.new_empty(0), persistent=False)
        self.subnetworks: TaskSubnetworks | None = None
        #: bodies kept per task (``keep_task_body``), keyed by ``str(task)``
        self.task_bodies = nn.ModuleDict()
        if single_head:
            fresh = self.fresh_head(self.graph.head_out_features)
            self.head_weight = nn.Parameter(fresh.weight.detach())
            self.head_col_ends = [self.head_features]  # column blocks, see widen()
        self.register_load_state_dict_pre_hook(self._legacy_keys)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def install_subnetworks(self, mode: str) -> TaskSubnetworks:
        """Give every task its own weight-level subnetwork of the body (``sparsecl.subnetworks``;
        ``mode`` "owner" or "masks"); idempotent for the same mode.

        Raises:
            ConfigError: a single head, heads already added, or another mode already installed.
        """
        if self.subnetworks is not None:
            if self.subnetworks.mode != mode:
                raise ConfigError(f"the network keeps '{self.subnetworks.mode}' subnetworks, not '{mode}'")
            return self.subnetworks
        if self.single_head:
            raise ConfigError("weight-level methods use one head per task; drop --single-head")
        if self.num_tasks:
            raise ConfigError("weight-level subnetworks must be installed before the first task")
        self.subnetworks = TaskSubnetworks(self.body, mode, self._norm_order(), self.per_task)
        return self.subnetworks

    def _norm_order(self) -> list[str]:
        return [n for g in self.graph.groups.values() for n in g.norms]

    def require_unit_graph(self, method: str) -> UnitGraph:
        """The unit graph, for a neuron-level method named ``method``.

        Raises:
            UnsupportedModelError: the model has none (the message says why, and that the
                weight-level methods take the model).
        """
        if self.graph.refusal is not None:
            raise UnsupportedModelError(f"--method {method} prunes and freezes units (neurons, channels) and needs "
                                        f"the model's unit graph, which sparsecl cannot trace: {self.graph.refusal}")
        return self.graph

    def _legacy_keys(self, module, state_dict, prefix, *_) -> None:
        """Load-state-dict pre-hook: ``body.{i}.…`` keys of a checkpoint written when the built-in
        MLP's layers were numbered are read as ``body.{name}.…``."""
        if not self._legacy:
            return
        head = prefix + "body."
        for key in [k for k in state_dict if k.startswith(head)]:
            index, _, rest = key[len(head):].partition(".")
            if index in self._legacy:
                state_dict[f"{head}{self._legacy[index]}.{rest}"] = state_dict.pop(key)

    @property
    def head_features(self) -> int:
        """Width of the features the heads read (it grows when the final hidden layer widens)."""
        return self.graph.head_in_features

    def fresh_head(self, num_classes: int) -> nn.Linear:
        """A default-initialized ``nn.Linear(head_features, num_classes)`` on the heads' device."""
        like = self._head_like
        return nn.Linear(self.head_features, num_classes, bias=self.graph.head_bias,
                         device=like.device, dtype=like.dtype)

    def add_head(self, num_classes: int) -> nn.Module:
        """Append a freshly initialized head for a new task with ``num_classes`` outputs.

        Raises:
            ConfigError: ``num_classes < 1``, or a single head whose width differs.
        """
        if num_classes < 1:
            raise ConfigError(f"a task head needs at least one class, got num_classes={num_classes}")
        if not self.single_head:
            head = self.fresh_head(num_classes)
        else:
            width = self.head_weight.shape[0]
            if num_classes != width:
                raise ConfigError(f"single head: task {len(self.heads)} has {num_classes} classes but "
                                  f"the shared output layer has {width}; every task needs {width}")
            bias = self.fresh_head(num_classes).bias
            head = MaskedHead(self.head_features, None if bias is None else bias.detach(), self._head_like.device)
        self.heads.append(head)
        self.head_classes.append(num_classes)
        if self.subnetworks is not None:
            self.subnetworks.add_task(self.body)
        return head

    def structure(self) -> dict:
        """What ``state_dict`` alone does not say: the single-head flag, each head's class count,
        the block structure of widened layers and heads, the subnetworks' mode and owner dtype and
        the tasks with a body of their own (JSON-serializable). ``restore``
        rebuilds a network of this structure from the same user model."""
        def blocks(module):
            return {"row_ends": module.row_ends, "col_ends": module.col_ends} if isinstance(module, WidenedLinear) else None
        return {
            "single_head": self.single_head,
            "head_classes": list(self.head_classes),
            "head_in_features": self.head_features,
            "layers": {name: blocks(layer.module) for name, layer in self.graph.layers.items()},
            "heads": None if self.single_head else [blocks(h) for h in self.heads],
            "head_col_ends": list(self.head_col_ends) if self.single_head else None,
            "subnetworks": None if self.subnetworks is None else self.subnetworks.structure(),
            "task_bodies": sorted(int(t) for t in self.task_bodies),
        }

    @classmethod
    def restore(cls, model: nn.Module, structure: dict) -> "ContinualNetwork":
        """An untrained network of ``structure`` (from ``structure()``) around ``model``: the
        right number of heads and the widened layers' shapes and blocks, ready for
        ``load_state_dict``.

        Raises:
            ConfigError: ``structure`` does not fit ``model`` (the message names the layer).
        """
        net = cls(model, single_head=bool(structure["single_head"]))
        layers = dict(net.graph.layers)
        saved_layers = {net._legacy.get(name, name): blocks for name, blocks in structure["layers"].items()}
        for name, blocks in saved_layers.items():
            if name not in layers:
                raise ConfigError(f"the saved network has a unit layer '{name}' that the model lacks "
                                  f"(its unit layers: {', '.join(layers) or 'none'})")
            if blocks is not None:
                module = _blocked(layers[name].module, blocks)
                net.body.set_submodule(name, module)
                layers[name] = replace(layers[name], module=module)
        saved_sub = structure.get("subnetworks")
        if saved_sub is not None:  # owner ids were int8 before the dtype was recorded
            dtype = getattr(torch, saved_sub.get("owner_dtype", "int8"))
            net.subnetworks = TaskSubnetworks(net.body, saved_sub["mode"], net._norm_order(), net.per_task, dtype)
        if set(layers) != set(saved_layers):
            raise ConfigError(f"the model's unit layers {sorted(layers)} differ from the saved "
                              f"network's {sorted(saved_layers)}")
        net.graph = _with_layers(net.graph, layers, int(structure["head_in_features"]))
        if net.single_head:
            net.head_col_ends = list(structure["head_col_ends"])
            net.head_weight = nn.Parameter(net.head_weight.new_zeros(net.head_weight.shape[0], net.head_features))
        for i, classes in enumerate(structure["head_classes"]):
            head = net.add_head(classes)
            blocks = None if net.single_head else structure["heads"][i]
            if blocks is not None:
                net.heads[i] = _blocked(head, blocks)
        for t in structure.get("task_bodies", []):
            net.keep_task_body(int(t), copy.deepcopy(net.body))
        return net

    def head_parameters(self, task: int) -> Iterator[nn.Parameter]:
        """The parameters that produce task ``task``'s logits from the features."""
        self.check_task_id(task)
        if self.single_head:
            yield self.head_weight
        yield from self.heads[task].parameters()

    def keep_task_body(self, task: int, body: nn.Module) -> None:
        """From now on task ``task``'s features come from ``body`` (a copy of the body trained
        for it, e.g. single-task training's network per task); saved with the network
        (``structure``, ``state_dict``).

        Raises:
            ConfigError: ``task`` has no head, or the network has weight-level subnetworks.
        """
        self.check_task_id(task)
        if self.subnetworks is not None:
            raise ConfigError("a network with weight-level subnetworks computes every task's features from one body")
        self.task_bodies[str(task)] = body

    def features(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Penultimate features, shape ``(N, head_features)``: the body's, task ``task``'s kept
        body (``keep_task_body``), or with weight-level subnetworks task ``task``'s subnetwork.

        Raises:
            ConfigError: subnetworks are installed and ``task`` is ``None``.
        """
        if task is not None and str(task) in self.task_bodies:
            return self.task_bodies[str(task)](x)
        if self.subnetworks is None:
            return self.body(x)
        if task is None:
            raise ConfigError("with weight-level subnetworks every task has its own features: pass the task id")
        return self.subnetworks.features(self.body, x, task)

    def head_logits(self, h: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s logits ``(N, C_task)`` from features ``h`` ``(N, head_features)``."""
        head = self.heads[task]
        if not self.single_head:
            return head(h)
        # masked_fill, not a multiply: a non-finite value in another task's unit stays out.
        return block_linear(h.masked_fill(~head.mask, 0.0), self.head_weight, head.bias,
                            [self.head_weight.shape[0]], self.head_col_ends)

    @torch.no_grad()
    def widen(self, layer: str, units: int) -> None:
        """Add ``units`` new units to unit layer ``layer``, and the matching zero columns to the
        layers and heads that read it; every existing output stays bitwise equal (see
        ``widen.WidenedLinear``). The new units' rows get a default initialization.

        Raises:
            ConfigError: ``layer`` is not a unit layer, ``units < 1``, or the layer is not a
                plain Linear read by Linears only (convolutions, BatchNorm, residual coupling and
                flattened reads are not widened).
        """
        if self.subnetworks is not None:
            raise ConfigError("layers of a network with weight-level subnetworks are not widened")
        if layer not in self.graph.layers or units < 1:
            raise ConfigError(f"cannot widen layer '{layer}' by {units} units: the unit layers are "
                              f"{', '.join(self.graph.layers)} and at least one unit is needed")
        group, readers = self.graph.groups[layer], self.graph.readers(layer)
        if (not isinstance(self.graph.layers[layer].module, nn.Linear) or len(group.layers) > 1 or group.norms
                or any(self.graph.layers[r].fan > 1 or not isinstance(self.graph.layers[r].module, nn.Linear)
                       for r in readers)
                or (layer == self.graph.head_source and self.graph.head_fan > 1)):
            raise ConfigError(f"cannot widen layer '{layer}': widening supports a Linear layer of its own "
                              "(no BatchNorm, no residual coupling) read by Linear layers only")
        layers = dict(self.graph.layers)
        for name, grow in [(layer, dict(rows=units))] + [(r, dict(cols=units)) for r in self.graph.readers(layer)]:
            module = WidenedLinear.grow(layers[name].module, **grow)
            self.body.set_submodule(name, module)
            layers[name] = replace(layers[name], module=module)
        head_in = self.graph.head_in_features
        if layer == self.graph.head_source:
            head_in += units
            if self.single_head:
                w = self.head_weight
                self.head_weight = nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], units)], 1))
                self.head_col_ends.append(head_in)
                for head in self.heads:
                    head.mask = torch.cat([head.mask, head.mask.new_zeros(units)])
            else:
                for i, head in enumerate(self.heads):
                    self.heads[i] = WidenedLinear.grow(head, cols=units)
        self.graph = _with_layers(self.graph, layers, head_in)

    def check_task_id(self, task: int) -> None:
        """Raises ``ConfigError`` unless ``task`` has a head."""
        if not 0 <= task < len(self.heads):
            raise ConfigError(f"task id {task} is out of range: the network has heads for tasks "
                              f"0..{len(self.heads) - 1}")

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task ``task``'s head, shape ``(N, num_classes_of_task)``."""
        self.check_task_id(task)
        return self.head_logits(self.features(x, task), task)

    def task_loss(self, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of a batch whose samples may belong to different tasks.

        ``x``: inputs ``(N, ...)``; ``y``: task-local labels ``(N,)``; ``tasks``: task id of each
        sample ``(N,)``. Each sample is scored by its own task's head. Returns ``(loss, correct)``,
        ``correct`` a bool tensor ``(N,)`` telling whether the sample was classified right.
        """
        task_ids = tasks.unique()
        if len(task_ids) == 1:
            t = int(task_ids[0])
            logits = self.head_logits(self.features(x, t), t)
            return F.cross_entropy(logits, y), logits.argmax(1) == y
        h = self.body(x) if self.subnetworks is None and not self.task_bodies else None  # else: per task
        loss = x.new_zeros((), dtype=torch.float32)
        correct = torch.empty_like(y, dtype=torch.bool)
        for t in task_ids.tolist():
            sel = tasks == t
            logits = self.head_logits(h[sel] if h is not None else self.features(x[sel], t), t)
            loss = loss + F.cross_entropy(logits, y[sel], reduction="sum")
            correct[sel] = logits.argmax(1) == y[sel]
        return loss / len(y), correct
