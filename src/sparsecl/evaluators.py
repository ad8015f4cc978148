"""The hook through which extra evaluations (task-agnostic routing) run after every task, without
the trainer knowing them.

An *evaluator* is any object with

    begin(benchmark, state)                    before the first task to learn: refuse what it
                                               cannot evaluate, start its record in ``state``
    after_task(net, benchmark, t, state)       after task t was learned and measured (its row of
                                               the accuracy matrix and its probe are in ``state``)

The trainer calls every evaluator of ``Trainer(..., evaluators=...)``; by default those the
``TrainConfig`` asks for (:func:`default_evaluators`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import TrainConfig


class Evaluator(Protocol):
    """An evaluation run after every task (see the module's doc)."""

    def begin(self, benchmark, state) -> None: ...

    def after_task(self, net, benchmark, t: int, state) -> None: ...


def default_evaluators(config: "TrainConfig", method) -> list[Evaluator]:
    """The evaluators ``config`` asks for: task-agnostic routing
    (:class:`sparsecl.routing.RoutingEvaluator`; with ``routing="oracle"`` it only clears the
    routing record of a saved run that is continued)."""
    from .routing import RoutingEvaluator

    return [RoutingEvaluator(config, method)]
