"""In-memory task and benchmark containers shared by the readers, the trainer and the methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TaskData:
    """One task of a continual-learning benchmark, held in memory.

    Images are ``uint8`` tensors of shape ``(N, C, H, W)`` with pixel values 0..255 (the batch
    iterator scales them to [0, 1]) or ``float32`` tensors already scaled. Labels are ``int64``
    of shape ``(N,)`` holding *task-local* class indices ``0 .. num_classes - 1``; ``classes[k]``
    is the original dataset label of local class ``k``.
    """

    task_id: int
    name: str
    classes: tuple[int, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Benchmark:
    """An ordered stream of tasks plus what is needed to reproduce it (``info``: seed, class order,
    whether the first permuted-MNIST task is permuted, sizes...)."""

    name: str
    tasks: list[TaskData]
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)
