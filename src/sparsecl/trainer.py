"""The task loop: for each task, train through the method's hooks, evaluate every task seen so
far, and verify that earlier tasks' logits did not move (DESIGN §2.1)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from . import distributed, metrics
from .data.augment import random_crop_flip
from .data.types import Benchmark, LazyTasks, TaskData, task_header
from .distributed import World
from .errors import CheckpointError, ConfigError, DataError, DivergenceError, ForgettingError
from .methods.base import Method
from .network import ContinualNetwork
from .routing import (ROUTING_MODES, ExemplarBuffer, RoutingRecord, common_prepare, evaluate_routing, fit_router,
                      free_units_of)

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class TrainConfig:
    """Options of the task loop shared by every method.

    ``epochs`` is the training budget per task (for EideticNets, the cap of training before
    pruning); ``lr``, ``weight_decay`` and ``momentum`` configure ``optimizer`` (``momentum`` is
    SGD's; Adam/AdamW use their default betas). ``probe_size`` test samples per task are kept to
    verify zero forgetting bitwise.

    ``routing``: besides the task-incremental accuracy matrix (task id given, ``"oracle"``),
    evaluate task-agnostic inference after every task (``sparsecl.routing``): ``"classifier"``,
    EideticNets' task classifier, retrained after every task for ``router_epochs`` epochs (Adam,
    ``router_lr``; a Linear head, or an MLP head with ``router_hidden`` hidden units) on at most
    ``router_buffer`` kept training samples *per task* (so this mode keeps data of earlier
    tasks), with units of its own in the capacity no task owns when ``router_free_units`` and the
    method keeps a unit ledger (else a head on the frozen features); or ``"entropy"``, the head
    with the lowest softmax entropy (keeps no data). Routing draws from generators of its own
    and never changes the network: the task-incremental results are the same bit for bit
    whatever ``routing`` is.
    """

    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int = 0
    eval_batch_size: int = 1024
    probe_size: int = 256
    device: str = "cpu"
    progress: bool = False
    routing: str = "oracle"
    router_buffer: int = 200
    router_epochs: int = 20
    router_lr: float = 1e-3
    router_hidden: int = 0
    router_free_units: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # API callers (and saved specs) get the CLI's checks, by argument name
            value, kind = getattr(self, f.name), str(f.type)
            where = f"--{f.name.replace('_', '-')} (TrainConfig.{f.name})"
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(f"{where} must be a finite number, got {value}")
            if kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{where} must be True or False, got {value!r}")
            if kind == "str" and not isinstance(value, str):
                raise ConfigError(f"{where} must be a string, got {value!r}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"--routing must be one of {', '.join(ROUTING_MODES)}, got '{self.routing}'")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        for name in ("epochs", "batch_size", "eval_batch_size", "probe_size", "router_buffer", "router_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_device(self.device)
        for name in ("lr", "weight_decay", "momentum", "router_hidden"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        if not self.router_lr > 0:
            raise ConfigError(f"--router-lr must be above 0, got {self.router_lr}")


def check_device(device: str, option: str = "--device") -> None:
    """Refuse a device this build of torch cannot use (``cuda`` on a CPU build, a missing GPU
    index) with one line, instead of the error of the first tensor moved there.

    Raises:
        ConfigError: naming ``option`` and the device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option} must be a torch device such as cpu or cuda, got '{device}'") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{option} {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                              f"0..{torch.cuda.device_count() - 1}")
        return
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"{option} {device}: torch cannot use this device here "
                          f"({' '.join(str(exc).split())[:160]})") from None


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 → float32 in [0, 1]; float input is returned unchanged. The input
    pipeline of a task without normalization (``TaskData.prepare`` with ``normalize=None``)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _seeded_generator(*key) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``key`` (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class MethodLoss(nn.Module):
    """The method's training loss of a batch as a module: what DDP wraps, so that the backward
    pass of ``method.loss`` all-reduces the gradients of every parameter of ``net``."""

    def __init__(self, net: ContinualNetwork, method: Method):
        super().__init__()
        self.net = net
        self.method = method  # not a module: its state stays out of DDP's parameters
        self.own = nn.ParameterList(method.own_parameters())  # e.g. WSN's scores, all-reduced too

    def forward(self, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.loss(self.net, x, y, tasks)


def training_step(net: ContinualNetwork, method: Method, optimizer: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor,
                  forward: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step through the method's hooks; returns ``(loss, correct)`` (detached).
    ``forward``: the module computing the loss, when not ``method.loss`` itself (a DDP-wrapped
    ``MethodLoss``)."""
    optimizer.zero_grad(set_to_none=True)
    loss, correct = forward(x, y, tasks) if forward is not None else method.loss(net, x, y, tasks)
    loss.backward()
    method.before_step(net)
    optimizer.step()
    method.after_step(net)
    return loss.detach(), correct


@torch.no_grad()
def predict(net: ContinualNetwork, x: torch.Tensor, task: int, batch_size: int, device: str,
            prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of task ``task`` for every row of ``x``, in eval mode; shape ``(N, num_classes)``.

    ``prepare`` turns a stored batch (on ``device``) into the network's input: pass the task's
    ``TaskData.prepare`` so that its normalization is applied; ``None`` is :func:`as_float`
    (pixels scaled to [0, 1], nothing else), right for tasks without normalization only."""
    prepare = prepare or as_float
    was_training = net.training
    net.eval()
    out = [net(prepare(x[i:i + batch_size].to(device)), task) for i in range(0, len(x), batch_size)]
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(net: ContinualNetwork, x: torch.Tensor, y: torch.Tensor, task: int,
             batch_size: int, device: str, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
             world: World | None = None) -> float:
    """Fraction of ``x`` classified as ``y`` by task ``task``'s head (eval mode); ``prepare`` as
    in :func:`predict` (pass the task's ``TaskData.prepare``). With ``world``, each rank
    measures its shard and the correct counts are summed: every rank returns the same value."""
    if len(x) == 0:
        raise ConfigError(f"cannot measure accuracy of task {task} on an empty set")
    if world is None:
        return int((predict(net, x, task, batch_size, device, prepare).argmax(1).cpu() == y).sum()) / len(x)
    part = distributed.shard(len(x), world)
    correct = 0
    if part.stop > part.start:
        correct = int((predict(net, x[part], task, batch_size, device, prepare).argmax(1).cpu() == y[part]).sum())
    return float(distributed.all_reduce_sum(torch.tensor(correct, dtype=torch.float64), world)) / len(x)


@dataclass
class EpochStats:
    loss: float
    accuracy: float  # running training accuracy (train mode), fraction


class TaskSession:
    """What the trainer lends a method while it learns task ``t``: training epochs over the
    task's data (or several tasks' data), accuracy measurements, and snapshot/rollback of the
    network and optimizer state.

    Batches go through each task's input pipeline: random crop + flip for the shuffled training
    batches of a task with ``augment`` (drawn from ``aug_generator``, seeded from
    ``(config.seed, t)`` and separate from the shuffling ``generator``, so turning augmentation on
    or off does not change the sample order), then the task's ``prepare`` (scaling and
    normalization).

    With ``world`` (data-parallel, ``sparsecl.distributed``), the training passes are split
    between ranks by a ``DistributedSampler`` (``config.batch_size`` is the global batch), the
    loss goes through DDP, the epoch statistics and the accuracy measurements are summed over
    ranks, and every other pass (scoring, measurement) runs whole on every rank, so that the
    method's decisions are the same everywhere."""

    def __init__(self, net: ContinualNetwork, method: Method, t: int, seen: list[TaskData],
                 config: TrainConfig, progress: Progress | None, world: World | None = None):
        self.net, self.method, self.t, self.seen, self.config = net, method, t, seen, config
        self.task = seen[t]
        self.world = world
        self.optimizer = make_optimizer(list(method.parameters(net, t)), config)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + t)
        self.aug_generator = _seeded_generator("augment", int(config.seed), int(t),
                                               *(() if world is None else (world.rank,)))
        self._forward = None if world is None else distributed.wrap(MethodLoss(net, method))
        self._passes = 0  # shuffled passes so far: the DistributedSampler's epoch
        self.epochs_trained = 0
        self._progress = progress
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def batches(self, tasks: Sequence[TaskData] | None = None, split: str = "train",
                shuffle: bool = True, batch_size: int | None = None,
                augment: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Mini-batches ``(x, y, task_ids)`` on the device over ``split`` of ``tasks`` (default:
        the current task), shuffled with the session's seeded generator, each row prepared by its
        own task's ``prepare``.

        ``augment``: whether the rows of tasks with ``augment=True`` get random crop + flip.
        ``None`` (default) means "when ``split`` is ``'train'`` and ``shuffle`` is on": training
        passes are augmented, unshuffled measurement passes (activation or saliency statistics)
        and the val/test splits never are. ``True`` still only affects tasks with ``augment``.
        """
        tasks = tuple(tasks or [self.task])
        x, y, ids = self._data(tasks, split)
        if len(x) == 0:
            raise ConfigError(f"task {self.t} ('{self.task.name}') has no {split} samples")
        if augment is None:
            augment = split == "train" and shuffle
        dev = self.config.device
        for idx in self._order(len(x), batch_size or self.config.batch_size, shuffle):
            bids = ids[idx].to(dev)
            yield self._prepare(tasks, x[idx].to(dev), bids, augment), y[idx].to(dev), bids

    def _order(self, n: int, batch_size: int, shuffle: bool) -> Iterator[torch.Tensor]:
        """Index batches of one pass: this rank's share of each global batch in a data-parallel
        shuffled pass, else every index (shuffled with the session's generator or in order)."""
        if shuffle and self.world is not None:
            # the sampler seeds each pass with seed + pass: hash (seed, task) so tasks never share a pass's seed
            seed = int.from_bytes(hashlib.sha256(repr(("sampler", int(self.config.seed), int(self.t))).encode())
                                  .digest()[:8], "little") >> 2
            order, self._real = distributed.sampler_indices(n, self.world, seed, self._passes)
            batch_size = distributed.local_batch_size(batch_size, self.world)
        else:
            order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)
            self._real = None
        self._passes += shuffle
        for i in range(0, len(order), batch_size):
            yield order[i:i + batch_size]

    def _prepare(self, tasks: tuple[TaskData, ...], x: torch.Tensor, ids: torch.Tensor,
                 augment: bool) -> torch.Tensor:
        """The network input of the stored batch ``x`` whose row ``r`` belongs to task ``ids[r]``:
        each task's rows augmented (if asked and the task has ``augment``) and prepared by it."""
        first = tasks[0]
        if all(t.normalize == first.normalize and t.augment == first.augment for t in tasks[1:]):
            if augment and first.augment:  # one pipeline for every row (always so for one task)
                x = random_crop_flip(x, self.aug_generator)
            return first.prepare(x)
        out = None
        for task in tasks:
            rows = (ids == task.task_id).nonzero().flatten()
            if len(rows) == 0:
                continue
            part = x[rows]
            if augment and task.augment:
                part = random_crop_flip(part, self.aug_generator)
            part = task.prepare(part)
            if out is None:
                out = torch.empty((len(x),) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device)
            out[rows] = part.to(out.dtype)
        return out

    def _data(self, tasks: tuple[TaskData, ...], split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, task_ids)`` of ``split`` over ``tasks``, concatenated once per session."""
        key = (tuple(t.task_id for t in tasks), split)
        if key not in self._cache:
            ys = [getattr(task, f"{split}_y") for task in tasks]
            ids = [torch.full((len(y),), task.task_id, dtype=torch.long) for task, y in zip(tasks, ys)]
            if len(tasks) == 1:
                self._cache[key] = (getattr(tasks[0], f"{split}_x"), ys[0], ids[0])
            else:
                self._cache[key] = (torch.cat([getattr(task, f"{split}_x") for task in tasks]),
                                    torch.cat(ys), torch.cat(ids))
        return self._cache[key]

    def train_epoch(self, tasks: Sequence[TaskData] | None = None) -> EpochStats:
        """One pass over the training data of ``tasks`` (default: the current task)."""
        self.net.train()
        total_loss = torch.zeros(())
        correct = seen = offset = 0
        batches = self.batches(tasks)
        bar = None
        if self._progress is not None:
            n = sum(len(t.train_y) for t in (tasks or [self.task]))
            bar = self._progress.add_task(f"task {self.t} epoch {self.epochs_trained + 1}",
                                          total=-(-n // self.config.batch_size))
        for step, (x, y, ids) in enumerate(batches, 1):
            loss, ok = training_step(self.net, self.method, self.optimizer, x, y, ids, self._forward)
            n, hits = len(y), int(ok.sum())
            if self.world is not None:  # every rank sees the global loss, so all stop together
                loss, hits, n = self._global_step_stats(loss, ok, offset)
                offset += len(y)
            if not torch.isfinite(loss):
                # Stop here, before a non-finite unit could reach an earlier task through an exact
                # zero weight (0 * nan = nan) and be mistaken for forgetting.
                raise DivergenceError(
                    f"task {self.t}: the training loss became {float(loss)} at step {step} of epoch "
                    f"{self.epochs_trained + 1}; the task was stopped (a checkpoint written after the "
                    "last completed task is intact); lower --lr or check the data")
            total_loss += loss.cpu() * n
            correct += hits
            seen += n
            if bar is not None:
                self._progress.advance(bar)
        if bar is not None:
            self._progress.remove_task(bar)
        if self.world is not None:
            distributed.broadcast_buffers(self.net, self.world)
        self.epochs_trained += 1
        return EpochStats(float(total_loss) / seen, correct / seen)

    def _global_step_stats(self, loss: torch.Tensor, ok: torch.Tensor, offset: int) -> tuple[torch.Tensor, int, int]:
        """``(mean loss, correct, samples)`` of a step over all ranks; the sampler's padded
        repeats (positions ``offset ..`` of this rank's pass) are left out of the counts."""
        real = self._real[offset:offset + len(ok)].to(ok.device)
        n = int(real.sum())
        total = distributed.all_reduce_sum(torch.tensor([float(loss) * n, float((ok & real).sum()), float(n)],
                                                        dtype=torch.float64), self.world)
        return (total[0] / total[2]).float(), int(total[1]), int(total[2])

    def fit(self, epochs: int, tasks: Sequence[TaskData] | None = None) -> list[EpochStats]:
        return [self.train_epoch(tasks) for _ in range(epochs)]

    def accuracy(self, split: str = "train", max_samples: int | None = None) -> float:
        """Accuracy of the current task on ``split`` ('train', 'val' or 'test'), eval mode, over
        the split's first ``max_samples`` samples (default: all)."""
        x, y = getattr(self.task, f"{split}_x"), getattr(self.task, f"{split}_y")
        return accuracy(self.net, x[:max_samples], y[:max_samples], self.t,
                        self.config.eval_batch_size, self.config.device, self.task.prepare, self.world)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def scale_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor

    def snapshot(self) -> tuple[dict, dict]:
        """Copy of the network's and the optimizer's state, for ``rollback``."""
        return copy.deepcopy(self.net.state_dict()), copy.deepcopy(self.optimizer.state_dict())

    def rollback(self, state: tuple[dict, dict]) -> None:
        self.net.load_state_dict(state[0])
        self.optimizer.load_state_dict(state[1])


@dataclass
class RunResult:
    """What a run produced; ``to_dict`` is the content of ``metrics.json``."""

    accuracy_matrix: list[list[float | None]]
    max_logit_change: float
    capacity: dict[str, list[float]]
    seconds_per_task: list[float]
    config: dict
    reuse: dict[str, dict[str, list[int]]]
    method: str
    benchmark: str
    benchmark_info: dict = field(default_factory=dict)
    routing: dict | None = None  # RoutingRecord.to_dict(): task-agnostic results, when routing is on
    bits_per_parameter: dict[str, list[float]] = field(default_factory=dict)  # Method.storage per task

    @property
    def acc(self) -> float:
        return metrics.average_accuracy(self.accuracy_matrix)

    @property
    def bwt(self) -> float | None:
        return metrics.backward_transfer(self.accuracy_matrix)

    @property
    def forgetting(self) -> float | None:
        return metrics.forgetting(self.accuracy_matrix)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "benchmark": self.benchmark,
            "accuracy_matrix": self.accuracy_matrix,
            "acc": self.acc,
            "bwt": self.bwt,
            "forgetting": self.forgetting,
            "max_logit_change": self.max_logit_change if math.isfinite(self.max_logit_change) else "inf",
            "capacity": self.capacity,
            "reuse": self.reuse,
            "config": self.config,
            "benchmark_info": self.benchmark_info,
            "versions": metrics.versions(),
            "seconds": sum(self.seconds_per_task),
            "seconds_per_task": self.seconds_per_task,
            **({"routing": self.routing} if self.routing is not None else {}),
            **({"bits_per_parameter": self.bits_per_parameter} if self.bits_per_parameter else {}),
        }


@dataclass
class RunState:
    """What the task loop carries from one task to the next. With the network and the method's
    ``state()``, it is everything a checkpoint needs to continue a run bit for bit.

    ``rows[t][i]``: test accuracy of task i after task t (i <= t); ``probes[i]``: task i's probe
    inputs and the logits recorded when it ended; ``capacity``/``reuse``: per layer, one entry
    per task; ``seconds``: wall time per task; ``routing``: the task-agnostic results and the
    latest task classifier (``None`` unless routing is on); ``bits``: ``Method.storage`` after
    each task (key → one value per task; empty for methods without per-weight bookkeeping).
    """

    rows: list[list[float]] = field(default_factory=list)
    probes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    capacity: dict[str, list[float]] = field(default_factory=dict)
    reuse: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    max_change: float = 0.0
    routing: RoutingRecord | None = None
    bits: dict[str, list[float]] = field(default_factory=dict)

    @property
    def tasks_done(self) -> int:
        return len(self.rows)

    def matrix(self, num_tasks: int) -> list[list[float | None]]:
        """The accuracy matrix ``(num_tasks, num_tasks)``, ``None`` where not (yet) measured."""
        return [(self.rows[t] + [None] * (num_tasks - len(self.rows[t]))) if t < len(self.rows)
                else [None] * num_tasks for t in range(num_tasks)]

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for i, (x, logits) in enumerate(self.probes):
            tensors[f"probe_x.{i}"], tensors[f"probe_logits.{i}"] = x, logits
        meta = {"rows": self.rows, "capacity": self.capacity, "reuse": self.reuse,
                "seconds": self.seconds, "max_change": self.max_change if math.isfinite(self.max_change) else "inf",
                "bits": self.bits}
        if self.routing is not None:
            routing_tensors, meta["routing"] = self.routing.to_checkpoint()
            tensors.update(routing_tensors)
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "RunState":
        n = len(meta["rows"])
        try:
            probes = [(tensors[f"probe_x.{i}"], tensors[f"probe_logits.{i}"]) for i in range(n)]
        except KeyError as exc:
            raise CheckpointError(f"the checkpoint lacks the probe tensor {exc} of an earlier task") from None
        change = meta["max_change"]
        routing = None if meta.get("routing") is None else RoutingRecord.from_checkpoint(tensors, meta["routing"])
        return cls([list(r) for r in meta["rows"]], probes, meta["capacity"], meta["reuse"],
                   list(meta["seconds"]), math.inf if change == "inf" else float(change), routing,
                   {k: list(v) for k, v in meta.get("bits", {}).items()})


def check_task(task: TaskData, t: int, head_classes: int | None = None) -> None:
    """Refuse a task the loop cannot learn or measure: wrong id, an empty training or test split,
    or labels outside ``0 .. num_classes - 1``.

    Raises:
        ConfigError: naming the task, the split and what was expected.
    """
    if task.task_id != t:
        raise ConfigError(f"task '{task.name}' has task_id {task.task_id}, expected {t}")
    for split in ("train", "test"):
        if len(getattr(task, f"{split}_y")) == 0:
            raise ConfigError(f"task {t} ('{task.name}') has an empty {split} split")
    n = task.num_classes if head_classes is None else head_classes
    for split in ("train", "val", "test"):
        y = getattr(task, f"{split}_y")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise ConfigError(f"task {t} ('{task.name}'): {split} label {bad} is outside the head's "
                              f"classes 0..{n - 1}")
        check_finite(getattr(task, f"{split}_x"), t, task.name, split)


def check_finite(x: torch.Tensor, t: int, name: str, split: str) -> None:
    """Refuse images holding NaN or infinity (integer images cannot).

    Raises:
        DataError: naming the task, the split and the first bad sample's index.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        value = x[i].reshape(-1)[~torch.isfinite(x[i].reshape(-1))][0]
        raise DataError(f"task {t} ('{name}'): {split} sample {i} holds {float(value)} ({int(bad.sum())} "
                        f"{split} sample(s) hold NaN or infinity); the data must be finite")


class Trainer:
    """Runs a method over a benchmark's task stream.

    After task t it fills row t of the accuracy matrix R[t][i] (test accuracy of every task
    i <= t, re-evaluated, never copied forward) and compares every earlier task's logits on its
    probe batch with those recorded when that task ended. Any difference is reported as
    ``max_logit_change``; for a method with ``isolates = True`` it raises ``ForgettingError``.

    ``world``: this process's place in a data-parallel run launched by torchrun
    (``sparsecl.distributed``); ``None`` trains in one process. After every task the ranks'
    networks, method states and ledgers are compared by checksum (``DistributedStateError`` if
    they differ).
    """

    def __init__(self, method: Method, config: TrainConfig | None = None, world: World | None = None):
        self.method = method
        self.config = config or TrainConfig()
        self.world = world

    def fit(self, model: nn.Module | ContinualNetwork, benchmark: Benchmark, state: RunState | None = None,
            on_task_end: Callable[[ContinualNetwork, RunState], None] | None = None) -> RunResult:
        """Learn the benchmark's tasks in order and return the run's results.

        ``state`` continues a run: ``model`` is then the restored ``ContinualNetwork`` with a
        head for each of the ``state.tasks_done`` tasks already learned, the method was restored
        (``setup`` and ``load_state``), and learning resumes with task ``state.tasks_done``.
        ``on_task_end(net, state)`` is called after every task (e.g. to write a checkpoint).

        Raises:
            ConfigError: a task cannot be learned (see ``check_task``), or the network does not
                match ``state``.
            ForgettingError: an isolation method changed an earlier task's logits.
            DivergenceError: the training loss became non-finite.
        """
        cfg, method = self.config, self.method
        if benchmark.num_tasks == 0:
            raise ConfigError(f"benchmark '{benchmark.name}' has no tasks")
        if state is None:
            if isinstance(model, ContinualNetwork) and model.num_tasks:
                raise ConfigError(f"the network already has heads for {model.num_tasks} tasks; Trainer.fit "
                                  "starts from an untrained network (pass the nn.Module itself) unless "
                                  "it is given the RunState to continue")
            torch.manual_seed(cfg.seed)
            net = model if isinstance(model, ContinualNetwork) else ContinualNetwork(model)
            net.to(cfg.device)
            method.setup(net)
            state = RunState()
        else:
            if not isinstance(model, ContinualNetwork) or model.num_tasks != state.tasks_done:
                have = model.num_tasks if isinstance(model, ContinualNetwork) else "no"
                raise ConfigError(f"continuing after {state.tasks_done} tasks needs the restored network "
                                  f"with {state.tasks_done} heads; got one with {have} heads")
            net = model.to(cfg.device)
        T = benchmark.num_tasks
        check_stream_length(method, T)
        lazy = isinstance(benchmark.tasks, LazyTasks)  # its tasks are checked when they start, not built now
        for t in range(state.tasks_done, T):  # refuse a bad task now, not after hours of training
            if not lazy:
                check_task(benchmark.tasks[t], t)
            head = task_header(benchmark.tasks, t)
            if net.single_head and head.num_classes != net.head_weight.shape[0]:
                raise ConfigError(f"single head: task {t} ('{head.name}') has "
                                  f"{head.num_classes} classes but the shared output layer "
                                  f"has {net.head_weight.shape[0]}; every task needs the same number")
        self._begin_routing(benchmark, state)
        progress = _progress() if cfg.progress else None
        with progress or nullcontext():
            for t in range(state.tasks_done, T):
                task = benchmark.tasks[t]
                if lazy:
                    check_task(task, t)
                start = time.perf_counter()
                net.add_head(task.num_classes)
                method.begin_task(net, t, task)
                session = TaskSession(net, method, t, benchmark.tasks[: t + 1], cfg, progress, self.world)
                method.train_task(session)
                method.end_task(session)
                self._record(net, benchmark, t, state)
                if state.routing is not None:
                    self._record_routing(net, benchmark, t, state.routing, state.probes)
                if self.world is not None:
                    self._check_ranks(net, t)
                state.seconds.append(time.perf_counter() - start)
                if progress is not None:
                    row = " ".join(f"{a:.3f}" for a in state.rows[t])
                    progress.console.log(f"task {t} done in {state.seconds[-1]:.1f}s; accuracy {row}")
                    if state.routing is not None:
                        routed = " ".join(f"{a:.3f}" for a in state.routing.rows[t])
                        progress.console.log(f"task {t}: routed ({cfg.routing}) accuracy {routed}")
                if on_task_end is not None:
                    on_task_end(net, state)
        return RunResult(state.matrix(T), state.max_change, state.capacity, state.seconds, asdict(cfg),
                         state.reuse, method.name, benchmark.name, dict(benchmark.info),
                         None if state.routing is None else state.routing.to_dict(T), state.bits)

    def _begin_routing(self, benchmark: Benchmark, state: RunState) -> None:
        """Check that routing can run on the benchmark (one input pipeline) before any training,
        and start its record; steps measured with another routing (a saved run extended with
        ``--from``) are kept as ``None``."""
        cfg = self.config
        if cfg.routing == "oracle":
            state.routing = None
            return
        if self.method.features_per_task:
            raise ConfigError(f"--routing {cfg.routing} routes each sample through one shared feature pass; "
                              f"method '{self.method.name}' computes each task's features with its own "
                              "subnetwork: use --routing oracle")
        common_prepare(benchmark.tasks)
        buffer = cfg.router_buffer if cfg.routing == "classifier" else None
        rec = state.routing
        if rec is None or (rec.mode, rec.buffer_per_task) != (cfg.routing, buffer) or len(rec.rows) != state.tasks_done:
            n = state.tasks_done
            state.routing = RoutingRecord(cfg.routing, buffer, [None] * n, [None] * n, [], [None] * n)

    def _record_routing(self, net: ContinualNetwork, benchmark: Benchmark, t: int, rec: RoutingRecord,
                        probes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Task-agnostic evaluation after task t, in addition to the oracle one: refit the task
        router (classifier mode) on the kept samples of tasks 0..t and check on the probe batches
        that its units leave every task's logits bitwise as they are, then route every seen
        task's test set. Draws from no RNG that the rest of the run uses."""
        cfg = self.config
        start = time.perf_counter()
        seen = benchmark.tasks[: t + 1]
        routing_net = net
        if cfg.routing == "classifier":
            free = free_units_of(self.method) if cfg.router_free_units else None
            rec.router = fit_router(net, seen, ExemplarBuffer(cfg.router_buffer, cfg.seed), cfg.router_epochs,
                                    cfg.router_lr, cfg.batch_size, cfg.seed, cfg.device, cfg.router_hidden,
                                    free, cfg.eval_batch_size)
            routing_net = rec.router.install(net)
            if routing_net is not net:  # the router's units must not reach any task's logits
                for i, (px, _) in enumerate(probes):
                    now = predict(routing_net, px, i, cfg.eval_batch_size, cfg.device, seen[i].prepare).cpu()
                    logits = predict(net, px, i, cfg.eval_batch_size, cfg.device, seen[i].prepare).cpu()
                    if not torch.equal(now, logits):
                        raise ForgettingError(
                            f"the task router's units changed the logits of task {i} (largest absolute change "
                            f"{float((now - logits).abs().max()):g}); a task reads a unit no task owns")
        result = evaluate_routing(routing_net, seen, cfg.routing, rec.router, cfg.eval_batch_size, cfg.device)
        rec.rows.append(result.routed)
        rec.routing_rows.append(result.routing)
        rec.per_class = result.per_class
        rec.seconds.append(time.perf_counter() - start)

    def _check_ranks(self, net: ContinualNetwork, t: int) -> None:
        """Every rank must hold the same network (parameters and buffers), method state and
        ledger after task t: selection and pruning are computed on every rank, never sent."""
        tensors, meta = self.method.state()
        checksum = distributed.state_checksum({**{f"net.{k}": v for k, v in net.state_dict().items()},
                                               **{f"method.{k}": v for k, v in tensors.items()}}, meta)
        distributed.check_identical(checksum, self.world, f"after task {t}")

    def _record(self, net: ContinualNetwork, benchmark: Benchmark, t: int, state: RunState) -> None:
        """Row t of the accuracy matrix, the bitwise check of every earlier task, capacity."""
        cfg, method = self.config, self.method
        net.eval()
        probe_x = benchmark.tasks[t].test_x[: cfg.probe_size]
        state.probes.append((probe_x, predict(net, probe_x, t, cfg.eval_batch_size, cfg.device,
                                              benchmark.tasks[t].prepare).cpu()))
        state.rows.append([accuracy(net, prev.test_x, prev.test_y, i, cfg.eval_batch_size, cfg.device, prev.prepare,
                                    self.world) for i, prev in enumerate(benchmark.tasks[: t + 1])])
        for i, (px, logits) in enumerate(state.probes[:-1]):
            now = predict(net, px, i, cfg.eval_batch_size, cfg.device, task_prepare(benchmark.tasks, i)).cpu()
            change, same = logit_change(px, now, logits)
            state.max_change = max(state.max_change, change)
            if method.isolates and not same:
                raise ForgettingError(
                    f"method '{method.name}' changed the logits of task {i} while learning "
                    f"task {t} (largest absolute change {change:g}); zero forgetting broke")
        for name, used in method.capacity(net).items():
            state.capacity.setdefault(name, []).append(used)
        for key, bits in method.storage(net).items():
            state.bits.setdefault(key, []).append(bits)
        for name, counts in method.reuse(net).items():
            for key, n in counts.items():
                state.reuse.setdefault(name, {}).setdefault(key, []).append(n)


def task_prepare(tasks, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Task ``i``'s input pipeline (``TaskData.prepare``) without building a lazy task."""
    if not isinstance(tasks, LazyTasks):
        return tasks[i].prepare
    head = tasks.header(i)
    return TaskData(head.task_id, head.name, head.classes, *([torch.empty(0)] * 6), normalize=head.normalize,
                    augment=head.augment).prepare


def logit_change(x: torch.Tensor, now: torch.Tensor, before: torch.Tensor) -> tuple[float, bool]:
    """The largest absolute change of the logits of the probe inputs ``x`` (``(n, ...)``) from
    ``before`` to ``now`` (``(n, classes)``), and whether they are the same bit for bit. Only the
    rows of finite inputs count (the data checks refuse others, but a probe restored from a
    checkpoint is not re-checked); a logit that is finite on one side only is an infinite change,
    NaN where it was NaN is no change."""
    rows = torch.isfinite(x.reshape(len(x), -1)).all(1) if x.is_floating_point() else torch.ones(len(x), dtype=torch.bool)
    now, before = now[rows], before[rows]
    fin_now, fin_before = torch.isfinite(now), torch.isfinite(before)
    same_kind = torch.equal(fin_now, fin_before) and torch.equal(now[~fin_now].nan_to_num(0.0),
                                                                 before[~fin_before].nan_to_num(0.0))
    both = fin_now & fin_before
    change = float((now[both] - before[both]).abs().max()) if bool(both.any()) else 0.0
    same = same_kind and torch.equal(now[both], before[both])
    return (change if same_kind else math.inf), same


def check_stream_length(method: Method, num_tasks: int) -> None:
    """Refuse, before task 0, a stream longer than the method can learn (``Method.max_tasks``).

    Raises:
        ConfigError: naming the method, its limit and the number of tasks asked for.
    """
    limit = getattr(method, "max_tasks", None)
    if limit is not None and num_tasks > limit:
        raise ConfigError(f"method '{method.name}' can learn at most {limit} tasks, but the stream has "
                          f"{num_tasks} (--tasks); use at most --tasks {limit}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True)
