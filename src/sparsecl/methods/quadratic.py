"""The quadratic penalty of the regularization baselines (EWC, SI): beside the task loss, every
parameter the current task trains is pulled towards an anchor, in proportion to its importance,

    penalty(theta) = strength * ( sum_k Omega_k (theta_k - anchor_k)^2  +  offset )

(EWC: Kirkpatrick et al. 2017, Eq. 3, strength lambda/2 and Omega the Fisher; SI: Zenke et al.
2017, Eq. 4, strength c and Omega the path-integral importance). ``offset`` is a constant that
keeps the value equal to a sum of several such penalties merged into one (EWC's one penalty per
earlier task); it moves no parameter.

The penalty's gradient ``2 * strength * Omega * (theta - anchor)`` is added to the parameters'
gradients in closed form after the backward pass (``before_step``) instead of through autograd:
it is exact, costs three element-wise operations per parameter, and leaves in ``.grad`` the task
loss's own gradient until then (SI's path integral needs it). Under DDP the task gradients are
all-reduced during the backward pass and the penalty's, the same on every rank, is added after.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..errors import CheckpointError
from .base import Method


class QuadraticPenalty(Method):
    """Keeps ``importance`` (Omega) and ``anchor`` tensors per parameter name (the names of
    ``ContinualNetwork.named_parameters()``, each tensor the parameter's shape) and the constant
    ``offset``; subclasses set them in ``end_task`` and define ``strength``.

    Only the parameters the current task's optimizer updates (``parameters(net, t)``) are
    penalized: an earlier task's own head is never trained again, so its importance is kept (it
    costs one head) but never enters the sum."""

    def __init__(self) -> None:
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.offset = 0.0
        self._trained: list[tuple[str, nn.Parameter]] = []
        self._pending: list[tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def strength(self) -> float:
        """The factor in front of the sum (EWC: lambda / 2; SI: c)."""
        raise NotImplementedError

    def begin_task(self, net, t: int, task) -> None:
        self._trained = self.trained_parameters(net, t)
        self._pending = []

    def trained_parameters(self, net, t: int) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter task ``t``'s optimizer updates, in the
        network's order."""
        ids = {id(p) for p in self.parameters(net, t)}
        return [(name, p) for name, p in net.named_parameters() if id(p) in ids]

    def penalized(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The current task's trained parameters that have an importance (none on task 0)."""
        return ((name, p) for name, p in self._trained if name in self.importance)

    @torch.no_grad()
    def penalty(self) -> torch.Tensor | float:
        """The penalty's value for the current parameters: a 0-d tensor on the parameters'
        device (the float 0.0 before any task ended)."""
        total = None
        for name, p in self.penalized():
            part = (self.importance[name] * (p - self.anchor[name]) ** 2).sum()
            total = part if total is None else total + part
        return 0.0 if total is None else self.strength * (total + self.offset)

    @torch.no_grad()
    def penalty_gradient(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """``d penalty / d p`` = ``2 * strength * Omega * (p - anchor)``, the shape of ``p``."""
        return (2 * self.strength) * self.importance[name] * (p - self.anchor[name])

    def loss(self, net, x: torch.Tensor, y: torch.Tensor,
             tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss plus the penalty's value (a constant here: its gradient is added by
        ``before_step``, computed now from the same parameters)."""
        loss, correct = net.task_loss(x, y, tasks)
        self._pending = []
        value = None
        with torch.no_grad():
            for name, p in self.penalized():
                d = p - self.anchor[name]
                grad = (2 * self.strength) * self.importance[name] * d
                part = (grad * d).sum() / 2
                value = part if value is None else value + part
                self._pending.append((p, grad))
        if value is None:
            return loss, correct
        return loss + (value + self.strength * self.offset).to(loss.dtype), correct

    @torch.no_grad()
    def before_step(self, net) -> None:
        for p, grad in self._pending:  # out of place: the task gradient tensor stays as it was
            p.grad = grad if p.grad is None else p.grad + grad
        self._pending = []

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"importance.{k}": v for k, v in self.importance.items()}
        tensors.update({f"anchor.{k}": v for k, v in self.anchor.items()})
        return tensors, {"offset": self.offset}

    def load_state(self, net, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        params = dict(net.named_parameters())
        importance = {k[len("importance."):]: v for k, v in tensors.items() if k.startswith("importance.")}
        anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}
        if importance.keys() != anchor.keys():
            missing = sorted(importance.keys() ^ anchor.keys())
            raise CheckpointError(f"method '{self.name}': the checkpoint has an importance without an anchor "
                                  f"(or the reverse) for parameter(s) {', '.join(missing)}")
        for name, value in importance.items():
            if name not in params or params[name].shape != value.shape or anchor[name].shape != value.shape:
                have = "no such parameter" if name not in params else f"the network's is {tuple(params[name].shape)}"
                raise CheckpointError(f"method '{self.name}': the saved importance of parameter '{name}' has shape "
                                      f"{tuple(value.shape)}; {have}")
        device = lambda name: params[name].device  # noqa: E731
        self.importance = {k: v.to(device(k)) for k, v in importance.items()}
        self.anchor = {k: v.to(device(k)) for k, v in anchor.items()}
        self.offset = float(meta.get("offset", 0.0))
