"""The zero-forgetting promise of neuron-level isolation (DESIGN §2): exact freezing under any
optimizer, pruning that never touches frozen units, exact-zero interference weights."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecl.data.types import TaskData
from sparsecl.errors import ForgettingError
from sparsecl.methods import EideticConfig, EideticNets
from sparsecl.methods.base import Method
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import ChecksOldLogits, cluster_benchmark

OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-2),
    "adamw-wd": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
    "sgd-momentum": dict(optimizer="sgd", lr=5e-2, momentum=0.9, weight_decay=0.01),
}


class Recording(ChecksOldLogits, EideticNets):
    """EideticNets that checks every earlier task's logits after every task and records how the
    body moved."""

    def __init__(self, config):
        super().__init__(config)
        self.bodies = []

    def end_task(self, session):
        super().end_task(session)
        self.bodies.append({k: v.clone() for k, v in session.net.body.state_dict().items()})


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_zero_forgetting_bitwise_under_every_optimizer(opt):
    bench = cluster_benchmark(num_tasks=4)
    method = Recording(EideticConfig(score="taylor", patience=3, prune_step=0.2, tolerance=0.02))
    config = TrainConfig(epochs=6, batch_size=32, seed=1, **OPTIMIZERS[opt])
    torch.manual_seed(0)
    result = Trainer(method, config).fit(mlp((20,), (32, 32), 3, dropout=0.1), bench)
    assert result.max_logit_change == 0.0
    assert len(method.records) == 4
    assert min(result.accuracy_matrix[-1]) > 0.8  # every task was really learned
    assert all(0 < used[0] < 1 for used in result.capacity.values())
    # later tasks trained and kept new units of their own, so the body really changed under them
    assert any(used[-1] > used[0] for used in result.capacity.values())
    assert any(not torch.equal(method.bodies[0][k], method.bodies[-1][k]) for k in method.bodies[0])


class Leaky(Method):
    """Claims isolation but freezes nothing: the trainer must catch it."""
    name = "leaky"
    isolates = True


def test_trainer_raises_when_an_isolation_method_forgets():
    with pytest.raises(ForgettingError, match="method 'leaky' changed the logits of task 0 while learning task 1"):
        Trainer(Leaky(), TrainConfig(epochs=2, batch_size=32)).fit(mlp((20,), (16,), 3), cluster_benchmark(2))


def _task(t, classes=3):
    e = torch.empty(0)
    return TaskData(t, f"t{t}", tuple(range(classes)), e, e.long(), e, e.long(), e, e.long())


def _begin(net, method, t):
    net.add_head(3)
    method.begin_task(net, t, _task(t))


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=1, max_size=3), seed=st.integers(0, 10_000),
       forward_transfer=st.booleans())
def test_pruning_never_touches_frozen_units(widths, seed, forward_transfer):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = ContinualNetwork(mlp((6,), widths, 3))
    method = EideticNets(EideticConfig(score="l1", forward_transfer=forward_transfer))
    method.setup(net)
    for t in range(3):
        if any(not method.ledger.free(n).any() for n in net.graph.layers):
            break
        _begin(net, method, t)
        frozen = {n: ~method.ledger.free(n) for n in net.graph.layers}
        rows_before = {n: l.module.weight[frozen[n]].clone() for n, l in net.graph.layers.items()}
        bias_before = {n: l.module.bias[frozen[n]].clone() for n, l in net.graph.layers.items()}
        # the selection of EideticNets only ever picks candidates
        chosen = method._choose(SimpleNamespace(net=net), {n: 10**6 for n in net.graph.layers})
        for n, mask in chosen.items():
            assert not (mask & frozen[n]).any()
        # pruning a frozen unit is refused, and nothing changes
        for n in net.graph.layers:
            if frozen[n].any():
                with pytest.raises(ValueError, match="not prunable"):
                    method.prune(net, t, {n: frozen[n]})
        random_pick = {n: method.candidates(n) & (torch.rand(len(frozen[n]), generator=gen) < 0.5)
                       for n in net.graph.layers}
        method.prune(net, t, random_pick)
        for n, layer in net.graph.layers.items():
            assert torch.equal(layer.module.weight[frozen[n]], rows_before[n])
            assert torch.equal(layer.module.bias[frozen[n]], bias_before[n])
            assert not layer.module.weight[random_pick[n]].any()  # pruned units output exact zeros
            assert not layer.module.bias[random_pick[n]].any()
        method.freeze(net, t)
        # interference: rows owned by t (and head t) read no unit that is still free
        for n, layer in net.graph.layers.items():
            if layer.source is not None:
                rows, free = method.ledger.owned_by(n, t), method.ledger.free(layer.source)
                assert not layer.module.weight[rows][:, free].any()
                if not forward_transfer:
                    old = method.ledger.owned_through(layer.source, t - 1) if t else torch.zeros_like(free)
                    assert not layer.module.weight[rows][:, old].any()
        assert not net.heads[t].weight[:, method.ledger.free(net.graph.head_source)].any()


def test_free_units_are_reinitialized_and_frozen_ones_kept():
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((6,), (8,), 3))
    method = EideticNets()
    method.setup(net)
    _begin(net, method, 0)
    layer = net.graph.layers["fc1"].module
    method.prune(net, 0, {"fc1": torch.arange(8) >= 5})
    method.freeze(net, 0)
    assert not layer.weight[5:].any()
    kept = layer.weight[:5].clone()
    _begin(net, method, 1)
    assert net.num_tasks == 2
    assert torch.equal(layer.weight[:5], kept)
    assert layer.weight[5:].abs().sum(1).gt(0).all()  # fresh rows for the new task


def test_rollback_restores_weights_and_optimizer_state():
    from sparsecl.trainer import TaskSession

    bench = cluster_benchmark(num_tasks=1)
    net = ContinualNetwork(mlp((20,), (16,), 3))
    method = Method()
    net.add_head(3)
    session = TaskSession(net, method, 0, bench.tasks, TrainConfig(batch_size=32), None)
    session.train_epoch()
    state = session.snapshot()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in session.optimizer.state.values()]
    session.train_epoch()
    session.rollback(state)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, session.optimizer.state.values()))


def test_eidetic_stops_within_tolerance_and_respects_the_pruning_cap():
    bench = cluster_benchmark(num_tasks=2)
    strict = EideticNets(EideticConfig(score="l2", patience=3, prune_step=0.3, tolerance=0.0))
    Trainer(strict, TrainConfig(epochs=6, batch_size=32)).fit(mlp((20,), (24,), 3), bench)
    for entry in strict.log:
        assert entry["final_train_accuracy"] >= entry["threshold"]
    capped = EideticNets(EideticConfig(score="l2", patience=3, prune_step=0.5, tolerance=0.99,
                                       max_pruned_ratio=0.25))
    Trainer(capped, TrainConfig(epochs=3, batch_size=32)).fit(mlp((20,), (24, 24), 3), bench)
    assert capped.log[0]["pruned"] == {"fc1": 6, "fc2": 6}  # floor(0.25 * 24), never more


def test_constant_pruning_steps_take_a_fixed_share_of_the_available_units():
    bench = cluster_benchmark(num_tasks=1)
    method = EideticNets(EideticConfig(score="l2", patience=2, prune_step=0.25, prune_step_of="available",
                                       tolerance=0.99, max_pruned_ratio=0.9))
    Trainer(method, TrainConfig(epochs=2, batch_size=32)).fit(mlp((20,), (40,), 3), bench)
    # 10 units a step while room lasts: 10, 20, 30, then the cap floor(0.9*40)=36
    assert method.log[0]["pruned"] == {"fc1": 36} and method.log[0]["steps"] == 4


def test_nan_scores_never_select_frozen_units():
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((6,), (10,), 3))
    method = EideticNets(EideticConfig(score="l1"))
    method.setup(net)
    _begin(net, method, 0)
    method.prune(net, 0, {"fc1": torch.arange(10) >= 6})
    method.freeze(net, 0)  # units 0..5 frozen
    _begin(net, method, 1)
    method._scores = lambda session: {"fc1": torch.full((10,), float("nan"))}
    chosen = method._choose(SimpleNamespace(net=net), {"fc1": 10})
    assert chosen["fc1"].sum() == 1 and not chosen["fc1"][:6].any()
