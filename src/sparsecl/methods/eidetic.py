"""EideticNets (paper 001: "Eidetic Learning: an Efficient and Provable Solution to Catastrophic
Forgetting"): train a task to a plateau of training accuracy, then prune the task's free units
iteratively while training accuracy holds, freeze the survivors and recycle the rest."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..scoring import SCORES, taylor_scores, weight_norm_scores
from .neuron import NeuronIsolation


log = logging.getLogger(__name__)


def _opt(help: str, **kw):
    return field(metadata={"help": help}, **kw)


@dataclass
class EideticConfig:
    """EideticNets hyperparameters. Defaults are the paper's best Permuted-MNIST setting
    (Sec. 6.1: Taylor pruning, step 5%, stop threshold 0.1%, learning rate halved before pruning,
    early-stopping patience 10, at most 5 recovery epochs)."""

    score: str = _opt("unit score for pruning: l1, l2 (incoming weight norm) or taylor", default="taylor")
    prune_step: float = _opt("fraction of units pruned per layer and step (see --prune-step-of)", default=0.05)
    prune_step_of: str = _opt("what --prune-step is a fraction of: 'remaining' (the task's units not "
                              "pruned yet) or 'available' (the units free when the task began: "
                              "constant steps, fewer of them)", default="remaining")
    tolerance: float = _opt("stop pruning when training accuracy < best*(1-tolerance)", default=0.001)
    patience: int = _opt("epochs without a better training accuracy before pruning starts", default=10)
    recovery_epochs: int = _opt("maximum training epochs to recover after a pruning step", default=5)
    max_pruned_ratio: float = _opt("maximum fraction of a layer's available units pruned per task", default=1.0)
    forward_transfer: bool = _opt("new units may read units of earlier tasks", default=True)
    widen: int = _opt("units added to a layer that has no free unit when a task starts "
                      "(0: stop with an error instead)", default=0)
    reuse_full: bool = _opt("a layer (unit group) with no free unit when a task starts is only "
                            "reused, frozen, by the new task instead of stopping with an error "
                            "(needs forward transfer; never the single head's final hidden layer)",
                            default=False)
    pruning_lr_factor: float = _opt("learning-rate factor applied before pruning starts", default=0.5)
    score_batches: int | None = _opt("taylor: training batches the scores are accumulated over "
                                     "(default: the whole training set)", default=None)
    accuracy_samples: int | None = _opt("training samples (the task's first N) on which the stop rule "
                                        "measures accuracy (default: the whole training set)", default=None)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got '{self.score}'")
        if self.prune_step_of not in ("remaining", "available"):
            raise ConfigError(f"--prune-step-of must be 'remaining' or 'available', got '{self.prune_step_of}'")
        if not 0 < self.prune_step <= 1:
            raise ConfigError(f"--prune-step must be in (0, 1], got {self.prune_step}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in [0, 1), got {self.tolerance}")
        if not 0 <= self.max_pruned_ratio <= 1:
            raise ConfigError(f"--max-pruned-ratio must be in [0, 1], got {self.max_pruned_ratio}")
        for name in ("score_batches", "accuracy_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.patience < 1 or self.recovery_epochs < 0 or self.pruning_lr_factor <= 0 or self.widen < 0:
            raise ConfigError("--patience must be >= 1, --recovery-epochs >= 0, "
                              "--pruning-lr-factor > 0 and --widen >= 0")


class EideticNets(NeuronIsolation):
    """Iterative structured pruning per task (paper 001, Sec. 3 and 6.1).

    Training runs until the running training accuracy has not improved for ``patience`` epochs
    (or reaches 100%, or the epoch budget ends). Then, with the learning rate scaled by
    ``pruning_lr_factor``, each step removes ``prune_step`` of the task's remaining units (with
    ``prune_step_of='available'``: of the units free when the task began, as the reference
    implementation's constant step size) in every hidden layer (lowest score first; frozen units
    are never scored), recovers for up to
    ``recovery_epochs`` epochs until training accuracy is back within ``best*(1-tolerance)``,
    and otherwise rolls the step back — weights, optimizer state and pruning masks — and stops.
    Training accuracy for the stop rule is measured in eval mode over the task's training set, so
    dropout noise cannot trigger or hide a drop. ``score_batches`` and ``accuracy_samples`` bound
    the cost of a pruning step on slow machines (the paper uses the whole training set for both).
    """

    name = "eidetic"

    def __init__(self, config: EideticConfig | None = None):
        self.config = config or EideticConfig()
        super().__init__(forward_transfer=self.config.forward_transfer, widen=self.config.widen,
                         reuse_full=self.config.reuse_full)
        self.log: list[dict] = []  # one entry per task: pruning steps taken, accuracies

    def train_task(self, session) -> None:
        best, stale = -1.0, 0
        for _ in range(session.config.epochs):
            acc = session.train_epoch().accuracy
            if acc > best:
                best, stale = acc, 0
            else:
                stale += 1
            if acc >= 1.0 or stale >= self.config.patience:
                break

    def select(self, session) -> None:
        cfg, net, t = self.config, session.net, session.t
        session.scale_lr(cfg.pruning_lr_factor)
        best = self._train_accuracy(session)
        entry = {"task": t, "epochs": session.epochs_trained, "best_train_accuracy": best, "steps": 0,
                 "rolled_back": False}
        limit = {n: math.floor(cfg.max_pruned_ratio * int(self.ledger.free(n).sum())) for n in self.pruned}
        threshold = lambda: best * (1 - cfg.tolerance)  # noqa: E731  (best rises during recovery)
        while True:
            chosen = self._choose(session, limit)
            if not any(m.any() for m in chosen.values()):
                break
            state, pruned = session.snapshot(), self.pruned_state()
            self.prune(net, t, chosen)
            acc = self._train_accuracy(session)
            for _ in range(cfg.recovery_epochs):
                if acc >= threshold():
                    break
                session.train_epoch()
                acc = self._train_accuracy(session)
            if acc < threshold():
                session.rollback(state)
                self.set_pruned(net, t, pruned)
                entry["rolled_back"] = True
                log.info("task %d: step %d rolled back (training accuracy %.4f < %.4f)", t,
                         entry["steps"] + 1, acc, threshold())
                break
            best = max(best, acc)
            entry["steps"] += 1
            log.info("task %d pruning step %d: kept %s, training accuracy %.4f", t, entry["steps"],
                     {n: int(self.candidates(n).sum()) for n in self.pruned}, acc)
        entry["threshold"] = threshold()
        entry["final_train_accuracy"] = self._train_accuracy(session)
        entry["pruned"] = {n: int(m.sum()) for n, m in self.pruned.items()}
        entry["kept"] = {n: int(self.candidates(n).sum()) for n in self.pruned}
        self.log.append(entry)

    def _train_accuracy(self, session) -> float:
        """Eval-mode accuracy on the task's training set (its first ``accuracy_samples``)."""
        return session.accuracy("train", self.config.accuracy_samples)

    def _choose(self, session, limit: dict[str, int]) -> dict[str, torch.Tensor]:
        """Lowest-scoring ``prune_step`` of each layer's remaining candidates, within the cap."""
        counts = {}
        for name in self.pruned:
            remaining = int(self.candidates(name).sum())
            base = remaining if self.config.prune_step_of == "remaining" else int(self.ledger.free(name).sum())
            room = limit[name] - int(self.pruned[name].sum())
            counts[name] = min(max(1, math.floor(self.config.prune_step * base)), remaining, room)
        if not any(counts.values()):
            return {}
        scores = self._scores(session)
        chosen = {}
        for name, k in counts.items():
            cand = self.candidates(name)
            mask = torch.zeros_like(cand)
            if k > 0:  # rank the candidates only: a NaN score can never reach a frozen unit
                idx = cand.nonzero().flatten()
                mask[idx[torch.topk(scores[name][idx], k, largest=False).indices]] = True
            chosen[name] = mask
        return chosen

    def _scores(self, session) -> dict[str, torch.Tensor]:
        if self.config.score == "taylor":
            net = session.net
            batches = itertools.islice(session.batches(shuffle=False, batch_size=session.config.eval_batch_size),
                                       self.config.score_batches)
            return taylor_scores(net, batches, net.task_loss)
        return weight_norm_scores(session.net, 1 if self.config.score == "l1" else 2)
