"""Human report of a run folder: reads ``RUN_DIR/metrics.json`` (written by ``sparsecl run --out``)
and, when there is one, ``RUN_DIR/history.csv`` (per-epoch loss and accuracy), and writes next to
them:

- ``accuracy_matrix.png``: the accuracy matrix as a heat map on a fixed 0–100 % colour scale, so
  that two runs compare by colour; ACC and BWT in the title;
- ``capacity.png``: the share of each layer (unit group) in use after every task, as lines for up
  to ``MAX_LINES`` groups and as a group × task heat map beyond (a ResNet has 12 groups);
- ``reuse.png`` (only with a non-empty ``"reuse"`` entry): new vs reused units (weights) per layer
  and task, as bars or, beyond ``MAX_LINES`` groups, as two heat maps;
- ``bits.png`` (only with ``"bits_per_parameter"``, written by the weight-level methods): the bits
  per masked weight of the task masks or owner ids, and of the compact model file where recorded;
- ``routing.png`` (only with a ``"routing"`` entry: a run with ``--routing classifier`` or
  ``entropy``);
- ``history.png`` (only when ``history.csv`` exists and has rows): loss and accuracy per epoch,
  every phase (train, recovery, finetune, theta-scan) in run order, the tasks separated;
- ``report.md``: the tables.

Every file goes through a temporary file in the same folder and :func:`os.replace`, so an
interrupted report never leaves half a file; ``report.md`` is written last. A missing folder or
file, invalid JSON or CSV, or a key or column of the wrong shape raises
:class:`~sparsecl.errors.ConfigError` naming the file and the key (or line and column).

The figure builders (:func:`accuracy_figure`, :func:`capacity_figure`, ...) take the metrics as
:func:`load_metrics` returns them and return a matplotlib ``Figure`` on the Agg canvas (no pyplot
global state). matplotlib is imported inside them, so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metrics as clmetrics
from .atomic import write_atomic
from .errors import ConfigError

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn, never at import time
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
MAX_LINES = 6  # beyond this many unit groups, capacity and reuse become group x task heat maps
CONFIG_KEYS = ("method", "benchmark", "epochs", "optimizer", "lr", "batch_size", "seed", "model", "hidden", "width",
               "method_options")
REUSE_FIELDS = ("units", "owned", "free", "reused")  # neuron-level; weight-level: "weights" and "used" too
BITS_FIELDS = ("raw", "coded", "stored", "entropy")
COMPACT_FIELDS = ("compact", "compact_task")  # TinySubNets' compact model file
HISTORY_NAME = "history.csv"
HISTORY_COLUMNS = ("task", "phase", "epoch", "loss", "accuracy")  # required; "lr" and "seconds" optional
PHASE_ORDER = ("train", "recovery", "finetune", "theta-scan")  # fixed colours; other phases follow


def _capacity_unit(m: dict[str, Any]) -> str:
    """What a layer's capacity counts: "weights" for weight-level methods, else "units"."""
    return "weights" if any("weights" in e for e in (m.get("reuse") or {}).values()) else "units"


def _reuse_fields(m: dict[str, Any]) -> tuple[str, ...]:
    return ("weights", "owned", "free", "used", "reused") if _capacity_unit(m) == "weights" else REUSE_FIELDS


MARKERS = "osD^v<>phX*"
LINESTYLES = ("-", "--", "-.", ":")


def write_report(run_dir: Path) -> list[Path]:
    """Read RUN_DIR/metrics.json (and RUN_DIR/history.csv when present); write
    RUN_DIR/accuracy_matrix.png, RUN_DIR/capacity.png, RUN_DIR/reuse.png (only when the metrics
    have a non-empty "reuse" key), RUN_DIR/bits.png (only with a "bits_per_parameter" key),
    RUN_DIR/routing.png (only with a "routing" key), RUN_DIR/history.png (only when history.csv
    has rows) and RUN_DIR/report.md; return the paths written, in that order. A plot of an earlier
    report that no longer applies is removed.

    Raises ConfigError if RUN_DIR is not a folder, metrics.json is missing or not valid JSON, a
    key is missing or of the wrong shape (the message names the file and the key), or history.csv
    is malformed (the message names the file, line and column).
    """
    run_dir = Path(run_dir)
    m = load_metrics(run_dir)
    history = read_history(run_dir / HISTORY_NAME, len(m["accuracy_matrix"]))
    written = [_save_figure(accuracy_figure(m), run_dir / "accuracy_matrix.png"),
               _save_figure(capacity_figure(m), run_dir / "capacity.png")]
    optional = (("reuse.png", reuse_figure, bool(m.get("reuse"))),
                ("bits.png", bits_figure, m.get("bits_per_parameter") is not None),
                ("routing.png", routing_figure, m.get("routing") is not None))
    for name, draw, wanted in optional:
        if wanted:
            written.append(_save_figure(draw(m), run_dir / name))
        else:  # a plot left by an earlier report would no longer match these metrics
            (run_dir / name).unlink(missing_ok=True)
    if history:
        written.append(_save_figure(history_figure(m, history), run_dir / "history.png"))
    else:
        (run_dir / "history.png").unlink(missing_ok=True)
    text = _markdown(m, [p.name for p in written], history)
    written.append(write_atomic(run_dir / "report.md", lambda f: f.write(text.encode("utf-8"))))
    return written


# ---------------------------------------------------------------------------- reading and checks

def load_metrics(run_dir: Path) -> dict[str, Any]:
    """The checked contents of RUN_DIR/metrics.json, as the figure builders take them.

    Raises ConfigError if RUN_DIR is not a folder, the file is missing or not valid JSON, or a key
    is missing or of the wrong shape (the message names the file and the key).
    """
    run_dir = Path(run_dir)
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
            # null: above the diagonal (not learned yet), or below it in a row that --eval-every /
            # --eval-tasks did not measure; the diagonal and the last row are always measured
            may_be_null = i > t or (i < t and t < T - 1)
            ok = (a is None and may_be_null) or (_is_num(a) and 0.0 <= a <= 1.0)
            if not ok:
                need = "a number in [0, 1] or null" if may_be_null else "a number in [0, 1]"
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


def read_history(path: Path, num_tasks: int | None = None) -> list[dict[str, Any]]:
    """The rows of a run's ``history.csv``, in file order, or ``[]`` when the file does not exist.

    The file has a header row naming at least the columns ``task`` (int ≥ 0), ``phase`` (text:
    ``train``, ``recovery``, ``finetune``, ``theta-scan``, ...), ``epoch`` (int ≥ 0), ``loss``
    (a number) and ``accuracy`` (a fraction in [0, 1]); ``lr`` and ``seconds`` (numbers) are read
    when present, other columns are ignored. An empty ``loss``, ``accuracy``, ``lr`` or
    ``seconds`` cell is read as NaN (a phase that measured no such value). Each row is returned as
    a dict of those columns. With ``num_tasks``, a task id must be below it.

    Raises ConfigError naming the file, and the line and column, for a missing column, an
    unreadable or out-of-range value.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in HISTORY_COLUMNS if c not in header]
            if missing:
                raise ConfigError(f"{path}: the header must name the columns " + ", ".join(HISTORY_COLUMNS) +
                                  " (lr and seconds optional); missing: " + ", ".join(missing))
            rows = [_history_row(path, reader.line_num, raw, num_tasks) for raw in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path} cannot be read as CSV: {exc}") from None
    return rows


def _history_row(path: Path, line: int, raw: dict[str, Any], num_tasks: int | None) -> dict[str, Any]:
    def bad(column: str, expected: str) -> ConfigError:
        return ConfigError(f"{path}, line {line}, column \"{column}\": expected {expected}; "
                           f"got {raw.get(column)!r}")

    row: dict[str, Any] = {}
    for column in ("task", "epoch"):
        try:
            row[column] = int(raw[column])
        except (TypeError, ValueError):
            raise bad(column, "a non-negative integer") from None
        if row[column] < 0:
            raise bad(column, "a non-negative integer")
    if num_tasks is not None and row["task"] >= num_tasks:
        raise bad("task", f"a task id below {num_tasks} (the tasks of metrics.json)")
    phase = (raw.get("phase") or "").strip()
    if not phase:
        raise bad("phase", "a phase name such as train, recovery, finetune or theta-scan")
    row["phase"] = phase
    for column in ("loss", "accuracy", "lr", "seconds"):
        text = (raw.get(column) or "").strip()
        try:
            value = float(text) if text else math.nan
        except ValueError:
            raise bad(column, "a number or an empty cell") from None
        if column == "accuracy" and not (math.isnan(value) or 0.0 <= value <= 1.0):
            raise bad(column, "a fraction in [0, 1] or an empty cell")
        row[column] = value
    return row


# ---------------------------------------------------------------------------- atomic writes

def _save_figure(fig: Figure, path: Path) -> Path:
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight",
                                                         pad_inches=0.15))
    finally:
        fig.clear()  # a bare Figure is not tracked by pyplot; clearing frees its artists at once


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------- plots

def _run_name(m: dict[str, Any]) -> str:
    """"method on benchmark (model)": what every figure's title starts with."""
    model = (m.get("config") or {}).get("model")
    return f"{m['method']} on {m['benchmark']}" + (f" ({model})" if isinstance(model, str) else "")


def _heatmap(fig: Figure, ax: Axes, data: Any, vmin: float, vmax: float, label: str,
             fmt: str = "{:.1f}", rows: list[str] | None = None) -> Any:
    """Draw ``data`` (rows x columns, NaN blank) on a fixed [vmin, vmax] viridis scale with a
    colour bar; write each cell's value in it while the cells are large enough to read."""
    import matplotlib
    import numpy as np

    data = np.ma.masked_invalid(np.asarray(data, dtype=float))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.9, label=label)
    n_rows, n_cols = data.shape
    if n_cols <= 20 and n_rows <= 40:  # beyond, the numbers would overlap: the colours and report.md remain
        size = 9 if n_cols <= 10 else 7
        blank = np.ma.getmaskarray(data)
        for r in range(n_rows):
            for c in range(n_cols):
                if not blank[r, c]:
                    v = float(data[r, c])
                    light = (v - vmin) / (vmax - vmin) > 0.55  # viridis is light at the top
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=size,
                            color="black" if light else "white")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows), rows if rows is not None else range(n_rows))
    ax.tick_params(labelsize=9)
    return im


def accuracy_figure(m: dict[str, Any]) -> Figure:
    """The accuracy matrix R (R[t][i]: test accuracy on task i after task t, in %) as a heat map on
    the fixed colour scale 0–100 %, blank above the diagonal; the title names the method, the
    benchmark (and model) and gives ACC and BWT (see :mod:`sparsecl.metrics`)."""
    import numpy as np

    R = m["accuracy_matrix"]
    T = len(R)
    data = np.array([[np.nan if a is None else 100 * a for a in row] for row in R])
    side = max(4.5, 0.55 * T + 2.0)  # cells keep their size; the figure grows
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    _heatmap(fig, ax, data, 0.0, 100.0, "accuracy (%)")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    acc = m["acc"] if "acc" in m else clmetrics.average_accuracy(R)
    bwt = m["bwt"] if "bwt" in m else clmetrics.backward_transfer(R)
    scores = f"ACC {_fmt(acc, 100, '.2f', ' %')}, BWT {_fmt(bwt, 100, '+.2f', ' points')}"
    ax.set_title(f"{_run_name(m)}\naccuracy matrix (%): {scores}", fontsize=10)
    return fig


def _style(k: int) -> dict[str, Any]:
    """Marker, dash and a shrinking marker size per line, so that identical curves stay visible."""
    return {"marker": MARKERS[k % len(MARKERS)], "linestyle": LINESTYLES[k % len(LINESTYLES)],
            "markersize": max(4.0, 9.0 - 2.5 * k), "fillstyle": "none" if k == 0 else "full"}


def _grouped_bars(ax: Axes, series: list[tuple[str, list[int]]], T: int) -> None:
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([t + offset for t in range(T)], values, width=width, label=label)
    ax.set_xticks(range(T))
    ax.set_xlim(-0.6, T - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.4)


def _share(e: dict[str, list[int]], field: str, unit: str) -> list[float]:
    """``e[field]`` per task as % of the layer's size (its ``units`` or ``weights``)."""
    return [100 * x / n if n else math.nan for x, n in zip(e[field], e[unit])]


SIDE_BY_SIDE_TASKS = 6  # up to this many tasks, two heat maps sit side by side; beyond, one above the other


def _heatmap_panels(groups: int, T: int, panels: int) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` group x task heat-map axes, sized so that cells stay readable:
    side by side (sharing the group labels) for up to ``SIDE_BY_SIDE_TASKS`` tasks, else stacked."""
    width, height = max(3.2, 0.45 * T + 2.2), max(2.6, 0.3 * groups + 1.3)
    side = panels > 1 and T <= SIDE_BY_SIDE_TASKS
    fig = _new_figure(width * panels + 2.0 if side else width + 2.0, height if side else height * panels)
    grid = fig.subplots(1, panels, sharey=True, squeeze=False) if side else fig.subplots(panels, 1, squeeze=False)
    return fig, list(grid.flat)


def _group_word(unit: str) -> str:
    """What a row of a heat map is: a unit group (neuron-level) or a layer (weight-level)."""
    return "layer" if unit == "weights" else "unit group"


def capacity_figure(m: dict[str, Any]) -> Figure:
    """Capacity in use per layer (unit group) after every task, in % of its units (weight-level
    methods: weights), as CLNP's Fig. 3 (Golkar, Kagan, Cho: "Continual Learning via Neural
    Pruning", 2019); with a "reuse" entry also the share each task newly took. Up to
    ``MAX_LINES`` groups: lines and grouped bars; beyond: group x task heat maps on 0–100 %."""
    cap, reuse = m["capacity"], m.get("reuse") or {}
    T = len(m["accuracy_matrix"])
    unit = _capacity_unit(m)
    if len(cap) > MAX_LINES:
        row = _group_word(unit)
        fig, axes = _heatmap_panels(len(cap), T, 2 if reuse else 1)
        names = [str(layer) for layer in cap]
        _heatmap(fig, axes[0], [[100 * f for f in fractions] for fractions in cap.values()], 0.0, 100.0,
                 f"{unit} in use (%)", "{:.0f}", names)
        axes[0].set_title(f"{unit} in use after each task (%)", fontsize=10)
        if reuse:  # same rows as capacity (the ledger's groups), in the same order
            _heatmap(fig, axes[1], [_share(reuse[layer], "owned", unit) if layer in reuse else [math.nan] * T
                                    for layer in cap], 0.0, 100.0, f"{unit} taken (% of the {row})", "{:.0f}", names)
            axes[1].set_title(f"{unit} newly taken by each task (% of the {row})", fontsize=10)
        for ax in axes:
            ax.set_xlabel("task")
        for ax in axes:  # the group names sit left of the first column only
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel(row)
        fig.suptitle(_run_name(m))
        return fig
    fig = _new_figure(max(6.0, 0.45 * T + 3.0), 8.0 if reuse else 4.5)
    axes = fig.subplots(2 if reuse else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for k, (layer, fractions) in enumerate(cap.items()):
        ax.plot(range(T), [100 * f for f in fractions], label=str(layer), **_style(k))
    ax.set_xticks(range(T))
    ax.set_ylim(0, 100)
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
    fig.suptitle(_run_name(m))
    return fig


def reuse_figure(m: dict[str, Any]) -> Figure:
    """New vs reused units (weight-level methods: weights) per layer and task, as CLNP's Fig. 5b:
    "reused" counts earlier tasks' frozen units that the task reads. Up to ``MAX_LINES`` layers:
    one bar panel per layer, up to three side by side; beyond: two group x task heat maps in %
    of each group's size."""
    reuse = m["reuse"]
    T = len(m["accuracy_matrix"])
    unit = _capacity_unit(m)
    if len(reuse) > MAX_LINES:
        row = _group_word(unit)
        fig, axes = _heatmap_panels(len(reuse), T, 2)
        layers = [str(layer) for layer in reuse]
        for ax, field, what in ((axes[0], "owned", f"new {unit} taken"),
                                (axes[1], "reused", f"{unit} of earlier tasks reused")):
            _heatmap(fig, ax, [_share(e, field, unit) for e in reuse.values()], 0.0, 100.0,
                     f"% of the {row}'s {unit}", "{:.0f}", layers)
            ax.set_title(f"{what} (%)", fontsize=10)
            ax.set_xlabel("task")
        for ax in axes:  # the group names sit left of the first column only
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel(row)
        fig.suptitle(f"{_run_name(m)}: new vs reused {unit}")
        return fig
    cols = min(3, len(reuse))
    rows = math.ceil(len(reuse) / cols)
    fig = _new_figure(cols * max(4.0, 0.3 * T + 2.5), 2.8 * rows + 0.9)
    grid = fig.subplots(rows, cols, sharex=True, squeeze=False)
    axes = list(grid.flat)
    for ax, (layer, e) in zip(axes, reuse.items()):
        _grouped_bars(ax, [(f"new {unit} taken", e["owned"]),
                           (f"{unit} of earlier tasks reused", e["reused"])], T)
        ax.set_ylabel(unit)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("task")
    for ax in axes[len(reuse):]:
        ax.set_visible(False)
    fig.suptitle(f"{_run_name(m)}: new vs reused {unit}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return fig


def bits_figure(m: dict[str, Any]) -> Figure:
    """Bits per parameter after every task (weight-level methods): left, the bits per masked weight
    of what running every task so far needs (owner ids or task masks), raw, entropy-coded,
    stored (the smaller) and the Shannon bound; right, when recorded (TinySubNets), the compact
    model file's bits over the dense float32 model's parameters, all tasks so far and the last
    task alone, against 32 bits of a float32 weight."""
    from matplotlib.ticker import MaxNLocator

    bits = m["bits_per_parameter"]
    T = len(m["accuracy_matrix"])
    compact = [f for f in COMPACT_FIELDS if f in bits]
    fig = _new_figure(max(6.0, 0.45 * T + 3.0) * (2 if compact else 1) * 0.85, 4.2)
    axes = fig.subplots(1, 2 if compact else 1, squeeze=False)[0]
    labels = {"raw": "raw", "coded": "entropy-coded", "stored": "stored (smaller of the two)",
              "entropy": "Shannon bound", "compact": "compact file, all tasks so far",
              "compact_task": "compact file, the last task alone"}
    panels = [(axes[0], BITS_FIELDS, "mask bits per masked weight", "task masks or owner ids")]
    if compact:
        panels.append((axes[1], tuple(compact), "bits per parameter", "compact model file"))
    for ax, fields, ylabel, title in panels:
        for k, field in enumerate(fields):
            ax.plot(range(T), bits[field], label=labels[field], **_style(k))
        if fields is not BITS_FIELDS:
            ax.axhline(32.0, color="gray", linestyle=":", linewidth=1, label="dense float32 (32)")
        ax.set_xticks(range(T))
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.set_xlabel("after task")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.4)
        ax.legend(fontsize=8)
    fig.suptitle(f"{_run_name(m)}: bits per parameter")
    return fig


def _phase_colors(phases: list[str]) -> dict[str, str]:
    known = [p for p in PHASE_ORDER if p in phases] + sorted(p for p in set(phases) if p not in PHASE_ORDER)
    fixed = {p: f"C{k}" for k, p in enumerate(PHASE_ORDER)}
    extra = iter(f"C{k}" for k in range(len(PHASE_ORDER), 10))
    return {p: fixed[p] if p in fixed else next(extra, "black") for p in known}


def history_figure(m: dict[str, Any], history: list[dict[str, Any]]) -> Figure:
    """Loss (top) and accuracy in % (bottom) of every row of ``history`` (as :func:`read_history`
    returns it), in run order: one point per epoch and phase, coloured by phase, a line joining
    the consecutive epochs of one phase; dotted lines and labels separate the tasks."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    N = len(history)
    fig = _new_figure(max(7.0, min(16.0, 0.05 * N + 6.0)), 6.0)
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    colors = _phase_colors([r["phase"] for r in history])
    marker = 3.5 if N <= 150 else 0.0
    start = 0
    for k in range(1, N + 1):  # one line per run of consecutive rows of the same task and phase
        if k < N and (history[k]["task"], history[k]["phase"]) == (history[start]["task"], history[start]["phase"]):
            continue
        xs = list(range(start + 1, k + 1))
        color = colors[history[start]["phase"]]
        ax_loss.plot(xs, [r["loss"] for r in history[start:k]], color=color, marker="o", markersize=marker)
        ax_acc.plot(xs, [100 * r["accuracy"] for r in history[start:k]], color=color, marker="o", markersize=marker)
        start = k
    bounds = [k for k in range(1, N) if history[k]["task"] != history[k - 1]["task"]]
    for ax in (ax_loss, ax_acc):
        for b in bounds:
            ax.axvline(b + 0.5, color="gray", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
    starts = [0, *bounds]
    top = ax_loss.secondary_xaxis("top")  # task names above the plot, where the layout makes room
    top.set_xticks([(first + last) / 2 + 0.5 for first, last in zip(starts, [*bounds, N])],
                   [f"task {history[first]['task']}" for first in starts], fontsize=8)
    top.tick_params(length=0)
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_xlabel("epoch, all phases in run order")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlim(0.5, N + 0.5)
    handles = [Line2D([], [], color=c, marker="o", label=p) for p, c in colors.items()]
    fig.legend(handles=handles, title="phase", loc="outside right upper", fontsize=8)
    fig.suptitle(f"{_run_name(m)}: training history")
    return fig


MAX_CLASS_BARS = 40  # beyond this many classes, the per-class panel is a scatter plot


def routing_figure(m: dict[str, Any]) -> Figure:
    """Top: per task after the last task, oracle vs routed accuracy and the share routed to the
    right task. Bottom: per class, oracle vs routed accuracy (EideticNets' Table 8 as a plot):
    bars for up to ``MAX_CLASS_BARS`` classes, else routed against oracle, one point per class."""
    import numpy as np

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
    fig.suptitle(f"{_run_name(m)}: task-agnostic inference ({r['mode']}{buffer})")
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
    kept = (r["kept"] if r.get("kept") else "none (entropy routing keeps no data)" if r.get("buffer_per_task") is None
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


def _history_markdown(history: list[dict[str, Any]]) -> list[str]:
    """Per task and phase (in run order): epochs, the last epoch's loss and accuracy, seconds."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in history:
        groups.setdefault((r["task"], r["phase"]), []).append(r)
    nan_fmt = lambda x, scale, spec: "n/a" if math.isnan(x) else f"{scale * x:{spec}}"  # noqa: E731
    rows = []
    for (task, phase), rs in groups.items():
        seconds = [r["seconds"] for r in rs if not math.isnan(r["seconds"])]
        rows.append([task, phase, len(rs), nan_fmt(rs[-1]["loss"], 1, ".4f"), nan_fmt(rs[-1]["accuracy"], 100, ".2f"),
                     f"{sum(seconds):.1f}" if seconds else "n/a"])
    return ["", "## Training history", "",
            f"From `{HISTORY_NAME}`: per task and phase, the epochs run and the last epoch's loss and accuracy.", "",
            *_table(["task", "phase", "epochs", "last loss", "last accuracy (%)", "seconds"], rows)]


def _markdown(m: dict[str, Any], images: list[str], history: list[dict[str, Any]] | None = None) -> str:
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
    if history:
        out += _history_markdown(history)
    shown = [k for k in CONFIG_KEYS if k in config]
    if shown:
        out += ["", "## Configuration", ""]
        out += [f"- **{k}**: `{json.dumps(config[k])}`" if isinstance(config[k], (dict, list))
                else f"- **{k}**: {config[k]}" for k in shown]
    out += ["", "## Plots"]
    for name in images:  # one paragraph each, so the images stack instead of sitting side by side
        out += ["", f"![{Path(name).stem.replace('_', ' ')}]({name})"]
    return "\n".join(out) + "\n"
