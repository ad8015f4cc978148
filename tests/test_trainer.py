"""The task loop: accuracy matrix, determinism, baselines."""

import pytest
import torch

from sparsecl.errors import ConfigError
from sparsecl.methods import EideticConfig, EideticNets, Finetune, Joint
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import cluster_benchmark

FAST = dict(epochs=4, batch_size=32)


def _eidetic():
    return EideticNets(EideticConfig(score="taylor", patience=2, prune_step=0.2, tolerance=0.02))


def test_same_seed_gives_the_same_accuracy_matrix_bit_for_bit():
    bench = cluster_benchmark(num_tasks=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = mlp((20,), (24, 24), 3, 0.1)
        runs.append(Trainer(_eidetic(), TrainConfig(seed=7, **FAST)).fit(model, bench))
    assert runs[0].accuracy_matrix == runs[1].accuracy_matrix
    assert runs[0].capacity == runs[1].capacity


def test_accuracy_matrix_shape_and_reevaluation():
    result = Trainer(Finetune(), TrainConfig(**FAST)).fit(mlp((20,), (16,), 3), cluster_benchmark(3))
    R = result.accuracy_matrix
    assert [[v is None for v in row] for row in R] == [[False, True, True], [False, False, True], [False] * 3]
    assert result.to_dict()["acc"] == pytest.approx(sum(R[-1]) / 3)
    assert set(result.to_dict()) >= {"accuracy_matrix", "acc", "bwt", "forgetting", "max_logit_change",
                                     "capacity", "config", "versions", "seconds"}


class HeadWatch:
    """Records task 0's head weights after every task."""

    def __init__(self, method):
        self.method, self.heads = method, []
        original = method.end_task

        def end_task(session):
            original(session)
            self.heads.append(session.net.heads[0].weight.detach().clone())
        method.end_task = end_task


def test_finetune_moves_old_logits_but_never_old_heads_and_joint_retrains_them():
    bench = cluster_benchmark(num_tasks=3)
    ft = HeadWatch(Finetune())
    result = Trainer(ft.method, TrainConfig(**FAST)).fit(mlp((20,), (16,), 3), bench)
    assert result.max_logit_change > 0  # no isolation: the shared body drifts
    assert all(torch.equal(ft.heads[0], h) for h in ft.heads)  # old heads are not optimized
    joint = HeadWatch(Joint())
    Trainer(joint.method, TrainConfig(**FAST)).fit(mlp((20,), (16,), 3), bench)
    assert not torch.equal(joint.heads[0], joint.heads[1])  # task 0's data and head train again


def test_task_loss_mixes_tasks_with_their_own_heads():
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((5,), (8,), 2))
    net.add_head(2)
    net.add_head(4)
    x = torch.randn(6, 5)
    y = torch.tensor([0, 1, 3, 2, 0, 1])
    tasks = torch.tensor([0, 0, 1, 1, 0, 1])
    loss, correct = net.task_loss(x, y, tasks)
    expected = sum(torch.nn.functional.cross_entropy(net(x[i:i + 1], int(tasks[i])), y[i:i + 1])
                   for i in range(6)) / 6
    assert torch.allclose(loss, expected)
    assert correct.shape == (6,)


def test_bad_options_are_refused_with_the_option_named():
    """In the API's terms (the argument), and in the command line's (the flag) for the CLI."""
    with pytest.raises(ConfigError, match=r"TrainConfig\(optimizer=...\): optimizer must be one of adam, adamw, sgd") as info:
        TrainConfig(optimizer="rmsprop")
    assert info.value.cli_message.startswith("--optimizer must be one of adam, adamw, sgd")
    with pytest.raises(ConfigError, match=r"TrainConfig\(batch_size=...\): batch_size must be at least 1") as info:
        TrainConfig(batch_size=0)
    assert info.value.cli_message == "--batch-size must be at least 1, got 0"
    with pytest.raises(ConfigError, match=r"EideticConfig\(prune_step=\.\.\.\)"):
        EideticConfig(prune_step=0)
    with pytest.raises(ConfigError, match=r"EideticConfig\(score=\.\.\.\) must be one of"):
        EideticConfig(score="random")
    net = ContinualNetwork(mlp((5,), (8,), 2))
    net.add_head(2)
    with pytest.raises(ConfigError, match="task id 3 is out of range"):
        net(torch.randn(1, 5), 3)


def test_divergence_is_reported_as_such_not_as_forgetting():
    from sparsecl.errors import DivergenceError

    with pytest.raises(DivergenceError, match="task 0: the training loss became"):
        Trainer(_eidetic(), TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=1e30)).fit(
            mlp((20,), (16,), 3), cluster_benchmark(2))


def test_a_network_that_already_learned_tasks_is_refused():
    net = ContinualNetwork(mlp((20,), (16,), 3))
    Trainer(Finetune(), TrainConfig(**FAST)).fit(net, cluster_benchmark(1))
    with pytest.raises(ConfigError, match="already has heads for 1 tasks"):
        Trainer(Finetune(), TrainConfig(**FAST)).fit(net, cluster_benchmark(1))


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"TrainConfig\(device=...\): device must be a torch device") as info:
        TrainConfig(device="foo")
    assert info.value.cli_message.startswith("--device must be a torch device")


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_optimizers_keep_zero_forgetting_and_repeat_bit_for_bit(optimizer):
    from sparsecl.methods import WSN, WSNConfig

    config = TrainConfig(epochs=2, batch_size=32, optimizer=optimizer, lr=0.01, momentum=0.9, weight_decay=0.01,
                         fused=True)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        method = WSN(WSNConfig(density=0.5))
        results.append(Trainer(method, config).fit(mlp((20,), (32, 32), 3), cluster_benchmark(num_tasks=3)))
        assert results[-1].max_logit_change == 0.0
    assert results[0].accuracy_matrix == results[1].accuracy_matrix
    from sparsecl.trainer import make_optimizer

    assert make_optimizer([torch.nn.Parameter(torch.zeros(3))], config).defaults["fused"] is True
    with pytest.raises(ConfigError, match="fused"):
        TrainConfig(optimizer=lambda p: torch.optim.Adam(p), fused=True)
