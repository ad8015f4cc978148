"""``sparsecl run`` end to end through the command line."""

import json
import os

from click.testing import CliRunner

from sparsecl.cli import main

FAST = ["--epochs", "3", "--hidden", "32,32", "--batch-size", "32", "--no-progress"]


def test_run_default_benchmark_writes_metrics(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", *FAST, "--patience", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == "split-digits" and metrics["method"] == "eidetic"
    R = metrics["accuracy_matrix"]
    assert len(R) == 5 and R[0][1] is None and all(v is not None for v in R[4])
    assert metrics["max_logit_change"] == 0.0 and metrics["bwt"] == 0.0
    assert set(metrics["capacity"]) == {"fc1", "fc2"} and all(len(v) == 5 for v in metrics["capacity"].values())
    assert metrics["config"]["method_options"]["patience"] == 2
    assert {"torch", "sparsecl", "python"} <= set(metrics["versions"]) and metrics["seconds"] > 0
    assert "ACC" in result.output and "max logit change 0" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_matrix.csv", "checkpoint.safetensors", "history.csv",
                                                     "metrics.json", "summary.csv"]  # no temporary file
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_same_seed_same_matrix_through_the_cli(tmp_path):
    matrices = []
    for name in ("a", "b"):
        args = ["run", "--method", "finetune", "--tasks", "2", *FAST, "--seed", "3", "--out", str(tmp_path / name)]
        assert CliRunner().invoke(main, args).exit_code == 0
        matrices.append(json.loads((tmp_path / name / "metrics.json").read_text())["accuracy_matrix"])
    assert matrices[0] == matrices[1]


def test_method_option_of_another_method_is_refused():
    result = CliRunner().invoke(main, ["run", "--method", "finetune", "--prune-step", "0.1", *FAST])
    assert result.exit_code != 0
    assert "--prune-step do(es) not apply to --method finetune" in result.output


def test_bad_values_name_the_option():
    result = CliRunner().invoke(main, ["run", *FAST, "--hidden", "10,x"])
    assert result.exit_code != 0 and "--hidden must be comma-separated integers" in result.output
    result = CliRunner().invoke(main, ["run", "--tolerance", "2", *FAST])
    assert result.exit_code != 0 and "--tolerance must be in [0, 1)" in result.output


def test_missing_data_names_the_files_and_where_it_looked(tmp_path):
    result = CliRunner().invoke(main, ["run", "--benchmark", "split-mnist", "--data-root", str(tmp_path), *FAST])
    assert result.exit_code != 0
    assert str(tmp_path) in result.output and "train-images-idx3-ubyte" in result.output


def test_unusable_out_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["run", *FAST, "--out", str(blocker / "run")])
    assert result.exit_code != 0 and f"--out {blocker / 'run'}: cannot create the folder" in result.output
    assert "accuracy matrix" not in result.output  # refused before any training happened


def test_bad_dropout_is_a_clear_error():
    result = CliRunner().invoke(main, ["run", *FAST, "--dropout", "1.5"])
    assert result.exit_code != 0 and "--dropout must be in [0, 1), got 1.5" in result.output


def test_clnp_single_head_run_then_report(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--method", "clnp", "--single-head", "--alpha", "1e-4", "--margin", "0.02",
            "--lrs", "0.01,0.003", *FAST, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_logit_change"] == 0.0 and metrics["config"]["single_head"] is True
    assert metrics["config"]["method_options"]["lrs"] == "0.01,0.003"
    assert set(metrics["reuse"]) == {"fc1", "fc2"}
    assert metrics["reuse"]["fc2"]["reused"] == [0] * 5  # a single head never shares final-hidden units
    assert all(len(entry["grid"]) == 2 for entry in metrics["method_log"])
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    written = {p.name for p in out.iterdir()}
    assert written == {"metrics.json", "checkpoint.safetensors", "accuracy_matrix.png", "capacity.png",
                       "reuse.png", "report.md", "history.csv", "history.png", "accuracy_matrix.csv", "summary.csv"}
    assert "clnp on split-digits" in (out / "report.md").read_text()


def test_report_of_a_folder_without_metrics_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0
    assert "metrics.json" in result.output and "sparsecl run --out" in result.output
    assert list(tmp_path.iterdir()) == []


def test_seeds_run_one_folder_per_seed_then_summarize(tmp_path):
    out = tmp_path / "multi"
    args = ["run", "--method", "finetune", "--tasks", "2", *FAST, "--seeds", "0,1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    seeds = [json.loads((out / f"seed-{s}" / "metrics.json").read_text())["config"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    assert "| finetune | split-digits |" in result.output and "2 (0, 1)" in result.output
    assert (out / "summary-over-seeds.md").is_file() and (out / "summary-over-seeds.csv").is_file()
    again = CliRunner().invoke(main, ["summarize", str(out), "--out", str(tmp_path / "table")])
    assert again.exit_code == 0, again.output
    assert "2 (0, 1)" in again.output and (tmp_path / "table.md").is_file()
    refused = CliRunner().invoke(main, [*args[:-2], "--seed", "3", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "give --seed (one run) or --seeds" in refused.output
    bad = CliRunner().invoke(main, ["summarize", str(tmp_path / "x")])
    assert bad.exit_code != 0


def test_init_weights_are_loaded_before_task_0_recorded_and_refused_on_resume(tmp_path):
    from safetensors.torch import save_file

    from sparsecl.checkpoint import load_checkpoint
    from sparsecl.models import mlp

    torch_model = mlp((64,), (16,), 2)  # split-digits: 8x8 images
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(weights))
    out = tmp_path / "run"
    args = ["run", "--method", "finetune", "--tasks", "1", "--epochs", "1", "--hidden", "16", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--init-weights", str(weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "initial weights from" in result.output
    spec = load_checkpoint(out).manifest["spec"]
    assert spec["model"]["init_weights"]["path"] == str(weights) and len(spec["model"]["init_weights"]["sha256"]) == 64
    for flag in ("--resume", "--from"):
        refused = CliRunner().invoke(main, ["run", flag, str(out), "--init-weights", str(weights)])
        assert refused.exit_code != 0 and "--init-weights sets the weights before task 0" in refused.output


def test_run_help_groups_options_and_shows_real_defaults_and_choices():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for section in ("Run:", "Data:", "Model:", "Training:", "Output:", "Method eidetic:", "Method clnp:",
                    "Options of several methods:"):
        assert section in result.output, section
    assert "--score [l1|l2|taylor]" in text and "--init [erk|uniform|auto]" in text
    assert "--growth [random|unfired|gradient|momentum]" in text and "--theta-order [first|last]" in text
    assert "eidetic: default 10" in text  # --patience: EideticNets' real default
    assert "--no-progress" in text and "progress bar per task" in text
    assert "[default: 20]" in text  # --epochs: TrainConfig's


def test_bad_choice_of_a_method_option_is_refused_by_click():
    result = CliRunner().invoke(main, ["run", "--score", "random", *FAST])
    assert result.exit_code != 0 and "'random' is not one of" in result.output
