"""Synaptic Intelligence (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic
Intelligence", ICML 2017): while a task trains, each parameter accumulates its contribution to the
drop of the task loss along the training path,

    omega_k = sum over steps of  -g_k * delta theta_k                                  (Eq. 3)

g the gradient of the task loss alone (without the penalty) before the step and delta theta the
step's change of the parameter. When the task ends the importance grows by

    Omega_k <- Omega_k + omega_k / (Delta_k^2 + xi)                                    (Eq. 5)

Delta_k the parameter's total change over the task, and later tasks pay

    L(theta) = L_t(theta) + c * sum_k Omega_k (theta_k - theta~_k)^2                     (Eq. 4)

theta~ the parameters at the end of the previous task. As the authors' code (ganguli-lab/pathint)
the importance is clipped at zero after each task, so that the penalty stays bounded below.

Forgets by design: not an isolation method; the trainer reports its forgetting and BWT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import config_field as _opt
from .quadratic import QuadraticPenalty


@dataclass
class SIConfig:
    """SI hyperparameters; defaults are the paper's Permuted MNIST values (Sec. 5.2: xi = 0.1,
    and c = 0.1 from a coarse grid search on held-out data; CLNP Table 1 quotes 97.2% for SI on
    10-task Permuted MNIST). The paper's Split MNIST uses c = 1, xi = 1e-3 (Sec. 5.1), its
    split CIFAR-10/100 c = 0.1, xi = 1e-3 (Sec. 5.3)."""

    si_c: float = _opt("strength c of the penalty c * sum Omega (theta - theta~)^2", default=0.1)
    si_xi: float = _opt("damping xi of the importance Omega += omega / (Delta^2 + xi)", default=0.1)

    def __post_init__(self) -> None:
        if not self.si_c >= 0:
            raise ConfigError(f"--si-c must be non-negative, got {self.si_c}")
        if not self.si_xi > 0:
            raise ConfigError(f"--si-xi must be above 0 (it keeps omega / (Delta^2 + xi) finite), got {self.si_xi}")


class SI(QuadraticPenalty):
    name = "si"

    def __init__(self, config: SIConfig | None = None):
        super().__init__()
        self.config = config or SIConfig()
        self.omega: dict[str, torch.Tensor] = {}  # this task's path integral, per trained parameter
        self._start: dict[str, torch.Tensor] = {}  # parameters when the task began
        self._before: list[tuple[str, torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    @property
    def strength(self) -> float:
        return self.config.si_c

    def begin_task(self, net, t: int, task) -> None:
        super().begin_task(net, t, task)
        self.omega = {name: torch.zeros_like(p) for name, p in self._trained}
        self._start = {name: p.detach().clone() for name, p in self._trained}

    @torch.no_grad()
    def before_step(self, net) -> None:
        # .grad holds the task loss's gradient until the penalty's is added (QuadraticPenalty); a
        # copy, since an optimizer may change .grad in place
        self._before = [(name, p, p.grad.clone(), p.detach().clone())
                        for name, p in self._trained if p.grad is not None]
        super().before_step(net)

    @torch.no_grad()
    def after_step(self, net) -> None:
        for name, p, g, old in self._before:
            self.omega[name] -= g * (p - old)
        self._before = []

    @torch.no_grad()
    def end_task(self, session) -> None:
        """Eq. 5: fold the task's path integral into the importance; the anchor becomes the
        parameters now."""
        for name, p in self._trained:
            delta = p.detach() - self._start[name]
            gain = self.omega[name] / (delta * delta + self.config.si_xi)
            old = self.importance.get(name)
            self.importance[name] = (gain if old is None else old + gain).clamp_(min=0)
            self.anchor[name] = p.detach().clone()
        self.omega, self._start = {}, {}
