"""PackNet (Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative
Pruning", CVPR 2018): train task t on the free weights (reading every earlier task's frozen
weights), prune a fraction of the task's new weights per layer by magnitude, retrain the
survivors briefly, freeze them. Task t evaluates with the weights of tasks <= t (one owner id per
weight, no masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CapacityError, ConfigError
from .base import config_field as _opt
from .weight import WeightIsolation


DEFAULT_PRUNE = 0.75


@dataclass
class PackNetConfig:
    """PackNet hyperparameters; defaults from the reference code (arunmallya/packnet: prune 0.75
    of each new task's weights, 10 retraining epochs at a tenth of the learning rate). Unlike the
    reference, which freezes biases and BatchNorm after the first task, every task keeps its own
    (DESIGN §5). ``shares`` N replaces the fixed ratio by an equal split of the capacity among N
    planned tasks (task t keeps 1/(N - t) of the weights free when it starts): with a fixed 0.75,
    task t owns 0.25 * 0.75^t of each layer (1.9% for the tenth task), with N = 10 each owns 10%."""

    prune: float | None = _opt("fraction of the task's new weights pruned per layer, by magnitude "
                               f"({DEFAULT_PRUNE} unless --shares is given)", default=None)
    shares: int = _opt("instead of --prune, split each layer's weights equally among this many tasks: task t "
                       "keeps 1/(shares - t) of the weights free when it starts (0: off)", default=0)
    retrain_epochs: int = _opt("epochs of retraining the survivors after pruning", default=10)
    retrain_lr_factor: float = _opt("learning rate of the retraining, as a factor of --lr", default=0.1)

    def __post_init__(self) -> None:
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise ConfigError(f"--prune must be in [0, 1), got {self.prune}")
        if self.retrain_epochs < 0:
            raise ConfigError(f"--retrain-epochs must be >= 0, got {self.retrain_epochs}")
        if not self.retrain_lr_factor > 0:
            raise ConfigError(f"--retrain-lr-factor must be above 0, got {self.retrain_lr_factor}")
        if self.shares < 0:
            raise ConfigError(f"--shares must be >= 0, got {self.shares}")
        if self.shares and self.prune is not None:
            raise ConfigError(f"--prune {self.prune} and --shares {self.shares} exclude each other: --shares "
                              "sets each task's pruned fraction")

    def prune_fraction(self, t: int) -> float:
        """The fraction of task ``t``'s new weights pruned per layer: ``prune``, or with ``shares``
        N, ``1 - 1/(N - t)``.

        Raises:
            CapacityError: with ``shares``, a task beyond the N planned (nothing is left for it).
        """
        if not self.shares:
            return DEFAULT_PRUNE if self.prune is None else self.prune
        if t >= self.shares:
            raise CapacityError(f"task {t} is beyond the {self.shares} tasks --shares planned for: the earlier tasks "
                                f"hold every weight; plan for more tasks with a larger --shares")
        return 1.0 - 1.0 / (self.shares - t)


class PackNet(WeightIsolation):
    name = "packnet"
    mode = "owner"

    def __init__(self, config: PackNetConfig | None = None):
        super().__init__()
        self.config = config or PackNetConfig()
        self.active: list[torch.Tensor] = []
        self._dense: list[bool] = []  # per layer: every weight active (the task has not been pruned yet)

    def start_task(self, net, t: int) -> None:
        self.config.prune_fraction(t)  # refuses a task beyond --shares before training
        # every weight: the earlier tasks' (frozen, reused) and the free ones (trained)
        self.active = [torch.ones_like(self.free(net, i)) for i in range(len(net.subnetworks.layers))]
        self._dense = [True] * len(self.active)

    def effective(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        # before pruning every weight is active: the weight itself, not a copy of it
        return weight if self._dense[i] else torch.where(self.active[i], weight, 0.0)

    def train_task(self, session) -> None:
        session.fit(session.config.epochs)
        self.prune(session.net)
        if self.config.retrain_epochs:
            session.scale_lr(self.config.retrain_lr_factor)
            session.fit(self.config.retrain_epochs, phase="finetune")

    @torch.no_grad()
    def prune(self, net) -> None:
        """Per layer, drop the ``prune_fraction`` of the task's new (free, active) weights with the
        smallest magnitude: they are set to 0 and left free for later tasks."""
        fraction = self.config.prune_fraction(net.num_tasks - 1)
        for i in range(len(net.subnetworks.layers)):
            w, new = self.weight(net, i), self.free(net, i) & self.active[i]
            k = round(fraction * int(new.sum()))
            if k == 0:
                continue
            drop = self.smallest(w, new, k)
            self.active[i] &= ~drop
            self._dense[i] = False
            w.masked_fill_(drop, 0.0)

    @torch.no_grad()
    def used(self, net, t: int) -> list[torch.Tensor]:
        for i, active in enumerate(self.active):  # free weights restart from zero (as PackNet's)
            self.weight(net, i).masked_fill_(~active, 0.0)
        return self.active
