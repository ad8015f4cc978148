"""CLNP (paper 000): zero forgetting in multi-head and single-head form, the graceful-forgetting
θ scan, the single head's isolation, the L1 penalty and the diagnostics."""

import dataclasses

import pytest
import torch

from sparsecl.errors import ConfigError
from sparsecl.methods import CLNP, CLNPConfig
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer, accuracy
from synthetic import ChecksOldLogits, cluster_benchmark

OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-2),
    "adamw-wd": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
    "sgd-momentum": dict(optimizer="sgd", lr=5e-2, momentum=0.9, weight_decay=0.01),
}


class Recording(ChecksOldLogits, CLNP):
    """CLNP that checks every earlier task's logits after every task."""


def _run(method, single_head=False, tasks=4, epochs=5, hidden=(48, 48), **opt):
    bench = cluster_benchmark(num_tasks=tasks, n_train=240, n_test=240)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), hidden, 3), single_head=single_head)
    config = TrainConfig(epochs=epochs, batch_size=32, seed=1, **(opt or OPTIMIZERS["adam"]))
    return net, bench, Trainer(method, config).fit(net, bench)


@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_zero_forgetting_bitwise(opt, single_head):
    method = Recording(CLNPConfig(alpha="3e-3", margin=0.02))
    net, bench, result = _run(method, single_head=single_head, **OPTIMIZERS[opt])
    assert result.max_logit_change == 0.0
    assert len(method.records) == 4
    assert min(result.accuracy_matrix[-1]) > 0.8  # every task was learned
    # pruning took place and later tasks took units of their own: the body changed under old tasks
    assert all(0 < used[0] < 1 for used in result.capacity.values())
    assert any(used[-1] > used[0] for used in result.capacity.values())


@pytest.mark.parametrize("per_layer,order", [(False, None), (True, None), (True, "first")],
                         ids=["one-theta", "theta-per-layer", "theta-per-layer-first-layer-first"])
def test_theta_scan_stays_within_the_margin_on_validation(per_layer, order):
    method = CLNP(CLNPConfig(alpha="1e-4;1e-3", lrs="0.01,0.003", margin=0.01, theta_steps=5,
                             theta_per_layer=per_layer, theta_order=order))
    net, bench, result = _run(method, tasks=3)
    assert len(method.log) == 3
    for entry, task in zip(method.log, bench.tasks):
        assert len(entry["grid"]) == 4  # 2 alphas x 2 learning rates
        best = max(g["val_accuracy"] for g in entry["grid"])
        assert entry["best_val_accuracy"] == best
        assert entry["floor"] == pytest.approx(best - 0.01)
        assert entry["val_accuracy_pruned"] >= entry["floor"]
        # the frozen network itself, measured again now, is the model the scan chose
        now = accuracy(net, task.val_x, task.val_y, task.task_id, 1024, "cpu")
        assert now == entry["val_accuracy_pruned"]
        chosen = entry["grid"][entry["chosen"]]
        assert chosen["within_margin"]
        if per_layer:  # one threshold per hidden layer, each with the units it pruned
            assert set(entry["theta"]) == set(net.graph.layers)
            layers = list(net.graph.layers)
            assert list(entry["theta"]) == (layers if order == "first" else layers[::-1])  # scan order
            for name, theta in entry["theta"].items():
                pruned_scores_exist = entry["pruned"][name] > 0
                assert (theta is None) == (not pruned_scores_exist)
        assert sum(entry["pruned"].values()) > 0  # the scan did prune
        # the sparsest model within the margin was picked
        kept = [sum(g["kept"].values()) for g in entry["grid"] if g["within_margin"]]
        assert sum(chosen["kept"].values()) == min(kept)
        for g in entry["grid"]:
            assert g["within_margin"] == (g["val_accuracy"] >= entry["floor"])
            if g["within_margin"]:
                assert g["pruned_val_accuracy"] >= entry["floor"]
    assert result.max_logit_change == 0.0


def test_zero_margin_never_loses_validation_accuracy():
    method = CLNP(CLNPConfig(alpha="1e-3", margin=0.0))
    net, bench, _ = _run(method, tasks=2)
    for entry in method.log:
        assert entry["val_accuracy_pruned"] >= entry["best_val_accuracy"]


def test_single_head_task_reads_only_its_own_final_hidden_units():
    method = CLNP(CLNPConfig(alpha="3e-3", margin=0.02))
    net, bench, _ = _run(method, single_head=True, tasks=3)
    last = net.graph.head_source
    owner = method.ledger.owner[last]
    assert len(set(owner[owner >= 0].tolist())) == 3  # every task owns final-hidden units
    x = torch.randn(50, 20)
    net.eval()
    with torch.no_grad():
        h = net.features(x)
        for t in range(3):
            own = owner == t
            assert torch.equal(net.heads[t].mask, own)
            noisy = h.clone()
            noisy[:, ~own] = torch.randn(50, int((~own).sum())) * 100  # every other unit changes
            assert torch.equal(net.head_logits(noisy, t), net.head_logits(h, t))
            moved = h.clone()
            moved[:, own] += 1.0
            assert not torch.equal(net.head_logits(moved, t), net.head_logits(h, t))


def test_single_head_needs_equal_class_counts():
    net = ContinualNetwork(mlp((4,), (8,), 3), single_head=True)
    net.add_head(3)
    with pytest.raises(ConfigError, match="single head: task 1 has 5 classes but the shared output layer has 3"):
        net.add_head(5)


def test_l1_penalty_covers_only_the_weights_the_task_trains():
    method = CLNP(CLNPConfig(alpha="3e-3", margin=0.02))
    net, bench, _ = _run(method, tasks=1)
    # task 1 begins: its penalty must equal α·|W| summed over the free rows and its own head
    net.add_head(3)
    method.begin_task(net, 1, bench.tasks[0])
    method._set_alpha(net, (0.5, 0.25, 0.125))
    x, y = bench.tasks[0].train_x[:8], bench.tasks[0].train_y[:8]
    tasks = torch.ones(8, dtype=torch.long)
    total, _ = method.loss(net, x, y, tasks)
    ce, _ = net.task_loss(x, y, tasks)
    expected = ce
    for (name, layer), alpha in zip(net.graph.layers.items(), (0.5, 0.25)):
        expected = expected + alpha * layer.module.weight[method.ledger.free(name)].abs().sum()
    expected = expected + 0.125 * net.heads[1].weight.abs().sum()
    assert torch.allclose(total, expected)
    first = next(iter(net.graph.layers))
    assert method.ledger.free(first).sum() < 48  # frozen rows exist, so the check is not vacuous


def test_bad_configuration_is_refused_with_the_option_named():
    with pytest.raises(ConfigError, match="3 weight layers"):
        _run(CLNP(CLNPConfig(alpha="1e-4,1e-5")), tasks=1, epochs=1)
    with pytest.raises(ConfigError, match=r"CLNPConfig\(alpha=\.\.\.\) must be comma-separated numbers"):
        CLNPConfig(alpha="1e-4,x")
    with pytest.raises(ConfigError, match=r"CLNPConfig\(margin=\.\.\.\)"):
        CLNPConfig(margin=1.5)
    with pytest.raises(ConfigError, match=r"CLNPConfig\(theta_order=\.\.\.\) orders the per-layer θ scan: it needs CLNPConfig\(theta_per_layer=\.\.\.\)"):
        CLNPConfig(theta_order="first")
    with pytest.raises(ConfigError, match=r"CLNPConfig\(theta_order=\.\.\.\) must be 'first' or 'last', got 'middle'"):
        CLNPConfig(theta_order="middle", theta_per_layer=True)
    bench = cluster_benchmark(num_tasks=1)
    bench.tasks[0] = dataclasses.replace(bench.tasks[0], val_x=bench.tasks[0].val_x[:0],
                                         val_y=bench.tasks[0].val_y[:0])
    with pytest.raises(ConfigError, match="task 0 .* has none: use --val-fraction > 0"):
        Trainer(CLNP(), TrainConfig(epochs=1)).fit(mlp((20,), (8, 8), 3), bench)


def test_finetuning_after_pruning_is_logged_and_keeps_zero_forgetting():
    method = CLNP(CLNPConfig(alpha="1e-4", margin=0.04, finetune_epochs=2, finetune_lr=1e-3,
                             finetune_alpha="5e-5"))
    net, bench, result = _run(method, tasks=2)
    assert result.max_logit_change == 0.0
    assert all("val_accuracy_finetuned" in e for e in method.log)


def test_reuse_diagnostics_count_units():
    method = CLNP(CLNPConfig(alpha="3e-3", margin=0.02))
    net, bench, result = _run(method, tasks=3)
    for name, counts in result.reuse.items():
        assert counts["units"] == [48, 48, 48]
        assert counts["reused"][0] == 0  # nothing to reuse for the first task
        for t in range(3):
            owned_so_far = sum(counts["owned"][: t + 1])
            assert counts["free"][t] == 48 - owned_so_far
            assert counts["reused"][t] <= owned_so_far - counts["owned"][t]
            assert result.capacity[name][t] == pytest.approx(owned_so_far / 48)
        assert sum(counts["reused"][1:]) > 0  # forward transfer: later tasks read earlier units
