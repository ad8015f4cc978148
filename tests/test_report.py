"""``sparsecl.report.write_report``: the files it writes, what report.md says, the errors it
raises and that a failing write leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from sparsecl.errors import ConfigError, SparseCLError
from sparsecl.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ("accuracy_matrix.png", "capacity.png", "reuse.png", "report.md")


def fake_metrics(reuse: bool = True) -> dict:
    m = {
        "method": "eidetic",
        "benchmark": "split-mnist",
        "accuracy_matrix": [[0.984, None, None], [0.984, 0.9712, None], [0.984, 0.9712, 0.9955]],
        "acc": (0.984 + 0.9712 + 0.9955) / 3,
        "bwt": 0.0,
        "forgetting": 0.0,
        "max_logit_change": 0.0,
        "capacity": {"fc1": [0.1, 0.25, 0.5], "fc2": [0.05, 0.125, 0.2]},
        "seconds": 12.5,
        "seconds_per_task": [4.0, 4.5, 4.0],
        "config": {"method": "eidetic", "benchmark": "split-mnist", "epochs": 2, "optimizer": "adam",
                   "lr": 0.002, "batch_size": 256, "seed": 0, "hidden": [40, 40],
                   "method_options": {"prune_step": 0.05}},
        "method_log": [{"task": 0}],
    }
    if reuse:
        m["reuse"] = {
            "fc1": {"units": [40, 40, 40], "owned": [4, 6, 10], "free": [36, 30, 20], "reused": [0, 3, 8]},
            "fc2": {"units": [40, 40, 40], "owned": [2, 3, 3], "free": [38, 35, 32], "reused": [0, 1, 2]},
        }
    return m


def make_run(tmp_path: Path, metrics: dict | str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    (run / "metrics.json").write_text(text)
    return run


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name != "metrics.json")


def test_writes_plots_and_report_with_reuse(tmp_path):
    run = make_run(tmp_path, fake_metrics(reuse=True))
    written = write_report(run)
    assert written == [run / name for name in OUTPUTS]
    for name in OUTPUTS[:3]:
        data = (run / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5000, name
    umask = os.umask(0)
    os.umask(umask)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    md = (run / "report.md").read_text()
    assert md.startswith("# eidetic on split-mnist\n")
    assert "| ACC | 98.36 % |" in md
    assert "| BWT | +0.00 points |" in md
    assert "| max logit change | `0.0` |" in md
    assert "| seconds per task (mean) | 4.2 s |" in md
    # accuracy matrix in percent, blank above the diagonal
    assert "| 0 | 98.40 |  |  |" in md
    assert "| 1 | 98.40 | 97.12 |  |" in md
    assert "| 2 | 98.40 | 97.12 | 99.55 |" in md
    # capacity per layer in percent
    assert "| fc1 | 10.00 | 25.00 | 50.00 |" in md
    assert "| fc2 | 5.00 | 12.50 | 20.00 |" in md
    # reuse: layer, task, units, owned, free, reused
    assert "| fc1 | 2 | 40 | 10 | 20 | 8 |" in md
    assert '- **method_options**: `{"prune_step": 0.05}`' in md
    assert "- **hidden**: `[40, 40]`" in md
    for alt, name in (("accuracy matrix", "accuracy_matrix.png"), ("capacity", "capacity.png"),
                      ("reuse", "reuse.png")):
        assert f"![{alt}]({name})" in md
    assert leftovers(run) == sorted(OUTPUTS)  # no temporary files


def test_no_reuse_means_no_reuse_plot(tmp_path):
    m = fake_metrics(reuse=False)
    del m["acc"], m["seconds"]  # optional: ACC comes from the matrix, time from seconds_per_task
    m["max_logit_change"] = "inf"
    m["bwt"] = None
    run = make_run(tmp_path, m)
    written = write_report(run)
    assert [p.name for p in written] == ["accuracy_matrix.png", "capacity.png", "report.md"]
    assert not (run / "reuse.png").exists()
    md = (run / "report.md").read_text()
    assert "| ACC | 98.36 % |" in md
    assert "| BWT | n/a |" in md
    assert "| max logit change | `inf` |" in md
    assert "12.5 s" in md
    assert "reuse" not in md.lower()


def test_empty_reuse_is_like_no_reuse(tmp_path):
    m = fake_metrics(reuse=False)
    m["reuse"] = {}
    run = make_run(tmp_path, m)
    assert not (run / "reuse.png") in write_report(run)
    assert not (run / "reuse.png").exists()


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        write_report(tmp_path / "file")


def test_missing_metrics(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\.json is missing.*sparsecl run --out"):
        write_report(tmp_path)
    assert issubclass(ConfigError, SparseCLError)


def test_invalid_json_names_the_file_and_position(tmp_path):
    run = make_run(tmp_path, '{"method": "eidetic",\n  "benchmark": }')
    with pytest.raises(ConfigError) as info:
        write_report(run)
    msg = str(info.value)
    assert str(run / "metrics.json") in msg
    assert "not valid JSON" in msg and "line 2" in msg
    assert leftovers(run) == []


def test_missing_accuracy_matrix_names_the_key(tmp_path):
    m = fake_metrics()
    del m["accuracy_matrix"]
    run = make_run(tmp_path, m)
    with pytest.raises(ConfigError, match='"accuracy_matrix".*missing'):
        write_report(run)
    assert leftovers(run) == []


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m["accuracy_matrix"][1].pop(), r'"accuracy_matrix" row 1 must be a list of 3'),
    (lambda m: m["accuracy_matrix"][2].__setitem__(0, None), r"\[2\]\[0\] must be a number in \[0, 1\]"),
    (lambda m: m["accuracy_matrix"][0].__setitem__(0, 98.4), r"\[0\]\[0\] must be a number"),
    (lambda m: m["capacity"]["fc2"].pop(), r'"capacity"'),
    (lambda m: m.pop("method"), r'"method"'),
    (lambda m: m.__setitem__("max_logit_change", "big"), r'"max_logit_change"'),
    (lambda m: m["reuse"]["fc1"].pop("reused"), r'"reuse" layer "fc1"'),
])
def test_wrong_shapes_name_the_key(tmp_path, mutate, match):
    m = fake_metrics()
    mutate(m)
    run = make_run(tmp_path, m)
    with pytest.raises(ConfigError, match=match):
        write_report(run)
    assert leftovers(run) == []


def test_failing_savefig_leaves_nothing(tmp_path, monkeypatch):
    run = make_run(tmp_path, fake_metrics())

    def broken_savefig(self, f, **kwargs):
        f.write(PNG_SIGNATURE + b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_report(run)
    assert leftovers(run) == []


def test_failing_rename_leaves_nothing(tmp_path, monkeypatch):
    run = make_run(tmp_path, fake_metrics())

    def broken_replace(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        write_report(run)
    assert leftovers(run) == []


def test_failing_report_md_keeps_the_old_one(tmp_path, monkeypatch):
    run = make_run(tmp_path, fake_metrics())
    (run / "report.md").write_text("old report\n")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "report.md":
            raise OSError("no space left")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="no space left"):
        write_report(run)
    assert (run / "report.md").read_text() == "old report\n"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def routing_metrics() -> dict:
    m = fake_metrics()
    m["routing"] = {
        "mode": "classifier", "buffer_per_task": 200,
        "accuracy_matrix": [[0.984, None, None], [0.95, 0.90, None], [0.93, 0.88, 0.97]],
        "acc": (0.93 + 0.88 + 0.97) / 3, "bwt": None, "forgetting": None,
        "routing_accuracy": [[1.0, None, None], [0.96, 0.92, None], [0.94, 0.9, 0.975]],
        "per_class": [{"task": t, "class": 2 * t + k, "samples": 50, "oracle": 0.98, "routed": 0.9 - 0.1 * k}
                      for t in range(3) for k in range(2)],
        "mean_class_drop": 0.13, "seconds_per_task": [0.1, 0.2, 0.3],
    }
    return m


def test_routing_adds_a_plot_and_a_section(tmp_path):
    run = make_run(tmp_path, routing_metrics())
    written = write_report(run)
    assert [p.name for p in written] == [*OUTPUTS[:3], "routing.png", "report.md"]
    assert (run / "routing.png").read_bytes().startswith(PNG_SIGNATURE)
    md = (run / "report.md").read_text()
    assert "## Task-agnostic inference (classifier routing)" in md
    assert "| routed ACC | 92.67 % |" in md and "| oracle ACC (task id given) | 98.36 % |" in md
    assert "| mean per-class drop (oracle − routed) | 13.00 points |" in md
    assert "200 training samples per task" in md
    assert "| 1 | 95.00 | 90.00 |  |" in md  # the routed matrix
    assert "| 2 | 94.00 | 90.00 | 97.50 |" in md  # routing accuracy
    assert "| 1 | 3 | 50 | 98.00 | 80.00 | 18.00 |" in md  # per class: task, class, samples, oracle, routed, drop
    assert "![routing](routing.png)" in md
    m = fake_metrics()  # a later report without routing removes the stale plot
    (run / "metrics.json").write_text(json.dumps(m))
    write_report(run)
    assert not (run / "routing.png").exists() and "Task-agnostic" not in (run / "report.md").read_text()


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("mode"), r'"routing.mode" must be a string; it is missing'),
    (lambda r: r["accuracy_matrix"][2].pop(), r'"routing.accuracy_matrix" must be a list of 3 rows'),
    (lambda r: r["routing_accuracy"][0].__setitem__(0, 1.5), r'"routing.routing_accuracy"'),
    (lambda r: r.__setitem__("buffer_per_task", 0), r'"routing.buffer_per_task" must be a positive integer'),
    (lambda r: r["per_class"][0].__setitem__("task", 7), r'"routing.per_class"'),
])
def test_malformed_routing_names_the_key(tmp_path, mutate, match):
    m = routing_metrics()
    mutate(m["routing"])
    run = make_run(tmp_path, m)
    with pytest.raises(ConfigError, match=match):
        write_report(run)
    assert leftovers(run) == []


def test_many_classes_plot_routed_against_oracle(tmp_path):
    m = routing_metrics()
    m["routing"]["per_class"] = [{"task": t, "class": 10 * t + k, "oracle": 0.9, "routed": 0.01 * k}
                                 for t in range(3) for k in range(20)]
    run = make_run(tmp_path, m)
    write_report(run)
    assert (run / "routing.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| 2 | 29 | " in (run / "report.md").read_text()  # no "samples": the cell is left empty


def test_weight_level_runs_report_weights_and_bits(tmp_path):
    """A PackNet/WSN/DST metrics.json (reuse counted in weights, bits_per_parameter) gets
    weight-labelled plots and tables and a bits-per-parameter section; bad bits are refused."""
    m = fake_metrics(reuse=False)
    m["reuse"] = {
        "fc1": {"weights": [100] * 3, "owned": [50, 10, 5], "free": [50, 40, 35], "used": [50] * 3, "reused": [0, 40, 45]},
    }
    m["bits_per_parameter"] = {"raw": [1.0, 2.0, 3.0], "coded": [1.01, 1.5, 1.9], "stored": [1.0, 1.5, 1.9],
                               "entropy": [1.0, 1.45, 1.85]}
    run = make_run(tmp_path, m)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "## Capacity used (% of weights)" in text and "## Reuse (weights)" in text
    assert "| fc1 | 1 | 100 | 10 | 40 | 50 | 40 |" in text
    assert "## Bits per parameter" in text and "| 2 | 3.000 | 1.900 | 1.900 | 1.850 |" in text
    assert (run / "reuse.png").read_bytes().startswith(PNG_SIGNATURE)
    m["bits_per_parameter"]["coded"] = [1.0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match='"bits_per_parameter"'):
        write_report(bad)


# ---------------------------------------------------------------------------- pictures

def test_accuracy_colour_scale_is_fixed_and_title_names_the_run(tmp_path):
    """Two runs compare by colour: the scale is 0–100 % whatever the accuracies; the title gives
    method, benchmark, model, ACC and BWT."""
    from sparsecl.report import accuracy_figure, load_metrics

    m = fake_metrics()
    m["config"]["model"] = "mlp"
    fig = accuracy_figure(load_metrics(make_run(tmp_path, m)))
    ax = fig.axes[0]
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, 100.0)
    title = ax.get_title()
    assert "eidetic on split-mnist (mlp)" in title
    assert "ACC 98.36 %" in title and "BWT +0.00 points" in title
    m["accuracy_matrix"] = [[0.2, None, None], [0.1, 0.3, None], [0.1, 0.25, 0.4]]
    del m["acc"], m["bwt"]  # computed from the matrix when absent
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps(m))
    ax = accuracy_figure(load_metrics(other)).axes[0]
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.0, 100.0)
    assert "ACC 25.00 %" in ax.get_title() and "BWT -7.50 points" in ax.get_title()


def many_groups_metrics(groups: int = 12, T: int = 3) -> dict:
    m = fake_metrics(reuse=False)
    m["accuracy_matrix"] = [[0.5 if i <= t else None for i in range(T)] for t in range(T)]
    del m["acc"], m["bwt"]
    names = [f"layer{g // 4 + 1}.{g % 4}.conv" for g in range(groups)]
    m["capacity"] = {n: [min(1.0, 0.3 * (t + 1)) for t in range(T)] for n in names}
    owned = [20 // (t + 1) for t in range(T)]
    free = [64 - sum(owned[:t + 1]) for t in range(T)]
    m["reuse"] = {n: {"units": [64] * T, "owned": owned, "free": free,
                      "reused": [min(64, 10 * t * (t + 1)) for t in range(T)]} for n in names}
    return m


def test_many_groups_give_heat_maps(tmp_path):
    """Beyond MAX_LINES unit groups, capacity and reuse are group x task heat maps on 0–100 %,
    one row per group, of a readable size (not a strip of one panel per group)."""
    from sparsecl.report import MAX_LINES, capacity_figure, load_metrics, reuse_figure

    m = load_metrics(make_run(tmp_path, many_groups_metrics(12)))
    assert 12 > MAX_LINES
    cap = capacity_figure(m)
    images = [ax.images[0] for ax in cap.axes if ax.images]
    assert len(images) == 2  # capacity in use, and units newly taken
    for im in images:
        assert im.get_array().shape == (12, 3)
        assert (im.norm.vmin, im.norm.vmax) == (0.0, 100.0)
    assert images[0].get_array()[0].tolist() == pytest.approx([30.0, 60.0, 90.0])
    assert images[1].get_array()[0].tolist() == pytest.approx([100 * 20 / 64, 100 * 10 / 64, 100 * 6 / 64])
    assert [t.get_text() for t in cap.axes[0].get_yticklabels()][:2] == ["layer1.0.conv", "layer1.1.conv"]
    reuse = reuse_figure(m)
    images = [ax.images[0] for ax in reuse.axes if ax.images]
    assert len(images) == 2 and images[1].get_array()[0].tolist() == pytest.approx([0.0, 100 * 20 / 64, 100 * 60 / 64])
    width, height = reuse.get_size_inches()
    assert height < 2 * width  # compact, not a 745x4126 px strip
    run = tmp_path / "run"
    write_report(run)
    assert (run / "capacity.png").read_bytes().startswith(PNG_SIGNATURE)


def test_few_groups_keep_lines(tmp_path):
    from sparsecl.report import capacity_figure, load_metrics

    fig = capacity_figure(load_metrics(make_run(tmp_path, fake_metrics())))
    assert not any(ax.images for ax in fig.axes)
    assert len(fig.axes[0].get_lines()) == 2  # one line per layer


def test_bits_plot_for_weight_level_runs(tmp_path):
    """bits.png: the four mask-bit series per task, and the compact file's bits beside a 32-bit
    line when recorded; removed again when a later report has no bits."""
    from sparsecl.report import bits_figure, load_metrics

    m = fake_metrics(reuse=False)
    m["bits_per_parameter"] = {"raw": [1.0, 2.0, 3.0], "coded": [0.9, 1.5, 1.9], "stored": [0.9, 1.5, 1.9],
                               "entropy": [0.8, 1.4, 1.8], "compact": [33.0, 20.0, 12.0],
                               "compact_task": [33.0, 8.0, 4.0]}
    run = make_run(tmp_path, m)
    fig = bits_figure(load_metrics(run))
    left, right = fig.axes
    assert [list(line.get_ydata()) for line in left.get_lines()][0] == [1.0, 2.0, 3.0]
    assert len(left.get_lines()) == 4
    assert [line.get_ydata()[-1] for line in right.get_lines()] == [12.0, 4.0, 32.0]
    written = [p.name for p in write_report(run)]
    assert written == ["accuracy_matrix.png", "capacity.png", "bits.png", "report.md"]
    del m["bits_per_parameter"]
    (run / "metrics.json").write_text(json.dumps(m))
    write_report(run)
    assert not (run / "bits.png").exists()


HISTORY = """task,phase,epoch,loss,accuracy,lr,seconds
0,train,0,0.90,0.70,0.001,1.5
0,train,1,0.40,0.90,0.001,1.4
0,recovery,0,0.35,0.92,0.0005,1.0
1,train,0,0.80,0.75,0.001,1.5
1,theta-scan,0,,0.91,,0.2
2,train,0,0.70,0.80,0.001,1.6
"""


def test_history_plot_and_table(tmp_path):
    """history.csv: one point per row, coloured by phase, tasks separated; report.md gets a table
    per task and phase. Empty cells are NaN, a report without the file has no history plot."""
    from sparsecl.report import history_figure, load_metrics, read_history

    run = make_run(tmp_path, fake_metrics())
    assert read_history(run / "history.csv") == []
    assert "history.png" not in [p.name for p in write_report(run)]
    (run / "history.csv").write_text(HISTORY)
    rows = read_history(run / "history.csv", 3)
    assert len(rows) == 6 and rows[2] == {"task": 0, "phase": "recovery", "epoch": 0, "loss": 0.35,
                                          "accuracy": 0.92, "lr": 0.0005, "seconds": 1.0}
    assert rows[4]["loss"] != rows[4]["loss"]  # NaN
    fig = history_figure(load_metrics(run), rows)
    loss_ax, acc_ax = fig.axes[:2]
    xs = sorted(x for line in acc_ax.get_lines() if line.get_linestyle() == "-" for x in line.get_xdata())
    assert xs == [1, 2, 3, 4, 5, 6]  # every row once, in run order
    ys = [list(line.get_ydata()) for line in acc_ax.get_lines() if line.get_linestyle() == "-"]
    assert ys[0] == pytest.approx([70.0, 90.0])  # task 0's two training epochs, in %
    bounds = [line.get_xdata()[0] for line in loss_ax.get_lines() if line.get_linestyle() == ":"]
    assert bounds == [3.5, 5.5]  # between tasks 0|1 and 1|2
    top = loss_ax.child_axes[0]  # the task names above the plot
    assert [t.get_text() for t in top.get_xticklabels()] == ["task 0", "task 1", "task 2"]
    assert list(top.get_xticks()) == [2.0, 4.5, 6.0]
    written = [p.name for p in write_report(run)]
    assert written == [*OUTPUTS[:3], "history.png", "report.md"]
    assert (run / "history.png").read_bytes().startswith(PNG_SIGNATURE)
    md = (run / "report.md").read_text()
    assert "## Training history" in md
    assert "| 0 | train | 2 | 0.4000 | 90.00 | 2.9 |" in md
    assert "| 1 | theta-scan | 1 | n/a | 91.00 | 0.2 |" in md
    assert "![history](history.png)" in md
    (run / "history.csv").unlink()
    write_report(run)
    assert not (run / "history.png").exists()


@pytest.mark.parametrize("text, match", [
    ("task,phase,epoch,loss\n0,train,0,1.0\n", r"missing: accuracy"),
    ("task,phase,epoch,loss,accuracy\n0,train,0,1.0,95.0\n", r'line 2, column "accuracy": expected a fraction'),
    ("task,phase,epoch,loss,accuracy\n0,train,0,1.0,0.5\nx,train,1,1.0,0.5\n", r'line 3, column "task"'),
    ("task,phase,epoch,loss,accuracy\n7,train,0,1.0,0.5\n", r'column "task": expected a task id below 3'),
    ("task,phase,epoch,loss,accuracy\n0,,0,1.0,0.5\n", r'column "phase"'),
    ("task,phase,epoch,loss,accuracy\n0,train,0,low,0.5\n", r'column "loss": expected a number'),
])
def test_malformed_history_names_file_line_and_column(tmp_path, text, match):
    run = make_run(tmp_path, fake_metrics())
    (run / "history.csv").write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        write_report(run)
    assert "history.csv" in str(info.value)
    assert leftovers(run) == ["history.csv"]


def test_report_module_imports_no_matplotlib():
    """Importing the report module (as the CLI may) must not import matplotlib: it is loaded
    only when a figure is drawn."""
    import subprocess
    import sys

    code = "import sys, sparsecl.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_heat_map_layout_and_row_names(tmp_path):
    """Up to SIDE_BY_SIDE_TASKS tasks the two heat maps sit side by side sharing the group names;
    beyond, one above the other, each named. Weight-level runs name their rows layers."""
    from sparsecl.report import SIDE_BY_SIDE_TASKS, capacity_figure, load_metrics

    few = capacity_figure(load_metrics(make_run(tmp_path, many_groups_metrics(12, 3))))
    left, right = [ax for ax in few.axes if ax.images]
    assert left.get_position().x0 < right.get_position().x0 and left.get_ylabel() == "unit group"
    many = many_groups_metrics(12, SIDE_BY_SIDE_TASKS + 1)
    for e in many["reuse"].values():  # a weight-level run counts weights
        e["weights"] = e.pop("units")
        e["used"] = e["owned"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps(many))
    top, bottom = [ax for ax in capacity_figure(load_metrics(other)).axes if ax.images]
    assert top.get_position().y0 > bottom.get_position().y0
    assert top.get_ylabel() == bottom.get_ylabel() == "layer"
