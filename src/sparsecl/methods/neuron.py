"""Neuron-level isolation: the part shared by EideticNets and CLNP.

Rules (DESIGN §2), for a unit layer L (of unit group G) reading unit group S, while task t trains:

* rows of L owned by earlier tasks are frozen whole (weights and bias), with the affine
  parameters and running statistics of G's BatchNorm channels (``norm.TaskBatchNorm*d``);
* rows of L free at the start of t were re-initialized and train, except
  - the rows (and biases, and BatchNorm affine parameters) of units pruned during t, held at
    exact zero, so a pruned unit outputs exact zeros in train and eval mode, and
  - their columns that read a unit of S pruned during t (exact zero), or, with forward transfer
    off, a unit of S owned by an earlier task (exact zero);
* task t's head follows the same column rules. With a single shared head (CLNP's single-head
  mode) the head's columns are units: columns of units owned by earlier tasks are frozen, and
  task t's mask reads only the final hidden layer's units free for t (after t: the units it
  owns), so the final hidden layer's units are never shared between tasks.

When t ends, its surviving units become its own and every entry of its rows (and of its head)
that reads a unit still free is set to zero before freezing: those units will be recycled, and
their later values must never reach task t (interference). The forward pass stays the plain
dense network; earlier tasks are untouched because every path into them is either frozen or an
exact zero.

Units are rows of a Linear or output channels of a Conv2d (dim 0 of the weight); columns are dim 1,
``fan`` columns per source unit when a Linear reads flattened feature maps. The ledger is kept per
unit group: layers coupled by a residual add own, prune and freeze their units together.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..freeze import Freezer
from ..graph import units_read
from ..ledger import FREE, CapacityLedger
from ..norm import reset_channels
from .base import Method

log = logging.getLogger(__name__)


class NeuronIsolation(Method):
    """Base of methods whose capacity unit is a neuron. Subclasses decide which units task t
    keeps by calling ``prune`` (and may roll back with ``pruned_state``/``set_pruned``) before
    ``end_task`` freezes the survivors."""

    isolates = True

    def __init__(self, forward_transfer: bool = True, widen: int = 0, reuse_full: bool = False):
        if reuse_full and not forward_transfer:
            raise ConfigError("--reuse-full lets a new task reuse a full layer's frozen units, which "
                              "needs forward transfer: drop --no-forward-transfer")
        self.forward_transfer = forward_transfer
        self.widen = widen
        self.reuse_full = reuse_full
        self.ledger: CapacityLedger | None = None
        self.freezer = Freezer()
        self.pruned: dict[str, torch.Tensor] = {}

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self, net) -> None:
        # refuse, before any training, a model whose units cannot be traced (LayerNorm, attention):
        # an empty graph would isolate nothing and fail only at the forgetting check
        graph = net.require_unit_graph(self.name)
        self.ledger = CapacityLedger({name: g.num_units for name, g in graph.groups.items()})

    def begin_task(self, net, t: int, task) -> None:
        for name in net.graph.groups:
            if self.ledger.free(name).any():
                continue
            if self.widen:
                net.widen(name, self.widen)
                self.ledger.widen(name, self.widen)
                log.info("task %d: layer '%s' was full; widened by %d units", t, name, self.widen)
            elif self.reuse_full and not (net.single_head and name == net.graph.head_source):
                log.info("task %d: layer '%s' is full; the task reuses its frozen units", t, name)
                continue
            self.ledger.require_free(name, t)
        if t > 0:
            self._reinitialize_free_units(net)
        self.pruned = {name: torch.zeros_like(self.ledger.free(name)) for name in net.graph.groups}
        self._apply(net, t)

    def after_step(self, net) -> None:
        self.freezer.restore()

    def end_task(self, session) -> None:
        self.select(session)
        self.freeze(session.net, session.t)

    def capacity(self, net) -> dict[str, float]:
        return {name: self.ledger.usage(name) for name in net.graph.groups}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"owner.{name}": owner for name, owner in self.ledger.owner.items()}
        return tensors, {"history": self.ledger.history, "log": getattr(self, "log", [])}

    def load_state(self, net, tensors, meta) -> None:
        """Raises ``CheckpointError`` when the saved ledger does not fit ``net``'s unit groups."""
        old_names = {new: old for old, new in net._legacy.items()}  # the MLP's layers were numbered before
        for name, owner in self.ledger.owner.items():
            saved = tensors.get(f"owner.{name}", tensors.get(f"owner.{old_names.get(name, name)}"))
            if saved is None or saved.shape != owner.shape or saved.dtype != owner.dtype:
                got = "missing" if saved is None else f"{saved.dtype} of shape {tuple(saved.shape)}"
                raise CheckpointError(f"the checkpoint's ledger of unit group '{name}' is {got}; the network "
                                      f"needs {owner.dtype} of shape {tuple(owner.shape)}")
            if (saved < FREE).any() or (saved >= net.num_tasks).any():
                raise CheckpointError(f"the checkpoint's ledger of unit group '{name}' names tasks outside "
                                      f"0..{net.num_tasks - 1}")
            self.ledger.owner[name] = saved.clone()
        self.ledger.history = [{net._legacy.get(k, k): v for k, v in h.items()} for h in meta["history"]]
        if hasattr(self, "log"):
            self.log = list(meta["log"])

    @torch.no_grad()
    def reuse(self, net) -> dict[str, dict[str, int]]:
        """Unit counts per unit group after the last task t. A unit of an earlier task counts as
        reused when a unit of task t (or task t's own head) reads it through a nonzero weight; a
        single head's final hidden layer is never reused (each task reads only its own units)."""
        t = net.num_tasks - 1
        report = {}
        for name, group in net.graph.groups.items():
            old = (~self.ledger.free(name)) & ~self.ledger.owned_by(name, t)
            read = torch.zeros_like(old)
            for reader in net.graph.readers(name):
                layer = net.graph.layers[reader]
                read |= units_read(layer.module.weight, self.ledger.owned_by(layer.group, t), layer.fan)
            if name == net.graph.head_source and not net.single_head:
                w = net.heads[t].weight
                read |= units_read(w, torch.ones(w.shape[0], dtype=torch.bool), net.graph.head_fan)
            report[name] = {"units": group.num_units, "owned": int(self.ledger.owned_by(name, t).sum()),
                            "free": int(self.ledger.free(name).sum()), "reused": int((read & old).sum())}
        return report

    # ---- selection ---------------------------------------------------------------------------
    def select(self, session) -> None:
        """Decide task t's units by calling ``prune``; by default every free unit is kept."""

    def candidates(self, group: str) -> torch.Tensor:
        """Bool mask of the units task t may still prune in unit group ``group``: free at the
        start of the task (nothing is assigned before ``freeze``) and not pruned yet. Frozen
        units are never candidates."""
        return self.ledger.free(group) & ~self.pruned[group]

    def prune(self, net, t: int, units: dict[str, torch.Tensor]) -> None:
        """Remove the units selected by bool masks ``units`` (unit group → ``(num_units,)``) from
        task t: their rows, biases, BatchNorm affine parameters and outgoing columns become exact
        zeros held by the freezer.

        Raises:
            ValueError: a selected unit is not a candidate (frozen, or pruned already).
        """
        for name, mask in units.items():
            bad = mask & ~self.candidates(name)
            if bad.any():
                raise ValueError(f"unit group '{name}': units {bad.nonzero().flatten().tolist()[:10]} are "
                                 f"not prunable for task {t} (frozen by an earlier task or pruned already)")
            self.pruned[name] = self.pruned[name] | mask
        self._apply(net, t)

    def pruned_state(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self.pruned.items()}

    def set_pruned(self, net, t: int, pruned: dict[str, torch.Tensor]) -> None:
        """Restore a pruning state saved with ``pruned_state`` (after the weights were rolled back)."""
        self.pruned = {name: mask.clone() for name, mask in pruned.items()}
        self._apply(net, t)

    # ---- mechanics ---------------------------------------------------------------------------
    def _connections(self, net, t: int) -> Iterator[tuple[nn.Module, torch.Tensor, torch.Tensor, str | None, Callable]]:
        """Yield ``(module, row_free, row_pruned, source, columns)`` for every unit layer and,
        with multi-head, for task t's head: the rows task t may train (for the head, all), the
        rows pruned during t (for the head, none), the unit group the module reads (``None``: the
        model input) and the map from a mask over the source's units to one over the columns."""
        for layer in net.graph.layers.values():
            yield layer.module, self.ledger.free(layer.group), self.pruned[layer.group], layer.source, layer.columns
        if not net.single_head:
            head = net.heads[t]
            rows = torch.ones(head.out_features, dtype=torch.bool)
            yield head, rows, ~rows, net.graph.head_source, net.graph.head_columns

    @torch.no_grad()
    def _apply(self, net, t: int) -> None:
        """Zero the pruned and (without forward transfer) the old-reading entries of trainable
        rows, then hold every frozen or zeroed entry with the freezer."""
        self.freezer.clear()
        for module, row_free, row_pruned, source, columns in self._connections(net, t):
            w, b = module.weight, module.bias
            dev = w.device
            row_free, row_pruned = row_free.to(dev), row_pruned.to(dev)
            row_fixed = ~row_free | row_pruned
            col_zero = torch.zeros(w.shape[1], dtype=torch.bool, device=dev)
            if source is not None:
                src_zero = self.pruned[source]
                if not self.forward_transfer:
                    src_zero = src_zero | ~self.ledger.free(source)
                col_zero = columns(src_zero).to(dev)
            w.masked_fill_(_rows(row_pruned, w) | (_rows(row_free, w) & _cols(col_zero, w)), 0.0)
            self.freezer.fix(w, row_fixed, col_zero)
            if b is not None:
                b.masked_fill_(row_pruned, 0.0)
                self.freezer.fix(b, row_fixed)
        for name in net.graph.groups:
            for bn in self._norms(net, name):
                dev = bn.weight.device
                free, pruned = self.ledger.free(name).to(dev), self.pruned[name].to(dev)
                for p in (bn.weight, bn.bias):
                    p.masked_fill_(pruned, 0.0)
                    self.freezer.fix(p, ~free | pruned)
        self._sync_norms(net)
        if net.single_head:
            self._apply_single_head(net, t)

    def _apply_single_head(self, net, t: int) -> None:
        """Task t reads its free, unpruned final-hidden units; earlier tasks' columns stay fixed."""
        source, w = net.graph.head_source, net.head_weight
        dev = w.device
        if source is None:  # no hidden layer: the input features are shared by every task
            raise UnsupportedModelError("a single head needs a hidden layer whose units the tasks can "
                                        "split; this model has none")
        cols = net.graph.head_columns
        free, pruned = cols(self.ledger.free(source)).to(dev), cols(self.pruned[source]).to(dev)
        net.heads[t].mask.copy_(free & ~pruned)
        w.masked_fill_(pruned[None, :], 0.0)
        self.freezer.fix(w, zero_cols=pruned, cols=~free)

    @staticmethod
    def _norms(net, group: str) -> Iterator[nn.Module]:
        for name in net.graph.groups[group].norms:
            yield net.body.get_submodule(name)

    def _sync_norms(self, net) -> None:
        """BatchNorm channels of owned units keep their frozen running statistics."""
        for name in net.graph.groups:
            for bn in self._norms(net, name):
                bn.frozen.copy_(~self.ledger.free(name).to(bn.frozen.device))

    @torch.no_grad()
    def freeze(self, net, t: int) -> None:
        """Give task t its surviving units, cut their reads of still-free units, record usage."""
        for name in net.graph.groups:
            self.ledger.assign(name, self.candidates(name), t)
        # ``prune`` already holds the columns of pruned units at zero, so for a selection made by
        # pruning this is a no-op; it keeps ``freeze`` correct for any other way of selecting.
        for layer in net.graph.layers.values():
            self._cut_reads_of_free(layer.module.weight, self.ledger.owned_by(layer.group, t),
                                    layer.source, layer.columns)
        if net.single_head:
            net.heads[t].mask.copy_(net.graph.head_columns(self.ledger.owned_by(net.graph.head_source, t)))
        else:
            head = net.heads[t]
            self._cut_reads_of_free(head.weight, torch.ones(head.out_features, dtype=torch.bool),
                                    net.graph.head_source, net.graph.head_columns)
        self._sync_norms(net)
        self.freezer.clear()
        self.pruned = {}
        self.ledger.record()

    def _cut_reads_of_free(self, weight: torch.Tensor, rows: torch.Tensor, source: str | None,
                           columns: Callable) -> None:
        if source is None:
            return
        dev = weight.device
        weight.masked_fill_(_rows(rows.to(dev), weight) & _cols(columns(self.ledger.free(source)).to(dev), weight), 0.0)

    @torch.no_grad()
    def _reinitialize_free_units(self, net, input_layers: bool = True) -> None:
        """Fresh default initialization (the module's own ``reset_parameters``) of every free
        row, and default BatchNorm state for free channels. ``input_layers=False`` leaves the
        rows (weights and biases) of the layers reading the model input as they are (CLNP's
        reading of its Alg. 1, where only the weights leaving a layer of units are free)."""
        for layer in net.graph.layers.values():
            if not input_layers and layer.source is None:
                continue
            free = self.ledger.free(layer.group).to(layer.module.weight.device)
            fresh = copy.deepcopy(layer.module)
            fresh.reset_parameters()
            layer.module.weight[free] = fresh.weight[free]
            if layer.module.bias is not None:
                layer.module.bias[free] = fresh.bias[free]
        for name in net.graph.groups:
            for bn in self._norms(net, name):
                reset_channels(bn, self.ledger.free(name))
        if net.single_head:  # the shared head's columns of free units are free weights too
            free = net.graph.head_columns(self.ledger.free(net.graph.head_source)).to(net.head_weight.device)
            fresh = net.fresh_head(net.head_weight.shape[0])
            net.head_weight[:, free] = fresh.weight[:, free]


def _rows(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A mask over dim 0 of ``weight``, shaped to broadcast against it."""
    return mask.view(-1, *([1] * (weight.dim() - 1)))


def _cols(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A mask over dim 1 of ``weight``, shaped to broadcast against it."""
    return mask.view(1, -1, *([1] * (weight.dim() - 2)))
