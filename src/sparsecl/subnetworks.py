"""Weight-level subnetworks (PackNet, WSN, DST-CL, TinySubNets) of any ``nn.Module``: which task
owns each weight, which weights each task uses, and the forward pass of one task's subnetwork.

Every parameter of the body (the user's model without its final Linear) falls in one of three
kinds, decided when the subnetworks are installed:

* **masked** — every trainable floating-point parameter with at least 2 dimensions: the weights
  of Linear, Conv1d/2d/3d (grouped and depthwise included), ``nn.Embedding``, the packed
  ``in_proj_weight`` and ``out_proj.weight`` of ``nn.MultiheadAttention`` (and its separate
  q/k/v projections and ``bias_k``/``bias_v``), and custom ``nn.Parameter``s. Each weight has an
  owner and each task a mask over it (below).
* **per task** — every other trainable parameter (biases, LayerNorm/GroupNorm/BatchNorm affine
  parameters, 1-D custom parameters), and the ≥ 2-D parameters a model marks per task by naming
  them in a ``sparsecl_per_task`` attribute (a tuple of parameter names, on the module that owns
  them or on any module above it; e.g. a ViT's class token and position embedding). Each task
  has its own copy, made from the previous task's when the task begins (task 0: the body's).
  Every persistent buffer (BatchNorm running statistics and batch counts, and any other) is per
  task too; evaluation uses the task's running statistics, never the test batch's.
* **constant** — parameters with ``requires_grad=False`` and non-persistent buffers: shared,
  never trained.

Per masked parameter i, ``TaskSubnetworks`` keeps

* ``owner{i}`` — ``int16``, the weight's shape: ``-1`` for a free weight, else the task whose
  training set its value (frozen since). **2 bytes per weight** in memory and in checkpoints, so
  one model holds up to ``MAX_TASKS`` = 32,767 tasks (checkpoints written with the former
  ``int8`` owners load and are widened when the next task ends).
* in ``"masks"`` mode (WSN, DST, TinySubNets: a task uses an arbitrary subset of the weights,
  earlier tasks' frozen ones included) one bit-packed mask per task: **1 bit per weight per
  task** (``storage.pack_mask``). In ``"owner"`` mode (PackNet) task t uses the weights with
  ``0 <= owner <= t`` and no mask is kept.

Task t's forward pass runs the body with ``torch.func.functional_call``, substituting each masked
weight by ``where(mask_t, weight, 0)`` and every per-task tensor by task t's (the body's own
per-task tensors are not used after task 0 copied them). While a task trains, the method
supplies the effective weights instead (``begin_training``): a straight-through score mask for
WSN, the current sparse mask for DST, the unpruned weights for PackNet. The task's tensors are
updated in place (BatchNorm statistics in train mode), exactly as in the plain module. Task t's
outputs then depend only on its mask, the frozen weights it reads and its own tensors, whatever
the module computes with them (attention, LayerNorm, embeddings, concatenations), so no unit
graph is needed.

Refused before training, naming the module and parameter: a BatchNorm without running
statistics (``track_running_stats=False`` would normalize with each evaluation batch's own
statistics, so a task's logits would depend on the batch), and a trainable parameter that is not
floating point (it cannot be masked).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from .errors import CapacityError, ConfigError, UnsupportedModelError
from .ledger import FREE
from .storage import pack_mask, unpack_mask

MODES = ("owner", "masks")
OWNER_DTYPE = torch.int16
MAX_TASKS = torch.iinfo(OWNER_DTYPE).max  # 32,767: owner ids are int16, -1 is free
PER_TASK_ATTRIBUTE = "sparsecl_per_task"

#: ``effective(layer_index, weight) -> weight used by the training task's forward pass``
Effective = Callable[[int, torch.Tensor], torch.Tensor]


def per_task_names(model: nn.Module) -> tuple[str, ...]:
    """Full names of the parameters ``model`` marks per task: for every module with a
    ``sparsecl_per_task`` attribute, its entries prefixed by the module's name.

    Raises:
        ConfigError: the attribute is not a tuple/list of names, or names no parameter.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for prefix, module in model.named_modules():
        names = getattr(module, PER_TASK_ATTRIBUTE, ())
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{PER_TASK_ATTRIBUTE} of module '{prefix or type(model).__name__}' must be a tuple of "
                              f"parameter names, got {names!r}")
        for name in names:
            full = f"{prefix}.{name}" if prefix else name
            if full not in params:
                raise ConfigError(f"{PER_TASK_ATTRIBUTE} of module '{prefix or type(model).__name__}' names "
                                  f"'{name}', which is not one of its parameters")
            out.append(full)
    return tuple(dict.fromkeys(out))


def _display(name: str) -> str:
    """A masked parameter's name in reports: its module's name for a module's ``weight``."""
    return name.removesuffix(".weight") if name.endswith(".weight") else name


def _use_order(body: nn.Module) -> list[str]:
    """The body's parameter names (canonical: as ``named_parameters`` gives them once) in the
    order the traced graph first uses them, then any others in registration order."""
    canonical = {id(p): n for n, p in body.named_parameters()}
    order: dict[str, None] = {}

    def add(params: Iterable[nn.Parameter]) -> None:
        for p in params:
            if id(p) in canonical:
                order.setdefault(canonical[id(p)], None)

    if isinstance(body, fx.GraphModule):
        for node in body.graph.nodes:
            if node.op == "call_module":
                add(body.get_submodule(node.target).parameters())
            elif node.op == "get_attr":
                module, _, attr = str(node.target).rpartition(".")
                value = getattr(body.get_submodule(module), attr)
                add(value.parameters() if isinstance(value, nn.Module) else [value])
    add(body.parameters())
    return list(order)


class TaskState(nn.Module):
    """One task's own tensors: ``bias[str(i)]`` (the bias of the module of masked weight i, for
    modules with one), ``norm_weight[str(j)]``/``norm_bias[str(j)]`` and buffers ``mean{j}``,
    ``var{j}``, ``count{j}`` of BatchNorm j, ``extra[str(k)]`` (per-task parameter k) and buffer
    ``buffer{k}`` (per-task buffer k), and in masks mode the packed masks ``mask{i}``
    ``(ceil(numel_i / 8),)`` uint8."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.ParameterDict()
        self.norm_weight = nn.ParameterDict()
        self.norm_bias = nn.ParameterDict()
        self.extra = nn.ParameterDict()


class TaskSubnetworks(nn.Module):
    """Per-weight ownership, per-task masks and per-task tensors of a ``ContinualNetwork``
    (installed by ``ContinualNetwork.install_subnetworks``; see the module doc).

    ``params``: the masked parameters' full names in the order the body first uses them;
    ``layers``: their names in reports (a module's name for its ``weight``); ``biases``: masked
    index → the full name of its module's bias; ``norms``: the BatchNorm modules' names
    (``norm_order`` first: the unit graph's order); ``task_params`` / ``task_buffers``: the other
    per-task parameters and buffers. Buffers ``owner{i}``: ``owner_dtype`` (int16; int8 only for
    a checkpoint written before), the shape of masked parameter i.

    Raises:
        ConfigError: unknown ``mode``.
        UnsupportedModelError: the body has a BatchNorm without running statistics, or a
            trainable parameter that is not floating point (the message names it).
    """

    def __init__(self, body: nn.Module, mode: str, norm_order: Iterable[str] = (),
                 per_task: Iterable[str] = (), owner_dtype: torch.dtype = OWNER_DTYPE):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"subnetwork mode must be one of {', '.join(MODES)}, got '{mode}'")
        self.mode = mode
        params = dict(body.named_parameters())
        for name, p in params.items():
            if p.requires_grad and not p.is_floating_point():
                raise UnsupportedModelError(f"parameter '{name}' is {p.dtype}: weight-level methods mask and train "
                                            "floating-point parameters; set requires_grad=False to keep it constant")
        bns = {n: m for n, m in body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        for name, bn in bns.items():
            if not bn.track_running_stats:
                raise UnsupportedModelError(
                    f"module '{name}' ({type(bn).__name__}) has track_running_stats=False: it would normalize with "
                    "each evaluation batch's own statistics, so a task's logits would depend on the batch it is "
                    "evaluated in; weight-level methods keep running statistics per task (track_running_stats=True)")
        order = _use_order(body)
        used_bns = [n for n in dict.fromkeys(p.rpartition(".")[0] for p in order) if n in bns]
        self.norms = [n for n in norm_order if n in bns] + [n for n in used_bns + list(bns) if n not in norm_order]
        self.norms = list(dict.fromkeys(self.norms))
        norm_tensors = {f"{n}.{a}" for n in self.norms for a in ("weight", "bias", "running_mean", "running_var",
                                                                 "num_batches_tracked")}
        per_task = set(per_task)
        trainable = [n for n in order if params[n].requires_grad and n not in norm_tensors]
        self.params = [n for n in trainable if params[n].dim() >= 2 and n not in per_task]
        self.layers = [_display(n) for n in self.params]
        self.biases: dict[int, str] = {}
        for i, name in enumerate(self.params):
            module, _, attr = name.rpartition(".")
            bias = f"{module}.bias" if module else "bias"
            if attr == "weight" and bias in trainable and bias not in self.params:
                self.biases[i] = bias
        claimed = set(self.params) | set(self.biases.values())
        self.task_params = [n for n in trainable if n not in claimed]
        self.task_buffers = []
        for name, _ in body.named_buffers():
            module, _, attr = name.rpartition(".")
            if name not in norm_tensors and attr not in body.get_submodule(module)._non_persistent_buffers_set:
                self.task_buffers.append(name)
        for i, name in enumerate(self.params):
            w = params[name]
            self.register_buffer(f"owner{i}", torch.full(w.shape, FREE, dtype=owner_dtype, device=w.device))
        self.tasks = nn.ModuleList()
        self._live: tuple[int, Effective] | None = None
        self._cache: tuple[tuple, list[torch.Tensor]] | None = None

    def train(self, mode: bool = True) -> "TaskSubnetworks":
        """Sets the mode flag only: the per-task states hold tensors and compute nothing, and
        walking them would make every ``net.train()``/``net.eval()`` cost O(tasks)."""
        self.training = mode
        return self

    # ----------------------------------------------------------------------------- structure
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def owner_dtype(self) -> torch.dtype:
        return self.owner(0).dtype if self.params else OWNER_DTYPE

    def owner(self, i: int) -> torch.Tensor:
        """Owner ids of masked parameter i, int16, the parameter's shape (-1: free)."""
        return getattr(self, f"owner{i}")

    def weight(self, body: nn.Module, i: int) -> nn.Parameter:
        return body.get_parameter(self.params[i])

    @torch.no_grad()
    def add_task(self, body: nn.Module) -> TaskState:
        """Append the next task's tensors: per-task parameters and buffers copied from the
        previous task (the body's own for task 0), empty masks.

        Raises:
            CapacityError: more than ``MAX_TASKS`` tasks.
        """
        if self.num_tasks >= MAX_TASKS:
            raise CapacityError(f"weight-level methods keep owner ids as int16: at most {MAX_TASKS} tasks")
        prev = self.tasks[-1] if self.num_tasks else None

        def copied(src: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad)

        state = TaskState()
        for i, name in self.biases.items():
            state.bias[str(i)] = copied(body.get_parameter(name) if prev is None else prev.bias[str(i)])
        for i, name in enumerate(self.params):
            if self.mode == "masks":
                w = body.get_parameter(name)
                state.register_buffer(f"mask{i}", pack_mask(torch.zeros_like(w, dtype=torch.bool)))
        for j, name in enumerate(self.norms):
            bn = body.get_submodule(name)
            if bn.affine:
                for key, attr in (("norm_weight", "weight"), ("norm_bias", "bias")):
                    getattr(state, key)[str(j)] = copied(getattr(bn, attr) if prev is None else getattr(prev, key)[str(j)])
            for buf, attr in ((f"mean{j}", "running_mean"), (f"var{j}", "running_var"),
                              (f"count{j}", "num_batches_tracked")):
                src = getattr(bn, attr) if prev is None else getattr(prev, buf)
                state.register_buffer(buf, src.detach().clone())
            if bn.momentum is None and prev is not None:  # a cumulative average restarts with the task
                getattr(state, f"count{j}").zero_()
        for k, name in enumerate(self.task_params):
            state.extra[str(k)] = copied(body.get_parameter(name) if prev is None else prev.extra[str(k)])
        for k, name in enumerate(self.task_buffers):
            src = body.get_buffer(name) if prev is None else getattr(prev, f"buffer{k}")
            state.register_buffer(f"buffer{k}", src.detach().clone())
        self.tasks.append(state)
        return state

    # ------------------------------------------------------------------------------- masks
    def mask(self, task: int, i: int) -> torch.Tensor:
        """Bool mask (the parameter's shape) of the weights of masked parameter i that task
        ``task`` uses."""
        owner = self.owner(i)
        if self.mode == "owner":
            return (owner >= 0) & (owner <= task)
        return unpack_mask(getattr(self.tasks[task], f"mask{i}"), tuple(owner.shape))

    def masks(self, task: int) -> list[torch.Tensor]:
        """``mask(task, i)`` for every masked parameter. The last task's masks are cached, keyed
        by the storage and version of the tensors they come from, so that ``load_state_dict``,
        ``.to()`` or any in-place change of the owner ids or masks is never served a stale mask."""
        sources = [self.owner(i) for i in range(len(self.params))]
        if self.mode == "masks":
            sources += [getattr(self.tasks[task], f"mask{i}") for i in range(len(self.params))]
        # inference-mode tensors keep no version counter (and cannot be changed outside that mode)
        key = (task, tuple((s.data_ptr(), 0 if s.is_inference() else s._version) for s in sources))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, [self.mask(task, i) for i in range(len(self.params))])
        return self._cache[1]

    @torch.no_grad()
    def commit(self, task: int, used: list[torch.Tensor]) -> None:
        """End of task ``task``: ``used[i]`` (bool, masked parameter i's shape) is the set of
        weights the task uses. The free ones among them become the task's (frozen from now on);
        in masks mode ``used`` is stored as the task's mask. In owner mode ``used`` must be every
        earlier task's weight plus the task's own (the owner rule is the mask).

        Owner ids of a checkpoint written with int8 owners are widened to int16 here.

        Raises:
            CapacityError: in owner mode, ``used`` leaves out a weight of an earlier task.
        """
        if self.owner_dtype != OWNER_DTYPE:
            for i in range(len(self.params)):
                setattr(self, f"owner{i}", self.owner(i).to(OWNER_DTYPE))
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
        """From now on, task ``task``'s forward pass uses ``effective(i, weight)`` as masked
        parameter i (until ``end_training``)."""
        self._live = (task, effective)

    def end_training(self) -> None:
        self._live = None
        self._cache = None

    def overrides(self, body: nn.Module, task: int) -> dict[str, torch.Tensor]:
        """The tensors substituted in the body for task ``task``'s forward pass, by full name."""
        state = self.tasks[task]
        live = self._live[1] if self._live is not None and self._live[0] == task else None
        masks = None if live is not None else self.masks(task)
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.params):
            w = body.get_parameter(name)
            # where, not a multiply: a non-finite value in an unused weight stays out
            out[name] = live(i, w) if live is not None else torch.where(masks[i], w, 0.0)
        for i, name in self.biases.items():
            out[name] = state.bias[str(i)]
        for j, name in enumerate(self.norms):
            if str(j) in state.norm_weight:
                out[f"{name}.weight"] = state.norm_weight[str(j)]
                out[f"{name}.bias"] = state.norm_bias[str(j)]
            out[f"{name}.running_mean"] = getattr(state, f"mean{j}")
            out[f"{name}.running_var"] = getattr(state, f"var{j}")
            out[f"{name}.num_batches_tracked"] = getattr(state, f"count{j}")
        for k, name in enumerate(self.task_params):
            out[name] = state.extra[str(k)]
        for k, name in enumerate(self.task_buffers):
            out[name] = getattr(state, f"buffer{k}")
        return out

    def features(self, body: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s penultimate features ``(N, head_features)`` of input ``x``."""
        return functional_call(body, self.overrides(body, task), (x,))

    @torch.no_grad()
    def materialize(self, body: nn.Module, task: int) -> nn.Module:
        """A plain copy of ``body`` computing task ``task``'s features: each masked weight
        ``where(mask, weight, 0)``, the task's per-task tensors written in (for export; the
        copy's forward equals ``features(body, x, task)``)."""
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
        return {"mode": self.mode, "owner_dtype": str(self.owner_dtype).removeprefix("torch.")}
