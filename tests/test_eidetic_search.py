"""EideticNets' pruning search (issue "Fast protocols"): ``bisect`` and ``walk`` both keep only
pruning that passed the paper's rule, bisect trains fewer epochs, Taylor scores gathered from
training epochs match a scoring pass, and the options are checked."""

from types import SimpleNamespace

import pytest
import torch

from sparsecl.errors import ConfigError
from sparsecl.methods import EideticConfig, EideticNets
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.scoring import TaylorAccumulator, taylor_scores
from sparsecl.trainer import TaskSession, TrainConfig, Trainer
from synthetic import cluster_benchmark


def _check_rule(entry):
    """Every kept amount passed, every trial's verdict is its accuracy against its threshold, and
    the units pruned are exactly the amounts kept."""
    for trial in entry["trials"]:
        assert trial["passed"] == (trial["accuracy"] >= trial["threshold"])
    for kept in entry["accepted"]:
        key = (kept["round"], kept["steps"], kept["pruned"])
        assert any(t["passed"] and (t["round"], t["steps"], t["pruned"]) == key for t in entry["trials"])
    assert sum(k["pruned"] for k in entry["accepted"]) == sum(entry["pruned"].values())
    assert entry["final_accuracy"] >= entry["threshold"]
    assert entry["epochs_trained"] == entry["epochs"] + entry["recovery_epochs"]
    assert entry["recovery_epochs"] == sum(t["epochs"] for t in entry["trials"])


def _run(search, stop_on="train-running", score="l2", tasks=2, **kw):
    options = dict(score=score, patience=2, prune_step=0.1, tolerance=0.02, recovery_epochs=2,
                   prune_search=search, stop_on=stop_on)
    method = EideticNets(EideticConfig(**{**options, **kw}))
    torch.manual_seed(0)
    result = Trainer(method, TrainConfig(epochs=4, batch_size=32, seed=0, lr=1e-2)).fit(
        mlp((20,), (48, 48), 3), cluster_benchmark(num_tasks=tasks))
    assert result.max_logit_change == 0.0
    return method, result


@pytest.mark.parametrize("stop_on", ["train-running", "val"])
def test_walk_and_bisect_both_keep_only_passing_pruning_and_bisect_trains_fewer_epochs(stop_on):
    walk, _ = _run("walk", stop_on)
    bisect, result = _run("bisect", stop_on)
    gallop, galloped = _run("gallop", stop_on)
    for entry in walk.log + bisect.log + gallop.log:
        _check_rule(entry)
    assert min(galloped.accuracy_matrix[-1]) > 0.8
    assert min(result.accuracy_matrix[-1]) > 0.8
    assert all(max(e["kept"].values()) < 48 for e in bisect.log)  # it really pruned
    walked = sum(e["recovery_epochs"] for e in walk.log)
    searched = sum(e["recovery_epochs"] for e in bisect.log)
    if stop_on == "train-running":  # every walk step trains; bisect trains at the amounts it tries
        assert searched < walked
        assert sum(e["recovery_epochs"] for e in gallop.log) < walked
    else:
        assert searched <= walked


class Scripted(EideticNets):
    """EideticNets whose stop rule reads a scripted accuracy: ``curve[units pruned]`` right after
    pruning, ``recovered[units pruned]`` after any recovery epoch — not monotone on purpose."""

    def __init__(self, config, curve, recovered):
        super().__init__(config)
        self.curve, self.recovered, self._since = curve, recovered, 0

    def _measure(self, session):
        pruned = sum(int(m.sum()) for m in self.pruned.values())
        return (self.recovered if self._since else self.curve)(pruned)

    def _epoch(self, session, phase=None):
        self._since += 1
        return super()._epoch(session, phase)

    def prune(self, net, t, units):
        self._since = 0
        super().prune(net, t, units)

    def set_pruned(self, net, t, pruned):
        self._since = 0
        super().set_pruned(net, t, pruned)


@pytest.mark.parametrize("search", ["bisect", "gallop", "walk"])
def test_the_search_never_keeps_an_amount_that_failed(search):
    """Accuracy 1.0 up to 20 units pruned, 0.5 beyond 20 except a lucky 1.0 at 30 right after
    pruning; recovery brings amounts up to 26 units back. The search may skip the lucky amount
    but never keeps a failing one, and keeps at least the 20 units that pass without recovery."""
    curve = lambda n: 1.0 if n <= 20 or n == 30 else 0.5  # noqa: E731
    recovered = lambda n: 1.0 if n <= 26 else 0.5  # noqa: E731
    config = EideticConfig(score="l2", patience=1, prune_step=0.02, prune_step_of="available", tolerance=0.01,
                           recovery_epochs=1, prune_search=search, stop_on="val")
    method = Scripted(config, curve, recovered)
    Trainer(method, TrainConfig(epochs=1, batch_size=64, seed=0)).fit(mlp((20,), (50,), 3), cluster_benchmark(1))
    entry = method.log[0]
    _check_rule(entry)
    (pruned,) = entry["pruned"].values()
    assert 20 <= pruned <= 26
    # the walk stops at the first amount that fails after recovery: 27 units; so does gallop,
    # whose last try is a single step
    assert pruned == 26 if search in ("walk", "gallop") else True


def test_taylor_scores_from_a_training_epoch_match_a_scoring_pass():
    """With nothing moving the weights (lr 0, no dropout), the scores gathered from an epoch's
    gradients equal those of a separate scoring pass (Molchanov et al. 2017, Eq. 8)."""
    bench = cluster_benchmark(num_tasks=1)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16, 12), 3))
    method = EideticNets(EideticConfig(score="taylor"))
    method.setup(net)
    net.add_head(3)
    method.begin_task(net, 0, bench.tasks[0])
    session = TaskSession(net, method, 0, bench.tasks, TrainConfig(batch_size=32, lr=0.0, optimizer="sgd"), None)
    acc = TaylorAccumulator(net)
    acc.attach()
    session.train_epoch()
    acc.detach()
    gathered = acc.scores()
    assert acc.count == len(bench.tasks[0].train_y)
    fresh = taylor_scores(net, session.batches(shuffle=False), net.task_loss)
    for name in fresh:
        assert torch.allclose(gathered[name], fresh[name], rtol=1e-4, atol=1e-7)
    assert all(s.gt(0).any() for s in gathered.values())
    session.accuracy("val")  # an eval-mode measurement adds nothing
    assert acc.count == len(bench.tasks[0].train_y)


def test_taylor_from_training_epochs_is_the_default_and_fresh_scores_stay_selectable():
    gathered, _ = _run("bisect", "val", score="taylor", tasks=1)
    fresh, _ = _run("bisect", "val", score="taylor", tasks=1, fresh_scores=True)
    for method in (gathered, fresh):
        _check_rule(method.log[0])
        assert method._taylor is None  # the hooks are gone once the task ends


def test_network_scope_ranks_normalized_scores_over_all_layers():
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((6,), (4, 4), 3))
    method = EideticNets(EideticConfig(score="l2", score_scope="network", prune_step=0.5))
    method.setup(net)
    net.add_head(3)
    method.begin_task(net, 0, None)
    first, second = net.graph.layers
    # the first layer's scores are tiny, but normalized per layer both layers compare alike
    method._scores = lambda session: {first: torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]),
                                      second: torch.tensor([4.0, 3.0, 2.5, 1.0])}
    chosen = method._choose(SimpleNamespace(net=net), {first: 4, second: 4})
    # half of the 8 remaining units; normalized, the first layer's two lowest are 0.18 and 0.37,
    # the second's 0.18 and 0.44
    assert chosen[first].tolist() == [True, True, False, False]
    assert chosen[second].tolist() == [False, False, True, True]
    capped = method._choose(SimpleNamespace(net=net), {first: 1, second: 4})
    assert int(capped[first].sum()) == 1 and int(capped[second].sum()) == 3


@pytest.mark.parametrize("search", ["bisect", "gallop", "walk"])
def test_without_raise_best_the_threshold_stays_the_accuracy_before_pruning(search):
    method, _ = _run(search, "val", raise_best=False)
    for entry in method.log:
        _check_rule(entry)
        assert entry["best_accuracy"] == entry["start_accuracy"]
        assert {t["threshold"] for t in entry["trials"]} == {entry["threshold"]}


def test_tasks_after_prune_tasks_keep_every_free_unit():
    method, result = _run("bisect", "val", tasks=2, prune_tasks=1)
    assert max(method.log[0]["kept"].values()) < 48 and method.log[0]["pruned"]
    assert method.log[1]["search"] == "none" and not any(method.log[1]["pruned"].values())
    assert all(used[-1] == 1.0 for used in result.capacity.values())  # the last task took every free unit
    assert result.max_logit_change == 0.0


@pytest.mark.parametrize("options, message", [
    (dict(prune_search="jump"), "--prune-search must be one of bisect, gallop, walk"),
    (dict(stop_on="test"), "--stop-on must be one of val, train, train-running"),
    (dict(score_scope="model"), "--score-scope must be one of layer, network"),
    (dict(stop_on="val", accuracy_samples=100), "--accuracy-samples bounds the training-set measurement"),
    (dict(stop_on="train-running", recovery_epochs=0), "needs --recovery-epochs >= 1"),
    (dict(prune_tasks=-1), "--prune-tasks must be at least 0"),
])
def test_bad_search_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(ConfigError) as info:
        EideticConfig(**options)
    assert message in info.value.cli_message  # the flag, on the command line
    assert "--" not in str(info.value) and "EideticConfig(" in str(info.value)  # the argument, in Python


def test_stop_on_val_needs_a_validation_split():
    bench = cluster_benchmark(num_tasks=1)
    task = bench.tasks[0]
    empty = type(task)(task.task_id, task.name, task.classes, task.train_x, task.train_y,
                       task.val_x[:0], task.val_y[:0], task.test_x, task.test_y)
    bench.tasks[0] = empty
    with pytest.raises(ConfigError, match="--stop-on val reads the validation split"):
        Trainer(EideticNets(EideticConfig(stop_on="val")), TrainConfig(epochs=1)).fit(mlp((20,), (8,), 3), bench)
