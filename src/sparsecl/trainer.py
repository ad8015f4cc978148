"""The task loop: for each task, train through the method's hooks, evaluate every task seen so
far, and verify that earlier tasks' logits did not move (DESIGN §2.1)."""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from . import distributed, metrics
from .config import OPTIMIZERS, TrainConfig, check_device, parse_eval_tasks
from .data.augment import random_crop_flip
from .data.types import SPLIT_CACHE_BYTES, Benchmark, LazyTasks, TaskData, task_header, task_split
from .distributed import World
from .errors import CheckpointError, ConfigError, DataError, DivergenceError, ForgettingError
from .evaluation import accuracy, as_float, mean_loss, predict
from .evaluators import default_evaluators
from .loggers import PHASES, Callback, CallbackList, HistoryRecorder, HistoryRow, TaskSummary
from .methods.base import Method
from .network import ContinualNetwork

if TYPE_CHECKING:
    from .routing import RoutingRecord

__all__ = ["OPTIMIZERS", "RunResult", "RunState", "TaskSession", "TrainConfig", "Trainer", "accuracy", "as_float",
           "check_device", "check_task", "make_optimizer", "predict", "training_step"]


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of a task: the one ``config.optimizer`` names, or what its factory returns.

    Raises:
        ConfigError: the factory did not return a ``torch.optim.Optimizer``."""
    if callable(config.optimizer):
        optimizer = config.optimizer(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"TrainConfig(optimizer=...): the factory must return a torch.optim.Optimizer "
                              f"built on the parameters it is given, got {type(optimizer).__name__}")
        return optimizer
    fused = {"fused": True} if config.fused else {}  # one kernel per parameter instead of one per operation
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused)


@contextmanager
def loss_function(net: ContinualNetwork, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None):
    """While the block runs, ``net.task_loss`` (what every method's loss starts from) uses
    ``loss(logits, labels)`` instead of cross-entropy; ``None`` changes nothing. A batch holding
    several tasks' samples gets each task's loss weighted by its share of the batch."""
    if loss is None:
        yield
        return

    def task_loss(x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tasks.unique().tolist()
        if len(ids) == 1:
            logits = net.head_logits(net.features(x, ids[0]), ids[0])
            return loss(logits, y), logits.argmax(1) == y
        total = x.new_zeros((), dtype=torch.float32)
        correct = torch.empty_like(y, dtype=torch.bool)
        for t in ids:
            sel = tasks == t
            logits = net.head_logits(net.features(x[sel], t), t)
            total = total + loss(logits, y[sel]) * (int(sel.sum()) / len(y))
            correct[sel] = logits.argmax(1) == y[sel]
        return total, correct

    net.__dict__["task_loss"] = task_loss  # an instance attribute shadows the method for the block only
    try:
        yield
    finally:
        net.__dict__.pop("task_loss", None)


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
                 config: TrainConfig, callbacks: Callback | None = None, world: World | None = None):
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
        self._callbacks = callbacks if callbacks is not None else Callback()
        self._phase = "train"
        self._phase_epochs: dict[str, int] = {}
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def phase(self, name: str):
        """The epochs trained (and steps reported) inside the block belong to phase ``name`` of
        the task in the run history: ``"train"`` (the default outside any block), ``"recovery"``
        (retraining after a pruning step), ``"finetune"``, ``"theta-scan"``.

        Raises:
            ConfigError: ``name`` is not one of ``sparsecl.loggers.PHASES``."""
        if name not in PHASES:
            raise ConfigError(f"session.phase('{name}'): the phase must be one of {', '.join(PHASES)}")
        before, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = before

    def _next_epoch(self, phase: str) -> int:
        self._phase_epochs[phase] = self._phase_epochs.get(phase, 0) + 1
        return self._phase_epochs[phase]

    def report(self, accuracy: float, loss: float | None = None, seconds: float = 0.0) -> None:
        """Record a step of the current phase that trained nothing (e.g. one threshold of a θ
        scan, measured on the validation split) as a row of the run history."""
        self._callbacks.on_epoch_end(HistoryRow(self.t, self._phase, self._next_epoch(self._phase),
                                                None if loss is None else float(loss), float(accuracy),
                                                float(self.optimizer.param_groups[0]["lr"]), float(seconds)))

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

    def train_epoch(self, tasks: Sequence[TaskData] | None = None, phase: str | None = None) -> EpochStats:
        """One pass over the training data of ``tasks`` (default: the current task); a row of
        the run history, of ``phase`` (default: the current :meth:`phase`)."""
        if phase is not None:
            with self.phase(phase):
                return self.train_epoch(tasks)
        started = time.perf_counter()
        self.net.train()
        total_loss = torch.zeros(())
        correct = seen = offset = 0
        n = sum(len(t.train_y) for t in (tasks or [self.task]))
        epoch = self._next_epoch(self._phase)
        self._callbacks.on_epoch_start(self.t, self._phase, epoch, -(-n // self.config.batch_size))
        for step, (x, y, ids) in enumerate(self.batches(tasks), 1):
            loss, ok = training_step(self.net, self.method, self.optimizer, x, y, ids, self._forward)
            n, hits = len(y), int(ok.sum())
            if self.world is not None:  # every rank sees the global loss, so all stop together
                loss, hits, n = self._global_step_stats(loss, ok, offset)
                offset += len(y)
            if not torch.isfinite(loss):
                # Stop here, before a non-finite unit could reach an earlier task through an exact
                # zero weight (0 * nan = nan) and be mistaken for forgetting.
                what = (f"task {self.t}: the training loss became {float(loss)} at step {step} of epoch "
                        f"{self.epochs_trained + 1}; the task was stopped (a checkpoint written after the "
                        "last completed task is intact)")
                raise DivergenceError(what + "; lower the learning rate (TrainConfig(lr=...) or your optimizer's) "
                                      "or check the data", cli=what + "; lower --lr or check the data")
            total_loss += loss.cpu() * n
            correct += hits
            seen += n
            self._callbacks.on_batch_end(self.t)
        if self.world is not None:
            distributed.broadcast_buffers(self.net, self.world)
        self.epochs_trained += 1
        stats = EpochStats(float(total_loss) / seen, correct / seen)
        self._callbacks.on_epoch_end(HistoryRow(self.t, self._phase, epoch, stats.loss, stats.accuracy,
                                                float(self.optimizer.param_groups[0]["lr"]),
                                                time.perf_counter() - started))
        return stats

    def _global_step_stats(self, loss: torch.Tensor, ok: torch.Tensor, offset: int) -> tuple[torch.Tensor, int, int]:
        """``(mean loss, correct, samples)`` of a step over all ranks; the sampler's padded
        repeats (positions ``offset ..`` of this rank's pass) are left out of the counts."""
        real = self._real[offset:offset + len(ok)].to(ok.device)
        n = int(real.sum())
        total = distributed.all_reduce_sum(torch.tensor([float(loss) * n, float((ok & real).sum()), float(n)],
                                                        dtype=torch.float64), self.world)
        return (total[0] / total[2]).float(), int(total[1]), int(total[2])

    def fit(self, epochs: int, tasks: Sequence[TaskData] | None = None, phase: str | None = None) -> list[EpochStats]:
        """``epochs`` training epochs (:meth:`train_epoch`), of ``phase`` (default: the current one).

        The current task's ``"train"`` epochs follow the validation schedule of
        ``TrainConfig.restore_best`` / ``lr_patience`` when one is set (then fewer epochs may
        run: the schedule stops once the learning rate falls below ``lr_min``).

        Raises:
            ConfigError: the schedule is set and the task has no validation split."""
        cfg = self.config
        if tasks is None and (phase or self._phase) == "train" and (cfg.restore_best or cfg.lr_patience):
            with self.phase("train"):
                return self._fit_on_validation(epochs)
        return [self.train_epoch(tasks, phase) for _ in range(epochs)]

    def validation_loss(self) -> float:
        """Mean loss of the current task on its validation split (eval mode), with the run's
        loss (``TrainConfig.loss``, cross-entropy by default)."""
        return mean_loss(self.net, self.task.val_x, self.task.val_y, self.t, self.config.eval_batch_size,
                         self.config.device, self.task.prepare, self.config.loss)

    def _fit_on_validation(self, epochs: int) -> list[EpochStats]:
        # Every rank measures the whole validation split the same way, so all take the same
        # decisions without a collective.
        cfg = self.config
        if len(self.task.val_y) == 0:
            what = (f"task {self.t} has no validation split, which the validation schedule "
                    "(restoring the best epoch, lowering the learning rate on plateaus) reads")
            raise ConfigError(f"TrainConfig(restore_best=..., lr_patience=...): {what}; give the tasks "
                              "validation data (val_fraction > 0)",
                              cli=f"--restore-best/--lr-patience: {what}; use --val-fraction > 0")
        best_loss, best, patience, stats = math.inf, None, cfg.lr_patience, []
        lr = float(self.optimizer.param_groups[0]["lr"])
        for _ in range(epochs):
            stats.append(self.train_epoch())
            loss = self.validation_loss()
            if loss < best_loss:
                best_loss, patience = loss, cfg.lr_patience
                if cfg.restore_best:
                    best = self._trained_tensors()
            elif cfg.lr_patience:
                patience -= 1
                if patience <= 0:
                    lr /= cfg.lr_factor
                    if lr < cfg.lr_min:
                        break
                    self.scale_lr(1 / cfg.lr_factor)
                    patience = cfg.lr_patience
        if best is not None:
            self._restore_tensors(best)
        return stats

    def _trained_tensors(self) -> tuple[dict, list[torch.Tensor]]:
        """Copies of the network's state and of the method's own trained tensors."""
        return (copy.deepcopy(self.net.state_dict()),
                [p.detach().clone() for p in self.method.own_parameters()])

    def _restore_tensors(self, state: tuple[dict, list[torch.Tensor]]) -> None:
        # The frozen entries have not moved within the task, so restoring them is exact.
        self.net.load_state_dict(state[0])
        with torch.no_grad():
            for p, value in zip(self.method.own_parameters(), state[1]):
                p.copy_(value)

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
    """What a run produced; ``to_dict`` is the content of ``metrics.json``.

    ``network``: the trained ``ContinualNetwork`` (a head per task; ``network(x, t)`` gives
    task t's logits for inputs prepared as the task's ``TaskData.prepare`` does), ``None`` for
    a result rebuilt from a file; ``history``: one :class:`~sparsecl.loggers.HistoryRow` per
    epoch and phase of the tasks learned by this call (neither is part of ``to_dict``)."""

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
    eval_seconds_per_task: list[float] = field(default_factory=list)  # of seconds_per_task: row t, probe check
    network: ContinualNetwork | None = field(default=None, repr=False, compare=False)
    history: list[HistoryRow] = field(default_factory=list, repr=False, compare=False)

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
            **({"eval_seconds_per_task": self.eval_seconds_per_task} if self.eval_seconds_per_task else {}),
            **({"routing": self.routing} if self.routing is not None else {}),
            **({"bits_per_parameter": self.bits_per_parameter} if self.bits_per_parameter else {}),
        }


@dataclass
class RunState:
    """What the task loop carries from one task to the next. With the network and the method's
    ``state()``, it is everything a checkpoint needs to continue a run bit for bit.

    ``rows[t][i]``: test accuracy of task i after task t (i <= t; ``None`` where not measured,
    see ``TrainConfig.eval_every``); ``probes[i]``: task i's probe inputs and the logits
    recorded when it ended; ``capacity``/``reuse``: per layer, one entry per task; ``seconds``:
    wall time per task, of which ``eval_seconds`` measuring (row t and the probe check);
    ``routing``: the task-agnostic results and the latest task classifier (``None`` unless
    routing is on); ``bits``: ``Method.storage`` after each task (key → one value per task;
    empty for methods without per-weight bookkeeping).
    """

    rows: list[list[float | None]] = field(default_factory=list)
    probes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    capacity: dict[str, list[float]] = field(default_factory=dict)
    reuse: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    max_change: float = 0.0
    routing: RoutingRecord | None = None
    bits: dict[str, list[float]] = field(default_factory=dict)
    eval_seconds: list[float] = field(default_factory=list)

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
                "bits": self.bits, "eval_seconds": self.eval_seconds}
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
        routing = None
        if meta.get("routing") is not None:
            from .routing import RoutingRecord

            routing = RoutingRecord.from_checkpoint(tensors, meta["routing"])
        return cls([list(r) for r in meta["rows"]], probes, meta["capacity"], meta["reuse"],
                   list(meta["seconds"]), math.inf if change == "inf" else float(change), routing,
                   {k: list(v) for k, v in meta.get("bits", {}).items()}, list(meta.get("eval_seconds", [])))


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
    i <= t, re-evaluated, never copied forward; with ``config.eval_every``/``eval_tasks`` only
    the new task and the tasks named, the other cells ``None``, and every task after the last)
    and compares every earlier task's logits on its probe batch with those recorded when that
    task ended, after every task whatever ``eval_every``. Any difference is reported as
    ``max_logit_change``; for a method with ``isolates = True`` it raises ``ForgettingError``.
    Each task's test set is read once per run where memory allows (a lazy benchmark's test sets
    are derived without building their tasks and kept, see ``LazyTasks.split``; on a GPU they
    stay on the device), so that the evaluation after task t costs one pass over each evaluated
    test set and nothing else that grows with t.

    ``callbacks``: what reports the run while it learns (``sparsecl.loggers``: the run history,
    TensorBoard; ``sparsecl.console``: progress bars); ``config.progress`` adds a console
    progress bar. ``evaluators``: evaluations run after every task besides the accuracy matrix
    (``sparsecl.evaluators``); by default those ``config`` asks for (``routing``).

    ``world``: this process's place in a data-parallel run launched by torchrun
    (``sparsecl.distributed``); ``None`` trains in one process. After every task the ranks'
    networks, method states and ledgers are compared by checksum (``DistributedStateError`` if
    they differ).
    """

    def __init__(self, method: Method, config: TrainConfig | None = None, world: World | None = None,
                 callbacks: Sequence[Callback] = (), evaluators: Sequence | None = None):
        if not isinstance(method, Method):
            raise ConfigError(f"Trainer(method=...): expected a sparsecl Method (e.g. EideticNets(EideticConfig())), "
                              f"got {type(method).__name__}")
        if config is not None and not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer(config=...): expected a TrainConfig, got {type(config).__name__}")
        self.method = method
        self.config = config or TrainConfig()
        self.world = world
        self.callbacks = list(callbacks)
        self.evaluators = list(evaluators) if evaluators is not None else default_evaluators(self.config, method)
        self._test_sets: TestSets | None = None  # during fit: the run's test sets as the evaluation reads them

    def fit(self, model: nn.Module | ContinualNetwork, benchmark: Benchmark, state: RunState | None = None,
            on_task_end: Callable[[ContinualNetwork, RunState], None] | None = None) -> RunResult:
        """Learn the benchmark's tasks in order and return the run's results, the trained
        network among them (``RunResult.network``).

        ``model``: an ``nn.Module`` (a copy of it is trained, with a head per task: ``model``
        itself is left as it is) or an untrained ``ContinualNetwork`` (trained in place).
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
        if not isinstance(benchmark, Benchmark):
            raise ConfigError(f"Trainer.fit(benchmark=...): expected a sparsecl Benchmark (load_benchmark(...) or "
                              f"Benchmark.from_datasets(...)), got {type(benchmark).__name__}")
        if benchmark.num_tasks == 0:
            raise ConfigError(f"benchmark '{benchmark.name}' has no tasks")
        if state is None:
            if isinstance(model, ContinualNetwork) and model.num_tasks:
                raise ConfigError(f"the network already has heads for {model.num_tasks} tasks; Trainer.fit "
                                  "starts from an untrained network (pass the nn.Module itself) unless "
                                  "it is given the RunState to continue")
            if not isinstance(model, nn.Module):
                raise ConfigError(f"Trainer.fit(model=...): expected a torch.nn.Module, got {type(model).__name__}")
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
        named = parse_eval_tasks(cfg.eval_tasks)
        if named is not None and named[-1] >= T:
            what = f"eval_tasks names task {named[-1]}, but the stream has {T} tasks (0..{T - 1})"
            raise ConfigError(f"TrainConfig(eval_tasks=...): {what}", cli=f"--eval-tasks: {what}")
        lazy = isinstance(benchmark.tasks, LazyTasks)  # its tasks are checked when they start, not built now
        for t in range(state.tasks_done, T):  # refuse a bad task now, not after hours of training
            if not lazy:
                check_task(benchmark.tasks[t], t)
            head = task_header(benchmark.tasks, t)
            if net.single_head and head.num_classes != net.head_weight.shape[0]:
                raise ConfigError(f"single head: task {t} ('{head.name}') has "
                                  f"{head.num_classes} classes but the shared output layer "
                                  f"has {net.head_weight.shape[0]}; every task needs the same number")
        for evaluator in self.evaluators:
            evaluator.begin(benchmark, state)
        history = HistoryRecorder()
        callbacks = [history, *self.callbacks]
        if cfg.progress:
            from .console import ConsoleProgress

            if not any(isinstance(c, ConsoleProgress) for c in callbacks):
                callbacks.append(ConsoleProgress())
        report = CallbackList(callbacks)
        report.on_run_start(T, state.tasks_done)
        self._test_sets = TestSets(benchmark.tasks, cfg.device)
        try:
            with loss_function(net, cfg.loss):
                for t in range(state.tasks_done, T):
                    self._learn_task(net, benchmark, t, state, report)
                    if on_task_end is not None:
                        on_task_end(net, state)
        finally:
            report.on_run_end()
            self._test_sets = None
        return RunResult(state.matrix(T), state.max_change, state.capacity, state.seconds, cfg.describe(),
                         state.reuse, method.name, benchmark.name, dict(benchmark.info),
                         None if state.routing is None else state.routing.to_dict(T), state.bits,
                         state.eval_seconds, network=net, history=history.rows)

    def _learn_task(self, net: ContinualNetwork, benchmark: Benchmark, t: int, state: RunState,
                    report: Callback) -> None:
        """Task t: train it through the method's hooks, measure, evaluate, report."""
        cfg, method = self.config, self.method
        task = benchmark.tasks[t]
        if isinstance(benchmark.tasks, LazyTasks):
            check_task(task, t)
        start = time.perf_counter()
        report.on_task_start(t, task.name, -(-len(task.train_y) // cfg.batch_size))
        net.add_head(task.num_classes)
        method.begin_task(net, t, task)
        session = TaskSession(net, method, t, benchmark.tasks[: t + 1], cfg, report, self.world)
        method.train_task(session)
        method.end_task(session)
        self._record(net, benchmark, t, state)
        for evaluator in self.evaluators:
            evaluator.after_task(net, benchmark, t, state)
        if self.world is not None:
            self._check_ranks(net, t)
        state.seconds.append(time.perf_counter() - start)
        reuse = method.reuse(net)
        units = {name: (counts["owned"], counts["units"]) for name, counts in reuse.items()
                 if "owned" in counts and "units" in counts}
        routed = None
        if state.routing is not None and state.routing.rows and state.routing.rows[-1] is not None:
            routed = list(state.routing.rows[-1])
        measured = [math.nan if a is None else a for a in state.rows[t]]  # NaN: not evaluated after this task
        report.on_task_end(TaskSummary(t, task.name, benchmark.num_tasks, measured,
                                       {name: used[-1] for name, used in state.capacity.items()}, units,
                                       state.seconds[-1], routed))

    def _check_ranks(self, net: ContinualNetwork, t: int) -> None:
        """Every rank must hold the same network (parameters and buffers), method state and
        ledger after task t: selection and pruning are computed on every rank, never sent."""
        tensors, meta = self.method.state()
        checksum = distributed.state_checksum({**{f"net.{k}": v for k, v in net.state_dict().items()},
                                               **{f"method.{k}": v for k, v in tensors.items()}}, meta)
        distributed.check_identical(checksum, self.world, f"after task {t}")

    def _record(self, net: ContinualNetwork, benchmark: Benchmark, t: int, state: RunState) -> None:
        """Row t of the accuracy matrix (the tasks ``config.evaluated_tasks`` names), the bitwise
        check of every earlier task, capacity."""
        cfg, method = self.config, self.method
        started = time.perf_counter()
        tests = self._test_sets if self._test_sets is not None else TestSets(benchmark.tasks, cfg.device)
        net.eval()
        # a copy: a view would keep the task's whole test set alive for the rest of the run
        probe_x = benchmark.tasks[t].test_x[: cfg.probe_size].clone()
        state.probes.append((probe_x, predict(net, tests.probe(t, probe_x), t, cfg.eval_batch_size, cfg.device,
                                              tests.prepare(t)).cpu()))
        row: list[float | None] = [None] * (t + 1)
        for i in cfg.evaluated_tasks(t, benchmark.num_tasks):
            row[i] = self._test_accuracy(net, tests, i)
        state.rows.append(row)
        for i, (px, logits) in enumerate(state.probes[:-1]):
            now = predict(net, tests.probe(i, px), i, cfg.eval_batch_size, cfg.device, tests.prepare(i)).cpu()
            change, same = logit_change(px, now, logits)
            state.max_change = max(state.max_change, change)
            if method.isolates and not same:
                raise ForgettingError(
                    f"method '{method.name}' changed the logits of task {i} while learning "
                    f"task {t} (largest absolute change {change:g}); zero forgetting broke")
        state.eval_seconds.append(time.perf_counter() - started)
        for name, used in method.capacity(net).items():
            state.capacity.setdefault(name, []).append(used)
        for key, bits in method.storage(net).items():
            state.bits.setdefault(key, []).append(bits)
        for name, counts in method.reuse(net).items():
            for key, n in counts.items():
                state.reuse.setdefault(name, {}).setdefault(key, []).append(n)

    @torch.no_grad()  # not inference_mode: a forward pass may cache tensors (masks) that training reuses
    def _test_accuracy(self, net: ContinualNetwork, tests: "TestSets", i: int) -> float:
        """Test accuracy of task ``i`` (eval mode): one pass over its test set in batches of
        ``eval_batch_size``, the correct predictions counted on the device (the logits of
        ``predict``, batch for batch)."""
        cfg = self.config
        x, y = tests.get(i)
        if self.world is not None:
            return accuracy(net, x, y, i, cfg.eval_batch_size, cfg.device, tests.prepare(i), self.world)
        if len(x) == 0:
            raise ConfigError(f"cannot measure accuracy of task {i} on an empty set")
        prepare, size = tests.prepare(i), cfg.eval_batch_size
        correct = torch.zeros((), dtype=torch.long, device=cfg.device)
        for s in range(0, len(x), size):
            logits = net(prepare(x[s:s + size].to(cfg.device)), i)
            correct += (logits.argmax(1) == y[s:s + size].to(cfg.device)).sum()
        return int(correct) / len(x)


class TestSets:
    """The test sets (and probe inputs) of a run's tasks as the evaluation reads them, each
    fetched once where memory allows: a lazy task list derives a test set without building
    its task (``LazyTasks.split``, which keeps it); on an accelerator the tensors are kept on the
    device up to ``budget`` bytes (the first tasks that fit, so a pass over every task does not
    evict what the next pass needs). Prepare functions are made once per task."""

    __test__ = False  # not a pytest class

    def __init__(self, tasks, device: str, budget: int = SPLIT_CACHE_BYTES):
        self.tasks, self.device, self.budget, self.used = tasks, torch.device(device), budget, 0
        self._on_device: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self._prepare: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def _keep(self, key: tuple[str, int], fetch: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if self.device.type == "cpu":
            return fetch()
        if key in self._on_device:
            return self._on_device[key]
        moved = tuple(t.to(self.device) for t in fetch())
        size = sum(t.numel() * t.element_size() for t in moved)
        if self.used + size <= self.budget:
            self._on_device[key], self.used = moved, self.used + size
        return moved

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of task ``i``'s test split, on the device when it was kept there."""
        return self._keep(("test", i), lambda: task_split(self.tasks, i, "test"))

    def probe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Task ``i``'s probe inputs ``x``, on the device when they were kept there."""
        return self._keep(("probe", i), lambda: (x,))[0]

    def prepare(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if i not in self._prepare:
            self._prepare[i] = task_prepare(self.tasks, i)
        return self._prepare[i]


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
