"""Measuring a continual network: logits, accuracy and loss of a task (task id given)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from . import distributed
from .errors import ConfigError

if TYPE_CHECKING:
    from .data.types import Benchmark
    from .distributed import World
    from .network import ContinualNetwork


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 → float32 in [0, 1]; float input is returned unchanged. The input
    pipeline of a task without normalization (``TaskData.prepare`` with ``normalize=None``)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


@torch.no_grad()
def predict(net: "ContinualNetwork", x: torch.Tensor, task: int, batch_size: int, device: str,
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


def accuracy(net: "ContinualNetwork", x: torch.Tensor, y: torch.Tensor, task: int,
             batch_size: int, device: str, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
             world: "World | None" = None) -> float:
    """Fraction of ``x`` classified as ``y`` by task ``task``'s head (eval mode); ``prepare`` as
    in :func:`predict` (pass the task's ``TaskData.prepare``). With ``world``, each rank
    measures its shard and the correct counts are summed: every rank returns the same value.

    Raises:
        ConfigError: ``x`` is empty."""
    if len(x) == 0:
        raise ConfigError(f"cannot measure accuracy of task {task} on an empty set")
    if world is None:
        return int((predict(net, x, task, batch_size, device, prepare).argmax(1).cpu() == y).sum()) / len(x)
    part = distributed.shard(len(x), world)
    correct = 0
    if part.stop > part.start:
        correct = int((predict(net, x[part], task, batch_size, device, prepare).argmax(1).cpu() == y[part]).sum())
    return float(distributed.all_reduce_sum(torch.tensor(correct, dtype=torch.float64), world)) / len(x)


@torch.no_grad()
def mean_loss(net: "ContinualNetwork", x: torch.Tensor, y: torch.Tensor, task: int, batch_size: int, device: str,
              prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
              loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean loss of task ``task``'s head over ``(x, y)`` in eval mode: ``loss(logits, labels)``
    (a batch mean, weighted by the batch's size) or cross-entropy when ``None``; ``prepare`` as in
    :func:`predict`. Summed in float64, so one call always gives the same value.

    Raises:
        ConfigError: ``x`` is empty."""
    if len(x) == 0:
        raise ConfigError(f"cannot measure the loss of task {task} on an empty set")
    loss = loss or torch.nn.functional.cross_entropy
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits = predict(net, x[i:i + batch_size], task, batch_size, device, prepare)
        total += float(loss(logits, y[i:i + batch_size].to(logits.device))) * len(logits)
    return total / len(x)


def evaluate(net: "ContinualNetwork", benchmark: "Benchmark", batch_size: int = 1024,
             device: str | None = None) -> list[float]:
    """Test accuracy of every task the network has a head for, task ``i`` of ``benchmark`` on
    head ``i`` (task id given), each task's input pipeline applied; a list of fractions.

    Raises:
        ConfigError: the benchmark has fewer tasks than the network has heads."""
    if benchmark.num_tasks < net.num_tasks:
        raise ConfigError(f"the network has heads for {net.num_tasks} tasks but benchmark '{benchmark.name}' "
                          f"has {benchmark.num_tasks}")
    device = device or str(next(net.parameters()).device)
    return [accuracy(net, task.test_x, task.test_y, i, batch_size, device, task.prepare)
            for i, task in enumerate(benchmark.tasks[: net.num_tasks])]
