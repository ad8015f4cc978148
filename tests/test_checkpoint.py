"""Checkpoints, resume after SIGKILL, learning more tasks on a saved model, evaluation, export of a
task's subnetwork, and faults: each refused with a clear error and nothing lost."""

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from sparsecl.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sparsecl.cli import main
from sparsecl.errors import CheckpointError, ConfigError, DivergenceError
from sparsecl.export import task_model
from sparsecl.methods import CLNP, CLNPConfig
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.rundir import LOCK_NAME
from sparsecl.runs import CheckpointWriter, RunSpec, build_method, build_network, build_stream, restore
from sparsecl.trainer import TrainConfig, Trainer
from interrupted import run_with_checkpoints
from synthetic import cluster_benchmark

RUN = ["--method", "clnp", "--epochs", "8", "--hidden", "64,64", "--batch-size", "32", "--alpha", "1e-4",
       "--margin", "0.02", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # both runs on one thread: the same arithmetic


def _tasks_done(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["sparsecl"])["tasks_done"]


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    subprocess.run([sys.executable, "-m", "sparsecl", "run", *RUN, "--out", str(out)], env=ENV, check=True,
                   capture_output=True)
    return out


def test_resume_after_sigkill_gives_the_same_run_bit_for_bit(finished_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sparsecl", "run", *RUN, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / CHECKPOINT_NAME
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if _tasks_done(ckpt) >= 2:
                break
        except (FileNotFoundError, ValueError, KeyError, struct.error):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()  # it really died before the end
    done = _tasks_done(ckpt)
    assert 2 <= done < 5
    # the killed run's lock file stays (the kernel released its lock) and a kill inside a write may
    # leave a temporary file: both are cleared when the folder is opened again
    assert {p.name for p in out.iterdir()} - {LOCK_NAME} - {p.name for p in out.glob(".*.tmp")} == {CHECKPOINT_NAME,
                                                                                                    "history.csv"}
    resumed = subprocess.run([sys.executable, "-m", "sparsecl", "run", "--resume", str(out), "--no-progress"],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert {p.name for p in out.iterdir()} == {CHECKPOINT_NAME, "metrics.json", "history.csv", "accuracy_matrix.csv",
                                               "summary.csv"}
    # the history of the interrupted task was dropped and learned again: the same rows as the
    # uninterrupted run's, wall times aside
    def history(folder):
        return [line.split(",")[:-1] for line in (folder / "history.csv").read_text().splitlines()]
    assert history(out) == history(finished_run)
    a = json.loads((finished_run / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_matrix", "capacity", "reuse", "method_log", "max_logit_change"):
        assert a[key] == b[key], key
    full, again = load_checkpoint(finished_run), load_checkpoint(out)
    assert full.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(full.tensors[k], again.tensors[k]) for k in full.tensors)


def test_resume_refuses_new_options(finished_run):
    result = _cli("run", "--resume", finished_run, "--epochs", "3")
    assert result.exit_code != 0 and "--resume continues the run in its own folder with its saved options; drop --epochs" in result.output


def test_new_tasks_on_a_saved_model_leave_the_old_ones_bitwise(finished_run, tmp_path):
    out = tmp_path / "more"
    result = _cli("run", "--from", finished_run, "--tasks", "2", "--epochs", "3", "--no-progress", "--out", out)
    assert result.exit_code == 0, result.output
    old = json.loads((finished_run / "metrics.json").read_text())["accuracy_matrix"]
    new = json.loads((out / "metrics.json").read_text())
    assert new["max_logit_change"] == 0.0  # the probes of the saved tasks were compared bitwise
    R = new["accuracy_matrix"]
    assert len(R) == 7 and all(v is not None for v in R[6])
    assert [row[:5] for row in R[5:]] == [old[4], old[4]]  # saved tasks' accuracies did not move
    assert new["config"]["stream"][0]["benchmark"] == new["config"]["stream"][1]["benchmark"] == "split-digits"


def test_from_refuses_another_method_or_model(finished_run):
    result = _cli("run", "--from", finished_run, "--method", "eidetic", "--no-progress")
    assert result.exit_code != 0 and "was trained with --method clnp; --method eidetic cannot continue it" in result.output
    result = _cli("run", "--from", finished_run, "--hidden", "10", "--no-progress")
    assert result.exit_code != 0 and "--from keeps the saved model" in result.output and "drop --hidden" in result.output


def test_eval_reports_the_saved_accuracies(finished_run, tmp_path, data_root):
    result = _cli("eval", finished_run, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    final_row = json.loads((finished_run / "metrics.json").read_text())["accuracy_matrix"][-1]
    assert [t["accuracy"] for t in evaluated["tasks"]] == final_row
    result = _cli("eval", finished_run, "--benchmark", "split-mnist", "--data-root", data_root)
    assert result.exit_code != 0 and "inputs of shape (1, 28, 28)" in result.output


def test_export_is_smaller_and_gives_the_same_logits(finished_run, tmp_path):
    ckpt = load_checkpoint(finished_run)
    net, _, _ = restore(ckpt)
    net.eval()
    x = torch.rand(50, 1, 8, 8)
    for t in (0, 4):
        path = tmp_path / f"task{t}.pt2"
        result = _cli("export", finished_run, "--task", t, "--out", path)
        assert result.exit_code == 0, result.output
        loaded = torch.export.load(str(path)).module()
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(x, t), atol=1e-5, rtol=0)
    small = sum(p.numel() for p in task_model(net, 0).parameters())
    full = sum(p.numel() for p in net.body.parameters()) + sum(p.numel() for p in net.heads[0].parameters())
    assert small < full  # task 0 keeps only part of the units
    result = _cli("export", finished_run, "--task", "9", "--out", tmp_path / "x.pt2")
    assert result.exit_code != 0 and "--task 9 is out of range" in result.output
    assert not (tmp_path / "x.pt2").exists()


def test_truncated_or_flipped_checkpoints_are_refused(finished_run, tmp_path):
    data = (finished_run / CHECKPOINT_NAME).read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (0, 5, 8, 100, len(data) // 3, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a sparsecl checkpoint"):
            load_checkpoint(bad)
    for offset in [*range(0, len(data), max(1, len(data) // 60)), len(data) - 1]:
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=str(bad)):
            load_checkpoint(bad)
    result = _cli("eval", bad)
    assert result.exit_code != 0 and "bad.safetensors" in result.output


def test_checkpoint_of_another_model_names_the_tensor(finished_run, tmp_path):
    ckpt = load_checkpoint(finished_run)
    spec = RunSpec(**ckpt.manifest["spec"])
    wrong = dataclasses.replace(spec, model=dict(spec.model, options=dict(spec.model["options"], hidden=[32, 32])))
    with pytest.raises(CheckpointError, match=r"does not fit the model \(--model mlp \(hidden=32,32 .*size mismatch"):
        restore(ckpt, wrong)
    other = save_checkpoint(tmp_path / "other.safetensors", {"spec": ckpt.manifest["spec"]}, {})
    with pytest.raises(CheckpointError, match="its manifest lacks input_shape, structure, method, run"):
        restore(load_checkpoint(other))


class _DivergesOnTask1(CLNP):
    """CLNP whose training loss turns NaN on task 1 (NaN data is refused before training, so
    the divergence comes from the loss itself)."""

    def loss(self, net, x, y, tasks):
        loss, correct = super().loss(net, x, y, tasks)
        return (loss * float("nan") if int(tasks[0]) == 1 else loss), correct


def test_divergence_names_task_and_step_and_keeps_the_last_checkpoint(tmp_path):
    bench = cluster_benchmark(num_tasks=3)
    spec = RunSpec([], {"hidden": [16], "dropout": 0.0, "single_head": False}, "clnp")
    method = _DivergesOnTask1(CLNPConfig(alpha="1e-4"))
    path = tmp_path / CHECKPOINT_NAME
    writer = CheckpointWriter(path, spec, method, (20,), bench.num_tasks)
    torch.manual_seed(0)
    trainer = Trainer(method, TrainConfig(epochs=2, batch_size=32, seed=0))
    with pytest.raises(DivergenceError, match=r"task 1: the training loss became nan at step 1 of epoch 1"):
        trainer.fit(mlp((20,), (16,), 3), bench, on_task_end=writer)
    assert _tasks_done(path) == 1  # the checkpoint after task 0 is intact
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_bad_tasks_and_task_ids_are_clear_errors():
    bench = cluster_benchmark(num_tasks=2)
    bad_labels = dataclasses.replace(bench.tasks[1], train_y=bench.tasks[1].train_y + 5)
    with pytest.raises(ConfigError, match=r"task 1 \('clusters:1'\): train label \d+ is outside the head's classes 0..2"):
        Trainer(CLNP(), TrainConfig(epochs=1)).fit(mlp((20,), (8, 8), 3), dataclasses.replace(bench, tasks=[bench.tasks[0], bad_labels]))
    empty = dataclasses.replace(bench.tasks[0], train_x=bench.tasks[0].train_x[:0], train_y=bench.tasks[0].train_y[:0])
    with pytest.raises(ConfigError, match=r"task 0 \('clusters:0'\) has an empty train split"):
        Trainer(CLNP(), TrainConfig(epochs=1)).fit(mlp((20,), (8, 8), 3), dataclasses.replace(bench, tasks=[empty]))
    net = ContinualNetwork(mlp((20,), (8,), 3))
    net.add_head(3)
    with pytest.raises(ConfigError, match=r"task id 3 is out of range: the network has heads for tasks 0..0"):
        net(torch.zeros(1, 20), 3)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A checkpoint written after 2 of the 5 tasks of a run that then stopped."""
    out = tmp_path_factory.mktemp("partial")
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {}}],
                   {"hidden": [16, 16], "dropout": 0.0, "single_head": False}, "clnp", {"alpha": "1e-4"},
                   {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                    "momentum": 0.0, "seed": 0})
    bench = build_stream(spec)
    method = build_method(spec.method, spec.method_options)
    writer = CheckpointWriter(out / CHECKPOINT_NAME, spec, method, bench.input_shape, bench.num_tasks)

    def stop_after_two(net, state):
        writer(net, state)
        if state.tasks_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(method, spec.train_config()).fit(build_network(spec, bench), bench, on_task_end=stop_after_two)
    return out


def test_unfinished_runs_are_resumed_not_extended(interrupted_run):
    result = _cli("run", "--from", interrupted_run, "--tasks", "1", "--no-progress")
    assert result.exit_code != 0 and "stopped after 2 of its run's 5 tasks" in result.output
    assert "--resume" in result.output
    result = _cli("run", "--resume", interrupted_run, "--out", "elsewhere")
    assert result.exit_code != 0 and "drop --out" in result.output


def test_eval_of_an_unfinished_run_measures_its_saved_tasks(interrupted_run, tmp_path):
    result = _cli("eval", interrupted_run, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert [t["task"] for t in json.loads((tmp_path / "e.json").read_text())["tasks"]] == [0, 1]
    result = _cli("eval", interrupted_run, "--tasks", "2")
    assert result.exit_code != 0 and "--tasks select(s) the tasks of --benchmark" in result.output


def test_outputs_in_missing_folders_are_refused_before_any_work(interrupted_run, tmp_path):
    for args in (["export", interrupted_run, "--task", "0", "--out", tmp_path / "no" / "t.pt2"],
                 ["eval", interrupted_run, "--json", tmp_path / "no" / "e.json"]):
        result = _cli(*args)
        assert result.exit_code != 0 and "does not exist or is not writable" in result.output
        assert "accuracy" not in result.output
    assert list(tmp_path.iterdir()) == []
    result = _cli("run", "--resume", tmp_path / "typo")
    assert result.exit_code != 0 and "does not exist" in result.output
    assert not (tmp_path / "typo").exists()  # no empty folder made for a missing checkpoint


def test_continuing_on_another_kind_of_device_is_refused(interrupted_run):
    with pytest.raises(CheckpointError, match="was trained on cpu; continuing on cuda .* use --device cpu"):
        restore(load_checkpoint(interrupted_run), continue_on="cuda")


def test_single_head_with_a_different_class_count_is_refused_before_training():
    bench = cluster_benchmark(num_tasks=3)
    odd = cluster_benchmark(num_tasks=3, classes=4).tasks[2]
    bench = dataclasses.replace(bench, tasks=[*bench.tasks[:2], odd])
    method = CLNP(CLNPConfig(alpha="1e-4"))
    net = ContinualNetwork(mlp((20,), (8,), 3), single_head=True)
    with pytest.raises(ConfigError, match=r"single head: task 2 \('clusters:2'\) has 4 classes but the shared output layer has 3"):
        Trainer(method, TrainConfig(epochs=1)).fit(net, bench)
    assert method.log == []  # refused before the first task was trained


def test_a_resumed_run_gives_the_same_routing_results(tmp_path):
    """A run with --routing classifier stopped after 2 tasks and resumed with ``sparsecl run
    --resume`` ends with the routing results, router and checkpoint of an uninterrupted run."""
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {"num_tasks": 4}}],
                   {"hidden": [16, 16], "dropout": 0.0, "single_head": False}, "eidetic",
                   {"patience": 2, "prune_step": 0.2},
                   {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                    "momentum": 0.0, "seed": 0, "routing": "classifier", "router_buffer": 60, "router_epochs": 5})
    bench = build_stream(spec)

    full = run_with_checkpoints(spec, bench, tmp_path / "full").routing
    with pytest.raises(KeyboardInterrupt):
        run_with_checkpoints(spec, bench, tmp_path / "cut", stop_after=2)
    assert _tasks_done(tmp_path / "cut" / CHECKPOINT_NAME) == 2
    result = _cli("run", "--resume", tmp_path / "cut", "--no-progress")
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["routing"]
    for key in set(full) - {"seconds_per_task"}:
        assert resumed[key] == full[key], key
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert any(k.startswith("run.router.units.") for k in a.tensors)  # the router's own units are saved
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
