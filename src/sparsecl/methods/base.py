"""The method contract: a few hooks the trainer calls, in this order, for every task t:

    begin_task(net, t, task)     prepare capacity for task t (its head already exists)
    parameters(net, t)           what the task's optimizer may update
    train_task(session)          learn the task, using the services of ``session``
    end_task(session)            select task t's subnetwork and freeze it
    capacity(net)                per-layer fraction of units owned, for the report
    state() / load_state(...)    what the method carries between tasks, for checkpoints
    reuse(net)                   per-layer unit counts of the task just ended, for the report
    storage(net)                 bits per parameter of the per-weight bookkeeping (weight-level)

and, around every optimizer step of every training epoch, ``loss``, ``before_step`` and
``after_step``. A method never reaches into the trainer: everything it may do while learning a
task (train an epoch, measure accuracy, snapshot and roll back) goes through the
``TaskSession`` it is handed (:class:`TaskSession`, the contract; its epochs are rows of the run
history, in the phase the method names with ``session.phase("recovery")``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from ..data.types import TaskData
    from ..network import ContinualNetwork


def config_field(help: str, choices: tuple[str, ...] | None = None, **kw):
    """A method config's dataclass field with its CLI help (and, where given, the values
    ``sparsecl run`` offers as choices), ``kw`` passed to ``dataclasses.field``."""
    return field(metadata={"help": help, **({"choices": choices} if choices else {})}, **kw)


class TaskSession(Protocol):
    """What a method may use while it learns task ``t`` (the trainer's ``TaskSession`` is one):
    the network, the task and the tasks seen so far, the run's ``TrainConfig``, the task's
    optimizer, and these services. Declared here so that methods depend on this contract, not
    on the trainer."""

    net: "ContinualNetwork"
    t: int
    task: "TaskData"
    seen: Sequence["TaskData"]
    config: Any  # sparsecl.config.TrainConfig
    optimizer: torch.optim.Optimizer
    world: Any  # sparsecl.distributed.World, or None in one process
    epochs_trained: int

    def batches(self, tasks: Sequence["TaskData"] | None = None, split: str = "train", shuffle: bool = True,
                batch_size: int | None = None, augment: bool | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...

    def train_epoch(self, tasks: Sequence["TaskData"] | None = None, phase: str | None = None) -> Any: ...

    def fit(self, epochs: int, tasks: Sequence["TaskData"] | None = None, phase: str | None = None) -> list: ...

    def phase(self, name: str) -> AbstractContextManager: ...

    def report(self, accuracy: float, loss: float | None = None, seconds: float = 0.0) -> None: ...

    def accuracy(self, split: str = "train", max_samples: int | None = None) -> float: ...

    def set_lr(self, lr: float) -> None: ...

    def scale_lr(self, factor: float) -> None: ...

    def snapshot(self) -> Any: ...

    def rollback(self, state: Any) -> None: ...


class Method:
    """Base class: plain training of the current head and the whole body (fine-tuning)."""

    name: ClassVar[str] = "base"
    #: True when the method promises zero forgetting; the trainer then treats any change of an
    #: earlier task's logits as an error.
    isolates: ClassVar[bool] = False
    #: True when each task computes its features with a subnetwork of its own (weight-level
    #: methods): a sample's features then depend on the task it is routed to.
    features_per_task: ClassVar[bool] = False
    #: The most tasks the method can learn (a limit of its bookkeeping, e.g. the integer type of
    #: its per-weight owner ids); ``None``: no fixed limit. The trainer refuses a longer stream
    #: before task 0 rather than failing at the task past the limit.
    max_tasks: ClassVar[int | None] = None

    def setup(self, net: "ContinualNetwork") -> None:
        """Called once, before the first task."""

    def begin_task(self, net: "ContinualNetwork", t: int, task: "TaskData") -> None:
        """Called when task ``t`` starts, after its head was added."""

    def parameters(self, net: "ContinualNetwork", t: int) -> Iterator[nn.Parameter]:
        """Parameters handed to task ``t``'s optimizer: the body and the task's own head."""
        yield from net.body.parameters()
        yield from net.head_parameters(t)

    def own_parameters(self) -> list[nn.Parameter]:
        """Parameters the method trains that are not the network's (WSN's scores); under DDP
        their gradients are all-reduced with the network's."""
        return []

    def loss(self, net: "ContinualNetwork", x: torch.Tensor, y: torch.Tensor,
             tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss of a batch and a bool ``(N,)`` tensor of correct predictions."""
        return net.task_loss(x, y, tasks)

    def before_step(self, net: "ContinualNetwork") -> None:
        """After ``backward``, before ``optimizer.step()``."""

    def after_step(self, net: "ContinualNetwork") -> None:
        """Right after ``optimizer.step()``."""

    def train_task(self, session: "TaskSession") -> None:
        """Learn the current task; by default, the configured number of epochs."""
        session.fit(session.config.epochs)

    def end_task(self, session: "TaskSession") -> None:
        """Called after training; isolation methods select and freeze here."""

    def capacity(self, net: "ContinualNetwork") -> dict[str, float]:
        """Fraction of each unit group's units in use after the current task. A method without
        isolation uses (and overwrites) every unit."""
        return {name: 1.0 for name in net.graph.groups}

    def reuse(self, net: "ContinualNetwork") -> dict[str, dict[str, int]]:
        """Per unit layer, for the task that just ended: ``units`` (layer width), ``owned``
        (units the task took), ``free`` (units left) and ``reused`` (units of earlier tasks the
        task's units read). Empty for methods that do not assign units."""
        return {}

    def storage(self, net: "ContinualNetwork") -> dict[str, float]:
        """Bits per masked weight needed to run every task learned so far, for the report:
        ``raw``, ``coded`` (entropy-coded), ``stored`` (the smaller) and ``entropy`` (the Shannon
        bound). Empty for methods without per-weight bookkeeping."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What the method carries from one task to the next, taken at a task boundary:
        ``(tensors, JSON-serializable metadata)``, for a checkpoint."""
        return {}, {}

    def load_state(self, net: "ContinualNetwork", tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore ``state()`` into a method that was ``setup`` on a restored ``net``."""
