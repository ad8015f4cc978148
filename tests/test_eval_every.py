"""Evaluation of long streams: ``TrainConfig.eval_every`` / ``eval_tasks`` skip cells of the
accuracy matrix, never the bitwise probe check nor the last row; the evaluation reads each test
set once and measures what the plain evaluation measures."""

import math

import pytest
import torch

from sparsecl.config import TrainConfig
from sparsecl.errors import ConfigError, ForgettingError
from sparsecl.evaluation import evaluate
from sparsecl.loggers import Callback
from sparsecl.methods import Finetune, PackNet, PackNetConfig
from sparsecl.models import mlp
from sparsecl.trainer import RunState, Trainer
from synthetic import cluster_benchmark

FAST = dict(epochs=2, batch_size=32)


def _packnet():
    return PackNet(PackNetConfig(prune=0.5, retrain_epochs=1))


def _fit(config, bench, method=None):
    torch.manual_seed(0)
    return Trainer(method or _packnet(), config).fit(mlp((20,), (16, 16), 3), bench)


def _pattern(R):
    return [[a is not None for a in row] for row in R]


def test_eval_every_skips_earlier_cells_but_keeps_the_diagonal_and_the_last_row():
    bench = cluster_benchmark(num_tasks=5)
    full = _fit(TrainConfig(**FAST), bench)
    sparse = _fit(TrainConfig(eval_every=3, **FAST), bench)
    R = sparse.accuracy_matrix
    # after tasks 2 (the 3rd) and 4 (the last) every task; else the new task alone
    assert _pattern(R) == [[True, False, False, False, False],
                           [False, True, False, False, False],
                           [True, True, True, False, False],
                           [False, False, False, True, False],
                           [True, True, True, True, True]]
    # the same training and the same evaluation code: each measured cell repeats the full run's
    for t, row in enumerate(R):
        for i, a in enumerate(row):
            if a is not None:
                assert a == full.accuracy_matrix[t][i]
    assert sparse.acc == full.acc
    # BWT reads the diagonal and the last row, both measured: the full run's value
    assert sparse.bwt == pytest.approx(full.bwt)
    assert sparse.forgetting is not None
    assert len(sparse.eval_seconds_per_task) == 5 and sparse.to_dict()["eval_seconds_per_task"]


def test_eval_tasks_names_the_earlier_tasks_re_evaluated():
    bench = cluster_benchmark(num_tasks=4)
    result = _fit(TrainConfig(eval_tasks=[0], **FAST), bench)
    assert _pattern(result.accuracy_matrix) == [[True, False, False, False],
                                                [True, True, False, False],
                                                [True, False, True, False],
                                                [True, True, True, True]]
    assert TrainConfig(eval_tasks="0-1, 3").eval_tasks == "0-1, 3"
    with pytest.raises(ConfigError, match="eval_tasks names task 7, but the stream has 4 tasks") as err:
        _fit(TrainConfig(eval_tasks="0,7", **FAST), bench)
    assert err.value.cli_message.startswith("--eval-tasks")
    with pytest.raises(ConfigError, match="eval_tasks must be 'all' or task indices"):
        TrainConfig(eval_tasks="last")
    with pytest.raises(ConfigError, match="eval_every must be at least 1"):
        TrainConfig(eval_every=0)


class BreaksAtTask2(Finetune):
    """Claims isolation; tasks 0 and 1 train their own heads only, task 2 the shared body."""

    name = "breaks-at-task-2"
    isolates = True

    def parameters(self, net, t):
        if t < 2:
            yield from net.head_parameters(t)
        else:
            yield from super().parameters(net, t)


def test_the_probe_check_runs_after_every_task_whatever_eval_every():
    bench = cluster_benchmark(num_tasks=5)
    with pytest.raises(ForgettingError, match="changed the logits of task 0 while learning task 2"):
        _fit(TrainConfig(eval_every=100, eval_tasks="4", **FAST), bench, BreaksAtTask2())


def test_the_cheap_evaluation_measures_what_the_plain_evaluation_measures():
    """The trainer's last row (a pass over cached test sets, correct predictions counted on the
    device) against ``sparsecl.evaluation.evaluate`` (logits gathered on the CPU) on the
    trained network: equal up to a tie broken differently (one sample)."""
    bench = cluster_benchmark(num_tasks=3, n_test=150)
    result = _fit(TrainConfig(eval_batch_size=64, **FAST), bench)
    plain = evaluate(result.network, bench, batch_size=64)
    assert result.accuracy_matrix[-1] == pytest.approx(plain, abs=1 / 150 + 1e-12)


class Summaries(Callback):
    def __init__(self):
        self.rows = []

    def on_task_end(self, summary):
        self.rows.append(summary.accuracies)


def test_callbacks_see_nan_for_a_cell_not_measured():
    seen = Summaries()
    torch.manual_seed(0)
    Trainer(_packnet(), TrainConfig(eval_every=2, **FAST), callbacks=[seen]).fit(mlp((20,), (16,), 3),
                                                                                 cluster_benchmark(num_tasks=3))
    assert not math.isnan(seen.rows[0][0])  # row 0: the diagonal
    assert [math.isnan(a) for a in seen.rows[1]] == [False, False]  # after task 1 (the 2nd): every task
    assert [math.isnan(a) for a in seen.rows[2]] == [False, False, False]  # the last
    seen = Summaries()
    torch.manual_seed(0)
    Trainer(_packnet(), TrainConfig(eval_every=5, **FAST), callbacks=[seen]).fit(mlp((20,), (16,), 3),
                                                                                 cluster_benchmark(num_tasks=3))
    assert [math.isnan(a) for a in seen.rows[1]] == [True, False]


def test_a_checkpointed_state_keeps_the_cells_not_measured():
    probes = [(torch.rand(4, 20), torch.rand(4, 3)) for _ in range(2)]
    state = RunState(rows=[[0.5], [None, 0.75]], probes=probes, seconds=[1.0, 2.0], eval_seconds=[0.1, 0.2])
    tensors, meta = state.to_checkpoint()
    back = RunState.from_checkpoint(tensors, meta)
    assert back.rows == [[0.5], [None, 0.75]] and back.eval_seconds == [0.1, 0.2]
    assert back.matrix(3)[1] == [None, 0.75, None]


def test_a_lazy_stream_builds_each_task_once(data_root):
    """Re-evaluating Permuted MNIST's earlier tasks derives each test set from its permutation
    once (kept by the task list), instead of rebuilding the task after every task."""
    from sparsecl.data.benchmarks import permuted_mnist

    options = dict(num_tasks=5, max_train_per_task=100, max_test_per_task=50)
    bench = permuted_mnist(data_root, **options)
    built, derived = [], []
    source = bench.tasks._source
    build, split = source.build, source.build_split
    source.build = lambda i: built.append(i) or build(i)
    source.build_split = lambda i, name: derived.append((i, name)) or split(i, name)
    torch.manual_seed(0)
    result = Trainer(Finetune(), TrainConfig(epochs=1, batch_size=50)).fit(mlp((1, 28, 28), (16,), 10), bench)
    assert sorted(built) == [1, 2, 3, 4]  # task 0 was built by permuted_mnist itself (its sizes)
    assert sorted(derived) == []  # every test set was read from its built task, then kept
    plain = evaluate(result.network, permuted_mnist(data_root, **options))
    assert result.accuracy_matrix[-1] == pytest.approx(plain, abs=1 / 50 + 1e-12)
    # no room to keep test sets: an earlier task's test set is derived again, its task not rebuilt
    bench = permuted_mnist(data_root, **options)
    built, derived = [], []
    source = bench.tasks._source
    source.split_budget = 0
    build, split = source.build, source.build_split
    source.build = lambda i: built.append(i) or build(i)
    source.build_split = lambda i, name: derived.append((i, name)) or split(i, name)
    torch.manual_seed(0)
    again = Trainer(Finetune(), TrainConfig(epochs=1, batch_size=50)).fit(mlp((1, 28, 28), (16,), 10), bench)
    assert sorted(built) == [1, 2, 3, 4] and ("test" in {name for _, name in derived})
    assert again.accuracy_matrix == result.accuracy_matrix  # the same run, repeated


def test_the_command_line_options(tmp_path):
    import json

    from click.testing import CliRunner

    from sparsecl.cli import main

    fast = ["run", "--method", "packnet", "--retrain-epochs", "1", "--epochs", "1", "--hidden", "16",
            "--no-progress", "-q"]
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*fast, "--eval-every", "2", "--eval-tasks", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert _pattern(metrics["accuracy_matrix"]) == [[True, False, False, False, False],
                                                    [True, True, False, False, False],
                                                    [False, False, True, False, False],
                                                    [True, False, False, True, False],
                                                    [True] * 5]
    assert metrics["config"]["eval_every"] == 2 and metrics["config"]["eval_tasks"] == "0"
    assert metrics["bwt"] is not None and len(metrics["eval_seconds_per_task"]) == 5
    assert (out / "accuracy_matrix.csv").read_text().splitlines()[3] == "2,,," + str(metrics["accuracy_matrix"][2][2]) + ",,"
    result = CliRunner().invoke(main, [*fast, "--eval-tasks", "0,9", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "--eval-tasks: eval_tasks names task 9, but the stream has 5 tasks" in result.output
    result = CliRunner().invoke(main, [*fast, "--eval-every", "0", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "--eval-every must be at least 1, got 0" in result.output


def test_a_run_with_unmeasured_cells_reports_and_resumes(tmp_path):
    """Cells left unmeasured by --eval-every are null in metrics.json and in the checkpoint's
    manifest: ``sparsecl report`` draws them blank and ``--resume`` loads the manifest."""
    import json

    from click.testing import CliRunner

    from sparsecl.cli import main

    out = tmp_path / "run"
    fast = ["--method", "packnet", "--retrain-epochs", "1", "--epochs", "1", "--hidden", "16", "--no-progress", "-q"]
    result = CliRunner().invoke(main, ["run", *fast, "--tasks", "3", "--eval-every", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"][1][0] is None
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "accuracy_matrix.png").exists() and "| 1 |  |" in (out / "report.md").read_text()
    result = CliRunner().invoke(main, ["run", "--resume", str(out)])  # loads (and validates) the manifest
    assert result.exit_code == 0 and "has finished all 3 tasks" in result.output, result.output
