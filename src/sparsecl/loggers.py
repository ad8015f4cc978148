"""What a run reports while it learns, through callbacks the trainer calls (it knows none of them):
the run history ``history.csv`` (always, in a run folder), TensorBoard scalars (optional).

The trainer calls, on every callback of ``Trainer(..., callbacks=[...])``:

    on_run_start(num_tasks, first_task)    before the first task to learn (``first_task`` > 0 when resuming)
    on_task_start(t, name, batches)        task t starts; ``batches`` per training epoch of the task
    on_epoch_start(t, phase, epoch, batches)   a training epoch starts
    on_batch_end(t)                        after every optimizer step of a training epoch
    on_epoch_end(row)                      a :class:`HistoryRow`: one per epoch and phase
    on_task_end(summary)                   a :class:`TaskSummary`: accuracies, capacity, seconds
    on_run_end()                           after the last task, or when the run stops with an error

A method says which phase its epochs belong to with ``session.phase("recovery")`` (train,
recovery, finetune, theta-scan; ``"train"`` by default).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Sequence

#: The phases of a task a history row can belong to.
PHASES = ("train", "recovery", "finetune", "theta-scan")
HISTORY_NAME = "history.csv"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class HistoryRow:
    """One epoch (or one measured step of a scan) of one phase of task ``task``.

    ``epoch``: 1, 2, ... within the task and phase; ``loss``: mean training loss of the epoch
    (``None`` for a step that trained nothing, e.g. a θ scan's measurement); ``accuracy``: the
    running training accuracy of the epoch (train mode), or the measured accuracy of a scan step,
    a fraction; ``lr``: the optimizer's learning rate at the end of the epoch (its first
    parameter group); ``seconds``: wall time of the epoch."""

    task: int
    phase: str
    epoch: int
    loss: float | None
    accuracy: float
    lr: float
    seconds: float


@dataclass
class TaskSummary:
    """Task ``task`` (named ``name``) has ended: ``accuracies[i]`` test accuracy of task i <= task,
    ``capacity`` the fraction of each unit group in use, ``units`` per group ``(units kept by
    this task, units)`` where the method assigns units, ``seconds`` the task's wall time,
    ``routed`` the task-agnostic accuracies when routing is on."""

    task: int
    name: str
    num_tasks: int
    accuracies: list[float]
    capacity: dict[str, float]
    units: dict[str, tuple[int, int]]
    seconds: float
    routed: list[float | None] | None = None


class Callback:
    """Base class: every hook does nothing."""

    def on_run_start(self, num_tasks: int, first_task: int) -> None:
        pass

    def on_task_start(self, t: int, name: str, batches: int) -> None:
        pass

    def on_epoch_start(self, t: int, phase: str, epoch: int, batches: int) -> None:
        pass

    def on_batch_end(self, t: int) -> None:
        pass

    def on_epoch_end(self, row: HistoryRow) -> None:
        pass

    def on_task_end(self, summary: TaskSummary) -> None:
        pass

    def on_run_end(self) -> None:
        pass


class CallbackList(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_run_start(self, num_tasks, first_task):
        for c in self.callbacks:
            c.on_run_start(num_tasks, first_task)

    def on_task_start(self, t, name, batches):
        for c in self.callbacks:
            c.on_task_start(t, name, batches)

    def on_epoch_start(self, t, phase, epoch, batches):
        for c in self.callbacks:
            c.on_epoch_start(t, phase, epoch, batches)

    def on_batch_end(self, t):
        for c in self.callbacks:
            c.on_batch_end(t)

    def on_epoch_end(self, row):
        for c in self.callbacks:
            c.on_epoch_end(row)

    def on_task_end(self, summary):
        for c in self.callbacks:
            c.on_task_end(summary)

    def on_run_end(self):
        for c in self.callbacks:
            c.on_run_end()


class HistoryRecorder(Callback):
    """Keeps the rows in memory (``rows``): ``RunResult.history`` of the Python API."""

    def __init__(self) -> None:
        self.rows: list[HistoryRow] = []

    def on_epoch_end(self, row: HistoryRow) -> None:
        self.rows.append(row)


class CSVHistory(Callback):
    """Appends every :class:`HistoryRow` to ``path`` (``history.csv``: columns task, phase, epoch,
    loss, accuracy, lr, seconds), flushed row by row so that an interrupted run keeps its rows.

    ``keep_tasks_below``: a resumed run first drops the rows of the task that was interrupted
    (task ``>= keep_tasks_below``), which is learned again from its start; the file is then
    rewritten atomically.
    """

    def __init__(self, path: Path, keep_tasks_below: int | None = None):
        self.path = Path(path)
        self._file = None
        self._keep = keep_tasks_below

    def _open(self):
        if self._file is not None:
            return self._file
        columns = [f.name for f in fields(HistoryRow)]
        if self._keep is not None and self.path.exists():
            from .atomic import write_atomic

            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("task", "").isdigit() and int(r["task"]) < self._keep]
            text = io.StringIO()
            writer = csv.DictWriter(text, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in columns} for r in kept)
            write_atomic(self.path, lambda f: f.write(text.getvalue().encode()))
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        if fresh:
            csv.writer(self._file, lineterminator="\n").writerow(columns)
        return self._file

    def on_run_start(self, num_tasks, first_task):
        self._open()

    def on_epoch_end(self, row: HistoryRow) -> None:
        f = self._open()
        values = ["" if v is None else (repr(float(v)) if isinstance(v, float) else v) for v in astuple(row)]
        csv.writer(f, lineterminator="\n").writerow(values)
        f.flush()

    def on_run_end(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


@dataclass
class TensorBoardLogger(Callback):
    """Writes scalars to TensorBoard event files under ``log_dir`` (the ``tensorboard``
    package's ``SummaryWriter``, imported when the first scalar is written):

    * ``task{t}/{phase}/loss``, ``task{t}/{phase}/accuracy``, ``task{t}/{phase}/lr`` at step
      ``epoch`` (one curve per task and phase);
    * ``accuracy/task{i}`` (test accuracy of task i) and ``accuracy/mean`` at step t after every
      task t, ``capacity/{group}`` (fraction in use) at step t.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed (``pip install tensorboard``).
    """

    log_dir: Path
    _writer: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)
        writer_class()  # refuse a missing package before the run starts

    @property
    def writer(self):
        if self._writer is None:
            self._writer = writer_class()(log_dir=str(self.log_dir))
        return self._writer

    def on_epoch_end(self, row: HistoryRow) -> None:
        prefix = f"task{row.task}/{row.phase}"
        if row.loss is not None:
            self.writer.add_scalar(f"{prefix}/loss", row.loss, row.epoch)
        self.writer.add_scalar(f"{prefix}/accuracy", row.accuracy, row.epoch)
        self.writer.add_scalar(f"{prefix}/lr", row.lr, row.epoch)

    def on_task_end(self, summary: TaskSummary) -> None:
        t = summary.task
        measured = [(i, acc) for i, acc in enumerate(summary.accuracies) if not math.isnan(acc)]  # --eval-every
        for i, acc in measured:
            self.writer.add_scalar(f"accuracy/task{i}", acc, t)
        self.writer.add_scalar("accuracy/mean", sum(a for _, a in measured) / len(measured), t)
        for name, used in summary.capacity.items():
            self.writer.add_scalar(f"capacity/{name}", used, t)
        self.writer.flush()

    def on_run_end(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard`` package.

    Raises:
        ConfigError: the package is missing."""
    from .errors import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("TensorBoard logging needs the tensorboard package: pip install tensorboard",
                          cli="--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter
