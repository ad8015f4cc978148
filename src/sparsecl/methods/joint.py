"""Joint (multitask) training: after each task t, train on the union of the training data of tasks
0..t at once, every sample through its own task's head. Not continual learning — it keeps all the
data — but the upper bound that continual methods are compared with."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from .base import Method


class Joint(Method):
    name = "joint"

    def parameters(self, net, t: int) -> Iterator[nn.Parameter]:
        yield from net.body.parameters()
        for head in net.heads[: t + 1]:
            yield from head.parameters()

    def train_task(self, session) -> None:
        session.fit(session.config.epochs, tasks=session.seen)
