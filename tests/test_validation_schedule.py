"""The validation schedule of the WSN/GPM reference code (``TrainConfig.restore_best``,
``lr_patience``): the task ends at its best-validation epoch, the learning rate falls on plateaus,
and the earlier tasks stay bit for bit; with the reference's other options (no biases, normalized
Permuted MNIST)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sparsecl.data.benchmarks import MNIST_STATS, permuted_mnist
from sparsecl.data.types import Benchmark
from sparsecl.errors import ConfigError
from sparsecl.methods import WSN, Finetune, WSNConfig
from sparsecl.models import build, mlp
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import cluster_benchmark


def _recording(cls, *args):
    """``cls(*args)`` whose sessions record every validation loss the schedule reads, and the
    loss of the network the task ends with."""

    class Recording(cls):
        def train_task(self, session):
            measured, read = [], session.validation_loss

            def record():
                measured.append(read())
                return measured[-1]

            session.validation_loss = record
            super().train_task(session)
            self.__dict__.setdefault("measured", []).append(measured)
            self.__dict__.setdefault("final", []).append(read())

    return Recording(*args)


# few noisy training samples and a large step: the validation loss rises after a few epochs
NOISY = dict(num_tasks=2, classes=3, n_train=24, n_test=120, noise=2.5)


@pytest.mark.parametrize("method", ["finetune", "wsn"])
def test_restore_best_ends_the_task_at_its_lowest_validation_loss(method):
    """WSN's scores are the method's own tensors: the task's mask follows them, so the ending
    loss equals the best epoch's only when they are restored too."""
    m = _recording(Finetune) if method == "finetune" else _recording(WSN, WSNConfig(density=0.5))
    config = TrainConfig(epochs=8, batch_size=8, lr=0.05, restore_best=True, optimizer="adamw", weight_decay=0.01)
    torch.manual_seed(0)
    result = Trainer(m, config).fit(mlp((20,), (64,), 3), cluster_benchmark(**NOISY))
    for measured, final in zip(m.measured, m.final):
        assert len(measured) == 8
        assert min(measured) < measured[-1]  # the setting makes a later epoch worse
        assert final == min(measured)  # the same network: the same computation, the same value
    if method == "wsn":
        assert result.max_logit_change == 0.0


def test_lr_patience_divides_the_lr_and_ends_training_below_lr_min():
    m = _recording(Finetune)
    config = TrainConfig(epochs=30, batch_size=8, lr=0.05, lr_patience=1, lr_factor=2.0, lr_min=0.01)
    torch.manual_seed(0)
    result = Trainer(m, config).fit(mlp((20,), (64,), 3), cluster_benchmark(**NOISY))
    rows = [r for r in result.history if r.task == 0 and r.phase == "train"]
    lrs = [r.lr for r in rows]
    # each epoch without a new best divides the lr by 2 (patience 1); 0.05/8 < 0.01 ends the task
    expected, lr, best = [], 0.05, float("inf")
    for loss in m.measured[0]:
        expected.append(lr)
        if loss < best:
            best = loss
        else:
            lr /= 2
            if lr < 0.01:
                break
    assert lrs == pytest.approx(expected)
    assert len(rows) < 30 and min(lrs) == pytest.approx(0.0125)


def test_the_schedule_needs_a_validation_split():
    task = cluster_benchmark(num_tasks=1).tasks[0]
    bench = Benchmark("clusters", [replace(task, val_x=task.val_x[:0], val_y=task.val_y[:0])], (20,), {})
    with pytest.raises(ConfigError, match="restore_best") as err:
        Trainer(Finetune(), TrainConfig(epochs=1, restore_best=True)).fit(mlp((20,), (8,), 3), bench)
    assert "--val-fraction" in err.value.cli_message


@pytest.mark.parametrize("field,value", [("lr_factor", 1.0), ("lr_patience", -1), ("lr_min", -1e-3)])
def test_schedule_options_out_of_range_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_mlp_without_biases():
    net = build("mlp", (1, 28, 28), 10, hidden=[16, 16], bias=False)
    assert all(not name.endswith("bias") for name, _ in net.named_parameters())
    with pytest.raises(ConfigError, match="bias"):
        build("mlp", (1, 28, 28), 10, hidden=[16], bias="no")


def test_permuted_mnist_normalized_by_mnist_statistics(data_root):
    plain = permuted_mnist(data_root, num_tasks=2, max_train_per_task=50, max_test_per_task=20)
    normed = permuted_mnist(data_root, num_tasks=2, max_train_per_task=50, max_test_per_task=20, normalize=True)
    task, raw = normed.tasks[1], plain.tasks[1]
    assert task.normalize == MNIST_STATS and raw.normalize is None
    assert torch.equal(task.train_x, raw.train_x)  # stored pixels are the same; the input pipeline differs
    x = task.train_x[:5]
    expected = (x.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(task.prepare(x), expected, atol=1e-6)
    assert normed.info["normalize"] == [[0.1307], [0.3081]]


def test_cli_runs_the_wsn_reference_options_and_records_them(tmp_path, data_root):
    import json

    from click.testing import CliRunner

    from sparsecl.cli import main

    out = tmp_path / "run"
    args = ["run", "--method", "wsn", "--benchmark", "permuted-mnist", "--data-root", str(data_root),
            "--tasks", "2", "--hidden", "16,16", "--epochs", "3", "--batch-size", "32", "--max-train-per-task", "200",
            "--max-test-per-task", "50", "--restore-best", "--lr-patience", "1", "--no-bias", "--normalize",
            "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_logit_change"] == 0.0
    text = json.dumps(metrics)
    assert '"restore_best": true' in text and '"lr_patience": 1' in text and '"bias": false' in text
    refused = CliRunner().invoke(main, ["run", "--model", "alexnet-like", "--no-bias", "--benchmark", "split-digits",
                                        "--out", str(tmp_path / "other")])
    assert refused.exit_code != 0 and "--bias/--no-bias" in refused.output
    assert not (tmp_path / "other").exists()
