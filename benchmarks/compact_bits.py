"""Print, per run folder of a masks-mode method (WSN, DST, TinySubNets), the size of its compact
model (what ``sparsecl export --compact`` writes) in bits per parameter of the dense float32
model: every task together, the last task alone, and the parts (masks, codebook indices,
codebooks, float32 weights, per-task tensors, heads). WSN and DST store their weights as float32;
TinySubNets as k-means codebook indices. Definitions: ``sparsecl.compact.CompactModel``.
Usage:
    python benchmarks/compact_bits.py runs/pmnist-weight-wsn-0.5 runs/pmnist-weight-tsn-0.5"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsecl.checkpoint import load_checkpoint
from sparsecl.compact import compact_payload
from sparsecl.runs import restore


def main(paths: list[str]) -> None:
    print("| run | method | every task | last task alone | parts (bits per parameter) |")
    print("|---|---|---|---|---|")
    for path in paths:
        net, method, _ = restore(load_checkpoint(Path(path)))
        bits = compact_payload(net, method.codebooks).bits_per_parameter()
        parts = ", ".join(f"{kind} {value:.2f}" for kind, value in sorted(bits["parts"].items()))
        print(f"| {Path(path).name} | {method.name} | {bits['total']:.2f} | {bits['per_task'][-1]:.2f} | {parts} |")


if __name__ == "__main__":
    main(sys.argv[1:])
