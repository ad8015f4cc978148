"""Print the DST-CL grid as two Markdown tables, read from the runs' metrics.json
(method_options: init, growth, sparsity):

1. ACC (%): one row per (initialization, growth), one column per sparsity.
2. Storage and time: one row per (sparsity, initialization), over its growth modes: the fraction
   of weights owned after the last task (mean over layers), the mask bits per masked weight after
   the last task (entropy-coded, raw in brackets; the range over growth modes), and the median
   wall time per task (minutes).

Runs that are not DST or have no metrics.json are ignored; a missing cell shows "—".
Usage:
    python benchmarks/dst_grid.py runs/cifar100-weight-dst-*"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(paths: list[str]) -> dict[tuple[str, str, float], dict]:
    """(init, growth, sparsity) -> metrics.json of that run; two runs of one cell are refused."""
    out = {}
    for path in paths:
        file = Path(path) / "metrics.json"
        if not file.exists():
            continue
        m = json.loads(file.read_text())
        if m["method"] != "dst":
            continue
        opts = m["config"]["method_options"]
        key = (opts["init"], opts["growth"], float(opts["sparsity"]))
        if key in out:
            raise SystemExit(f"two runs with init={key[0]}, growth={key[1]}, sparsity={key[2]}: {path}")
        out[key] = m
    return out


def owned(m: dict) -> float:
    return statistics.mean(used[-1] for used in m["capacity"].values())


def span(values: list[float], fmt: str) -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def main(paths: list[str]) -> None:
    runs = load(paths)
    if not runs:
        raise SystemExit(f"no DST run with a metrics.json among {len(paths)} path(s)")
    sparsities = sorted({s for _, _, s in runs})
    rows = sorted({(i, g) for i, g, _ in runs})
    print("| init | growth | " + " | ".join(f"{100 * s:.0f}% sparse" for s in sparsities) + " |")
    print("|---|---|" + "---|" * len(sparsities))
    for init, growth in rows:
        cells = [f"{100 * runs[init, growth, s]['acc']:.2f}" if (init, growth, s) in runs else "—"
                 for s in sparsities]
        print(f"| {init} | {growth} | " + " | ".join(cells) + " |")
    print()
    print("| sparsity | init | runs | weights owned | mask bits per weight (raw) | wall time per task (median) |")
    print("|---|---|---|---|---|---|")
    for s in sparsities:
        for init in sorted({i for i, _, sp in runs if sp == s}):
            group = [m for (i, _, sp), m in sorted(runs.items()) if i == init and sp == s]
            stored = [m["bits_per_parameter"]["stored"][-1] for m in group]
            raw = [m["bits_per_parameter"]["raw"][-1] for m in group]
            minutes = statistics.median(t / 60 for m in group for t in m["seconds_per_task"])
            print(f"| {100 * s:.0f}% | {init} | {len(group)} | {span([100 * owned(m) for m in group], '{:.0f}')}% "
                  f"| {span(stored, '{:.2f}')} ({span(raw, '{:.0f}')}) | {minutes:.1f} min |")


if __name__ == "__main__":
    main(sys.argv[1:])
