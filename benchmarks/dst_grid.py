"""Print the DST-CL grid as a Markdown table: one row per (initialization, growth), one ACC column
per sparsity, read from the runs' metrics.json (method_options: init, growth, sparsity). A cell
holds ACC (%) and, in brackets, the fraction of weights owned after the last task, mean over
layers. Runs that are not DST or have no metrics.json are ignored; a missing cell shows "—".
Usage:
    python benchmarks/dst_grid.py runs/cifar100-weight-dst-*"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def cells(paths: list[str]) -> dict[tuple[str, str, float], str]:
    out = {}
    for path in paths:
        file = Path(path) / "metrics.json"
        if not file.exists():
            continue
        m = json.loads(file.read_text())
        if m["method"] != "dst":
            continue
        opts = m["config"]["method_options"]
        owned = statistics.mean(used[-1] for used in m["capacity"].values())
        key = (opts["init"], opts["growth"], float(opts["sparsity"]))
        if key in out:
            raise SystemExit(f"two runs with init={key[0]}, growth={key[1]}, sparsity={key[2]}: {path}")
        out[key] = f"{100 * m['acc']:.2f} ({100 * owned:.0f}%)"
    return out


def main(paths: list[str]) -> None:
    table = cells(paths)
    sparsities = sorted({s for _, _, s in table})
    rows = sorted({(i, g) for i, g, _ in table})
    print("| init | growth | " + " | ".join(f"{100 * s:.0f}% sparse" for s in sparsities) + " |")
    print("|---|---|" + "---|" * len(sparsities))
    for init, growth in rows:
        print(f"| {init} | {growth} | " + " | ".join(table.get((init, growth, s), "—") for s in sparsities) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
