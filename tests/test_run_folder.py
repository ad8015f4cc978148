"""Run folders: every run writes one; another run's files are never overwritten or mixed
(refused unless --overwrite); one run at a time per folder (a lock naming its holder, taken over
from a killed run); stale temporary files cleared; a stopped run is reported from its
checkpoint; a full disk or a read-only folder is one clean line."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsecl.checkpoint import CHECKPOINT_NAME, load_checkpoint
from sparsecl.cli import main
from sparsecl.errors import RunFolderError
from sparsecl.rundir import LOCK_NAME, RunFolder

FAST = ["--method", "finetune", "--tasks", "2", "--epochs", "1", "--hidden", "16", "--batch-size", "64",
        "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_run_without_out_writes_a_default_run_folder(tmp_path):
    result = _cli("run", *FAST)  # the autouse fixture runs every test in tmp_path
    assert result.exit_code == 0, result.output
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("finetune-split-digits-")
    assert {p.name for p in folders[0].iterdir()} == {CHECKPOINT_NAME, "metrics.json", "history.csv",
                                                      "accuracy_matrix.csv", "summary.csv"}
    ckpt = str(Path("runs") / folders[0].name / CHECKPOINT_NAME)
    lines = result.output.splitlines()
    assert ckpt in lines[0] and ckpt in lines[-1]  # named when the run starts and when it ends


def test_a_folder_of_another_run_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "R"
    assert _cli("run", *FAST, "--out", out).exit_code == 0
    assert _cli("report", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = _cli("run", *FAST, "--seed", "1", "--out", out)
    assert result.exit_code != 0
    assert "holds another run's files" in result.output and "--resume" in result.output
    assert "--overwrite" in result.output and "accuracy matrix" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    result = _cli("run", *FAST, "--seed", "1", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {CHECKPOINT_NAME, "metrics.json", "history.csv", "accuracy_matrix.csv",
                                               "summary.csv"}  # the old report is gone
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1


def test_an_unfinished_run_is_refused_as_out_and_named_for_resume(tmp_path):
    out = tmp_path / "R"
    assert _cli("run", *FAST, "--out", out).exit_code == 0
    (out / "metrics.json").unlink()  # as a run killed before its end leaves it
    result = _cli("run", *FAST, "--out", out)
    assert result.exit_code != 0 and f"--resume {out}" in result.output


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "R"
    with RunFolder.open(out):
        result = _cli("run", *FAST, "--out", out)
        assert result.exit_code != 0
        assert f"in use by process {os.getpid()}" in result.output
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
            RunFolder.open(out)
    assert not (out / LOCK_NAME).exists()  # released and removed
    assert _cli("run", *FAST, "--out", out).exit_code == 0


def test_two_concurrent_runs_on_one_folder(tmp_path):
    out = tmp_path / "R"
    args = [sys.executable, "-m", "sparsecl", "run", "--method", "finetune", "--tasks", "2", "--epochs", "100000",
            "--hidden", "64", "--no-progress", "--out", str(out)]
    first = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / LOCK_NAME).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (out / LOCK_NAME).exists(), first.communicate()
        second = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"in use by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "R"
    code = ("import sys, time; from sparsecl.rundir import RunFolder; RunFolder.open(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
        RunFolder.open(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # the stale lock file is still there
    with RunFolder.open(out) as folder:  # taken over: the kernel dropped the dead process's flock
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert folder.path == out


def test_stale_temporary_files_are_removed_when_the_folder_is_opened(tmp_path):
    out = tmp_path / "R"
    assert _cli("run", *FAST, "--out", out).exit_code == 0
    (out / "metrics.json").unlink()
    stale = out / f".{CHECKPOINT_NAME}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    stale.chmod(0o600)
    keep = out / "notes.txt"  # not a temporary file of ours
    keep.write_text("mine")
    result = _cli("run", "--resume", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and keep.read_text() == "mine"


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    for bad in (["--lr", "nan"], ["--weight-decay", "inf"], ["--hidden", "100000000"]):
        out = tmp_path / "new"
        result = _cli("run", *FAST, *bad, "--out", out)
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert not out.exists(), bad


def test_report_of_a_killed_run_uses_its_checkpoint_and_names_resume(tmp_path):
    out = tmp_path / "R"
    assert _cli("run", *FAST, "--tasks", "3", "--out", out).exit_code == 0
    full = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    ckpt_bytes = (out / CHECKPOINT_NAME).read_bytes()
    result = _cli("report", out)
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "accuracy_matrix.png").is_file()
    assert not (out / "metrics.json").exists()  # the folder still reads as an unfinished... run
    assert (out / CHECKPOINT_NAME).read_bytes() == ckpt_bytes  # ...whose checkpoint is untouched
    assert "finetune on split-digits" in (out / "report.md").read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert full["accuracy_matrix"][2][0] is not None


def test_report_of_a_stopped_run_names_resume(tmp_path):
    from interrupted import run_with_checkpoints
    from sparsecl.runs import RunSpec, build_stream

    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {"num_tasks": 3}}],
                   {"name": "mlp", "options": {"hidden": [16], "dropout": 0.0}, "single_head": False}, "finetune",
                   {}, {"epochs": 1, "batch_size": 64})
    out = tmp_path / "R"
    with pytest.raises(KeyboardInterrupt):
        run_with_checkpoints(spec, build_stream(spec), out, stop_after=2)
    result = _cli("report", out)
    assert result.exit_code == 0, result.output
    assert "stopped after 2 of its 3 tasks" in result.output and f"sparsecl run --resume {out}" in result.output
    assert "metrics.json is missing" not in result.output


def test_report_into_a_read_only_folder_is_one_clean_error(tmp_path, monkeypatch):
    out = tmp_path / "R"
    assert _cli("run", *FAST, "--out", out).exit_code == 0
    import sparsecl.report as report_module

    def denied(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(report_module, "write_atomic", denied)
    result = _cli("report", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # click's clean exit
    assert "cannot write the report" in result.output and "Permission denied" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_into_a_read_only_folder_for_real(tmp_path):
    out = tmp_path / "R"
    assert _cli("run", *FAST, "--out", out).exit_code == 0
    out.chmod(0o555)
    try:
        result = _cli("report", out)
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1 and "cannot write the report" in result.output


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import sparsecl.runs as runs_module

    real, calls = runs_module.save_checkpoint, []

    def full_disk(path, manifest, tensors):
        calls.append(manifest["tasks_done"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, manifest, tensors)

    monkeypatch.setattr(runs_module, "save_checkpoint", full_disk)
    out = tmp_path / "R"
    result = _cli("run", *FAST, "--out", out)
    assert result.exit_code == 1 and not isinstance(result.exception, OSError)
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "No space left on device" in error[0]
    assert "the checkpoint after task 0 is kept" in error[0]
    assert load_checkpoint(out).manifest["tasks_done"] == 1
    assert f"--resume {out}" in result.output
