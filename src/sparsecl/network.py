"""A user's model prepared for continual learning: traced body plus one head per task."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ConfigError
from .graph import UnitGraph, trace


class ContinualNetwork(nn.Module):
    """Wraps a user's ``nn.Module`` whose last operation is an ``nn.Linear``.

    The model is traced (``graph.trace``): its body computes the features, shape
    ``(N, graph.head_in_features)``, and its final Linear is replaced by ``heads``, one
    ``nn.Linear`` per task, created when the task begins (the number of tasks is open-ended).
    The forward pass is the plain dense body: no masks (DESIGN §2.5).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.body, self.graph, prototype = trace(copy.deepcopy(model))
        self.heads = nn.ModuleList()
        # Follows .to(): new heads take the device and dtype of the model's final Linear.
        self.register_buffer("_head_like", prototype.weight.new_empty(0), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def add_head(self, num_classes: int) -> nn.Linear:
        """Append a freshly initialized head with ``num_classes`` outputs; returns it."""
        if num_classes < 1:
            raise ConfigError(f"a task head needs at least one class, got num_classes={num_classes}")
        like = self._head_like
        head = nn.Linear(self.graph.head_in_features, num_classes, bias=self.graph.head_bias,
                         device=like.device, dtype=like.dtype)
        self.heads.append(head)
        return head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape ``(N, head_in_features)``."""
        return self.body(x)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < len(self.heads):
            raise ConfigError(f"task id {task} is out of range: the network has heads for tasks "
                              f"0..{len(self.heads) - 1}")

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task ``task``'s head, shape ``(N, num_classes_of_task)``."""
        self._check_task(task)
        return self.heads[task](self.body(x))

    def task_loss(self, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of a batch whose samples may belong to different tasks.

        ``x``: inputs ``(N, ...)``; ``y``: task-local labels ``(N,)``; ``tasks``: task id of each
        sample ``(N,)``. Each sample is scored by its own task's head. Returns ``(loss, correct)``,
        ``correct`` a bool tensor ``(N,)`` telling whether the sample was classified right.
        """
        h = self.body(x)
        task_ids = tasks.unique()
        if len(task_ids) == 1:
            logits = self.heads[int(task_ids[0])](h)
            return nn.functional.cross_entropy(logits, y), logits.argmax(1) == y
        loss = h.new_zeros(())
        correct = torch.empty_like(y, dtype=torch.bool)
        for t in task_ids.tolist():
            sel = tasks == t
            logits = self.heads[t](h[sel])
            loss = loss + nn.functional.cross_entropy(logits, y[sel], reduction="sum")
            correct[sel] = logits.argmax(1) == y[sel]
        return loss / len(y), correct
