"""The Python API as a user meets it: the trained network comes back in the result and saves,
loads and evaluates; your own data as map-style Datasets; your own optimizer and loss with zero
forgetting kept bitwise; errors in the API's terms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from sparsecl.checkpoint import load_checkpoint, load_network, save_network
from sparsecl.data.formats import load_mnist_like
from sparsecl.data.types import Benchmark
from sparsecl.errors import ConfigError
from sparsecl.evaluation import evaluate, predict
from sparsecl.methods import EideticConfig, EideticNets
from sparsecl.models import mlp
from sparsecl.runs import CheckpointWriter, RunSpec, restore
from sparsecl.trainer import TrainConfig, Trainer

from synthetic import cluster_benchmark

FAST = dict(epochs=3, batch_size=32, lr=1e-2, seed=0)


def _eidetic() -> EideticNets:
    return EideticNets(EideticConfig(score="l1", patience=2, prune_step=0.2, tolerance=0.02))


class DigitSubset(Dataset):
    """A map-style Dataset of MNIST digits: ``(x (1, 28, 28) uint8, label)``, original labels."""

    def __init__(self, images, labels, digits, n, offset=0):
        idx = [i for i in range(len(labels)) if int(labels[i]) in digits][offset:offset + n]
        self.x, self.y = torch.from_numpy(images[idx]).unsqueeze(1), [int(labels[i]) for i in idx]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_the_result_holds_the_trained_network_whose_logits_equal_the_checkpoints(tmp_path):
    bench = cluster_benchmark(2)
    model = mlp((20,), (32,), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": [32], "dropout": 0.0}, "single_head": False}, "eidetic",
                   {"score": "l1", "patience": 2, "prune_step": 0.2, "tolerance": 0.02}, dict(FAST))
    method = _eidetic()
    writer = CheckpointWriter(tmp_path / "checkpoint.safetensors", spec, method, (20,), 2)
    result = Trainer(method, TrainConfig(**FAST)).fit(model, bench, on_task_end=writer)
    net = result.network
    assert net is not None and net.num_tasks == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    restored, _, _ = restore(load_checkpoint(tmp_path / "checkpoint.safetensors"))
    for t, task in enumerate(bench.tasks):
        assert torch.equal(predict(net, task.test_x, t, 64, "cpu"), predict(restored, task.test_x, t, 64, "cpu"))
    # save, load and evaluate in Python, with the same model class
    save_network(net, tmp_path / "net.safetensors", info={"note": "clusters"})
    loaded = load_network(mlp((20,), (32,), 3), tmp_path / "net.safetensors")
    for t, task in enumerate(bench.tasks):
        assert torch.equal(predict(net, task.test_x, t, 64, "cpu"), predict(loaded, task.test_x, t, 64, "cpu"))
    assert evaluate(loaded, bench) == result.accuracy_matrix[-1]
    with pytest.raises(Exception, match="does not fit the model given to load_network"):
        load_network(mlp((20,), (8,), 3), tmp_path / "net.safetensors")


def test_a_dataset_based_two_task_run_on_real_mnist_forgets_nothing(data_root):
    train_images, train_labels = load_mnist_like(data_root, "MNIST", train=True)
    test_images, test_labels = load_mnist_like(data_root, "MNIST", train=False)
    tasks = [{"train": DigitSubset(train_images, train_labels, digits, 600),
              "test": DigitSubset(test_images, test_labels, digits, 300), "name": f"digits {digits}"}
             for digits in ((0, 1), (2, 3))]
    bench = Benchmark.from_datasets(tasks, "mnist-pairs", val_fraction=0.1, seed=0)
    first = bench.tasks[1]
    assert first.classes == (2, 3) and set(first.train_y.tolist()) == {0, 1}  # labels made task-local
    assert len(first.val_y) == 60 and len(first.train_y) == 540 and first.train_x.dtype == torch.uint8
    assert bench.input_shape == (1, 28, 28)
    result = Trainer(_eidetic(), TrainConfig(epochs=3, batch_size=64, lr=1e-3)).fit(mlp((1, 28, 28), (64, 64), 2),
                                                                                   bench)
    assert result.max_logit_change == 0.0 and result.bwt == 0.0 and result.forgetting == 0.0
    assert min(result.accuracy_matrix[-1]) > 0.9
    # tensors work the same way, and a given val split is kept
    t = bench.tasks[0]
    again = Benchmark.from_datasets([((t.train_x, t.train_y), (t.val_x, t.val_y), (t.test_x, t.test_y))])
    assert torch.equal(again.tasks[0].val_x, t.val_x) and again.tasks[0].classes == (0, 1)


@pytest.mark.parametrize("factory", [
    lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1),
], ids=["RAdam", "NAdam"])
def test_own_optimizer_with_weight_decay_keeps_frozen_weights_bitwise(factory):
    bench = cluster_benchmark(3)
    method = _eidetic()
    frozen = {}

    def after_task(net, state):
        if state.tasks_done == 1:  # the rows and head task 0 owns, as it left them
            for name, owner in method.ledger.owner.items():
                layer = net.graph.layers[name].module
                rows = owner == 0
                frozen[name] = (rows, layer.weight[rows].detach().clone(), layer.bias[rows].detach().clone())
            frozen["head"] = [p.detach().clone() for p in net.head_parameters(0)]

    result = Trainer(method, TrainConfig(**FAST, optimizer=factory)).fit(mlp((20,), (32, 32), 3), bench,
                                                                       on_task_end=after_task)
    net = result.network
    assert result.max_logit_change == 0.0 and result.bwt == 0.0
    assert all(bool(rows.any()) for rows, _, _ in (frozen[n] for n in method.ledger.owner))
    for name in method.ledger.owner:
        rows, weight, bias = frozen[name]
        layer = net.graph.layers[name].module
        assert torch.equal(layer.weight[rows], weight) and torch.equal(layer.bias[rows], bias)
    assert all(torch.equal(a, b) for a, b in zip(net.head_parameters(0), frozen["head"]))
    assert result.config["optimizer"].startswith("custom: ")


def test_own_loss_is_used_and_zero_forgetting_holds():
    bench = cluster_benchmark(2)
    plain = Trainer(_eidetic(), TrainConfig(**FAST)).fit(mlp((20,), (32,), 3), bench)
    seen = []

    def smoothed(logits, y):
        seen.append(logits.shape)
        return nn.functional.cross_entropy(logits, y, label_smoothing=0.2)

    own = Trainer(_eidetic(), TrainConfig(**FAST, loss=smoothed)).fit(mlp((20,), (32,), 3), bench)
    assert seen and all(s[1] == 3 for s in seen)
    assert own.max_logit_change == 0.0 and own.bwt == 0.0
    assert own.history[0].loss != plain.history[0].loss  # the smoothed loss is what was minimized
    assert "task_loss" not in own.network.__dict__  # the loss is the run's, not left on the network


def test_api_errors_name_the_argument():
    with pytest.raises(ConfigError, match=r"TrainConfig\(optimizer=...\): optimizer must be one of adam, adamw, sgd "
                                          r"or a callable"):
        TrainConfig(optimizer=42)
    with pytest.raises(ConfigError, match=r"TrainConfig\(loss=...\)"):
        TrainConfig(loss="mse")
    with pytest.raises(ConfigError, match=r"TrainConfig\(optimizer=...\): the factory must return a torch.optim"):
        Trainer(_eidetic(), TrainConfig(**{**FAST, "optimizer": lambda p: None})).fit(mlp((20,), (8,), 3),
                                                                                    cluster_benchmark(1))
    with pytest.raises(ConfigError, match=r"TrainConfig\(epochs=...\): epochs must be at least 1") as info:
        TrainConfig(epochs=0)
    assert info.value.cli_message == "--epochs must be at least 1, got 0"
    with pytest.raises(ConfigError, match=r"Trainer.fit\(benchmark=...\)"):
        Trainer(_eidetic()).fit(mlp((20,), (8,), 3), [torch.zeros(3)])
    with pytest.raises(ConfigError, match=r"tasks\[0\]\['train'\]\[0\] must be an \(x, y\) pair"):
        Benchmark.from_datasets([{"train": [torch.zeros(3)], "test": [(torch.zeros(3), 0)]}])
    with pytest.raises(ConfigError, match=r"tasks\[1\] has inputs of shape \(4,\), tasks\[0\] of \(3,\)"):
        Benchmark.from_datasets([((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)),) * 2,
                                 ((torch.zeros(4, 4), torch.zeros(4, dtype=torch.long)),) * 2])
    with pytest.raises(ConfigError, match=r"val_fraction=...\): must be in \[0, 1\), got nan"):
        Benchmark.from_datasets([], val_fraction=math.nan)


def test_one_set_of_defaults_for_the_api_and_the_cli():
    from sparsecl.commands.run import command

    defaults = {p.name: p.default for p in command.params}
    config = TrainConfig()
    for name in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "seed", "routing",
                 "router_buffer", "router_epochs", "router_lr", "router_hidden", "router_free_units", "device"):
        assert defaults[name] == getattr(config, name), name
