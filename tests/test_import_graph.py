"""No import circles between sparsecl's modules: every ``import`` / ``from ... import`` of a
sparsecl module counts, at module top level, under ``TYPE_CHECKING`` or inside a function, so
that data and dependencies flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparsecl"

#: Edges not yet untied, each with the reason; remove an entry when its module stops importing.
KNOWN: set[tuple[str, str]] = set()  # edges allowed to close a cycle: none


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the sparsecl modules it imports (anywhere in its source)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "sparsecl")
            elif isinstance(node, ast.ImportFrom):
                base = (".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                        if node.level else (node.module or ""))
                if base.split(".")[0] != "sparsecl":
                    continue
                for alias in node.names:  # `from . import metrics` imports the submodule metrics
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "sparsecl.methods.base" in graph["sparsecl.trainer"]
    assert "sparsecl.data.files" in graph["sparsecl.data.download"]
    assert "sparsecl.metrics" in graph["sparsecl.trainer"]  # `from . import distributed, metrics`


def test_no_import_cycles_but_the_known_ones():
    graph = import_graph()
    for a, b in KNOWN:
        graph[a].discard(b)
    assert cycles(graph) == []


def test_untied_circles_stay_untied():
    graph = import_graph()
    for a, b in (("sparsecl.data.formats", "sparsecl.data.download"), ("sparsecl.methods.base", "sparsecl.trainer"),
                 ("sparsecl.routing", "sparsecl.trainer"), ("sparsecl.metrics", "sparsecl")):
        assert b not in graph[a] or a not in graph[b], (a, b)
    assert "sparsecl.trainer" not in graph["sparsecl.methods.base"]  # methods see the session as a Protocol
    assert "sparsecl.trainer" not in graph["sparsecl.routing"]  # routing evaluates through the evaluator hook
    assert "sparsecl" not in graph["sparsecl.metrics"]
