"""Bad numbers, devices, models, data and manifests: one clean error each, before any training,
in the caller's terms (flags for the CLI, argument names for the API)."""

import dataclasses
import gzip
import json
import math
import re
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from sparsecl.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sparsecl.cli import main
from sparsecl.errors import CheckpointError, ConfigError, DataError, DataFormatError
from sparsecl.methods.base import Method
from sparsecl.models import mlp
from sparsecl.runs import build_method
from sparsecl.trainer import TrainConfig, Trainer, logit_change
from synthetic import cluster_benchmark

FAST = ["--method", "finetune", "--tasks", "2", "--epochs", "1", "--hidden", "16", "--batch-size", "64",
        "--no-progress"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _clean_error(result, *fragments):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not a raw exception
    for f in fragments:
        assert f in result.output, (f, result.output)
    assert "accuracy matrix" not in result.output  # refused before any training


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--weight-decay", "nan"), ("--momentum", "inf"),
                                         ("--router-lr", "nan"), ("--lr", "-inf")])
def test_non_finite_training_options_are_refused(tmp_path, flag, value):
    out = tmp_path / "R"
    extra = ["--routing", "classifier"] if flag.startswith("--router") else []
    _clean_error(_cli("run", *FAST, *extra, flag, value, "--out", out), flag, "finite")
    assert not out.exists()


@pytest.mark.parametrize("args, flag", [(["--method", "clnp", "--alpha", "nan"], "--alpha"),
                                        (["--method", "clnp", "--alpha", "1e-4,inf"], "--alpha"),
                                        (["--method", "clnp", "--margin", "nan"], "--margin"),
                                        (["--method", "eidetic", "--prune-step", "inf"], "--prune-step"),
                                        (["--dropout", "nan"], "--dropout"),
                                        (["--val-fraction", "nan"], "val_fraction")])
def test_non_finite_method_and_data_options_are_refused(tmp_path, args, flag):
    base = [a for a in FAST if a not in ("--method", "finetune")]
    _clean_error(_cli("run", *base, *args, "--out", tmp_path / "R"), flag)
    assert not (tmp_path / "R").exists()


def test_api_callers_get_the_same_checks_by_argument_name():
    with pytest.raises(ConfigError, match=r"TrainConfig\(lr=...\): lr must be a finite number, got nan"):
        TrainConfig(lr=math.nan)
    with pytest.raises(ConfigError, match=r"TrainConfig\(batch_size=...\): batch_size must be an integer, got '64'"):
        TrainConfig(batch_size="64")
    with pytest.raises(ConfigError, match=r"TrainConfig\(weight_decay=...\): weight_decay must be a number"):
        TrainConfig(weight_decay="0.1")
    with pytest.raises(ConfigError, match=r"argument alpha of --method clnp\) must list finite numbers"):
        build_method("clnp", {"alpha": "nan"})
    with pytest.raises(ConfigError, match=r"argument prune_step of --method eidetic\) must be a finite number"):
        build_method("eidetic", {"prune_step": math.inf})
    with pytest.raises(ConfigError, match=r"argument patience of --method eidetic\) must be an integer"):
        build_method("eidetic", {"patience": "3"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path):
    _clean_error(_cli("run", *FAST, "--device", "cuda", "--out", tmp_path / "R"), "--device cuda", "--device cpu")
    assert not (tmp_path / "R").exists()
    with pytest.raises(ConfigError, match=r"TrainConfig\(device=...\): device cuda") as info:
        TrainConfig(device="cuda")
    assert "--device cuda" in info.value.cli_message


def test_a_device_index_past_the_last_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"device cuda:99") as info:
        TrainConfig(device="cuda:99")
    assert "--device cuda:99" in info.value.cli_message


def test_a_model_too_large_for_memory_is_refused_with_its_parameter_count(tmp_path):
    result = _cli("run", *FAST, "--hidden", "100000000", "--out", tmp_path / "R")
    _clean_error(result, "--model mlp (hidden=100000000", "parameters", "GiB")
    assert re.search(r"has [\d,]{13,} parameters", result.output)
    assert not (tmp_path / "R").exists()


class _TwoTasksAtMost(Method):
    name = "two-tasks"
    max_tasks = 2


def test_a_stream_longer_than_the_method_can_learn_is_refused_before_task_0():
    bench = cluster_benchmark(num_tasks=3)
    ended = []
    with pytest.raises(ConfigError, match=r"'two-tasks' can learn at most 2 tasks, but the stream has 3"):
        Trainer(_TwoTasksAtMost(), TrainConfig(epochs=1)).fit(mlp((20,), (8,), 3), bench,
                                                              on_task_end=lambda net, state: ended.append(1))
    assert ended == []
    Trainer(_TwoTasksAtMost(), TrainConfig(epochs=1)).fit(mlp((20,), (8,), 3), dataclasses.replace(
        bench, tasks=bench.tasks[:2]))


def test_split_digits_accepts_and_ignores_data_root(tmp_path):
    out = tmp_path / "R"
    nowhere = tmp_path / "no-data-here"
    result = _cli("run", *FAST, "--data-root", nowhere, "--out", out)
    assert result.exit_code == 0, result.output
    (out / "metrics.json").unlink()  # as if stopped: resume it with another data root
    result = _cli("run", "--resume", out, "--data-root", tmp_path / "elsewhere")
    assert result.exit_code == 0, result.output
    result = _cli("eval", out, "--data-root", nowhere)
    assert result.exit_code == 0, result.output
    result = _cli("eval", out, "--benchmark", "split-digits", "--tasks", "2", "--data-root", nowhere)
    assert result.exit_code == 0, result.output
    assert not nowhere.exists() and not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------- data


def _poisoned(split: str, value: float, task: int = 0, row: int = 3):
    bench = cluster_benchmark(num_tasks=2)
    t = bench.tasks[task]
    x = getattr(t, f"{split}_x").clone()
    x[row, 5] = value
    tasks = list(bench.tasks)
    tasks[task] = dataclasses.replace(t, **{f"{split}_x": x})
    return dataclasses.replace(bench, tasks=tasks)


@pytest.mark.parametrize("split, value, task", [("test", math.nan, 0), ("val", math.nan, 1), ("test", math.inf, 1),
                                                ("train", -math.inf, 1)])
@pytest.mark.parametrize("method", ["finetune", "eidetic", "clnp"])
def test_non_finite_data_is_a_data_error_before_training(split, value, task, method):
    bench = _poisoned(split, value, task)
    ended = []
    with pytest.raises(DataError, match=rf"task {task} \('clusters:{task}'\): {split} sample 3 holds {value}"):
        Trainer(build_method(method, {"alpha": "1e-4"} if method == "clnp" else {}), TrainConfig(epochs=1)).fit(
            mlp((20,), (8,), 3), bench, on_task_end=lambda net, state: ended.append(1))
    assert ended == []  # refused before task 0 trained


def test_the_forgetting_check_compares_finite_logits_of_finite_inputs():
    x = torch.tensor([[0.0, 1.0], [math.nan, 0.0], [1.0, 2.0]])
    before = torch.tensor([[1.0, 2.0], [5.0, 6.0], [math.nan, 3.0]])
    same = torch.tensor([[1.0, 2.0], [math.nan, 9.0], [math.nan, 3.0]])  # row 1's input is not finite
    assert logit_change(x, same, before) == (0.0, True)
    moved = torch.tensor([[1.0, 2.5], [5.0, 6.0], [math.nan, 3.0]])
    assert logit_change(x, moved, before) == (0.5, False)
    overflowed = torch.tensor([[1.0, math.inf], [5.0, 6.0], [math.nan, 3.0]])
    assert logit_change(x, overflowed, before) == (math.inf, False)


# ---------------------------------------------------------------------------- memory bounds


def _peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


_STREAM = """
    import resource
    from sparsecl.data.benchmarks import permuted_mnist
    b = permuted_mnist({root!r}, num_tasks={n}, max_train_per_task=2000, max_test_per_task=500)
    assert len(b.tasks) == {n}
    for t in (0, 1, {n} - 1, 2, {n} - 2):
        task = b.tasks[t]
        assert task.task_id == t and task.train_x.shape == (1800, 1, 28, 28)
    for t in range({n}):  # every task's header without building the task
        assert b.tasks.header(t).num_classes == 10
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_a_lazy_10000_task_stream_does_not_grow_with_its_length(data_root):
    short = _peak_rss_mb(_STREAM.format(root=str(data_root), n=3))
    long = _peak_rss_mb(_STREAM.format(root=str(data_root), n=10_000))
    assert long < short + 64, (short, long)  # 10,000 eager tasks held 5.4 GB


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:  # declares 10 bytes, inflates to 512 MiB
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
        zeros = bytes(1 << 20)
        for _ in range(512):
            f.write(zeros)
    assert path.stat().st_size < 4 << 20
    code = f"""
        import resource
        from sparsecl.data.formats import read_idx
        from sparsecl.errors import DataFormatError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_idx({str(path)!r})
        except DataFormatError as exc:
            assert "more than 1048576 trailing bytes" in str(exc), exc
        else:
            raise AssertionError("accepted")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
    assert _peak_rss_mb(code) < 32


def test_a_header_claiming_a_huge_payload_is_truncated_not_allocated(tmp_path):
    path = tmp_path / "huge-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2**31, 2**16, 2**16))
                                   + bytes(100)))
    from sparsecl.data.formats import read_idx

    with pytest.raises(DataFormatError, match="truncated IDX payload.*got 100 bytes"):
        read_idx(path)


# ---------------------------------------------------------------------------- untrusted manifests


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("mnist") / "R"
    result = CliRunner().invoke(main, ["run", *FAST, "--benchmark", "split-mnist", "--max-train-per-task", "200",
                                       "--max-test-per-task", "100", "--data-root", str(data_root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _crafted(run, tmp_path, edit, tensors_edit=None):
    """A copy of ``run``'s checkpoint with ``edit(manifest)`` applied and its SHA-256 recomputed,
    as anyone can."""
    ckpt = load_checkpoint(run)
    manifest = json.loads(json.dumps(ckpt.manifest))
    edit(manifest)
    tensors = dict(ckpt.tensors)
    if tensors_edit is not None:
        tensors_edit(tensors)
    out = tmp_path / "crafted"
    out.mkdir()
    save_checkpoint(out / CHECKPOINT_NAME, manifest, tensors)
    return out


def test_a_crafted_data_root_and_download_are_ignored(mnist_run, tmp_path, data_root, monkeypatch):
    evil = tmp_path / "chosen-by-the-file"

    def edit(m):
        m["spec"]["stream"][0]["options"].update(data_root=str(evil), download=True)

    crafted = _crafted(mnist_run, tmp_path, edit)
    monkeypatch.setenv("SPARSECL_DATA", str(data_root))
    result = _cli("eval", crafted)
    assert result.exit_code == 0, result.output
    assert not evil.exists()


@pytest.mark.parametrize("field, edit", [
    ("spec.train.lr", lambda m: m["spec"]["train"].update(lr="0.1")),
    ("spec.train.batch_size", lambda m: m["spec"]["train"].update(batch_size="64")),
    ("spec.train.device", lambda m: m["spec"]["train"].update(device="cuda")),
    ("run.rows[0][0]", lambda m: m["run"]["rows"][0].__setitem__(0, "0.9")),
    ("run.rows[1][1]", lambda m: m["run"]["rows"][1].__setitem__(1, 1.5)),
    ("run.capacity.fc[0]", lambda m: m["run"].update(capacity={"fc": ["full"]})),
    ("run.seconds[0]", lambda m: m["run"]["seconds"].__setitem__(0, "1.5")),
    ("spec.method_options.patience", lambda m: m["spec"]["method_options"].update(patience=[1])),
    ("spec.stream[0].seed", lambda m: m["spec"]["stream"][0].update(seed="0")),
    ("tasks_done", lambda m: m.update(tasks_done="2")),
])
def test_a_schema_error_names_the_field(mnist_run, tmp_path, data_root, field, edit):
    crafted = _crafted(mnist_run, tmp_path, edit)
    (crafted / CHECKPOINT_NAME).rename(crafted / "c.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"manifest field '{field}'")):
        from sparsecl.runs import restore

        restore(load_checkpoint(crafted / "c.safetensors"))
    (crafted / "c.safetensors").rename(crafted / CHECKPOINT_NAME)
    result = _cli("run", "--resume", crafted, "--data-root", data_root)
    _clean_error(result, f"manifest field '{field}'")


@pytest.mark.parametrize("field, edit", [
    ("rng.torch", lambda t: t.update({"rng.torch": t["rng.torch"][:100]})),
    ("run.probe_x.0", lambda t: t.update({"run.probe_x.0": t["run.probe_x.0"][:, :, :4]})),
    ("run.probe_logits.1", lambda t: t.update({"run.probe_logits.1": t["run.probe_logits.1"][:, :1]})),
])
def test_crafted_tensor_shapes_are_refused_on_load(mnist_run, tmp_path, field, edit):
    crafted = _crafted(mnist_run, tmp_path, lambda m: None, edit)
    result = _cli("run", "--resume", crafted)
    _clean_error(result, f"'tensor {field}'")


def test_the_cli_checks_the_stream_length_against_the_methods_limit_before_task_0(tmp_path, data_root):
    from sparsecl.methods import METHODS

    limit = METHODS["packnet"][0].max_tasks
    assert limit is not None  # the weight-level owner ids bound the number of tasks
    result = _cli("run", "--method", "packnet", "--benchmark", "permuted-mnist", "--tasks", limit + 1,
                  "--max-train-per-task", "100", "--max-test-per-task", "50", "--epochs", "1", "--hidden", "16",
                  "--no-progress", "--data-root", data_root, "--out", tmp_path / "R")
    _clean_error(result, f"can learn at most {limit} tasks", f"--tasks {limit}")
    assert "task 0 done" not in result.output and not (tmp_path / "R").exists()


def test_method_option_errors_speak_argument_terms_in_python_and_flags_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from sparsecl.cli import main
    from sparsecl.methods import EideticConfig, PackNetConfig

    with pytest.raises(ConfigError) as info:
        EideticConfig(prune_search="sideways")
    assert str(info.value).startswith("EideticConfig(prune_search=...) must be one of")
    assert info.value.cli_message.startswith("--prune-search must be one of")
    with pytest.raises(ConfigError, match=r"PackNetConfig\(prune=\.\.\.\) must be in \[0, 1\)"):
        PackNetConfig(prune=1.5)
    result = CliRunner().invoke(main, ["run", "--method", "packnet", "--prune", "1.5", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "--prune must be in [0, 1)" in result.output
    assert "PackNetConfig" not in result.output and not (tmp_path / "r").exists()
