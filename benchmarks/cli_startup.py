"""Start-up cost of the ``sparsecl`` command line, and the heavy libraries it imports eagerly.

Measures, as wall time of fresh processes (the two commands alternated, ``--repeats`` times each,
median and range):

- ``sparsecl --help``: what a user waits for before any work;
- ``python -c 'import sparsecl.cli'``: the import alone.

Then runs ``python -X importtime -c 'import sparsecl.cli'`` once and lists which of the heavy
libraries (``--heavy``: scikit-learn, matplotlib, SciPy, TensorBoard, pandas by default) are
imported at start-up, with their cumulative import time and the chain of modules that pulled them
in, down to the sparsecl module and source line of the import statement. Those libraries belong
inside the functions that use them. torch's own import time is listed for reference: the CLI
needs it for every command that trains or loads a model.

    python benchmarks/cli_startup.py [--repeats 7] [--target 1.5]

Run it on an otherwise idle machine: the medians move with the load.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("sklearn", "matplotlib", "scipy", "tensorboard", "pandas")


def wall_time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def sparsecl_executable() -> str:
    """The ``sparsecl`` script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("sparsecl")
    found = str(beside) if beside.is_file() else shutil.which("sparsecl")
    if found is None:
        sys.exit("no `sparsecl` executable next to this Python or on PATH: install the package first "
                 "(pip install -e .)")
    return found


def parse_importtime(stderr: str) -> list[tuple[str, int, float]]:
    """``-X importtime`` lines as (module, nesting depth, cumulative seconds), in printed order
    (a module's imports are printed before it, one level deeper)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((name.strip(), depth, int(cumulative) / 1e6))
    return rows


def importers(rows: list[tuple[str, int, float]], k: int) -> list[int]:
    """Indices of the chain of modules whose import led to ``rows[k]``, ``k`` first: a module's
    parent is the next printed module one level shallower."""
    chain, depth = [k], rows[k][1]
    for i in range(k + 1, len(rows)):
        if rows[i][1] < depth:
            chain.append(i)
            depth = rows[i][1]
    return chain


def outermost(rows: list[tuple[str, int, float]], chain: list[int]) -> list[int]:
    """``chain`` with each run of one library's own modules cut to its outermost (sparsecl's
    modules all kept): scipy.sparse <- sklearn.cluster <- sparsecl.methods.tinysubnets <- ..."""
    top = lambda i: rows[i][0].split(".")[0]  # noqa: E731
    return [i for n, i in enumerate(chain)
            if top(i) == "sparsecl" or n + 1 == len(chain) or top(chain[n + 1]) != top(i)]


def import_line(module: str, target: str) -> int | None:
    """The source line of ``module`` whose import statement imports ``target`` (absolute or
    relative), or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # "from .x import y" inside package p: p.x
                base = importlib.util.resolve_name("." * node.level + base, package)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == target or target.startswith(n + ".") or n.startswith(target + ".") for n in names if n):
            return node.lineno
    return None


def origin(module: str) -> str:
    spec = importlib.util.find_spec(module)
    return spec.origin if spec and spec.origin else module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command (default 7)")
    parser.add_argument("--target", type=float, default=1.5, help="seconds `sparsecl --help` should stay within")
    parser.add_argument("--heavy", default=",".join(HEAVY), help="comma-separated top-level packages to look for")
    args = parser.parse_args()
    heavy = [h for h in args.heavy.split(",") if h]

    commands = {"sparsecl --help": [sparsecl_executable(), "--help"],
                "python -c 'import sparsecl.cli'": [sys.executable, "-c", "import sparsecl.cli"]}
    for cmd in commands.values():  # warm the file cache, so that the first timed run is not the odd one out
        wall_time(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            times[name].append(wall_time(cmd))
    print(f"Wall time of a fresh process, {args.repeats} runs each, alternated (machine load {load()}):")
    for name, ts in times.items():
        print(f"  {name:<34} median {statistics.median(ts):6.2f} s   (min {min(ts):.2f}, max {max(ts):.2f})")
    median_help = statistics.median(times["sparsecl --help"])
    verdict = "within" if median_help <= args.target else "ABOVE"
    print(f"  `sparsecl --help`: {median_help:.2f} s, {verdict} the {args.target:.2f} s target")

    probe = "import sys, sparsecl.cli; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())  # what stayed imported (-X importtime also lists failed attempts)
    rows = parse_importtime(out.stderr)
    print("\nHeavy libraries imported by `import sparsecl.cli`:")
    found = False
    for lib in heavy:
        if lib not in loaded:
            print(f"  {lib:<12} not imported")
            continue
        found = True
        # where the library comes in: its first printed module that no module of its own imported
        k = next(i for i, (name, _, _) in enumerate(rows) if name.split(".")[0] == lib
                 and all(rows[j][0].split(".")[0] != lib for j in importers(rows, i)[1:]))
        chain = outermost(rows, importers(rows, k))
        print(f"  {lib:<12} imported ({rows[chain[0]][2]:.2f} s cumulative), via "
              + " <- ".join(rows[i][0] for i in chain))
        names = [rows[i][0] for i in chain]
        ours = next((n for n in names[1:] if n.split(".")[0] == "sparsecl"), None)
        if ours is not None:
            line = import_line(ours, names[names.index(ours) - 1])
            print(f"  {'':<12} import statement: {origin(ours)}" + (f":{line}" if line else ""))
    if not found:
        print("  none")
    direct = {}  # third-party modules a sparsecl module imports itself: what the start-up is made of
    for k, (name, _, seconds) in enumerate(rows):
        chain = importers(rows, k)
        if name.split(".")[0] != "sparsecl" and len(chain) > 1 and rows[chain[1]][0].split(".")[0] == "sparsecl":
            top = name.split(".")[0]
            if top in loaded and seconds > direct.get(top, ("", 0.0))[1]:
                direct[top] = (rows[chain[1]][0], seconds)
    print("\nLargest imports made by sparsecl modules (cumulative; a library counted where it is first imported):")
    for top, (by, seconds) in sorted(direct.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"  {top:<16} {seconds:6.2f} s   by {by}")

    if "torch" in loaded:  # needed by every command that trains or loads a model, not by --help
        k = next(i for i, (name, _, _) in enumerate(rows) if name == "torch")
        chain = outermost(rows, importers(rows, k))
        print(f"\nFor reference, torch: {rows[k][2]:.2f} s cumulative, via " + " <- ".join(rows[i][0] for i in chain))
    else:
        print("\ntorch is not imported by `import sparsecl.cli`.")

if __name__ == "__main__":
    main()
