"""Human report of a run folder: reads ``RUN_DIR/metrics.json`` (written by ``sparsecl run --out``)
and writes ``accuracy_matrix.png``, ``capacity.png``, ``reuse.png`` (only when the metrics have a
non-empty ``"reuse"`` entry), ``routing.png`` (only when they have a ``"routing"`` entry: a run with
``--routing classifier`` or ``entropy``) and ``report.md`` next to it.

Every file goes through a temporary file in the same folder and :func:`os.replace`, so an
interrupted report never leaves half a file; ``report.md`` is written last. A missing folder or
file, invalid JSON or a key of the wrong shape raises :class:`~sparsecl.errors.ConfigError`.
Plots use matplotlib's ``Figure`` with the Agg canvas directly (no pyplot global state).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import metrics as clmetrics
from .atomic import write_atomic
from .errors import ConfigError

DPI = 120
CONFIG_KEYS = ("method", "benchmark", "epochs", "optimizer", "lr", "batch_size", "seed", "model", "hidden", "width",
               "method_options")
REUSE_FIELDS = ("units", "owned", "free", "reused")  # neuron-level; weight-level: "weights" and "used" too
BITS_FIELDS = ("raw", "coded", "stored", "entropy")
COMPACT_FIELDS = ("compact", "compact_task")  # TinySubNets' compact model file


def _capacity_unit(m: dict[str, Any]) -> str:
    """What a layer's capacity counts: "weights" for weight-level methods, else "units"."""
    return "weights" if any("weights" in e for e in (m.get("reuse") or {}).values()) else "units"


def _reuse_fields(m: dict[str, Any]) -> tuple[str, ...]:
    return ("weights", "owned", "free", "used", "reused") if _capacity_unit(m) == "weights" else REUSE_FIELDS
MARKERS = "osD^v<>phX*"
LINESTYLES = ("-", "--", "-.", ":")


def write_report(run_dir: Path) -> list[Path]:
    """Read RUN_DIR/metrics.json; write RUN_DIR/accuracy_matrix.png, RUN_DIR/capacity.png,
    RUN_DIR/reuse.png (only when the metrics have a non-empty "reuse" key), RUN_DIR/routing.png
    (only when they have a "routing" key) and RUN_DIR/report.md; return the paths written, in
    that order.

    Raises ConfigError if RUN_DIR is not a folder, metrics.json is missing or not valid JSON, or
    a key is missing or of the wrong shape (the message names the file and the key).
    """
    run_dir = Path(run_dir)
    m = _load_metrics(run_dir)
    written = [_save_figure(_accuracy_figure(m), run_dir / "accuracy_matrix.png"),
               _save_figure(_capacity_figure(m), run_dir / "capacity.png")]
    if m.get("reuse"):
        written.append(_save_figure(_reuse_figure(m), run_dir / "reuse.png"))
    else:  # a reuse plot left by an earlier report would no longer match these metrics
        (run_dir / "reuse.png").unlink(missing_ok=True)
    if m.get("routing") is not None:
        written.append(_save_figure(_routing_figure(m), run_dir / "routing.png"))
    else:
        (run_dir / "routing.png").unlink(missing_ok=True)
    text = _markdown(m, [p.name for p in written])
    written.append(write_atomic(run_dir / "report.md", lambda f: f.write(text.encode("utf-8"))))
    return written


# ---------------------------------------------------------------------------- reading and checks

def _load_metrics(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise ConfigError(f"run folder {run_dir} {what}; expected a folder holding metrics.json")
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; run `sparsecl run --out {run_dir}` first")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                          f"column {exc.colno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    if not isinstance(m, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(m).__name__}")
    _check(m, path)
    return m


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(m: dict[str, Any], path: Path) -> None:
    def bad(key: str, expected: str) -> ConfigError:
        got = "it is missing" if key not in m else f"got {json.dumps(m[key])[:80]}"
        return ConfigError(f"{path}: key \"{key}\" must be {expected}; {got}")

    for key in ("method", "benchmark"):
        if not isinstance(m.get(key), str):
            raise bad(key, "a string")
    R = m.get("accuracy_matrix")
    if not isinstance(R, list) or not R:
        raise bad("accuracy_matrix", "a non-empty list of rows")
    T = len(R)
    for t, row in enumerate(R):
        if not isinstance(row, list) or len(row) != T:
            raise ConfigError(f"{path}: key \"accuracy_matrix\" row {t} must be a list of {T} entries "
                              f"(one per task); got {json.dumps(row)[:80]}")
        for i, a in enumerate(row):
            ok = (a is None and i > t) or (_is_num(a) and 0.0 <= a <= 1.0)
            if not ok:
                need = "a number in [0, 1] or null" if i > t else "a number in [0, 1]"
                raise ConfigError(f"{path}: key \"accuracy_matrix\" entry [{t}][{i}] must be {need}; "
                                  f"got {json.dumps(a)}")
    cap = m.get("capacity")
    if not isinstance(cap, dict) or not all(
            isinstance(v, list) and len(v) == T and all(_is_num(x) and 0 <= x <= 1 for x in v)
            for v in cap.values()):
        raise bad("capacity", f"an object mapping layer names to lists of {T} fractions in [0, 1]")
    for key in ("acc", "bwt", "forgetting", "seconds"):
        if key in m and not (m[key] is None or _is_num(m[key])):
            raise bad(key, "a number or null")
    if "max_logit_change" in m and not (_is_num(m["max_logit_change"]) or m["max_logit_change"] == "inf"):
        raise bad("max_logit_change", 'a number or the string "inf"')
    spt = m.get("seconds_per_task", [])
    if not isinstance(spt, list) or not all(_is_num(s) for s in spt):
        raise bad("seconds_per_task", "a list of numbers")
    if not isinstance(m.get("config", {}), dict):
        raise bad("config", "an object")
    reuse = m.get("reuse") or {}
    if not isinstance(reuse, dict):
        raise bad("reuse", "an object mapping layer names to per-task unit counts")
    fields = _reuse_fields(m)
    for layer, entry in reuse.items():
        if not isinstance(entry, dict) or not all(
                isinstance(entry.get(f), list) and len(entry[f]) == T
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry[f])
                for f in fields):
            raise ConfigError(f"{path}: key \"reuse\" layer \"{layer}\" must have " +
                              ", ".join(f'"{f}"' for f in fields) +
                              f", each a list of {T} non-negative integers")
    bits = m.get("bits_per_parameter")
    if bits is not None and not (isinstance(bits, dict) and all(
            isinstance(bits.get(f), list) and len(bits[f]) == T and all(_is_num(x) and x >= 0 for x in bits[f])
            for f in BITS_FIELDS)):
        raise bad("bits_per_parameter", "an object with " + ", ".join(f'"{f}"' for f in BITS_FIELDS) +
                  f", each a list of {T} non-negative numbers")
    if m.get("routing") is not None:
        _check_routing(m["routing"], T, path)


def _is_fraction(x: Any) -> bool:
    return _is_num(x) and 0.0 <= x <= 1.0


def _check_routing(r: Any, T: int, path: Path) -> None:
    """The "routing" entry: mode, routed matrix and routing accuracy (T x T, fractions or null),
    per-class rows; every problem is named by its key."""
    def bad(key: str, expected: str) -> ConfigError:
        got = "it is missing" if not isinstance(r, dict) or key not in r else f"got {json.dumps(r[key])[:80]}"
        return ConfigError(f"{path}: key \"routing.{key}\" must be {expected}; {got}")

    if not isinstance(r, dict):
        raise ConfigError(f"{path}: key \"routing\" must be an object; got {json.dumps(r)[:80]}")
    if not isinstance(r.get("mode"), str):
        raise bad("mode", "a string")
    for key in ("accuracy_matrix", "routing_accuracy"):
        M = r.get(key)
        if not (isinstance(M, list) and len(M) == T and all(
                isinstance(row, list) and len(row) == T and all(a is None or _is_fraction(a) for a in row)
                for row in M)):
            raise bad(key, f"a list of {T} rows of {T} numbers in [0, 1] or null")
    for key in ("acc", "mean_class_drop"):
        if r.get(key) is not None and not _is_num(r[key]):
            raise bad(key, "a number or null")
    b = r.get("buffer_per_task")
    if b is not None and not (isinstance(b, int) and not isinstance(b, bool) and b > 0):
        raise bad("buffer_per_task", "a positive integer or null")
    rows = r.get("per_class", [])
    if not isinstance(rows, list) or not all(
            isinstance(c, dict) and isinstance(c.get("task"), int) and 0 <= c["task"] < T and "class" in c
            and all(c.get(k) is None or _is_fraction(c.get(k)) for k in ("oracle", "routed")) for c in rows):
        raise bad("per_class", 'a list of {"task", "class", "oracle", "routed"} entries (accuracies in [0, 1] or null)')


# ---------------------------------------------------------------------------- atomic writes

def _save_figure(fig: Figure, path: Path) -> Path:
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight",
                                                         pad_inches=0.15))
    finally:
        fig.clear()  # a bare Figure is not tracked by pyplot; clearing frees its artists at once


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------- plots

def _accuracy_figure(m: dict[str, Any]) -> Figure:
    R = m["accuracy_matrix"]
    T = len(R)
    data = np.ma.masked_invalid(np.array([[np.nan if a is None else 100 * a for a in row] for row in R]))
    vmin = max(0.0, math.floor(float(data.min())) - 1.0)
    side = max(4.5, 0.55 * T + 2.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=100.0)
    fig.colorbar(im, ax=ax, shrink=0.9, label="accuracy (%)")
    size = 9 if T <= 10 else 8 if T <= 15 else 7  # cells keep their size; the figure grows
    blank = np.ma.getmaskarray(data)
    for t in range(T):
        for i in range(T):
            if not blank[t, i]:
                v = float(data[t, i])
                light = (v - vmin) / (100.0 - vmin) > 0.6  # viridis is light at the top
                ax.text(i, t, f"{v:.1f}", ha="center", va="center", fontsize=size,
                        color="black" if light else "white")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.tick_params(labelsize=9)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(f"{m['method']} on {m['benchmark']}: accuracy matrix (%)")
    return fig


def _style(k: int) -> dict[str, Any]:
    """Marker, dash and a shrinking marker size per line, so that identical curves stay visible."""
    return {"marker": MARKERS[k % len(MARKERS)], "linestyle": LINESTYLES[k % len(LINESTYLES)],
            "markersize": max(4.0, 9.0 - 2.5 * k), "fillstyle": "none" if k == 0 else "full"}


def _grouped_bars(ax: Axes, series: list[tuple[str, list[int]]], T: int) -> None:
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([t + offset for t in range(T)], values, width=width, label=label)
    ax.set_xticks(range(T))
    ax.set_xlim(-0.6, T - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.4)


def _capacity_figure(m: dict[str, Any]) -> Figure:
    cap, reuse = m["capacity"], m.get("reuse") or {}
    T = len(m["accuracy_matrix"])
    fig = _new_figure(max(6.0, 0.45 * T + 3.0), 8.0 if reuse else 4.5)
    axes = fig.subplots(2 if reuse else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for k, (layer, fractions) in enumerate(cap.items()):
        ax.plot(range(T), [100 * f for f in fractions], label=str(layer), **_style(k))
    ax.set_xticks(range(T))
    ax.set_ylim(0, 100)
    unit = _capacity_unit(m)
    ax.set_ylabel(f"{unit} in use (%)")
    ax.set_title("capacity used per layer")
    ax.grid(True, alpha=0.4)
    if cap:
        ax.legend(title="layer")
    if reuse:
        _grouped_bars(axes[1], [(str(layer), e["owned"]) for layer, e in reuse.items()], T)
        axes[1].set_ylabel(unit)
        axes[1].set_title(f"{unit} newly taken by each task")
        axes[1].legend(title="layer")
    axes[-1].set_xlabel("task")
    return fig


def _reuse_figure(m: dict[str, Any]) -> Figure:
    reuse = m["reuse"]
    T = len(m["accuracy_matrix"])
    fig = _new_figure(max(6.0, 0.45 * T + 3.0), 2.8 * len(reuse) + 0.6)
    axes = fig.subplots(len(reuse), 1, sharex=True, squeeze=False)[:, 0]
    unit = _capacity_unit(m)
    for ax, (layer, e) in zip(axes, reuse.items()):
        _grouped_bars(ax, [(f"new {unit} taken", e["owned"]),
                           (f"{unit} of earlier tasks reused", e["reused"])], T)
        ax.set_ylabel(unit)
        ax.set_title(f"layer {layer}")
    axes[-1].set_xlabel("task")
    fig.suptitle(f"{m['method']} on {m['benchmark']}: new vs reused {unit}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return fig


MAX_CLASS_BARS = 40  # beyond this many classes, the per-class panel is a scatter plot


def _routing_figure(m: dict[str, Any]) -> Figure:
    """Top: per task after the last task, oracle vs routed accuracy and the share routed to the
    right task. Bottom: per class, oracle vs routed accuracy (EideticNets' Table 8 as a plot):
    bars for up to ``MAX_CLASS_BARS`` classes, else routed against oracle, one point per class."""
    r = m["routing"]
    R, T = m["accuracy_matrix"], len(m["accuracy_matrix"])
    classes = r.get("per_class") or []
    bars = len(classes) <= MAX_CLASS_BARS
    width = min(14.0, max(6.5, 0.45 * T + 3.0, 0.28 * len(classes) + 2.0 if bars else 0.0))
    fig = _new_figure(width, 8.5 if classes else 4.5)
    axes = fig.subplots(2 if classes else 1, 1, squeeze=False)[:, 0]
    nan = lambda v: np.nan if v is None else 100 * v  # noqa: E731
    series = [("oracle (task id given)", [nan(a) for a in R[-1]]),
              (f"routed ({r['mode']})", [nan(a) for a in r["accuracy_matrix"][-1]]),
              ("routed to its task", [nan(a) for a in r["routing_accuracy"][-1]])]
    ax = axes[0]
    step = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        ax.bar([t + (k - 1) * step for t in range(T)], values, width=step, label=label)
    ax.set_xticks(range(T))
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylim(0, 105)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per task, after the last task")
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if classes:
        ax = axes[1]
        oracle, routed = [nan(c["oracle"]) for c in classes], [nan(c["routed"]) for c in classes]
        if bars:
            x = np.arange(len(classes))
            ax.bar(x - 0.2, oracle, width=0.4, label="oracle")
            ax.bar(x + 0.2, routed, width=0.4, label=f"routed ({r['mode']})")
            ax.set_xticks(x, [f"{c['task']}:{c['class']}" for c in classes], rotation=90 if len(classes) > 20 else 0,
                          fontsize=8)
            ax.set_xlim(-0.6, len(classes) - 0.4)
            ax.set_ylim(0, 105)
            ax.set_xlabel("task:class (original label)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(True, axis="y", alpha=0.4)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        else:
            points = ax.scatter(oracle, routed, c=[c["task"] for c in classes], cmap="viridis", s=18, alpha=0.8)
            ax.plot([0, 100], [0, 100], color="gray", linestyle="--", linewidth=1, label="no drop")
            fig.colorbar(points, ax=ax, label="task")
            ax.set_xlim(-2, 102)
            ax.set_ylim(-2, 102)
            ax.set_xlabel("oracle accuracy (%)")
            ax.set_ylabel(f"routed accuracy, {r['mode']} (%)")
            ax.grid(True, alpha=0.4)
            ax.legend(loc="upper left", fontsize=8)
        drop = r.get("mean_class_drop")
        ax.set_title(f"per class ({len(classes)})" + ("" if drop is None else f": mean drop {100 * drop:.2f} points"))
    buffer = "" if r.get("buffer_per_task") is None else f", {r['buffer_per_task']} samples kept per task"
    fig.suptitle(f"{m['method']} on {m['benchmark']}: task-agnostic inference ({r['mode']}{buffer})")
    return fig


# ---------------------------------------------------------------------------- report.md

def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" if k == 0 else "---:" for k in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _fmt(x: float | None, scale: float = 1.0, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if x is None else f"{scale * x:{spec}}{unit}"


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    h, rest = divmod(round(s), 3600)
    return f"{s:.1f} s ({h}:{rest // 60:02d}:{rest % 60:02d})"


def _routing_markdown(r: dict[str, Any], T: int, oracle_acc: float | None) -> list[str]:
    cells = lambda row: ["" if a is None else f"{100 * a:.2f}" for a in row]  # noqa: E731
    kept = ("none (entropy routing keeps no data)" if r.get("buffer_per_task") is None
            else f"{r['buffer_per_task']} training samples per task, kept to retrain the router")
    out = ["", f"## Task-agnostic inference ({r['mode']} routing)", "",
           "Every test sample is routed to a task head without its task id, in one pass of the network.", ""]
    out += _table(["metric", "value"], [
        ["routing", r["mode"]],
        ["data kept for routing", kept],
        ["routed ACC", _fmt(r.get("acc"), 100, ".2f", " %")],
        ["oracle ACC (task id given)", _fmt(oracle_acc, 100, ".2f", " %")],
        ["mean per-class drop (oracle − routed)", _fmt(r.get("mean_class_drop"), 100, ".2f", " points")],
    ])
    out += ["", "### Routed accuracy matrix (%)", "",
            "Row t: accuracy on every task after training task t, task and class both predicted.", ""]
    out += _table(["after task"] + [f"task {i}" for i in range(T)],
                  [[t] + cells(row) for t, row in enumerate(r["accuracy_matrix"])])
    out += ["", "### Routing accuracy (%)", "", "Row t: share of each task's test samples routed to it after task t.", ""]
    out += _table(["after task"] + [f"task {i}" for i in range(T)],
                  [[t] + cells(row) for t, row in enumerate(r["routing_accuracy"])])
    classes = r.get("per_class") or []
    if classes:
        out += ["", "### Per-class accuracy after the last task (%)", "",
                "As EideticNets' Table 8: each class with the task id given (oracle) and routed.", ""]
        out += _table(["task", "class", "samples", "oracle", "routed", "drop (points)"],
                      [[c["task"], c["class"], c.get("samples", ""), _fmt(c["oracle"], 100), _fmt(c["routed"], 100),
                        "n/a" if c["oracle"] is None or c["routed"] is None else f"{100 * (c['oracle'] - c['routed']):.2f}"]
                       for c in classes])
    return out


def _markdown(m: dict[str, Any], images: list[str]) -> str:
    R, cap, reuse, config = m["accuracy_matrix"], m["capacity"], m.get("reuse") or {}, m.get("config", {})
    T = len(R)
    acc = m["acc"] if "acc" in m else clmetrics.average_accuracy(R)
    bwt = m["bwt"] if "bwt" in m else clmetrics.backward_transfer(R)
    fgt = m["forgetting"] if "forgetting" in m else clmetrics.forgetting(R)
    spt = m.get("seconds_per_task", [])
    seconds = m.get("seconds", sum(spt) if spt else None)
    mlc = m.get("max_logit_change")
    out = [f"# {m['method']} on {m['benchmark']}", "", "## Summary", ""]
    out += _table(["metric", "value"], [
        ["tasks", T],
        ["ACC", _fmt(acc, 100, ".2f", " %")],
        ["BWT", _fmt(bwt, 100, "+.2f", " points")],
        ["forgetting", _fmt(fgt, 100, ".2f", " points")],
        ["max logit change", "n/a" if mlc is None else f"`{mlc!r}`" if mlc != "inf" else "`inf`"],
        ["total time", _duration(seconds)],
        ["seconds per task (mean)", _fmt(sum(spt) / len(spt) if spt else None, 1, ".1f", " s")],
    ])
    out += ["", "## Accuracy matrix (%)", "",
            "Row t: accuracy on every task after training task t.", ""]
    out += _table(["after task"] + [f"task {i}" for i in range(T)],
                  [[t] + ["" if a is None else f"{100 * a:.2f}" for a in row] for t, row in enumerate(R)])
    unit, fields = _capacity_unit(m), _reuse_fields(m)
    out += ["", f"## Capacity used (% of {unit})", ""]
    out += _table(["layer"] + [f"task {t}" for t in range(T)],
                  [[layer] + [f"{100 * f:.2f}" for f in fr] for layer, fr in cap.items()])
    if reuse:
        out += ["", f"## Reuse ({unit})", ""]
        out += _table(["layer", "task", *fields],
                      [[layer, t, *(e[f][t] for f in fields)] for layer, e in reuse.items()
                       for t in range(T)])
    bits = m.get("bits_per_parameter")
    if bits:
        out += ["", "## Bits per parameter", "",
                "Bits per masked weight of what running every task so far needs (owner ids or task masks): "
                "raw, entropy-coded, stored (the smaller of the two) and the Shannon bound; a float32 weight is "
                "32 bits.", ""]
        shown = BITS_FIELDS + tuple(f for f in COMPACT_FIELDS if f in bits)
        if len(shown) > len(BITS_FIELDS):
            out += ["`compact`: the compact model file (`sparsecl export --compact`) of every task so far, all "
                    "its bits over the dense float32 model's parameters; `compact_task`: the last task alone.", ""]
        out += _table(["after task", *shown], [[t, *(f"{bits[f][t]:.3f}" for f in shown)] for t in range(T)])
    if m.get("routing") is not None:
        out += _routing_markdown(m["routing"], T, acc)
    shown = [k for k in CONFIG_KEYS if k in config]
    if shown:
        out += ["", "## Configuration", ""]
        out += [f"- **{k}**: `{json.dumps(config[k])}`" if isinstance(config[k], (dict, list))
                else f"- **{k}**: {config[k]}" for k in shown]
    out += ["", "## Plots"]
    for name in images:  # one paragraph each, so the images stack instead of sitting side by side
        out += ["", f"![{Path(name).stem.replace('_', ' ')}]({name})"]
    return "\n".join(out) + "\n"
