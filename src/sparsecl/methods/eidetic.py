"""EideticNets (paper 001: "Eidetic Learning: an Efficient and Provable Solution to Catastrophic
Forgetting"): train a task to a plateau of training accuracy, then prune the task's free units
while accuracy holds, freeze the survivors and recycle the rest.

The paper's decision rule: keep the most pruning whose accuracy, after at most N recovery
epochs, stays >= best·(1 − tolerance). ``walk`` finds it as the paper does, 5% steps each with its
recovery; ``bisect`` (default) finds a pruning that satisfies the same rule with far fewer trained
epochs: it scores once per round, tries prune amounts by an exponential then a binary search from
a snapshot of the weights, optimizer state and masks, and trains only at the amounts it tries
(DESIGN §2.7)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..scoring import SCORES, TaylorAccumulator, layer_normalized, taylor_scores, weight_norm_scores
from .base import config_field as _opt
from .neuron import NeuronIsolation


log = logging.getLogger(__name__)

SEARCHES = ("bisect", "gallop", "walk")
STOP_ON = ("val", "train", "train-running")
SCOPES = ("layer", "network")
_ALL = "*"  # the key of a network-wide prune count


@dataclass
class EideticConfig:
    """EideticNets hyperparameters. Defaults are the paper's best Permuted-MNIST setting
    (Sec. 6.1: Taylor pruning, step 5%, stop threshold 0.1%, learning rate halved before pruning,
    early-stopping patience 10, at most 5 recovery epochs); ``prune_search``, ``stop_on``,
    ``fresh_scores`` and ``score_scope`` choose how the pruning point is found (see
    ``EideticNets``)."""

    score: str = _opt("unit score for pruning: l1, l2 (incoming weight norm) or taylor", default="taylor")
    prune_step: float = _opt("fraction of units pruned per layer and step (see --prune-step-of)", default=0.05)
    prune_step_of: str = _opt("what --prune-step is a fraction of: 'remaining' (the task's units not "
                              "pruned yet) or 'available' (the units free when the task began: "
                              "constant steps, fewer of them)", default="remaining")
    tolerance: float = _opt("stop pruning when the accuracy (--stop-on) < best*(1-tolerance)", default=0.001)
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
    score_batches: int | None = _opt("taylor: score with a pass of its own over this many training batches "
                                     "(implies --fresh-scores, whose pass covers the whole training set)",
                                     default=None)
    accuracy_samples: int | None = _opt("--stop-on train: training samples (the task's first N) on which the "
                                        "stop rule measures accuracy (default: the whole training set)", default=None)
    prune_search: str = _opt("how the pruning point is found: 'bisect' (score once per round, try prune "
                             "amounts by exponential then binary search from snapshots, train only at the "
                             "amounts tried), 'gallop' (the walk with steps that double after a pass and "
                             "halve after a failure, each from the last kept state) or 'walk' (the paper's: "
                             "one step at a time, each recovered)", default="bisect")
    stop_on: str = _opt("the accuracy the stop rule reads: 'val' (eval mode, the task's validation split), "
                        "'train' (eval mode, the training set) or 'train-running' (the running train-mode "
                        "accuracy of a recovery epoch, as the reference implementation; every tried "
                        "amount then trains at least one epoch)", default="val")
    fresh_scores: bool = _opt("taylor: score with a pass of its own over the training set (eval mode) each "
                              "time, instead of the gradients of the last training or recovery epoch",
                              default=False)
    raise_best: bool = _opt("the stop rule's best accuracy rises to that of every accepted pruning that measures "
                            "higher (the reference implementation); off: it stays the accuracy measured before "
                            "pruning (the paper's text; a maximum of noisy measurements is biased upwards)",
                            default=True)
    prune_tasks: int | None = _opt("prune only the first N tasks; later ones keep every unit that was free for "
                                   "them (the reference implementation does not prune its last task)",
                                   default=None)
    score_scope: str = _opt("'layer': every layer prunes the same share of its units; 'network': scores are "
                            "normalized per layer and one threshold over all layers picks the share of "
                            "all remaining units (the reference implementation's Taylor pruning)",
                            default="layer")

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got '{self.score}'")
        if self.prune_step_of not in ("remaining", "available"):
            raise ConfigError(f"--prune-step-of must be 'remaining' or 'available', got '{self.prune_step_of}'")
        for flag, value, allowed in (("--prune-search", self.prune_search, SEARCHES),
                                     ("--stop-on", self.stop_on, STOP_ON),
                                     ("--score-scope", self.score_scope, SCOPES)):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got '{value}'")
        if not 0 < self.prune_step <= 1:
            raise ConfigError(f"--prune-step must be in (0, 1], got {self.prune_step}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in [0, 1), got {self.tolerance}")
        if not 0 <= self.max_pruned_ratio <= 1:
            raise ConfigError(f"--max-pruned-ratio must be in [0, 1], got {self.max_pruned_ratio}")
        if self.prune_tasks is not None and self.prune_tasks < 0:
            raise ConfigError(f"--prune-tasks must be at least 0, got {self.prune_tasks}")
        for name in ("score_batches", "accuracy_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.patience < 1 or self.recovery_epochs < 0 or self.pruning_lr_factor <= 0 or self.widen < 0:
            raise ConfigError("--patience must be >= 1, --recovery-epochs >= 0, "
                              "--pruning-lr-factor > 0 and --widen >= 0")
        if self.accuracy_samples is not None and self.stop_on != "train":
            raise ConfigError("--accuracy-samples bounds the training-set measurement of --stop-on train; "
                              f"with --stop-on {self.stop_on} drop it")
        if self.stop_on == "train-running" and self.recovery_epochs < 1:
            raise ConfigError("--stop-on train-running reads the accuracy of a recovery epoch: it needs "
                              "--recovery-epochs >= 1")


@dataclass
class _Trial:
    """A prune amount tried by the search: ``steps`` pruning steps' worth of units, the
    accuracy that decided it and the recovery epochs it trained; ``saved`` is the state to keep
    when it passed."""

    steps: int
    passed: bool
    accuracy: float
    epochs: int
    pruned: int = 0
    saved: tuple | None = None


class EideticNets(NeuronIsolation):
    """Iterative structured pruning per task (paper 001, Sec. 3 and 6.1).

    Training runs until the running training accuracy has not improved for ``patience`` epochs
    (or reaches 100%, or the epoch budget ends). Then, with the learning rate scaled by
    ``pruning_lr_factor``, units are pruned (lowest score first; frozen units are never scored)
    while the accuracy read by the stop rule (``stop_on``) stays >= ``best*(1-tolerance)``,
    ``best`` being that accuracy before pruning (with ``raise_best``, raised by every accepted
    pruning that measures higher). An amount that fails right after pruning is recovered for up to ``recovery_epochs``
    epochs, measured after each; an amount that still fails is rolled back — weights, optimizer
    state and masks. A *step* removes ``prune_step`` of the task's remaining units (with
    ``prune_step_of='available'``: of the units free when the task began, as the reference
    implementation's constant step size) in every hidden layer, or with
    ``score_scope='network'`` that share of all remaining units, chosen by per-layer normalized
    scores under one threshold.

    ``prune_search='walk'``: the paper's procedure, step after step, each scored afresh and
    recovered, until a step fails. ``'bisect'``: rounds; a round scores once and tries amounts of
    1, 2, 4, ... steps of the round's scores, each from the round's snapshot, then bisects
    between the largest passing and the smallest failing amount. With an accuracy that can be
    read without training (``stop_on`` val or train) that search only measures, and the round
    then tries the next amount once with recovery epochs: if it passes, the next round starts
    from it, else the search keeps the largest amount that passed and stops — the walk's stop
    condition (one more step fails even after recovery). With ``train-running`` every tried
    amount trains, and one round decides. ``'gallop'``: the walk with growing steps — each try
    prunes k steps' worth from the last kept state and recovers; k doubles after a pass and halves
    after a failure (rolled back); a failing single step ends it, as it ends the walk. With a rule
    read without training only single steps get recovery epochs (a larger failing try just backs
    off). Unlike
    bisect's tries from one snapshot, every kept try's recovery epochs stay in the model, as the
    walk's do. An amount is kept only if it passed the rule.

    Taylor scores come from the gradients of the last training or recovery epoch
    (``scoring.TaylorAccumulator``; a walk step that passed without recovery is ranked by the
    epoch before it, minus the units pruned since), unless ``fresh_scores`` asks for a scoring
    pass of their own (the paper's, eval mode, ``score_batches`` of the training set). L1/L2
    need no data: a bisect trial of k steps replays the walk's first k steps exactly.

    ``log`` holds one entry per task: ``search``, ``stop_on``, ``epochs`` (training epochs before
    pruning), ``recovery_epochs`` (all trained while pruning, those of rolled-back amounts
    included), ``epochs_trained`` (both), ``rounds`` (the walk: steps kept), ``trials`` (every
    amount tried: round, steps, units pruned, accuracy, the threshold it had to reach, recovery
    epochs, passed), ``accepted`` (the amount each round kept), ``steps`` (the steps the kept
    pruning spans), ``start_accuracy`` and ``best_accuracy`` (``best`` before and after
    pruning), ``threshold``, ``final_accuracy``, ``pruned``/``kept`` units per layer,
    ``seconds`` (training and pruning) and ``select_seconds`` (pruning). The keys
    ``best_train_accuracy``/``final_train_accuracy`` repeat ``best_accuracy``/``final_accuracy``
    under their names from before ``stop_on`` existed.
    """

    name = "eidetic"

    def __init__(self, config: EideticConfig | None = None):
        self.config = config or EideticConfig()
        super().__init__(forward_transfer=self.config.forward_transfer, widen=self.config.widen,
                         reuse_full=self.config.reuse_full)
        self.log: list[dict] = []
        self._taylor: TaylorAccumulator | None = None
        self._started = 0.0
        self._train_best = -1.0
        self._recovery = 0

    @property
    def _fresh(self) -> bool:
        return self.config.fresh_scores or self.config.score_batches is not None

    # ---- hooks -------------------------------------------------------------------------------
    def train_task(self, session) -> None:
        task = session.task
        if self.config.stop_on == "val" and len(task.val_y) == 0:  # refused before any training
            raise ConfigError(f"--stop-on val reads the validation split, but task {session.t} ('{task.name}') "
                              "has none: use --val-fraction > 0 or --stop-on train / train-running")
        self._started = time.perf_counter()
        self._recovery = 0
        if self.config.score == "taylor" and not self._fresh:
            self._taylor = TaylorAccumulator(session.net)
            self._taylor.attach()
        best, stale = -1.0, 0
        for _ in range(session.config.epochs):
            acc = self._epoch(session).accuracy
            if acc > best:
                best, stale = acc, 0
            else:
                stale += 1
            if acc >= 1.0 or stale >= self.config.patience:
                break
        self._train_best = best

    def end_task(self, session) -> None:
        try:
            super().end_task(session)
        finally:
            if self._taylor is not None:
                self._taylor.detach()
                self._taylor = None

    # ---- selection ---------------------------------------------------------------------------
    def select(self, session) -> None:
        cfg, net, t = self.config, session.net, session.t
        started = time.perf_counter()
        epochs = session.epochs_trained
        session.scale_lr(cfg.pruning_lr_factor)
        best = self._train_best if cfg.stop_on == "train-running" else self._measure(session)
        limit = {n: math.floor(cfg.max_pruned_ratio * int(self.ledger.free(n).sum())) for n in self.pruned}
        entry = {"task": t, "search": cfg.prune_search, "stop_on": cfg.stop_on, "epochs": epochs,
                 "start_accuracy": best, "steps": 0, "rounds": 0, "rolled_back": False, "trials": [],
                 "accepted": []}
        if cfg.prune_tasks is not None and t >= cfg.prune_tasks:
            entry["search"], final = "none", best
        else:
            search = {"walk": self._walk, "bisect": self._bisect, "gallop": self._gallop}[cfg.prune_search]
            best, final = search(session, limit, best, entry)
        entry["best_accuracy"] = best
        entry["threshold"] = best * (1 - cfg.tolerance)
        entry["final_accuracy"] = final
        entry["best_train_accuracy"], entry["final_train_accuracy"] = best, final
        entry["recovery_epochs"] = self._recovery
        entry["epochs_trained"] = epochs + self._recovery
        entry["pruned"] = {n: int(m.sum()) for n, m in self.pruned.items()}
        entry["kept"] = {n: int(self.candidates(n).sum()) for n in self.pruned}
        entry["select_seconds"] = time.perf_counter() - started
        entry["seconds"] = time.perf_counter() - self._started
        self.log.append(entry)
        log.info("task %d: %s search kept %s after %d rounds, %d recovery epochs (%.1fs)", t,
                 cfg.prune_search, entry["kept"], entry["rounds"], self._recovery, entry["select_seconds"])

    def _walk(self, session, limit: dict[str, int], best: float, entry: dict) -> tuple[float, float]:
        """The paper's procedure: one step at a time, each scored afresh and recovered."""
        net, t, final = session.net, session.t, best
        while True:
            chosen = self._choose(session, limit)
            if not any(m.any() for m in chosen.values()):
                break
            saved = self._save(session)
            self.prune(net, t, chosen)
            threshold = best * (1 - self.config.tolerance)
            passed, acc, epochs = self._recover(session, threshold, recover=True)
            entry["trials"].append({"round": entry["steps"] + 1, "steps": 1, "pruned": _count(chosen),
                                    "accuracy": acc, "threshold": threshold, "epochs": epochs, "passed": passed,
                                    "recovery": True})
            if not passed:
                self._restore(session, saved)
                entry["rolled_back"] = True
                log.info("task %d: step %d rolled back (accuracy %.4f < %.4f)", t, entry["steps"] + 1, acc, threshold)
                break
            best, final = self._raised(best, acc), acc
            entry["steps"] += 1
            entry["rounds"] += 1
            entry["accepted"].append({"round": entry["rounds"], "steps": 1, "pruned": _count(chosen)})
            log.info("task %d pruning step %d: kept %s, accuracy %.4f", t, entry["steps"],
                     {n: int(self.candidates(n).sum()) for n in self.pruned}, acc)
        return best, final

    def _gallop(self, session, limit: dict[str, int], best: float, entry: dict) -> tuple[float, float]:
        """The walk with growing steps: each try prunes k steps' worth from the last kept state
        and recovers; k doubles after a pass and halves after a failure (which is rolled back);
        a failing single step ends the search, as it ends the walk."""
        net, t, final = session.net, session.t, best
        k = 1
        while True:
            amounts = self._amounts(limit)
            if len(amounts) == 1:
                break
            k = min(k, len(amounts) - 1)
            entry["rounds"] += 1
            saved = self._save(session)
            start = _count(self.pruned)
            if self.config.score == "taylor":  # one ranking for the k steps
                room = {n: limit[n] - int(self.pruned[n].sum()) for n in self.pruned}
                self.prune(net, t, self._lowest(self._scores(session), amounts[k], room))
            else:  # weight norms: the walk's k steps exactly
                for _ in range(k):
                    self.prune(net, t, self._choose(session, limit))
            pruned = _count(self.pruned) - start
            threshold = best * (1 - self.config.tolerance)
            # a rule read without training backs off for free: only a single step gets recovery
            recover = k == 1 or self.config.stop_on == "train-running"
            passed, acc, epochs = self._recover(session, threshold, recover=recover)
            entry["trials"].append({"round": entry["rounds"], "steps": k, "pruned": pruned, "accuracy": acc,
                                    "threshold": threshold, "epochs": epochs, "passed": passed, "recovery": recover})
            if passed:
                best, final = self._raised(best, acc), acc
                entry["steps"] += k
                entry["accepted"].append({"round": entry["rounds"], "steps": k, "pruned": pruned})
                k *= 2
                continue
            self._restore(session, saved)
            if k == 1:
                entry["rolled_back"] = True
                break
            k //= 2
        return best, final

    def _bisect(self, session, limit: dict[str, int], best: float, entry: dict) -> tuple[float, float]:
        """Rounds of exponential then binary search over prune amounts (see the class doc)."""
        net, t, final = session.net, session.t, best
        cheap = self.config.stop_on != "train-running"
        while True:
            amounts = self._amounts(limit)
            K = len(amounts) - 1
            if K == 0:
                break
            entry["rounds"] += 1
            r = entry["rounds"]
            room = {n: limit[n] - int(self.pruned[n].sum()) for n in self.pruned}
            base = self._save(session)
            start = _count(self.pruned)
            # Weight norms need no data: a trial of k steps replays the walk's first k steps
            # exactly (each re-ranks the units once the previous step's columns are zeroed).
            # Taylor scores are taken once per round and rank all k steps' units at once.
            replay = self.config.score != "taylor"
            scores = None if replay else self._scores(session)
            masks = [self.pruned_state()]
            threshold = best * (1 - self.config.tolerance)
            modified = False

            def prune_steps(k: int) -> None:
                """Prune k steps' worth of units from the round's start."""
                nonlocal modified
                if modified:
                    self._restore(session, base)
                modified = True
                if not replay:
                    self.prune(net, t, self._lowest(scores, amounts[k], room))
                    return
                j = min(k, len(masks) - 1)
                if j:
                    self.set_pruned(net, t, masks[j])
                while j < k:
                    chosen = self._choose(session, limit)
                    if not any(m.any() for m in chosen.values()):
                        break
                    self.prune(net, t, chosen)
                    masks.append(self.pruned_state())
                    j += 1

            def trial(k: int, recover: bool) -> _Trial:
                prune_steps(k)
                pruned = _count(self.pruned) - start
                passed, acc, epochs = self._recover(session, threshold, recover)
                entry["trials"].append({"round": r, "steps": k, "pruned": pruned, "accuracy": acc,
                                        "threshold": threshold, "epochs": epochs, "passed": passed,
                                        "recovery": recover})
                return _Trial(k, passed, acc, epochs, pruned, self._save(session) if passed else None)

            good, bad = _Trial(0, True, best, 0), None
            k = 1
            while True:  # exponential: 1, 2, 4, ... steps, then K
                tried = trial(k, recover=not cheap)
                if not tried.passed:
                    bad = tried
                    break
                good = tried
                if k == K:
                    break
                k = min(2 * k, K)
            while bad is not None and bad.steps - good.steps > 1:
                tried = trial((good.steps + bad.steps) // 2, recover=not cheap)
                if tried.passed:
                    good = tried
                else:
                    bad = tried
            again = False
            if cheap and bad is not None and self.config.recovery_epochs > 0:
                tried = trial(bad.steps, recover=True)  # the next amount, given its recovery epochs
                if tried.passed:
                    good, again = tried, True
            if good.steps == 0:
                self._restore(session, base)
                entry["rolled_back"] = True
                break
            self._restore(session, good.saved)
            best, final = self._raised(best, good.accuracy), good.accuracy
            entry["steps"] += good.steps
            entry["accepted"].append({"round": r, "steps": good.steps, "pruned": good.pruned})
            log.info("task %d round %d: %d steps kept, %s units left, accuracy %.4f", t, r, good.steps,
                     {n: int(self.candidates(n).sum()) for n in self.pruned}, good.accuracy)
            if not again:
                break
        return best, final

    # ---- measurement and training ------------------------------------------------------------
    def _raised(self, best: float, accepted: float) -> float:
        return max(best, accepted) if self.config.raise_best else best

    def _epoch(self, session, phase: str | None = None):
        """One training epoch (of ``phase`` in the run history); the Taylor accumulator then
        holds this epoch's gradients."""
        if self._taylor is not None:
            self._taylor.reset()
        return session.train_epoch(phase=phase)

    def _measure(self, session) -> float:
        """The stop rule's accuracy, eval mode: the validation split or the training set."""
        if self.config.stop_on == "val":
            return session.accuracy("val")
        return session.accuracy("train", self.config.accuracy_samples)

    def _recover(self, session, threshold: float, recover: bool) -> tuple[bool, float, int]:
        """``(passed, accuracy, recovery epochs)`` of the pruning just applied: measured at once
        (not with ``train-running``), then after each recovery epoch until it passes, up to
        ``recovery_epochs`` (none unless ``recover``)."""
        running = self.config.stop_on == "train-running"
        acc, epochs = -1.0, 0
        if not running:
            acc = self._measure(session)
            if acc >= threshold:
                return True, acc, 0
        if not recover:
            return False, acc, 0
        for epochs in range(1, self.config.recovery_epochs + 1):
            self._recovery += 1
            stats = self._epoch(session, "recovery")
            acc = stats.accuracy if running else self._measure(session)
            if acc >= threshold:
                return True, acc, epochs
        return False, acc, epochs

    def _save(self, session) -> tuple:
        return (session.snapshot(), self.pruned_state(),
                None if self._taylor is None else self._taylor.state())

    def _restore(self, session, saved: tuple) -> None:
        state, pruned, taylor = saved
        session.rollback(state)
        self.set_pruned(session.net, session.t, pruned)
        if taylor is not None:
            self._taylor.load(taylor)

    # ---- choosing units ----------------------------------------------------------------------
    def _step(self, remaining: dict[str, int], room: dict[str, int]) -> dict[str, int]:
        """Units one pruning step removes: per layer, or (network scope) in all under ``_ALL``."""
        of_remaining = self.config.prune_step_of == "remaining"
        if self.config.score_scope == "network":
            base = sum(remaining.values()) if of_remaining else sum(int(self.ledger.free(n).sum()) for n in remaining)
            cap = sum(min(remaining[n], room[n]) for n in remaining)
            return {_ALL: min(max(1, math.floor(self.config.prune_step * base)), cap)}
        counts = {}
        for name in remaining:
            base = remaining[name] if of_remaining else int(self.ledger.free(name).sum())
            counts[name] = max(0, min(max(1, math.floor(self.config.prune_step * base)), remaining[name], room[name]))
        return counts

    def _amounts(self, limit: dict[str, int]) -> list[dict[str, int]]:
        """Cumulative units to prune after 0, 1, ..., K steps from the current pruning, K the
        steps until nothing more may be pruned (the walk's counts, without re-scoring)."""
        remaining = {n: int(self.candidates(n).sum()) for n in self.pruned}
        room = {n: limit[n] - int(self.pruned[n].sum()) for n in self.pruned}
        network = self.config.score_scope == "network"
        total = {_ALL: 0} if network else {n: 0 for n in self.pruned}
        amounts = [dict(total)]
        while True:
            step = self._step(remaining, room)
            if not any(step.values()):
                return amounts
            if network:  # which layers lose the units is up to the scores: cap the total only
                total[_ALL] += step[_ALL]
                left = step[_ALL]
                for n in remaining:
                    take = min(left, remaining[n], room[n])
                    remaining[n] -= take
                    room[n] -= take
                    left -= take
            else:
                for n, c in step.items():
                    total[n] += c
                    remaining[n] -= c
                    room[n] -= c
            amounts.append(dict(total))

    def _choose(self, session, limit: dict[str, int]) -> dict[str, torch.Tensor]:
        """The next step's units: the lowest-scoring ``prune_step`` of each layer's remaining
        candidates (network scope: of all of them), within the cap."""
        remaining = {n: int(self.candidates(n).sum()) for n in self.pruned}
        room = {n: limit[n] - int(self.pruned[n].sum()) for n in self.pruned}
        counts = self._step(remaining, room)
        if not any(counts.values()):
            return {}
        return self._lowest(self._scores(session), counts, room)

    def _lowest(self, scores: dict[str, torch.Tensor], counts: dict[str, int],
                room: dict[str, int]) -> dict[str, torch.Tensor]:
        """Bool masks of the lowest-scoring candidates: ``counts[layer]`` per layer, or
        ``counts[_ALL]`` over all layers by per-layer normalized scores, at most ``room[layer]``
        in a layer. Only candidates are ranked, so a NaN score can never reach a frozen unit."""
        cand = {n: self.candidates(n) for n in self.pruned}
        chosen = {n: torch.zeros_like(c) for n, c in cand.items()}
        if _ALL in counts:
            normal = layer_normalized(scores, cand)
            names, idx, vals = [], [], []
            for i, n in enumerate(cand):
                where = cand[n].nonzero().flatten()
                names.append(torch.full((len(where),), i))
                idx.append(where)
                vals.append(normal[n][where])
            order = torch.cat(vals).argsort(stable=True) if vals else torch.empty(0, dtype=torch.long)
            layer_of, unit_of = torch.cat(names), torch.cat(idx)
            taken = {n: 0 for n in cand}
            left = counts[_ALL]
            keys = list(cand)
            for j in order.tolist():
                if left == 0:
                    break
                n = keys[int(layer_of[j])]
                if taken[n] < min(room[n], int(cand[n].sum())):
                    chosen[n][unit_of[j]] = True
                    taken[n] += 1
                    left -= 1
            return chosen
        for name, k in counts.items():
            if k > 0:
                where = cand[name].nonzero().flatten()
                chosen[name][where[torch.topk(scores[name][where], k, largest=False).indices]] = True
        return chosen

    def _scores(self, session) -> dict[str, torch.Tensor]:
        if self.config.score != "taylor":
            return weight_norm_scores(session.net, 1 if self.config.score == "l1" else 2)
        if self._taylor is not None and self._taylor.count:
            return self._taylor.scores(getattr(session, "world", None))
        net = session.net
        batches = session.batches(shuffle=False, batch_size=session.config.eval_batch_size)
        if self.config.score_batches is not None:
            batches = (b for b, _ in zip(batches, range(self.config.score_batches)))
        return taylor_scores(net, batches, net.task_loss)


def _count(chosen: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in chosen.values())
