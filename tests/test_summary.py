"""Mean ± std over seeds (sparsecl.summary) on hand-made metrics.json folders, and on the
metrics.json of real runs."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
from click.testing import CliRunner

from sparsecl.cli import main
from sparsecl.errors import ConfigError
from sparsecl.summary import load_run, summarize_runs, to_csv, to_markdown, write_summary


def _metrics(method="ewc", seed=0, acc=0.9, bwt=-0.01, forgetting=0.02, capacity=None, seconds=60.0, epochs=5,
             benchmark="permuted-mnist"):
    capacity = capacity if capacity is not None else {"fc1": [0.5, 1.0], "fc2": [0.25, 0.5]}
    return {"method": method, "benchmark": benchmark, "accuracy_matrix": [[acc]], "acc": acc, "bwt": bwt,
            "forgetting": forgetting, "max_logit_change": 0.5, "capacity": capacity, "reuse": {},
            "config": {"epochs": epochs, "lr": 0.001, "seed": seed, "device": "cpu", "progress": False,
                       "method_options": {"ewc_lambda": 5000.0},
                       "stream": [{"benchmark": benchmark, "seed": seed, "options": {"num_tasks": 10}}]},
            "seconds": seconds, "seconds_per_task": [seconds]}


def _write(folder, metrics):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_mean_and_std_over_seeds_per_configuration(tmp_path):
    accs, bwts, seconds = [0.90, 0.92, 0.97], [-0.01, -0.03, -0.02], [60.0, 150.0, 240.0]
    runs = [_write(tmp_path / f"ewc-s{s}", _metrics(seed=s, acc=a, bwt=b, seconds=t,
                                                     capacity={"fc1": [1.0, 0.2 + 0.1 * s], "fc2": [0.4, 0.6]}))
            for s, a, b, t in zip(range(3), accs, bwts, seconds)]
    other = _write(tmp_path / "ewc-e10", _metrics(seed=0, acc=0.95, epochs=10, forgetting=None, bwt=None))
    rows = summarize_runs(runs[:2] + [other] + runs[2:])
    assert [(r.method, r.seeds) for r in rows] == [("ewc", [0, 1, 2]), ("ewc", [0])]
    first, second = rows
    assert first.acc.mean == pytest.approx(statistics.mean(accs)) and first.acc.n == 3
    assert first.acc.std == pytest.approx(statistics.stdev(accs))  # sample std (n - 1)
    assert first.bwt.mean == pytest.approx(-0.02) and first.bwt.std == pytest.approx(0.01)
    assert first.forgetting.mean == pytest.approx(0.02) and first.forgetting.std == pytest.approx(0.0)
    assert first.seconds.mean == pytest.approx(150.0) and first.seconds.std == pytest.approx(90.0)
    assert first.capacity_per_layer["fc1"].mean == pytest.approx(0.3)
    assert first.capacity_per_layer["fc1"].std == pytest.approx(0.1)
    assert first.capacity.mean == pytest.approx((0.3 + 0.6) / 2)  # the layers' mean, over seeds
    assert first.config == second.config | {"epochs": 5}
    assert "seed" not in first.config and "device" not in first.config
    assert all("seed" not in seg for seg in first.config["stream"])
    assert second.acc.std is None and second.bwt.mean is None  # one seed; one task

    md = to_markdown(rows)
    assert "| ewc | permuted-mnist | epochs=5 | 3 (0, 1, 2) | 93.00 ± 3.61 | -2.00 ± 1.00 | 2.00 ± 0.00 " in md
    assert "fc1 30.0 ± 10.0, fc2 60.0 ± 0.0" in md and "| 2.5 ± 1.5 min |" in md and "| 60.0 s |" in md
    assert "| epochs=10 | 1 (0) | 95.00 | — | — |" in md

    table = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [t["seeds"] for t in table] == ["0 1 2", "0"]
    assert float(table[0]["acc_mean"]) == first.acc.mean and float(table[0]["acc_std"]) == first.acc.std
    assert float(table[0]["capacity[fc2]_mean"]) == pytest.approx(0.6)
    assert table[1]["acc_std"] == "" and table[1]["bwt_mean"] == ""
    assert table[0]["options"] == "epochs=5" and json.loads(table[0]["config"])["epochs"] == 5

    md_path, csv_path = write_summary(rows, tmp_path / "summary.md")
    assert md_path.read_text() == md and csv_path == tmp_path / "summary.csv"
    assert csv_path.read_text() == to_csv(rows)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_of_seed_folders_stands_for_its_runs(tmp_path):
    for s in range(2):
        _write(tmp_path / "sweep" / f"seed{s}", _metrics(seed=s, acc=0.9 + s / 100))
    (rows,) = summarize_runs([tmp_path / "sweep"])
    assert rows.seeds == [0, 1] and rows.acc.mean == pytest.approx(0.905)


def test_methods_and_benchmarks_are_grouped_apart(tmp_path):
    a = _write(tmp_path / "a", _metrics(method="ewc"))
    b = _write(tmp_path / "b", _metrics(method="si"))
    c = _write(tmp_path / "c", _metrics(method="ewc", benchmark="split-mnist"))
    rows = summarize_runs([a, b, c])
    assert [(r.method, r.benchmark) for r in rows] == [("ewc", "permuted-mnist"), ("si", "permuted-mnist"),
                                                        ("ewc", "split-mnist")]


def test_stream_options_that_differ_are_named_by_segment(tmp_path):
    plain = _metrics(seed=0)
    normalized = _metrics(seed=0)
    normalized["config"]["stream"][0]["options"]["normalize"] = True
    rows = summarize_runs([_write(tmp_path / "a", plain), _write(tmp_path / "b", normalized)])
    md = to_markdown(rows)
    assert "| stream.0.options.normalize=— |" in md and "| stream.0.options.normalize=True |" in md
    assert "num_tasks" not in md  # the same in both rows


def test_bad_inputs_are_refused_by_name(tmp_path):
    a = _write(tmp_path / "a", _metrics(seed=1))
    b = _write(tmp_path / "b", _metrics(seed=1, acc=0.5))
    with pytest.raises(ConfigError, match="same seed 1") as err:
        summarize_runs([a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metrics.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(ConfigError, match="neither a run folder"):
        summarize_runs([tmp_path / "empty"])
    broken = _write(tmp_path / "broken", {"method": "ewc"})
    with pytest.raises(ConfigError, match="lacks the key"):
        load_run(broken)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metrics.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_run(tmp_path / "garbage")
    with pytest.raises(ConfigError, match="no run folders"):
        summarize_runs([])
    with pytest.raises(ConfigError, match="does not exist"):
        write_summary(summarize_runs([a]), tmp_path / "missing" / "out.md")


def test_summary_of_real_runs(tmp_path):
    """metrics.json as ``sparsecl run`` writes it: two seeds of one configuration group together."""
    for seed in (0, 1):
        result = CliRunner().invoke(main, ["run", "--method", "ewc", "--tasks", "2", "--epochs", "1", "--hidden", "16",
                                           "--seed", str(seed), "--no-progress", "--out", str(tmp_path / f"s{seed}")])
        assert result.exit_code == 0, result.output
    (row,) = summarize_runs([tmp_path / "s0", tmp_path / "s1"])
    accs = [json.loads((tmp_path / f"s{s}" / "metrics.json").read_text())["acc"] for s in (0, 1)]
    assert row.method == "ewc" and row.seeds == [0, 1]
    assert row.acc.mean == pytest.approx(statistics.mean(accs)) and row.acc.std == pytest.approx(statistics.stdev(accs))
    assert row.capacity.mean == 1.0 and row.config["method_options"]["ewc_lambda"] == 5000.0
