"""Single-task training: a fresh network per task ("Single Task SGD" of CLNP's Table 1, Golkar,
Kagan & Cho, "Continual Learning via Neural Pruning", 2019: 98.48 +- 0.05% on 10-task Permuted
MNIST). Each task trains a freshly initialized body and its own head; when the task ends its body
is kept (``ContinualNetwork.keep_task_body``) and computes that task's features from then on, so
an earlier task's logits never change: the upper bound of task-incremental learning, at T times
the parameters."""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method


def task_seed(seed: int, t: int) -> int:
    """The seed of task ``t``'s initialization in a run seeded ``seed`` (stable across processes
    and platforms)."""
    digest = hashlib.sha256(repr(("single-task", int(seed), int(t))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def reinitialize(body: nn.Module, seed: int) -> None:
    """Draw fresh values for every parameter and buffer of ``body``, in place (the tensors keep
    their identity, so an optimizer built on them stays valid): each module's own
    ``reset_parameters()`` on a CPU copy, under a torch generator seeded with ``seed`` (the global
    RNG is left as it was, and the values do not depend on the device).

    Raises:
        ConfigError: a module holding parameters has no ``reset_parameters()``.
    """
    fresh = copy.deepcopy(body).cpu()
    for name, module in fresh.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not hasattr(module, "reset_parameters"):
            raise ConfigError(f"single-task cannot re-initialize layer '{name}' ({type(module).__name__}): it has "
                              "parameters but no reset_parameters()")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for target, value in zip(body.state_dict(keep_vars=True).values(), fresh.state_dict().values()):
        target.copy_(value)


class SingleTask(Method):
    """A network of its own per task. Task 0 trains the run's initial body; task t > 0
    re-initializes the body (seeded by the run's seed and t, ``task_seed``) and trains it with
    its own head; ``end_task`` keeps a copy of the trained body for the task. Earlier tasks'
    bodies and heads are never handed to an optimizer, so their logits stay bitwise equal
    (``isolates``). Capacity is reported as full: each task uses every unit of its network."""

    name = "single-task"
    isolates = True
    features_per_task = True  # each task reads its own body: no shared feature pass to route on

    def setup(self, net) -> None:
        if net.single_head:
            raise ConfigError("single-task trains a separate network per task, output layer included; "
                              "drop --single-head")

    def train_task(self, session) -> None:
        if session.t > 0:
            reinitialize(session.net.body, task_seed(session.config.seed, session.t))
        session.fit(session.config.epochs)

    def end_task(self, session) -> None:
        session.net.keep_task_body(session.t, copy.deepcopy(session.net.body))
