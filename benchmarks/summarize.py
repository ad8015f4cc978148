"""Print one Markdown table row per run folder: the run (folder name), method, ACC, BWT, max
logit change, capacity used after the last task (per layer, or the mean and range over many
layers), bits per parameter (weight-level methods: stored, raw in brackets), wall time per task.
With --over-seeds, instead one row per configuration: mean ± std over its seeds
(sparsecl.summary, as ``sparsecl summarize``).
Usage:
    python benchmarks/summarize.py runs/cifar100-alexnet-like-*
    python benchmarks/summarize.py --over-seeds runs/pmnist-ewc-seed*"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def row(run_dir: Path) -> str:
    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    bwt = "—" if m["bwt"] is None else f"{100 * m['bwt']:+.2f}"
    last = {name: used[-1] for name, used in m["capacity"].items()}
    if len(last) <= 6:
        capacity = ", ".join(f"{name} {100 * u:.0f}%" for name, u in last.items()) or "—"
    else:
        capacity = (f"mean {100 * statistics.mean(last.values()):.0f}% over {len(last)} layers "
                    f"({100 * min(last.values()):.0f}–{100 * max(last.values()):.0f}%)")
    per_task = statistics.mean(m["seconds_per_task"])
    bits = m.get("bits_per_parameter")
    bits = f"{bits['stored'][-1]:.2f} ({bits['raw'][-1]:.0f})" if bits else "—"
    return (f"| {Path(run_dir).name} | {m['method']} | {100 * m['acc']:.2f} | {bwt} | {m['max_logit_change']} "
            f"| {capacity} | {bits} | {per_task / 60:.1f} min |")


def main(paths: list[str]) -> None:
    if paths[:1] == ["--over-seeds"]:
        from sparsecl.summary import summarize_runs, to_markdown

        print(to_markdown(summarize_runs(paths[1:])), end="")
        return
    print("| run | method | ACC (%) | BWT (points) | max logit change | capacity used after the last task "
          "| bits per parameter | wall time per task |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        if (Path(path) / "metrics.json").exists():
            print(row(Path(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
