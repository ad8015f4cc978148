"""Weight-level subnetworks (PackNet, WSN, DST-CL): which task owns each weight, which weights
each task uses, and the forward pass of one task's subnetwork.

The masked layers are the body's unit layers (every ``nn.Linear`` and ``nn.Conv2d`` before the
heads); task heads are per task and unmasked. Per masked layer, ``TaskSubnetworks`` keeps

* ``owner`` — ``int8``, the weight's shape: ``-1`` for a free weight, else the task whose training
  set its value (frozen since). **1 byte per weight** in memory and in checkpoints (so at most
  127 tasks).
* in ``"masks"`` mode (WSN, DST: a task uses an arbitrary subset of the weights, earlier tasks'
  frozen ones included) one bit-packed mask per task: **1 bit per weight per task**
  (``storage.pack_mask``). In ``"owner"`` mode (PackNet) task t uses the weights with
  ``0 <= owner <= t`` and no mask is kept.

Channels are shared between tasks, so everything per channel is per task (DESIGN §2.4): every
task has its own copy of the unit layers' biases and of every BatchNorm's affine parameters and
running statistics (``TaskState``). Evaluation uses the task's running statistics, never the
test batch's, so results do not depend on the evaluation batch size.

Task t's forward pass runs the user's body with ``torch.func.functional_call``, substituting each
masked layer's weight by ``where(mask_t, weight, 0)`` and the task's biases and BatchNorm tensors
(the body's own biases and BatchNorm tensors are not used). While a task trains, the method
supplies the effective weights instead (``begin_training``): a straight-through score mask for
WSN, the current sparse mask for DST, the unpruned weights for PackNet. The task's tensors are
updated in place (BatchNorm statistics in train mode), exactly as in the plain module.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from .errors import CapacityError, ConfigError
from .graph import UnitGraph
from .ledger import FREE
from .storage import pack_mask, unpack_mask

MODES = ("owner", "masks")
MAX_TASKS = 127  # owner ids are int8

#: ``effective(layer_index, weight) -> weight used by the training task's forward pass``
Effective = Callable[[int, torch.Tensor], torch.Tensor]


class TaskState(nn.Module):
    """One task's own tensors: ``bias[str(i)]`` of masked layer i (layers with a bias),
    ``norm_weight[str(j)]``/``norm_bias[str(j)]`` and buffers ``mean{j}``, ``var{j}``,
    ``count{j}`` of BatchNorm j, and in masks mode the packed masks ``mask{i}``
    ``(ceil(numel_i / 8),)`` uint8."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.ParameterDict()
        self.norm_weight = nn.ParameterDict()
        self.norm_bias = nn.ParameterDict()


class TaskSubnetworks(nn.Module):
    """Per-weight ownership, per-task masks and per-task biases/BatchNorm of a ``ContinualNetwork``
    (installed by ``ContinualNetwork.install_subnetworks``; see the module doc).

    ``layers``: the masked layers' names (the graph's unit layers, in order); ``norms``: the
    BatchNorm modules' names. Buffers ``owner{i}``: int8, the shape of layer i's weight.

    The traced body holds only Linear/Conv2d layers and BatchNorms (``graph.trace`` refuses any
    other parameter), so every parameter is either masked or kept per task.

    Raises:
        ConfigError: unknown ``mode``.
    """

    def __init__(self, body: nn.Module, graph: UnitGraph, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"subnetwork mode must be one of {', '.join(MODES)}, got '{mode}'")
        self.mode = mode
        self.layers = list(graph.layers)
        self.norms = [n for g in graph.groups.values() for n in g.norms]
        for i, name in enumerate(self.layers):
            w = body.get_submodule(name).weight
            self.register_buffer(f"owner{i}", torch.full(w.shape, FREE, dtype=torch.int8, device=w.device))
        self.tasks = nn.ModuleList()
        self._live: tuple[int, Effective] | None = None
        self._cache: tuple[tuple, list[torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------- structure
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def owner(self, i: int) -> torch.Tensor:
        """Owner ids of masked layer i, int8, the weight's shape (-1: free)."""
        return getattr(self, f"owner{i}")

    def weight(self, body: nn.Module, i: int) -> nn.Parameter:
        return body.get_submodule(self.layers[i]).weight

    @torch.no_grad()
    def add_task(self, body: nn.Module) -> TaskState:
        """Append the next task's tensors: biases and BatchNorm tensors copied from the previous
        task (the body's own for task 0), empty masks.

        Raises:
            CapacityError: more than ``MAX_TASKS`` tasks (owner ids are int8).
        """
        if self.num_tasks >= MAX_TASKS:
            raise CapacityError(f"weight-level methods keep owner ids in one byte: at most {MAX_TASKS} tasks")
        prev = self.tasks[-1] if self.num_tasks else None
        state = TaskState()
        for i, name in enumerate(self.layers):
            module = body.get_submodule(name)
            if module.bias is not None:
                src = module.bias if prev is None else prev.bias[str(i)]
                state.bias[str(i)] = nn.Parameter(src.detach().clone())
            if self.mode == "masks":
                state.register_buffer(f"mask{i}", pack_mask(torch.zeros_like(module.weight, dtype=torch.bool)))
        for j, name in enumerate(self.norms):
            bn = body.get_submodule(name)
            for key, attr in (("norm_weight", "weight"), ("norm_bias", "bias")):
                src = getattr(bn, attr) if prev is None else getattr(prev, key)[str(j)]
                getattr(state, key)[str(j)] = nn.Parameter(src.detach().clone())
            for buf, attr in ((f"mean{j}", "running_mean"), (f"var{j}", "running_var"),
                              (f"count{j}", "num_batches_tracked")):
                src = getattr(bn, attr) if prev is None else getattr(prev, buf)
                state.register_buffer(buf, src.detach().clone())
        self.tasks.append(state)
        return state

    # ------------------------------------------------------------------------------- masks
    def mask(self, task: int, i: int) -> torch.Tensor:
        """Bool mask (the weight's shape) of the weights of layer i that task ``task`` uses."""
        owner = self.owner(i)
        if self.mode == "owner":
            return (owner >= 0) & (owner <= task)
        return unpack_mask(getattr(self.tasks[task], f"mask{i}"), tuple(owner.shape))

    def masks(self, task: int) -> list[torch.Tensor]:
        """``mask(task, i)`` for every layer. The last task's masks are cached, keyed by the
        storage and version of the tensors they come from, so that ``load_state_dict``, ``.to()``
        or any in-place change of the owner ids or masks is never served a stale mask."""
        sources = [self.owner(i) for i in range(len(self.layers))]
        if self.mode == "masks":
            sources += [getattr(self.tasks[task], f"mask{i}") for i in range(len(self.layers))]
        # inference-mode tensors keep no version counter (and cannot be changed outside that mode)
        key = (task, tuple((s.data_ptr(), 0 if s.is_inference() else s._version) for s in sources))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, [self.mask(task, i) for i in range(len(self.layers))])
        return self._cache[1]

    @torch.no_grad()
    def commit(self, task: int, used: list[torch.Tensor]) -> None:
        """End of task ``task``: ``used[i]`` (bool, layer i's weight shape) is the set of weights
        the task uses. The free ones among them become the task's (frozen from now on); in
        masks mode ``used`` is stored as the task's mask. In owner mode ``used`` must be every
        earlier task's weight plus the task's own (the owner rule is the mask).

        Raises:
            CapacityError: in owner mode, ``used`` leaves out a weight of an earlier task.
        """
        for i, mask in enumerate(used):
            owner = self.owner(i)
            mask = mask.to(owner.device)
            if self.mode == "owner" and ((owner >= 0) & ~mask).any():
                raise CapacityError(f"layer '{self.layers[i]}': task {task} must use every weight of the "
                                    "earlier tasks (PackNet's rule: task t uses the weights of tasks <= t)")
            owner[mask & (owner == FREE)] = task
            if self.mode == "masks":
                getattr(self.tasks[task], f"mask{i}").copy_(pack_mask(mask))
        self._cache = None

    # ----------------------------------------------------------------------------- forward
    def begin_training(self, task: int, effective: Effective) -> None:
        """From now on, task ``task``'s forward pass uses ``effective(i, weight)`` as layer i's
        weight (until ``end_training``)."""
        self._live = (task, effective)

    def end_training(self) -> None:
        self._live = None
        self._cache = None

    def overrides(self, body: nn.Module, task: int) -> dict[str, torch.Tensor]:
        """The tensors substituted in the body for task ``task``'s forward pass."""
        state = self.tasks[task]
        live = self._live[1] if self._live is not None and self._live[0] == task else None
        masks = None if live is not None else self.masks(task)
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.layers):
            w = self.weight(body, i)
            # where, not a multiply: a non-finite value in an unused weight stays out
            out[f"{name}.weight"] = live(i, w) if live is not None else torch.where(masks[i], w, 0.0)
            if str(i) in state.bias:
                out[f"{name}.bias"] = state.bias[str(i)]
        for j, name in enumerate(self.norms):
            out[f"{name}.weight"] = state.norm_weight[str(j)]
            out[f"{name}.bias"] = state.norm_bias[str(j)]
            out[f"{name}.running_mean"] = getattr(state, f"mean{j}")
            out[f"{name}.running_var"] = getattr(state, f"var{j}")
            out[f"{name}.num_batches_tracked"] = getattr(state, f"count{j}")
        return out

    def features(self, body: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s penultimate features ``(N, head_features)`` of input ``x``."""
        return functional_call(body, self.overrides(body, task), (x,))

    @torch.no_grad()
    def materialize(self, body: nn.Module, task: int) -> nn.Module:
        """A plain copy of ``body`` computing task ``task``'s features: each masked layer's weight
        ``where(mask, weight, 0)``, the task's biases and BatchNorm tensors written in (for export;
        the copy's forward equals ``features(body, x, task)``)."""
        plain = copy.deepcopy(body)
        live, self._live = self._live, None
        try:
            for key, value in self.overrides(body, task).items():
                module, _, attr = key.rpartition(".")
                getattr(plain.get_submodule(module), attr).copy_(value.detach())
        finally:
            self._live = live
        return plain

    def structure(self) -> dict:
        return {"mode": self.mode}
