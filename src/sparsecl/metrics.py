"""Continual-learning metrics as pure functions of the accuracy matrix (DESIGN §6).

``R[t][i]`` is the test accuracy on task ``i`` after training task ``t`` (0-based, ``T`` tasks;
entries above the diagonal are ``None``). Accuracies are fractions in [0, 1]. Definitions follow
Lopez-Paz & Ranzato (2017, GEM) for ACC/BWT/FWT and Chaudhry et al. (2018, RWalk) for forgetting.

A cell at or below the diagonal may be *unmeasured* (``None`` or NaN): a run with
``TrainConfig(eval_every=K)`` or ``eval_tasks`` evaluates only some earlier tasks after each task.
The last row must be complete (the trainer always evaluates every task after the last one). Each
metric then averages over the tasks whose cells it needs were measured, as its docstring says;
with a complete matrix these are the papers' definitions exactly.
"""

from __future__ import annotations

import math
import platform
from typing import Sequence

Matrix = Sequence[Sequence[float | None]]


def measured(a: float | None) -> bool:
    """Whether a cell of the accuracy matrix holds a measurement (not ``None``, not NaN)."""
    return a is not None and not (isinstance(a, float) and math.isnan(a))


def _square(R: Matrix) -> int:
    """``T`` of a square, non-empty matrix whose last row is measured up to the diagonal.

    Raises:
        ValueError: the matrix is not square or its last row misses a cell."""
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {len(R)} rows")
    missing = [i for i in range(T) if not measured(R[T - 1][i])]
    if missing:
        raise ValueError(f"accuracy matrix row {T - 1} (after the last task) has unmeasured entries at "
                         f"tasks {missing[:10]}; every task must be evaluated after the last one")
    return T


def average_accuracy(R: Matrix) -> float:
    """ACC = mean_i R[T-1][i]: accuracy on every task after the last one (Lopez-Paz &
    Ranzato 2017, GEM).

    Raises:
        ValueError: the matrix is not square or its last row is incomplete."""
    T = _square(R)
    return sum(R[T - 1][i] for i in range(T)) / T


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean_{i<T-1} (R[T-1][i] - R[i][i]) (Lopez-Paz & Ranzato 2017, GEM); negative
    means forgetting. Tasks whose diagonal R[i][i] was not measured are left out of the mean
    (the trainer always measures the diagonal). ``None`` if T = 1 or no such task is left.

    Raises:
        ValueError: the matrix is not square or its last row is incomplete."""
    T = _square(R)
    terms = [R[T - 1][i] - R[i][i] for i in range(T - 1) if measured(R[i][i])]
    return sum(terms) / len(terms) if terms else None


def forgetting(R: Matrix) -> float | None:
    """Mean over i<T-1 of (max_{i<=t<T-1} R[t][i] - R[T-1][i]) (Chaudhry et al. 2018,
    RWalk, their forgetting measure after the last task): the drop from each task's best
    accuracy to its final one. The max runs over the measured cells of column i before the last
    row (the diagonal among them); a task with none is left out of the mean. ``None`` if T = 1
    or no task is left.

    Raises:
        ValueError: the matrix is not square or its last row is incomplete."""
    T = _square(R)
    terms = []
    for i in range(T - 1):
        before = [R[t][i] for t in range(i, T - 1) if measured(R[t][i])]
        if before:
            terms.append(max(before) - R[T - 1][i])
    return sum(terms) / len(terms) if terms else None


def forward_transfer(R: Matrix, baseline: Sequence[float]) -> float | None:
    """FWT = mean_{i>0} (R[i-1][i] - b_i), ``b_i`` the accuracy of a freshly initialized network
    on task i (Lopez-Paz & Ranzato 2017, GEM). Needs the accuracy of task i *before* it is
    trained, which only exists for methods that can predict an unseen task (a shared head).
    ``None`` if T = 1.

    Raises:
        ValueError: the matrix is not square, its last row is incomplete, ``baseline`` has the
            wrong length, or some R[i-1][i] is unmeasured."""
    T = _square(R)
    if len(baseline) != T:
        raise ValueError(f"baseline has {len(baseline)} entries for {T} tasks")
    if T < 2:
        return None
    if any(not measured(R[i - 1][i]) for i in range(1, T)):
        raise ValueError("forward transfer needs R[i-1][i], the accuracy on task i before training it")
    return sum(R[i - 1][i] - baseline[i] for i in range(1, T)) / (T - 1)


def per_class_accuracy(labels: Sequence[int], correct: Sequence[bool], num_classes: int) -> list[float | None]:
    """Accuracy of each class ``k`` in ``0 .. num_classes - 1``: the fraction of the samples
    whose label is ``k`` that were classified right (``correct[n]`` for sample ``n``); ``None``
    for a class without samples. EideticNets (paper 001, Tables 7-8) compares it with and without
    task routing."""
    if len(labels) != len(correct):
        raise ValueError(f"{len(labels)} labels but {len(correct)} correctness flags")
    hits, totals = [0] * num_classes, [0] * num_classes
    for label, ok in zip(labels, correct):
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} is outside the classes 0..{num_classes - 1}")
        totals[label] += 1
        hits[label] += bool(ok)
    return [None if n == 0 else h / n for h, n in zip(hits, totals)]


def mean_class_drop(oracle: Sequence[float | None], routed: Sequence[float | None]) -> float | None:
    """Mean over classes of (oracle accuracy − routed accuracy): what routing without a task id
    costs per class (EideticNets, paper 001, Table 8: "the average drop in per-class accuracy").
    Classes measured in only one of the two are skipped; ``None`` if no class is left."""
    if len(oracle) != len(routed):
        raise ValueError(f"{len(oracle)} oracle accuracies but {len(routed)} routed ones")
    drops = [o - r for o, r in zip(oracle, routed) if o is not None and r is not None]
    return sum(drops) / len(drops) if drops else None


def versions() -> dict[str, str]:
    """Versions of what produced a result, recorded in ``metrics.json``."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch

    try:
        ours = version("sparsecl")
    except PackageNotFoundError:  # a source tree that was not installed
        ours = "0+unknown"
    return {"sparsecl": ours, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


#: Tables written beside ``metrics.json``, read with ``pandas.read_csv`` as they are.
ACCURACY_MATRIX_NAME = "accuracy_matrix.csv"
SUMMARY_NAME = "summary.csv"


def write_run_tables(folder, metrics: dict) -> list:
    """Write ``accuracy_matrix.csv`` (a row per task learned, ``after_task``, and a column per
    task, ``task_0``..., test accuracy as a fraction, empty where not measured) and
    ``summary.csv`` (one row: method, benchmark, tasks, acc, bwt, forgetting, max_logit_change,
    seconds, the routed ACC when routing was on, and ``capacity_<layer>`` after the last task)
    from a run's ``metrics.json`` content, atomically, into ``folder``; returns both paths."""
    import csv
    import io
    from pathlib import Path

    from .atomic import write_atomic

    def cell(v):
        return v if measured(v) else ""

    R = metrics["accuracy_matrix"]
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(["after_task"] + [f"task_{i}" for i in range(len(R))])
    for t, row in enumerate(R):
        out.writerow([t] + [cell(a) for a in row])
    summary = {"method": metrics["method"], "benchmark": metrics["benchmark"], "tasks": len(R),
               "acc": metrics["acc"], "bwt": cell(metrics["bwt"]), "forgetting": cell(metrics["forgetting"]),
               "max_logit_change": metrics["max_logit_change"], "seconds": metrics["seconds"]}
    if metrics.get("routing"):
        summary[f"routed_acc_{metrics['routing']['mode']}"] = cell(metrics["routing"].get("acc"))
    for name, used in metrics.get("capacity", {}).items():
        summary[f"capacity_{name}"] = cell(used[-1] if used else None)
    text2 = io.StringIO()
    writer = csv.DictWriter(text2, list(summary), lineterminator="\n")
    writer.writeheader()
    writer.writerow(summary)
    folder = Path(folder)
    paths = [folder / ACCURACY_MATRIX_NAME, folder / SUMMARY_NAME]
    for path, body in zip(paths, (text.getvalue(), text2.getvalue())):
        write_atomic(path, lambda f, body=body: f.write(body.encode("utf-8")))
    return paths
