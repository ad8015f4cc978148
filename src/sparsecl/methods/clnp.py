"""CLNP (paper 000: Golkar, Kagan & Cho, "Continual Learning via Neural Pruning", 2019).

Each task trains on the free units with an L1 weight penalty, then keeps the units whose mean
activation over the task's training set exceeds a threshold θ. θ is chosen by *graceful
forgetting* (Sec. 2.2): among the models of an (α, learning rate) grid whose validation accuracy
is within a margin m of the best one, scan θ upward while validation accuracy stays within m and
keep the sparsest result. Only evaluation happens after training; optional fine-tuning of the
survivors follows (Sec. 3.2, "CLNP + fine tuning").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import CheckpointError, ConfigError
from ..scoring import activation_scores
from .base import config_field as _opt
from .neuron import NeuronIsolation

log = logging.getLogger(__name__)

THETA_SCANS = ("first-fail", "full")
THETA_EVALS = ("cached", "plain")
L1_STEPS = ("gradient", "proximal")
#: Largest cache of unchanged activations (bytes) the cached θ scan keeps for the whole
#: validation split; beyond it they are recomputed for every evaluation (still without touching
#: the weights).
CACHE_BYTES = 1 << 30


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated numbers, got '{text}'") from None
    if not values:
        raise ConfigError(f"--{what} needs at least one number, got '{text}'")
    return values


@dataclass
class CLNPConfig:
    """CLNP hyperparameters. Defaults are the paper's Permuted-MNIST setting (Sec. 3.1): L1
    coefficients α = 1e-7, 1e-5, 1e-6 for the first, second and output layer, margin m = 0.05%
    (0.0005 as a fraction of accuracy), no fine-tuning. The learning rate grid defaults to the
    run's ``--lr`` (the paper: 0.002)."""

    alpha: str = _opt("L1 coefficient per weight layer (hidden layers in order, then the output "
                      "layer; one value = all layers); ';' separates grid points, e.g. "
                      "'1e-7,1e-5,1e-6;1e-6,1e-4,1e-5'", default="1e-7,1e-5,1e-6")
    lrs: str = _opt("learning-rate grid, comma-separated (default: --lr)", default="")
    margin: float = _opt("graceful-forgetting margin m: validation accuracy may fall this much "
                         "(a fraction: 0.0005 = 0.05 points) below the grid's best", default=0.0005)
    theta_steps: int = _opt("coarse steps of the θ scan before it is refined unit by unit", default=20)
    theta_per_layer: bool = _opt("one threshold θ per layer (the paper allows it), scanned from the last "
                                 "hidden layer to the first, instead of one θ for all", default=False)
    theta_order: str | None = _opt("with --theta-per-layer, which layer's θ is scanned first: 'last' (the last "
                                   "hidden layer, the default) or 'first' (the first hidden layer: the "
                                   "margin goes to a task's own first-layer units, which later tasks can "
                                   "replace by reading earlier tasks' units)", default=None)
    theta_scan: str = _opt("'first-fail': raise θ until the first threshold outside the margin, then bisect "
                           "back; 'full': evaluate every coarse threshold and refine above the highest one "
                           "within the margin (the paper's 'highest θ within the margin' when validation "
                           "accuracy is not monotone in θ)", default="first-fail")
    theta_eval: str = _opt("how a threshold is evaluated: 'cached' (the units' outputs are masked where "
                           "they are read, and what a threshold cannot change — every layer before the "
                           "first reader of a scanned layer — is computed once) or 'plain' (prune the "
                           "weights, measure, roll back); both give the same θ", default="cached")
    finetune_epochs: int = _opt("epochs of fine-tuning the survivors after pruning (paper: 20)", default=0)
    finetune_lr: float = _opt("learning rate of the fine-tuning (paper: 1e-4)", default=1e-4)
    finetune_alpha: str = _opt("L1 coefficient(s) while fine-tuning (paper: 5e-5; default: the "
                               "chosen --alpha)", default="")
    patience: int | None = _opt("stop training a grid point after this many epochs without a better "
                                "validation accuracy and keep its best epoch (default: train --epochs)",
                                default=None)
    forward_transfer: bool = _opt("new units may read units of earlier tasks", default=True)
    widen: int = _opt("units added to a layer that has no free unit when a task starts "
                      "(0: stop with an error instead)", default=0)
    reuse_full: bool = _opt("a layer (unit group) with no free unit when a task starts is only "
                            "reused, frozen, by the new task instead of stopping with an error "
                            "(needs forward transfer; never the single head's final hidden layer)",
                            default=False)
    reinit_input: bool = _opt("re-initialize, when a task starts, the input weights of the free units of the layers "
                              "reading the model input (the default). --no-reinit-input keeps them as the "
                              "previous task trained them, before pruning: Alg. 1 of the paper re-initializes "
                              "only W^free = W(N_l -> N_l+1^inact) between layers of units, and the input is "
                              "not one of the N_l", default=True)
    l1: str = _opt("how the L1 penalty acts: 'gradient' (a term of the loss, the paper's) or 'proximal' (a "
                   "soft-threshold w <- sign(w)·max(|w| - lr·α, 0) after every optimizer step on the "
                   "weights the task trains, which gives exact zeros)", choices=L1_STEPS, default="gradient")
    read_threshold: float = _opt("the per-task log counts a unit as read when a unit of a later layer (or a "
                                 "head) reads it through a weight with |w| > this fraction of that layer's "
                                 "largest |w|", default=1e-3)

    def __post_init__(self) -> None:
        self.alpha_grid = tuple(_floats(point, "alpha") for point in self.alpha.split(";"))
        self.lr_grid = _floats(self.lrs, "lrs") if self.lrs.strip() else ()
        self.finetune_alphas = _floats(self.finetune_alpha, "finetune-alpha") if self.finetune_alpha.strip() else None
        if any(a < 0 for point in self.alpha_grid for a in point) or any(a < 0 for a in self.finetune_alphas or ()):
            raise ConfigError(f"--alpha and --finetune-alpha must be non-negative, got '{self.alpha}'")
        if any(lr <= 0 for lr in self.lr_grid) or self.finetune_lr <= 0:
            raise ConfigError("--lrs and --finetune-lr must be positive")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"--margin must be in [0, 1), got {self.margin}")
        if self.theta_steps < 1 or self.finetune_epochs < 0 or self.widen < 0:
            raise ConfigError("--theta-steps must be >= 1, --finetune-epochs >= 0 and --widen >= 0")
        if self.theta_order is not None:
            if self.theta_order not in ("first", "last"):
                raise ConfigError(f"--theta-order must be 'first' or 'last', got '{self.theta_order}'")
            if not self.theta_per_layer:
                raise ConfigError("--theta-order orders the per-layer θ scan: it needs --theta-per-layer")
        if self.theta_scan not in THETA_SCANS:
            raise ConfigError(f"--theta-scan must be one of {', '.join(THETA_SCANS)}, got '{self.theta_scan}'")
        if self.theta_eval not in THETA_EVALS:
            raise ConfigError(f"--theta-eval must be one of {', '.join(THETA_EVALS)}, got '{self.theta_eval}'")
        if self.l1 not in L1_STEPS:
            raise ConfigError(f"--l1 must be one of {', '.join(L1_STEPS)}, got '{self.l1}'")
        if not 0 <= self.read_threshold < 1:
            raise ConfigError(f"--read-threshold must be in [0, 1), got {self.read_threshold}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"--patience must be at least 1, got {self.patience}")


class CLNP(NeuronIsolation):
    """Continual Learning via Neural Pruning (paper 000, Alg. 1), multi-head or single-head.

    For task t, every point (α, lr) of the grid trains from the same initialization of the free
    units for ``epochs`` epochs (or until ``patience``) with the loss ``CE + Σ_l α_l·‖W_l‖₁``
    over the weights the task trains. With v* the best validation accuracy of the grid, every
    model with validation accuracy ≥ v* − m is pruned at the largest activation threshold θ it
    tolerates: units whose mean |activation| over the task's training set is ≤ θ are pruned,
    and θ rises (a coarse scan over the sorted scores, then bisection between the last threshold
    within the margin and the first outside it) while the pruned model's validation accuracy
    stays ≥ v* − m (``theta_scan='full'``: every coarse threshold is evaluated and the bisection
    starts above the highest one within the margin, since validation accuracy need not fall
    monotonically in θ). The model keeping the fewest units wins (ties: higher validation
    accuracy). A threshold is evaluated without touching the weights (``theta_eval='cached'``:
    the pruned units' outputs are zeroed where they are read, and the layers no scanned unit
    reaches are computed once per scan), which gives the plain evaluation's accuracy exactly.
    Its survivors become task t's units; the rest are recycled. ``log`` records every grid point
    and the choice, and after the task (``units_read``) how many of each layer's owned units a
    later layer or a head reads through a weight above ``read_threshold`` of that layer's largest.

    ``l1='proximal'`` replaces the loss term by a soft-threshold after every optimizer step
    (proximal gradient, e.g. Parikh & Boyd, "Proximal Algorithms", 2014, Sec. 6.1.1:
    ``w ← sign(w)·max(|w| − lr·α, 0)``) on the same weights, with the learning rate of the
    optimizer's parameter group: it gives exact zeros, where an L1 gradient under Adam makes an
    unused weight oscillate around zero by about lr for any α. ``reinit_input=False`` keeps, at
    the next task, the trained input weights of the units the task left free (Alg. 1 re-
    initializes only ``W(N_l → N_{l+1}^inact)``, weights leaving a layer of units).

    Raises:
        ConfigError: a task has no validation split, or ``alpha`` does not match the network.
    """

    name = "clnp"

    def __init__(self, config: CLNPConfig | None = None):
        self.config = config or CLNPConfig()
        super().__init__(forward_transfer=self.config.forward_transfer, widen=self.config.widen,
                         reuse_full=self.config.reuse_full)
        self.log: list[dict] = []
        self._alpha: tuple[float, ...] = ()
        self._penalty: list[tuple[torch.Tensor, float, tuple[int, ...], torch.Tensor | None]] = []
        self._runs: list[dict] = []
        # --no-reinit-input: per layer reading the model input, its (weight, bias) before the last
        # pruning, i.e. as the paper's network holds the free units' input weights
        self._revive: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._lr_groups: dict[int, dict] = {}  # id(parameter) -> its optimizer param group

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self, net) -> None:
        super().setup(net)
        names = [*net.graph.layers, "head"]
        for point in self.config.alpha_grid + ((self.config.finetune_alphas,) if self.config.finetune_alphas else ()):
            if len(point) not in (1, len(names)):
                raise ConfigError(
                    f"--alpha / --finetune-alpha: {len(point)} values given, but the network has "
                    f"{len(names)} weight layers ({', '.join(names)}); give 1 value or {len(names)}")

    def begin_task(self, net, t: int, task) -> None:
        if len(task.val_y) == 0:
            raise ConfigError(f"CLNP chooses each task's units on a validation split, but task {t} "
                              f"('{task.name}') has none: use --val-fraction > 0")
        super().begin_task(net, t, task)

    def loss(self, net, x, y, tasks):
        loss, correct = net.task_loss(x, y, tasks)
        if self.config.l1 == "proximal":  # the L1 term acts through after_step's soft-threshold
            return loss, correct
        for weight, alpha, dims, keep in self._penalty:
            # L1 norm per unit (row, filter; a BatchNorm scale is one number) or, for a single head, per column
            norms = weight.abs().sum(dims) if dims else weight.abs()
            loss = loss + alpha * (norms.sum() if keep is None else (norms * keep).sum())
        return loss, correct

    def after_step(self, net) -> None:
        if self.config.l1 == "proximal":
            self._proximal_step()
        super().after_step(net)  # frozen entries written back (the soft-threshold never touches them)

    def end_task(self, session) -> None:
        super().end_task(session)
        net, rel = session.net, self.config.read_threshold
        read = read_units(net, self.ledger, rel)
        t = session.t
        if not self.log or self.log[-1].get("task") != t:  # a selection that logged nothing (a subclass's)
            self.log.append({"task": t})
        self.log[-1]["read_threshold"] = rel
        self.log[-1]["units_read"] = {
            name: {"owned": int((~self.ledger.free(name)).sum()), "read": int(mask.sum()),
                   "owned_new": int(self.ledger.owned_by(name, t).sum()),
                   "read_new": int((mask & self.ledger.owned_by(name, t)).sum())}
            for name, mask in read.items()}
        self._lr_groups = {}

    def state(self):
        tensors, meta = super().state()
        for name, (w, b) in self._revive.items():
            tensors[f"revive.{name}.weight"] = w
            if b is not None:
                tensors[f"revive.{name}.bias"] = b
        return tensors, meta

    def load_state(self, net, tensors, meta) -> None:
        """Raises ``CheckpointError`` when the saved ledger or the saved input weights of free
        units (``--no-reinit-input``) do not fit ``net``."""
        super().load_state(net, tensors, meta)
        self._revive = {}
        for name, layer in net.graph.layers.items():
            w = tensors.get(f"revive.{name}.weight")
            if w is None:
                continue
            own = layer.module.weight
            if w.shape[1:] != own.shape[1:] or w.shape[0] > own.shape[0]:
                raise CheckpointError(f"the checkpoint's input weights of the free units of layer '{name}' have "
                                      f"shape {tuple(w.shape)}; the layer's weight has {tuple(own.shape)}")
            self._revive[name] = (w.clone(), None if f"revive.{name}.bias" not in tensors
                                  else tensors[f"revive.{name}.bias"].clone())

    def train_task(self, session) -> None:
        cfg = self.config
        self._lr_groups = {id(p): g for g in session.optimizer.param_groups for p in g["params"]}
        grid = [(a, lr) for a in cfg.alpha_grid for lr in (cfg.lr_grid or (session.config.lr,))]
        start = session.snapshot() if len(grid) > 1 else None
        self._runs = []
        for alpha, lr in grid:
            if start is not None:  # every grid point starts from the same initialization
                session.rollback(start)
            session.set_lr(lr)
            self._set_alpha(session.net, alpha)
            val, epochs = self._train(session)
            self._runs.append({"alpha": list(alpha), "lr": lr, "epochs": epochs, "val_accuracy": val,
                               "state": session.snapshot() if start is not None else None})
            log.info("task %d: alpha %s lr %g → validation accuracy %.4f after %d epochs",
                     session.t, alpha, lr, val, epochs)

    def select(self, session) -> None:
        cfg, net, t = self.config, session.net, session.t
        best = max(r["val_accuracy"] for r in self._runs)
        floor = best - cfg.margin
        chosen = None
        for r in self._runs:
            r["within_margin"] = r["val_accuracy"] >= floor
            if not r["within_margin"]:
                continue
            if r["state"] is not None:
                session.rollback(r["state"])
            r["theta"], r["units"], r["pruned_val_accuracy"] = self._scan(session, floor, r["val_accuracy"])
            with session.phase("theta-scan"):  # one history row per scan: the accuracy it kept
                session.report(r["pruned_val_accuracy"])
            r["kept"] = {n: int((self.candidates(n) & ~r["units"][n]).sum()) for n in self.pruned}
            key = (sum(r["kept"].values()), -r["pruned_val_accuracy"])
            if chosen is None or key < chosen[0]:
                chosen = (key, r)
        r = chosen[1]
        if r["state"] is not None:
            session.rollback(r["state"])
        self._set_alpha(net, tuple(r["alpha"]))
        if not cfg.reinit_input:  # the free units' input weights as trained, for the next task
            self._revive = {name: (layer.module.weight.detach().clone(),
                                   None if layer.module.bias is None else layer.module.bias.detach().clone())
                            for name, layer in net.graph.layers.items() if layer.source is None}
        self.prune(net, t, r["units"])
        entry = {"task": t, "best_val_accuracy": best, "margin": cfg.margin, "floor": floor,
                 "chosen": self._runs.index(r), "theta": r["theta"],
                 "val_accuracy_pruned": session.accuracy("val"),
                 "kept": dict(r["kept"]), "pruned": {n: int(m.sum()) for n, m in self.pruned.items()},
                 "grid": [{k: v for k, v in run.items() if k not in ("state", "units")} for run in self._runs]}
        if cfg.finetune_epochs:
            session.set_lr(cfg.finetune_lr)
            if cfg.finetune_alphas:
                self._set_alpha(net, cfg.finetune_alphas)
            session.fit(cfg.finetune_epochs, phase="finetune")
            entry["val_accuracy_finetuned"] = session.accuracy("val")
        self._runs = []
        self.log.append(entry)
        log.info("task %d: θ=%s keeps %s; validation accuracy %.4f (best %.4f, floor %.4f)", t,
                 entry["theta"], entry["kept"], entry["val_accuracy_pruned"], best, floor)

    # ---- steps -------------------------------------------------------------------------------
    @torch.no_grad()
    def _proximal_step(self) -> None:
        """Soft-threshold ``w ← sign(w)·max(|w| − lr·α, 0)`` of the entries that carry an L1
        term (the rows of free, unpruned units; a single head's columns of them; the task's own
        head): the proximal operator of ``lr·α·‖w‖₁``. Other entries are not touched."""
        for weight, alpha, dims, keep in self._penalty:
            group = self._lr_groups.get(id(weight))
            if group is None:  # not in the task's optimizer: not trained by the task
                continue
            shrunk = torch.nn.functional.softshrink(weight, float(group["lr"]) * alpha)
            if keep is None:
                weight.copy_(shrunk)
            else:
                shape = [1] * weight.dim()
                shape[next(d for d in range(weight.dim()) if d not in dims)] = -1
                weight.copy_(torch.where(keep.view(shape).bool(), shrunk, weight))

    @torch.no_grad()
    def _reinitialize_free_units(self, net) -> None:
        super()._reinitialize_free_units(net, input_layers=self.config.reinit_input)
        if self.config.reinit_input:
            return
        for name, layer in net.graph.layers.items():
            if layer.source is not None:
                continue
            if name not in self._revive:
                raise ConfigError(f"--no-reinit-input keeps the input weights the previous task trained for the "
                                  f"free units of layer '{name}', but none were recorded: the earlier tasks "
                                  "were learned with input re-initialization (learn them with --no-reinit-input)")
            w, b = self._revive[name]
            module = layer.module
            free = self.ledger.free(layer.group)[:len(w)]  # rows added by --widen keep their fresh values
            idx = free.nonzero().flatten().to(module.weight.device)
            module.weight.index_copy_(0, idx, w.to(module.weight.device).index_select(0, idx))
            if b is not None and module.bias is not None:
                module.bias.index_copy_(0, idx, b.to(module.bias.device).index_select(0, idx))

    def _train(self, session) -> tuple[float, int]:
        """Train one grid point; returns its validation accuracy and the epochs it took."""
        patience = self.config.patience
        if patience is None:
            session.fit(session.config.epochs)
            return session.accuracy("val"), session.config.epochs
        best, best_state, stale, epochs = -1.0, None, 0, 0
        for epoch in range(session.config.epochs):
            session.train_epoch()
            val = session.accuracy("val")
            if val > best:
                best, best_state, stale, epochs = val, session.snapshot(), 0, epoch + 1
            else:
                stale += 1
                if stale >= patience:
                    break
        session.rollback(best_state)
        return best, epochs

    def _scan(self, session, floor: float, unpruned: float | None = None
              ) -> tuple[float | dict | None, dict[str, torch.Tensor], float]:
        """Largest θ whose pruned model keeps validation accuracy ≥ ``floor``: one θ for every
        layer, or with ``theta_per_layer`` one per layer, scanned from the last hidden layer to
        the first (``theta_order`` 'first': the reverse), each on top of the layers scanned
        before it, already pruned at their θ.

        ``unpruned``: the validation accuracy of the unpruned model when already measured (the
        same computation, so the same value).

        Returns ``(θ — a float, a dict of per-layer θ, or None when nothing can be pruned —,
        units to prune per layer, validation accuracy of the pruned model)``; the network is
        left unpruned.
        """
        net = session.net
        batches = (x for x, _, _ in session.batches(shuffle=False, batch_size=session.config.eval_batch_size))
        scores = activation_scores(net, batches)
        cand = {n: self.candidates(n) for n in self.pruned}
        units = {n: torch.zeros_like(m) for n, m in cand.items()}
        layers = [list(cand)] if not self.config.theta_per_layer else \
            [[n] for n in (list(cand) if self.config.theta_order == "first" else reversed(list(cand)))]
        thetas = {}
        acc = unpruned
        for scanned in layers:
            if self.config.theta_eval == "plain":
                val_with = self._plain_evaluator(session, cand)
            else:
                val_with = _MaskedAccuracy(session, units, scanned)
            try:
                if acc is None:
                    acc = session.accuracy("val") if self.config.theta_eval == "plain" else val_with(units)
                theta, units, acc = self._raise_theta(scanned, scores, cand, units, acc, floor, val_with)
            finally:
                if isinstance(val_with, _MaskedAccuracy):
                    val_with.close()
            thetas[scanned[0]] = theta
        return (thetas if self.config.theta_per_layer else thetas[layers[0][0]]), units, acc

    def _plain_evaluator(self, session, cand: dict[str, torch.Tensor]):
        """The plain evaluation: prune the weights, measure, roll back weights and masks."""
        net, state = session.net, session.snapshot()

        def val_with(units: dict[str, torch.Tensor]) -> float:
            self.prune(net, session.t, units)
            acc = session.accuracy("val")
            session.rollback(state)
            self.set_pruned(net, session.t, {n: torch.zeros_like(m) for n, m in cand.items()})
            return acc
        return val_with

    def _raise_theta(self, layers, scores, cand, base, base_acc, floor, val_with):
        """Scan one θ over ``layers`` on top of the pruning ``base``: a coarse scan over the
        sorted scores — up to the first threshold outside the margin (``theta_scan``
        'first-fail') or all of them ('full') —, then bisection between the highest coarse
        threshold within the margin and the next coarse one. Returns ``(θ or None, units,
        validation accuracy)``."""
        thresholds = torch.cat([scores[n][cand[n]] for n in layers]).unique()  # sorted ascending
        units = lambda k: {n: base[n] | (cand[n] & (scores[n] <= thresholds[k])) if n in layers  # noqa: E731
                           else base[n] for n in cand}
        n = len(thresholds)
        good, good_acc, bad = -1, base_acc, n
        step = max(1, math.ceil(n / self.config.theta_steps))
        coarse = sorted(set(range(0, n, step)) | ({n - 1} if n else set()))
        full = self.config.theta_scan == "full"
        for i, k in enumerate(coarse):
            acc = val_with(units(k))
            if acc >= floor:
                good, good_acc = k, acc
                bad = coarse[i + 1] if i + 1 < len(coarse) else n
            elif not full:
                bad = k
                break
            elif good < 0:
                bad = min(bad, k)
        while bad - good > 1:
            mid = (good + bad) // 2
            acc = val_with(units(mid))
            if acc >= floor:
                good, good_acc = mid, acc
            else:
                bad = mid
        if good < 0:
            return None, base, good_acc
        return float(thresholds[good]), units(good), good_acc

    def _set_alpha(self, net, alpha: tuple[float, ...]) -> None:
        n = len(net.graph.layers) + 1
        self._alpha = alpha * n if len(alpha) == 1 else alpha
        self._refresh_penalty(net)

    def _apply(self, net, t: int) -> None:
        super()._apply(net, t)
        self._refresh_penalty(net, t)

    def _refresh_penalty(self, net, t: int | None = None) -> None:
        """The L1 terms of the weights task t trains: its rows in each unit layer (free, not
        pruned), its own head, or a single head's columns of free units. A unit normalized by
        BatchNorm would not shrink with its filter (BatchNorm rescales it), so its BatchNorm scale
        γ takes the L1 term too, with the α of the group's first layer (as network slimming,
        Liu et al. 2017, does for channel pruning)."""
        if not self._alpha or self.ledger is None or not self.pruned:
            self._penalty = []
            return
        t = net.num_tasks - 1 if t is None else t
        terms = []
        for layer, alpha in zip(net.graph.layers.values(), self._alpha):
            w = layer.module.weight
            rows = (self.ledger.free(layer.group) & ~self.pruned[layer.group]).to(w.device)
            terms.append((w, alpha, tuple(range(1, w.dim())), None if rows.all() else rows.float()))
            if layer.name == layer.group:  # a group's first layer
                for norm in net.graph.groups[layer.group].norms:
                    gamma = net.body.get_submodule(norm).weight
                    terms.append((gamma, alpha, (), None if rows.all() else rows.to(gamma.device).float()))
        alpha = self._alpha[-1]
        if net.single_head:
            source = net.graph.head_source
            cols = net.graph.head_columns(self.ledger.free(source) & ~self.pruned[source]).to(net.head_weight.device)
            terms.append((net.head_weight, alpha, (0,), None if cols.all() else cols.float()))
        else:
            terms.append((net.heads[t].weight, alpha, (1,), None))
        self._penalty = [term for term in terms if term[1] > 0]


@torch.no_grad()
def read_units(net, ledger, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Per unit group, a bool mask ``(num_units,)`` of the units owned by some task that an owned
    unit of a layer reading the group, or a head (a single head's shared weight, or every task's
    own head), reads through a weight with ``|w| > threshold · max|w|``, the maximum taken over
    that reading layer's owned rows (over the whole head weight). A diagnostic of how CLNP's
    Fig. 3 may count used units (paper 000, Sec. 3.1); ``threshold=0`` counts nonzero reads.
    The head reads its source group only: units of other groups need a reading layer."""
    out = {}
    for name in net.graph.groups:
        owned = ~ledger.free(name)
        read = torch.zeros_like(owned)
        for reader in net.graph.readers(name):
            layer = net.graph.layers[reader]
            read |= _read_above(layer.module.weight, ~ledger.free(layer.group), layer.fan, threshold)
        if name == net.graph.head_source:
            heads = [net.head_weight] if net.single_head else [h.weight for h in net.heads]
            for w in heads:
                read |= _read_above(w, torch.ones(w.shape[0], dtype=torch.bool), net.graph.head_fan, threshold)
        out[name] = read & owned
    return out


def _read_above(weight: torch.Tensor, rows: torch.Tensor, fan: int, threshold: float) -> torch.Tensor:
    """Bool mask of the source units (``fan`` input columns each) that ``weight``'s ``rows`` read
    through an entry with ``|w| > threshold · max|w[rows]|``."""
    w = weight.detach()[rows.to(weight.device)].abs()
    if w.numel() == 0:
        return torch.zeros(weight.shape[1] // fan, dtype=torch.bool)
    cols = (w > threshold * w.max()).transpose(0, 1).flatten(1).any(1).cpu()
    return cols.view(-1, fan).any(1) if fan > 1 else cols


class _Capture(fx.Interpreter):
    """Runs a traced body node by node and keeps the values of the nodes in ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]):
        super().__init__(gm)
        self.keep, self.kept = keep, {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node in self.keep:
            self.kept[node] = value
        return value


class _MaskedAccuracy:
    """Validation accuracy of task t with some candidate units pruned, computed without touching
    the weights: a pruned unit's output is replaced by exact zeros where it is read (the input
    columns of the layers reading it and, for the group the heads read, the features). Pruning
    zeroes those very columns and outputs, so the logits are the plain scan's: the products are
    the same up to the sign of an exact zero.

    Only the units of the ``scanned`` groups vary from one call to the next (``base`` is the
    pruning of the groups scanned before, fixed). Every node of the traced body that no reader
    of a scanned group reaches is computed once per validation batch and kept (if it fits in
    ``CACHE_BYTES``; else recomputed each call); each call runs only the rest of the body — the
    layers from the first reader of a scanned group on — and the head.
    """

    def __init__(self, session, base: dict[str, torch.Tensor], scanned: list[str]):
        net = session.net
        self.net, self.t = net, session.t
        self.masks = {n: m.clone() for n, m in base.items()}
        self.batches = [(x, y) for x, y, _ in session.batches(split="val", shuffle=False,
                                                               batch_size=session.config.eval_batch_size)]
        gm = net.body
        readers = {name for name, layer in net.graph.layers.items() if layer.source in scanned}
        self.head_varies = net.graph.head_source in scanned
        dirty: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if (node.op == "call_module" and node.target in readers) or any(a in dirty for a in node.all_input_nodes):
                dirty.add(node)
        output = next(node for node in gm.graph.nodes if node.op == "output")
        self.frontier: list[fx.Node] = []
        if output in dirty:
            seen = set()
            for node in gm.graph.nodes:
                if node in dirty:
                    for a in node.all_input_nodes:
                        if a not in dirty and a not in seen:
                            seen.add(a)
                            self.frontier.append(a)
            self.rest = self._subgraph(gm, dirty, output)
            self.keep = set(self.frontier)
        else:  # the scanned units reach only the heads: the features never change
            self.rest = None
            self.keep = {output.args[0]}
        self._hooks = [net.graph.layers[name].module.register_forward_pre_hook(self._masker(layer))
                       for name, layer in net.graph.layers.items() if layer.source is not None]
        self.cache: list[list[torch.Tensor]] | None = None
        try:
            self.cache = self._clean_pass()
        except _TooLarge:
            self.cache = None

    def _subgraph(self, gm: fx.GraphModule, dirty: set[fx.Node], output: fx.Node) -> fx.GraphModule:
        """The body from the frontier on: one placeholder per frontier node, then every dirty node."""
        graph = fx.Graph()
        env = {node: graph.placeholder(f"kept_{i}") for i, node in enumerate(self.frontier)}
        for node in gm.graph.nodes:
            if node in dirty and node is not output:
                env[node] = graph.node_copy(node, lambda a: env[a])
        graph.output(fx.map_arg(output.args[0], lambda a: env[a]))
        return fx.GraphModule(gm, graph)  # shares gm's modules (and their hooks)

    def _masker(self, layer):
        def hook(module, inputs):
            pruned = self.masks.get(layer.source)
            if pruned is None or not pruned.any():
                return None
            x = inputs[0]
            cols = layer.columns(pruned).to(x.device)
            shape = [1, -1] + [1] * (x.dim() - 2)
            return (x.masked_fill(cols.view(shape), 0.0),) + tuple(inputs[1:])
        return hook

    def _kept_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        capture = _Capture(self.net.body, self.keep)
        capture.run(x)
        order = self.frontier if self.rest is not None else list(self.keep)
        return [capture.kept[node] for node in order]

    @torch.no_grad()
    def _clean_pass(self) -> list[list[torch.Tensor]]:
        """The kept values of every validation batch, computed with the base pruning."""
        was = self.net.training
        self.net.eval()
        try:
            cache, size = [], 0
            for x, _ in self.batches:
                values = self._kept_values(x)
                size += sum(v.numel() * v.element_size() for v in values)
                if size > CACHE_BYTES:
                    raise _TooLarge
                cache.append(values)
            return cache
        finally:
            self.net.train(was)

    @torch.no_grad()
    def __call__(self, units: dict[str, torch.Tensor]) -> float:
        net = self.net
        self.masks = {n: m.clone() for n, m in units.items()}
        was = net.training
        net.eval()
        correct = total = 0
        try:
            for i, (x, y) in enumerate(self.batches):
                if self.cache is None:
                    h = net.features(x)  # nothing kept: the whole body, masked by the hooks
                else:
                    h = self.rest(*self.cache[i]) if self.rest is not None else self.cache[i][0]
                source = net.graph.head_source
                if source is not None and self.masks[source].any():
                    cols = net.graph.head_columns(self.masks[source]).to(h.device)
                    h = h.masked_fill(cols.view(1, -1), 0.0)
                correct += int((net.head_logits(h, self.t).argmax(1) == y).sum())
                total += len(y)
        finally:
            net.train(was)
        return correct / total

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class _TooLarge(Exception):
    """The kept values of the validation split exceed ``CACHE_BYTES``."""
