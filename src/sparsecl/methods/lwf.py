"""Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI
2018): while task t trains, every earlier task's head keeps answering the new task's images as it
did before task t began, by knowledge distillation (Hinton et al. 2015) on its outputs:

    L = L_new(y, y^_t) + lambda_o * sum_{i < t} L_old(y_o,i, y^_o,i)                     (Sec. 3)

with y_o,i the outputs of head i of the network as it was before task t (recorded by a frozen
copy of it, evaluated on each training batch: the paper records them once before training,
which is the same without augmentation), and L_old the cross-entropy between the two
temperature-softened distributions y' = softmax(logits / T). Here L_old is the
Kullback-Leibler divergence KL(y'_o || y^'_o), which differs from the paper's cross-entropy by the
entropy of the recorded targets, a constant: the gradients are the same, and the loss is zero
when the old heads answer as before. The shared body, the old heads and the new head are all
trained (the paper's theta_s, theta_o, theta_n); the paper's optional warm-up first trains the new
head alone (``lwf_warmup_epochs``).

Forgets by design: not an isolation method; the trainer reports its forgetting and BWT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .base import Method, config_field as _opt


@dataclass
class LwFConfig:
    """LwF hyperparameters; defaults are the paper's (Sec. 3: lambda_o = 1, temperature T = 2).
    The paper warms the new head up "to convergence" before training everything; the number
    of warm-up epochs is not given, so it is off by default (as in FACIL)."""

    lwf_lambda: float = _opt("weight lambda_o of the distillation loss of the old heads", default=1.0)
    lwf_temperature: float = _opt("distillation temperature T", default=2.0)
    lwf_warmup_epochs: int = _opt("epochs training the new task's head alone before everything is trained",
                                  default=0)

    def __post_init__(self) -> None:
        if not self.lwf_lambda >= 0:
            raise ConfigError(f"--lwf-lambda must be non-negative, got {self.lwf_lambda}")
        if not self.lwf_temperature > 0:
            raise ConfigError(f"--lwf-temperature must be above 0, got {self.lwf_temperature}")
        if self.lwf_warmup_epochs < 0:
            raise ConfigError(f"--lwf-warmup-epochs must be >= 0, got {self.lwf_warmup_epochs}")


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of KL(softmax(old / T) || softmax(new / T)); logits ``(N, C)``.
    Zero when ``new_logits`` equal ``old_logits``; its gradient in ``new_logits`` is that of
    the paper's cross-entropy L_old (Li & Hoiem, Sec. 3, Eq. 2)."""
    target = F.log_softmax(old_logits / temperature, -1)
    return F.kl_div(F.log_softmax(new_logits / temperature, -1), target, reduction="batchmean", log_target=True)


class LwF(Method):
    name = "lwf"

    def __init__(self, config: LwFConfig | None = None):
        self.config = config or LwFConfig()
        self.old: nn.Module | None = None  # the network before the current task, frozen
        self._head_only = False

    def parameters(self, net, t: int) -> Iterator[nn.Parameter]:
        """The body and every task's head: the old heads learn too (Li & Hoiem's theta_o)."""
        yield from net.body.parameters()
        seen: set[int] = set()  # a single head's shared weight belongs to every task
        for i in range(t + 1):
            for p in net.head_parameters(i):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def begin_task(self, net, t: int, task) -> None:
        self.old = None
        if t > 0:
            self.old = copy.deepcopy(net).eval()
            self.old.requires_grad_(False)

    def loss(self, net, x: torch.Tensor, y: torch.Tensor,
             tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the current task's head plus ``lwf_lambda`` times the distillation of
        every earlier head (the batch is the current task's, as every training pass of LwF)."""
        if self.old is None:
            return net.task_loss(x, y, tasks)
        t = net.num_tasks - 1
        h = net.features(x, t)
        logits = net.head_logits(h, t)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            old_h = self.old.features(x, t)
        for i in range(t):
            with torch.no_grad():
                target = self.old.head_logits(old_h, i)
            loss = loss + self.config.lwf_lambda * distillation(net.head_logits(h, i), target,
                                                                 self.config.lwf_temperature)
        return loss, logits.argmax(1) == y

    @torch.no_grad()
    def before_step(self, net) -> None:
        if self._head_only:  # warm-up: a parameter without a gradient is left alone by every optimizer
            head = {id(p) for p in net.head_parameters(net.num_tasks - 1)}
            for p in self.parameters(net, net.num_tasks - 1):
                if id(p) not in head:
                    p.grad = None

    def train_task(self, session) -> None:
        if self.old is not None and self.config.lwf_warmup_epochs:
            self._head_only = True
            try:
                session.fit(self.config.lwf_warmup_epochs)
            finally:
                self._head_only = False
        session.fit(session.config.epochs)

    def end_task(self, session) -> None:
        self.old = None  # the next task copies the network as it is then
