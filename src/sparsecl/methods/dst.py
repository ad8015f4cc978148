"""DST-CL, dynamic sparse training for continual learning (Yildirim et al., "Continual Learning
with Dynamic Sparse Training: Exploring Algorithms for Effective Model Updates", CPAL 2024; paper
002 and its code, muratonuryildirim/CL-with-DST).

Each task starts a sparse random mask at density d = 1 - sparsity over the free weights (from task
1 on re-initialized, Kaiming uniform; task 0 keeps the network's initial or pretrained values) and,
with ``reuse_frozen``, the frozen weights of earlier tasks (reused, never changed), with per-layer
densities from ERK or uniform. Every ``update_interval`` steps, per layer, the smallest-magnitude
*trainable* active weights are dropped (a fraction cosine-decayed from ``drop_fraction`` to
``final_drop_fraction`` over the task's steps) and as many free inactive weights are regrown, by
``random``, ``unfired`` (never active during this task, then random), ``gradient`` (|dense
gradient|, RigL) or ``momentum`` (|Adam m / (√v + 1e-8)|, or SGD's momentum buffer). Grown weights
start at 0 with their optimizer state reset (RigL). Each layer keeps the number of active weights
it started the task with: its density d_l (ERK or uniform), rounded per layer, unless fewer
candidate weights are left (without ``reuse_frozen``, only free weights are candidates).

The training forward pass uses the active weights, with the dense gradient passed through to
every weight (as in the reference code, where inactive weights are zeros in a dense layer), so
that gradient and momentum growth see inactive weights; inactive free weights are set back to 0
after every step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CapacityError, ConfigError
from ..sparsity import auto_init, cosine_drop_fraction, erk_densities, layer_budget, uniform_densities
from .base import config_field as _opt
from .weight import WeightIsolation, mask_of

log = logging.getLogger(__name__)

INITS = ("erk", "uniform", "auto")
GROWTHS = ("random", "unfired", "gradient", "momentum")


@dataclass
class DSTConfig:
    """DST-CL hyperparameters; defaults from the reference code's 10-task CIFAR-100 run (80%
    sparsity, ERK, random growth, ΔT = 400; drop rate 0.5 → 0.005 cosine). ``auto`` picks ERK
    below 90% sparsity and uniform from 90% (the paper: ERK is better at low sparsity, uniform
    more robust at high sparsity; the 90% threshold is ours, from its example runs)."""

    sparsity: float = _opt("fraction of each task's mask left out: the mask's density is 1 - sparsity", default=0.8)
    init: str = _opt("per-layer densities of the mask: erk, uniform, or auto (by --sparsity)", default="erk")
    growth: str = _opt("regrowth criterion: random, unfired, gradient or momentum", default="random")
    update_interval: int = _opt("ΔT: training steps between mask updates", default=400)
    drop_fraction: float = _opt("fraction of a layer's trainable active weights dropped per update at the "
                                "start of the task (cosine-decayed over the task's steps)", default=0.5)
    final_drop_fraction: float = _opt("drop fraction at the task's last step (cosine decay)", default=0.005)
    reuse_frozen: bool = _opt("the mask may include earlier tasks' frozen weights (reused unchanged)", default=True)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.init not in INITS:
            raise ConfigError(f"--init must be one of {', '.join(INITS)}, got '{self.init}'")
        if self.growth not in GROWTHS:
            raise ConfigError(f"--growth must be one of {', '.join(GROWTHS)}, got '{self.growth}'")
        if self.update_interval < 1:
            raise ConfigError(f"--update-interval must be at least 1, got {self.update_interval}")
        if not 0.0 <= self.final_drop_fraction <= self.drop_fraction <= 1.0:
            raise ConfigError(f"need 0 <= --final-drop-fraction <= --drop-fraction <= 1, got "
                              f"{self.final_drop_fraction} and {self.drop_fraction}")

    @property
    def resolved_init(self) -> str:
        return auto_init(self.sparsity) if self.init == "auto" else self.init


class DST(WeightIsolation):
    name = "dst"
    mode = "masks"

    def __init__(self, config: DSTConfig | None = None):
        super().__init__()
        self.config = config or DSTConfig()
        self.active: list[torch.Tensor] = []
        self.fired: list[torch.Tensor] = []
        self.densities: dict[str, float] = {}
        self._optimizer = None
        self._step = 0
        self._total_steps = 1
        self._updates: list[dict] = []
        self._active_f: list[torch.Tensor] = []  # ``_factors``' cache
        self._keep_f: list[torch.Tensor] = []
        self._active_key: list = []
        self._keep_key: list = []

    # ---- the task's initial mask -------------------------------------------------------------
    @torch.no_grad()
    def start_task(self, net, t: int) -> None:
        cfg, sub = self.config, net.subnetworks
        shapes = {name: tuple(self.weight(net, i).shape) for i, name in enumerate(sub.layers)}
        density = 1.0 - cfg.sparsity
        self.densities = (erk_densities if cfg.resolved_init == "erk" else uniform_densities)(shapes, density)
        candidates = [torch.ones_like(self.free(net, i)) if cfg.reuse_frozen else self.free(net, i)
                      for i in range(len(shapes))]
        sizes = {n: math.prod(s) for n, s in shapes.items()}
        target = layer_budget(self.densities, sizes)
        budget = layer_budget(self.densities, sizes, {n: int(c.sum()) for n, c in zip(shapes, candidates)})
        for name in shapes:
            if budget[name] == 0 < target[name]:
                raise CapacityError(f"layer '{name}' has no free weight left for task {t}'s mask of {target[name]} "
                                    "weights; let the task reuse frozen weights (--reuse-frozen) or lower its density")
            if budget[name] < target[name]:
                log.warning("task %d: layer '%s' has %d free weights for a mask of %d", t, name, budget[name],
                            target[name])
        self.active, self.fired = [], []
        for i, name in enumerate(sub.layers):
            w, free = self.weight(net, i), self.free(net, i)
            if t > 0:  # task 0 starts from the network's own (or pretrained) weights
                fresh = torch.empty_like(w)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # the default init of Linear/Conv2d
                w.copy_(torch.where(free, fresh, w))
            active = _random_subset(candidates[i], budget[name])
            w.masked_fill_(free & ~active, 0.0)  # inactive free weights are zeros
            self.active.append(active)
            self.fired.append(active.clone())
        self._step, self._updates = 0, []
        self._active_key, self._keep_key = [], []  # new masks may reuse freed storage: never trust old keys

    def effective(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        # value: the active weights (inactive ones exactly 0); gradient: dense, to every weight
        return _DenseGradient.apply(weight, self._factors(weight)[0][i])

    def _factors(self, like: torch.Tensor, net=None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per layer, 0/1 factors in ``like``'s dtype: the active weights and (with ``net``) the
        weights that are not inactive-and-free. Products by them cost a third of ``where`` and
        ``masked_fill`` on the CPU; they are rebuilt when the mask or the owner ids change."""
        sources = list(self.active)
        if net is not None:
            sources += [net.subnetworks.owner(i) for i in range(len(self.active))]
        key = [(like.dtype, like.device)] + [(a.data_ptr(), a._version) for a in sources]
        if key[:len(self.active) + 1] != self._active_key:
            self._active_f = [a.to(like.dtype) for a in self.active]
            self._active_key = key[:len(self.active) + 1]
        if net is None:
            return self._active_f, None
        if key != self._keep_key:
            self._keep_f = [(~self.free(net, i) | a).to(like.dtype) for i, a in enumerate(self.active)]
            self._keep_key = key
        return self._active_f, self._keep_f

    # ---- training and topology updates -------------------------------------------------------
    def train_task(self, session) -> None:
        cfg = self.config
        if cfg.growth == "momentum" and session.config.optimizer == "sgd" and session.config.momentum == 0:
            raise ConfigError("--growth momentum needs Adam/AdamW or SGD with --momentum above 0")
        self._optimizer = session.optimizer
        steps_per_epoch = math.ceil(len(session.task.train_y) / session.config.batch_size)
        self._total_steps = max(1, session.config.epochs * steps_per_epoch)
        if cfg.update_interval >= self._total_steps:
            log.warning("task %d: --update-interval %d is not below the task's %d training steps: the mask "
                        "never changes (static sparse training)", session.t, cfg.update_interval, self._total_steps)
        session.fit(session.config.epochs)
        self._optimizer = None

    def after_step(self, net) -> None:
        super().after_step(net)
        with torch.no_grad():
            for i, keep in enumerate(self._factors(self.weight(net, 0), net)[1]):
                self.weight(net, i).mul_(keep)  # inactive free weights back to zero
        self._step += 1
        if self._step % self.config.update_interval == 0 and self._step < self._total_steps:
            self.update(net)

    def drop_fraction(self) -> float:
        cfg = self.config
        return cfg.final_drop_fraction + cosine_drop_fraction(self._step, self._total_steps,
                                                              cfg.drop_fraction - cfg.final_drop_fraction)

    @torch.no_grad()
    def update(self, net) -> None:
        """One drop-and-regrow step in every layer; the number of active weights is unchanged."""
        fraction = self.drop_fraction()
        moved = 0
        for i in range(len(self.active)):
            w, free, active = self.weight(net, i), self.free(net, i), self.active[i]
            trainable = active & free
            n = math.ceil(fraction * int(trainable.sum()))
            if n == 0:
                continue
            drop = self.smallest(w, trainable, n)
            active &= ~drop
            w.masked_fill_(drop, 0.0)
            candidates = free & ~active  # includes the just-dropped weights, as in RigL
            grow = mask_of(self._grow(i, w, candidates, n), w)
            active |= grow
            w.masked_fill_(grow, 0.0)  # grown weights start at zero (RigL)
            self._reset_state(w, grow)
            self.fired[i] |= active
            moved += n
        self._updates.append({"step": self._step, "drop_fraction": fraction, "moved": moved})

    def _grow(self, i: int, w: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
        """Flat indices of the ``n`` candidates to regrow in layer i by the growth criterion."""
        growth, flat = self.config.growth, candidates.flatten()
        if growth == "unfired":
            unfired = flat & ~self.fired[i].flatten()
            first = _random_subset(unfired, min(n, int(unfired.sum()))).nonzero().flatten()
            if len(first) == n:
                return first
            rest = flat.clone()
            rest[first] = False
            return torch.cat([first, _random_subset(rest, n - len(first)).nonzero().flatten()])
        if growth == "random":
            return _random_subset(flat, n).nonzero().flatten()
        if growth == "gradient":
            score = w.grad.abs() if w.grad is not None else torch.zeros_like(w)
        else:
            state = self._optimizer.state.get(w, {}) if self._optimizer is not None else {}
            if "exp_avg" in state:
                score = (state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)).abs()
            elif state.get("momentum_buffer") is not None:
                score = state["momentum_buffer"].abs()
            else:
                score = torch.zeros_like(w)
        score = torch.where(flat.view_as(w), score, -torch.inf).flatten()
        return torch.topk(score, n).indices

    def _reset_state(self, w: torch.Tensor, grown: torch.Tensor) -> None:
        """Zero the optimizer state of the grown weights (bool mask, ``w``'s shape): RigL resets
        it; a new connection should not inherit the moments of the one that was there before."""
        state = self._optimizer.state.get(w, {}) if self._optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if isinstance(state.get(key), torch.Tensor):
                state[key].masked_fill_(grown, 0.0)

    def used(self, net, t: int) -> list[torch.Tensor]:
        return [a.clone() for a in self.active]

    def task_log(self, net, t: int) -> dict:
        return {"init": self.config.resolved_init, "densities": self.densities, "updates": len(self._updates),
                "moved": sum(u["moved"] for u in self._updates)}


class _DenseGradient(torch.autograd.Function):
    """``weight · active`` (0/1 in the weight's dtype) whose gradient goes to every weight
    unchanged (the reference code's dense layer with zeros at inactive weights); one product
    forward, nothing backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return weight * active

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _random_subset(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (``mask``'s shape) of ``k`` entries of ``mask`` drawn uniformly (global torch
    RNG, so that every data-parallel rank draws the same)."""
    idx = mask.flatten().nonzero().flatten()
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if k > 0:
        out[idx[torch.randperm(len(idx), device=idx.device)[:k]]] = True
    return out.view_as(mask)
