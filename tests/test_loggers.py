"""Run history and loggers: history.csv holds one row per epoch and phase, TensorBoard event files
hold the scalars, the console shows a summary line per task; all through trainer callbacks."""

from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from sparsecl.cli import main
from sparsecl.errors import ConfigError
from sparsecl.loggers import CSVHistory, HistoryRow, TensorBoardLogger
from sparsecl.methods import Method
from sparsecl.models import mlp
from sparsecl.trainer import TrainConfig, Trainer

from synthetic import cluster_benchmark

COLUMNS = ["task", "phase", "epoch", "loss", "accuracy", "lr", "seconds"]


def read_csv(path):
    """``(columns, rows)``, numbers as floats, empty cells as None (what pandas.read_csv reads as NaN)."""
    def value(v):
        if v == "":
            return None
        try:
            return float(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, [{k: value(v) for k, v in r.items()} for r in reader]


class Phased(Method):
    """Trains 2 epochs, then 1 recovery epoch, 2 fine-tuning epochs, and reports 3 scan steps."""

    name = "phased"

    def train_task(self, session):
        session.fit(2)
        with session.phase("recovery"):
            session.train_epoch()
        session.set_lr(1e-4)
        session.fit(2, phase="finetune")
        with session.phase("theta-scan"):
            for acc in (0.9, 0.8, 0.7):
                session.report(acc)


def test_history_has_one_row_per_epoch_and_phase(tmp_path):
    path = tmp_path / "history.csv"
    result = Trainer(Phased(), TrainConfig(epochs=1, batch_size=32), callbacks=[CSVHistory(path)]).fit(
        mlp((20,), (16,), 3), cluster_benchmark(2))
    columns, rows = read_csv(path)
    assert columns == COLUMNS
    counts = {}
    for r in rows:
        counts[(int(r["task"]), r["phase"])] = counts.get((int(r["task"]), r["phase"]), 0) + 1
    assert counts == {(t, p): n for t in (0, 1) for p, n in
                      (("train", 2), ("recovery", 1), ("finetune", 2), ("theta-scan", 3))}
    assert len(rows) == len(result.history) == 16
    first = [r for r in rows if r["task"] == 0 and r["phase"] == "train"]
    assert [r["epoch"] for r in first] == [1, 2] and all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in first)
    assert all(r["lr"] == 1e-3 for r in first) and all(r["lr"] == 1e-4 for r in rows if r["phase"] == "finetune")
    scan = [r for r in rows if r["phase"] == "theta-scan"]
    assert all(r["loss"] is None for r in scan)  # a scan step trains nothing
    assert [r["accuracy"] for r in scan] == [0.9, 0.8, 0.7] * 2
    assert all(r["seconds"] >= 0 for r in rows)
    assert [r.phase for r in result.history[:5]] == ["train", "train", "recovery", "finetune", "finetune"]


def test_an_unknown_phase_is_refused():
    class Bad(Method):
        def train_task(self, session):
            with session.phase("warmup"):
                session.fit(1)

    with pytest.raises(ConfigError, match="session.phase\\('warmup'\\): the phase must be one of train, recovery"):
        Trainer(Bad(), TrainConfig(epochs=1)).fit(mlp((20,), (8,), 3), cluster_benchmark(1))


def test_a_resumed_history_drops_the_interrupted_tasks_rows(tmp_path):
    path = tmp_path / "history.csv"
    log = CSVHistory(path)
    for task, epoch in ((0, 1), (0, 2), (1, 1)):
        log.on_epoch_end(HistoryRow(task, "train", epoch, 0.5, 0.9, 1e-3, 0.1))
    log.on_run_end()
    resumed = CSVHistory(path, keep_tasks_below=1)  # task 1 was interrupted: it is learned again
    resumed.on_run_start(2, 1)
    resumed.on_epoch_end(HistoryRow(1, "train", 1, 0.25, 0.95, 1e-3, 0.1))
    resumed.on_run_end()
    rows = list(csv.DictReader(path.open()))
    assert [(r["task"], r["epoch"], r["loss"]) for r in rows] == [("0", "1", "0.5"), ("0", "2", "0.5"),
                                                                 ("1", "1", "0.25")]


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    Trainer(Phased(), TrainConfig(epochs=1, batch_size=32), callbacks=[TensorBoardLogger(logdir)]).fit(
        mlp((20,), (16,), 3), cluster_benchmark(2))
    events = list(logdir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"task0/train/loss", "task0/train/accuracy", "task0/train/lr", "task1/recovery/loss",
            "task1/finetune/accuracy", "task1/theta-scan/accuracy", "accuracy/task0", "accuracy/task1",
            "accuracy/mean", "capacity/fc1"} <= tags
    assert "task0/theta-scan/loss" not in tags
    assert [e.step for e in acc.Scalars("task0/train/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("accuracy/task0")] == [0, 1]
    assert [round(e.value, 6) for e in acc.Scalars("task1/theta-scan/accuracy")] == [0.9, 0.8, 0.7]


def test_the_cli_writes_history_and_tensorboard_and_a_line_per_task(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--method", "finetune", "--tasks", "2", "--epochs", "2", "--hidden", "16", "--no-progress",
            "--tensorboard", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out / "history.csv")
    assert [(r["task"], r["phase"], r["epoch"]) for r in rows] == [(0, "train", 1), (0, "train", 2),
                                                                  (1, "train", 1), (1, "train", 2)]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    lines = [line for line in result.output.splitlines() if line.startswith("task ")]
    assert len(lines) == 2 and lines[0].startswith("task 1/2 (") and "accuracy" in lines[0] and lines[0].endswith("s")
    # the tables beside metrics.json read as they are
    columns, matrix = read_csv(out / "accuracy_matrix.csv")
    assert columns == ["after_task", "task_0", "task_1"] and matrix[0]["task_1"] is None
    columns, summary = read_csv(out / "summary.csv")
    assert summary[0]["method"] == "finetune" and 0 < summary[0]["acc"] <= 1 and "capacity_fc1" in columns


def test_quiet_prints_the_final_table_alone_and_verbose_the_methods_steps(tmp_path):
    base = ["run", "--tasks", "2", "--epochs", "2", "--hidden", "16", "--patience", "1"]
    quiet = CliRunner().invoke(main, [*base, "-q", "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert "accuracy matrix" in quiet.output and "ACC" in quiet.output
    assert "run folder" not in quiet.output and not any(l.startswith("task ") for l in quiet.output.splitlines())
    loud = CliRunner().invoke(main, [*base, "-v", "--no-progress", "--out", str(tmp_path / "v")])
    normal = CliRunner().invoke(main, [*base, "--no-progress", "--out", str(tmp_path / "n")])
    assert loud.exit_code == 0 and normal.exit_code == 0
    assert "INFO" in loud.output and "search kept" in loud.output  # EideticNets' pruning steps, one line each
    assert "INFO" not in normal.output and "search kept" not in normal.output


@pytest.mark.parametrize("method, options, phases", [
    ("eidetic", dict(patience=1, prune_step=0.3, recovery_epochs=1, stop_on="train", prune_search="walk",
                     tolerance=0.0), {"train", "recovery"}),
    ("clnp", dict(finetune_epochs=1), {"train", "theta-scan", "finetune"}),
    ("packnet", dict(retrain_epochs=1), {"train", "finetune"}),
])
def test_the_methods_name_their_phases_in_the_history(method, options, phases):
    from sparsecl.methods import METHODS
    from sparsecl.network import ContinualNetwork

    method_cls, config_cls = METHODS[method]
    model = mlp((20,), (16, 16), 3)
    result = Trainer(method_cls(config_cls(**options)), TrainConfig(epochs=2, batch_size=32)).fit(
        ContinualNetwork(model), cluster_benchmark(num_tasks=2))
    assert {row.phase for row in result.history} == phases
