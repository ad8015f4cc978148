"""Results over seeds: the mean and standard deviation of ACC, BWT, forgetting, capacity and wall
time of runs that differ only in their seed, as the papers report them (CLNP Table 1 and
EideticNets Table 3: mean +- std over 5 runs).

Each run is a folder holding the ``metrics.json`` that ``sparsecl run`` writes
(``RunResult.to_dict`` plus the run's options under ``config``). Runs are grouped by method,
benchmark and configuration minus the seed: ``config`` without ``seed``, the seed of every
benchmark segment of ``config['stream']``, and the run-time options that do not define a run
(``device``, ``progress``; DESIGN §2.6). Within a group, each seed may appear once.

``summarize_runs`` returns one ``SummaryRow`` per group; ``to_markdown`` and ``to_csv`` render
them, ``write_summary`` writes both files atomically (``sparsecl.atomic``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .atomic import write_atomic
from .errors import ConfigError

METRICS_NAME = "metrics.json"
#: ``config`` keys that do not define a run: the seed (what the summary averages over) and the
#: run-time options.
NOT_CONFIG = ("seed", "device", "progress")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (Bessel's correction, ``statistics.stdev``) of one
    quantity over a group's seeds; ``std`` is ``None`` with one value, both are ``None`` when
    the quantity is undefined (BWT and forgetting of a one-task run)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Stat":
        known = [v for v in values if v is not None]
        if not known:
            return cls(None, None, 0)
        return cls(statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None, len(known))


@dataclass(frozen=True)
class RunRecord:
    """One run's figures, read from ``metrics.json``: fractions for ``acc``, ``bwt``,
    ``forgetting``, ``capacity`` (per layer, after the last task) and seconds for ``seconds``
    (the whole run)."""

    path: Path
    method: str
    benchmark: str
    seed: int
    config: dict
    acc: float
    bwt: float | None
    forgetting: float | None
    capacity: dict[str, float]
    seconds: float

    @property
    def mean_capacity(self) -> float | None:
        """Capacity after the last task averaged over the layers (``None`` without layers)."""
        return statistics.fmean(self.capacity.values()) if self.capacity else None


@dataclass
class SummaryRow:
    """One group of runs (same method, benchmark and configuration but the seed): ``seeds`` and
    ``runs`` (folders) in the order given, and a ``Stat`` per figure. ``capacity`` is the
    capacity after the last task averaged over layers; ``capacity_per_layer`` per layer."""

    method: str
    benchmark: str
    config: dict
    seeds: list[int]
    runs: list[Path]
    acc: Stat
    bwt: Stat
    forgetting: Stat
    capacity: Stat
    seconds: Stat
    capacity_per_layer: dict[str, Stat] = field(default_factory=dict)


def run_config(metrics: dict) -> dict:
    """The part of a run's ``config`` that defines it apart from its seed (see the module doc)."""
    config = {k: v for k, v in metrics.get("config", {}).items() if k not in NOT_CONFIG}
    if isinstance(config.get("stream"), list):
        config["stream"] = [{k: v for k, v in seg.items() if k != "seed"} if isinstance(seg, dict) else seg
                            for seg in config["stream"]]
    return config


def load_run(path: Path) -> RunRecord:
    """Read a run folder's ``metrics.json`` (``path`` may also name the file itself).

    Raises:
        ConfigError: the file is missing, is not JSON, or lacks a figure (the message names the
            file and the key).
    """
    path = Path(path)
    file = path if path.name == METRICS_NAME and path.is_file() else path / METRICS_NAME
    if not file.is_file():
        raise ConfigError(f"run folder {path} has no {METRICS_NAME}: a run writes it when its last task ends "
                          f"(finish an interrupted run with sparsecl run --resume {path})")
    try:
        m = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{file} is not readable JSON ({exc})") from None
    try:
        capacity = {name: float(used[-1]) for name, used in m["capacity"].items() if used}
        seed = m["config"]["seed"]
        record = RunRecord(file.parent, str(m["method"]), str(m["benchmark"]), int(seed), run_config(m),
                           float(m["acc"]), _optional(m["bwt"]), _optional(m["forgetting"]), capacity,
                           float(m["seconds"]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        why = f"lacks the key {exc}" if isinstance(exc, KeyError) else f"has a malformed entry ({exc})"
        raise ConfigError(f"{file} is not a sparsecl metrics file: it {why}") from None
    if not all(math.isfinite(v) for v in (record.acc, record.seconds)):
        raise ConfigError(f"{file}: acc and seconds must be finite numbers, got {record.acc} and {record.seconds}")
    return record


def _optional(value) -> float | None:
    return None if value is None else float(value)


def expand_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """The run folders named by ``paths``: a folder with a ``metrics.json`` (or the file
    itself) is one run; a folder without one stands for its immediate subfolders that have one
    (the seed folders of a multi-seed run), in name order.

    Raises:
        ConfigError: no path given, or a path that is neither a run nor a folder of runs.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if (path / METRICS_NAME).is_file() or (path.name == METRICS_NAME and path.is_file()):
            out.append(path)
            continue
        children = sorted(p for p in path.iterdir() if (p / METRICS_NAME).is_file()) if path.is_dir() else []
        if not children:
            raise ConfigError(f"{path} is neither a run folder (it has no {METRICS_NAME}) nor a folder of runs "
                              f"(none of its subfolders has one)")
        out.extend(children)
    if not out:
        raise ConfigError("no run folders given: name the folders of the runs to summarize")
    return out


def summarize_runs(paths: Iterable[Path]) -> list[SummaryRow]:
    """Group the runs in ``paths`` (see ``expand_run_dirs``) by method, benchmark and
    configuration minus the seed, and summarize each group over its seeds. Groups come in the
    order of their first run.

    Raises:
        ConfigError: a run cannot be read (``load_run``), or two runs of one group have the same
            seed (the message names both folders).
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for path in expand_run_dirs(paths):
        run = load_run(path)
        key = (run.method, run.benchmark, json.dumps(run.config, sort_keys=True, default=str))
        group = groups.setdefault(key, [])
        twin = next((r for r in group if r.seed == run.seed), None)
        if twin is not None:
            raise ConfigError(f"runs {twin.path} and {run.path} have the same configuration and the same seed "
                              f"{run.seed}: give each seed of a configuration once")
        group.append(run)
    rows = []
    for (method, benchmark, _), runs in groups.items():
        layers = list(dict.fromkeys(name for r in runs for name in r.capacity))
        rows.append(SummaryRow(
            method, benchmark, runs[0].config, [r.seed for r in runs], [r.path for r in runs],
            Stat.of([r.acc for r in runs]), Stat.of([r.bwt for r in runs]), Stat.of([r.forgetting for r in runs]),
            Stat.of([r.mean_capacity for r in runs]), Stat.of([r.seconds for r in runs]),
            {name: Stat.of([r.capacity.get(name) for r in runs]) for name in layers}))
    return rows


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """``config`` as ``dotted.key → text``: nested dicts flattened, lists of dicts (the stream's
    segments) by index (``stream.0.options.normalize``), other lists as JSON."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(item, dict) for item in v):
            for i, item in enumerate(v):
                out.update(_flat(item, f"{prefix}{k}.{i}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
    return out


def differing_options(rows: Sequence[SummaryRow]) -> list[dict[str, str]]:
    """Per row, the configuration entries whose value is not the same in every row (what sets
    the groups apart), as ``key → text``."""
    flats = [_flat(r.config) for r in rows]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    varying = [k for k in keys if len({f.get(k) for f in flats}) > 1]
    return [{k: f.get(k, "—") for k in varying} for f in flats]


def _pm(stat: Stat, scale: float = 100.0, digits: int = 2, sign: bool = False) -> str:
    if stat.mean is None:
        return "—"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(scale * stat.mean)
    return text if stat.std is None else f"{text} ± {scale * stat.std:.{digits}f}"


def _duration(stat: Stat) -> str:
    if stat.mean is None:
        return "—"
    scale, unit = (1 / 60, "min") if stat.mean >= 120 else (1.0, "s")
    return f"{_pm(stat, scale, 1)} {unit}"


def _capacity(row: SummaryRow) -> str:
    if not row.capacity_per_layer:
        return "—"
    if len(row.capacity_per_layer) <= 4:
        return ", ".join(f"{name} {_pm(s, digits=1)}" for name, s in row.capacity_per_layer.items())
    return f"mean {_pm(row.capacity, digits=1)} over {len(row.capacity_per_layer)} layers"


def to_markdown(rows: Sequence[SummaryRow]) -> str:
    """A Markdown table, one line per group: method, benchmark, the options that set the groups
    apart, seeds, then mean ± std over seeds of ACC (%), BWT and forgetting (points), capacity
    after the last task (% per layer, or the mean over more than 4 layers) and wall time per
    run."""
    lines = ["| method | benchmark | options | seeds | ACC (%) | BWT (points) | forgetting (points) "
             "| capacity after the last task (%) | wall time per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, options in zip(rows, differing_options(rows)):
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "—"
        lines.append(f"| {row.method} | {row.benchmark} | {opts} | {len(row.seeds)} ({', '.join(map(str, row.seeds))}) "
                     f"| {_pm(row.acc)} | {_pm(row.bwt, sign=True)} | {_pm(row.forgetting)} | {_capacity(row)} "
                     f"| {_duration(row.seconds)} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[SummaryRow]) -> str:
    """CSV, one line per group: ``method, benchmark, options`` (the differing options as
    ``key=value; ...``), ``config`` (the whole configuration minus the seed, JSON), ``seeds``
    (``0 1 2``), ``n``, then ``<figure>_mean, <figure>_std`` for acc, bwt, forgetting, capacity
    (mean over layers) and seconds, and ``capacity[<layer>]_mean/_std`` for every layer of any
    group. Figures are fractions (not percent) and seconds; an undefined value is empty."""
    layers = list(dict.fromkeys(name for r in rows for name in r.capacity_per_layer))
    figures = ("acc", "bwt", "forgetting", "capacity", "seconds")
    header = ["method", "benchmark", "options", "config", "seeds", "n"]
    header += [f"{f}_{s}" for f in figures for s in ("mean", "std")]
    header += [f"capacity[{name}]_{s}" for name in layers for s in ("mean", "std")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    cell = lambda v: "" if v is None else repr(float(v))  # noqa: E731  (repr: every digit, round-trips)
    for row, options in zip(rows, differing_options(rows)):
        values = [row.method, row.benchmark, "; ".join(f"{k}={v}" for k, v in options.items()),
                  json.dumps(row.config, sort_keys=True, default=str), " ".join(map(str, row.seeds)), len(row.seeds)]
        for f in figures:
            stat = getattr(row, f)
            values += [cell(stat.mean), cell(stat.std)]
        for name in layers:
            stat = row.capacity_per_layer.get(name, Stat(None, None, 0))
            values += [cell(stat.mean), cell(stat.std)]
        writer.writerow(values)
    return buffer.getvalue()


def write_summary(rows: Sequence[SummaryRow], out: Path) -> tuple[Path, Path]:
    """Write ``to_markdown(rows)`` to ``out`` with the suffix ``.md`` and ``to_csv(rows)`` with
    ``.csv`` (``out`` = ``results/pmnist`` or ``results/pmnist.md`` both give
    ``results/pmnist.md`` and ``results/pmnist.csv``), each atomically; returns both paths.

    Raises:
        ConfigError: the folder of ``out`` does not exist.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    text_md, text_csv = to_markdown(rows), to_csv(rows)
    write_atomic(md, lambda f: f.write(text_md.encode("utf-8")))
    write_atomic(csv_path, lambda f: f.write(text_csv.encode("utf-8")))
    return md, csv_path
