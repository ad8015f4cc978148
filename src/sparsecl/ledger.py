"""The capacity ledger: which task owns each unit."""

from __future__ import annotations

import torch

from .errors import CapacityError

FREE = -1


class CapacityLedger:
    """Owner task of every unit of every unit layer.

    ``owner[layer]`` is an ``int16`` tensor of shape ``(num_units,)``: ``-1`` for a free unit
    (trainable now, recycled for later tasks), otherwise the id of the task that owns it (frozen).
    ``history`` holds, after each task, the fraction of each layer's units owned.
    """

    def __init__(self, layer_sizes: dict[str, int]):
        self.owner = {name: torch.full((n,), FREE, dtype=torch.int16) for name, n in layer_sizes.items()}
        self.history: list[dict[str, float]] = []

    def free(self, layer: str) -> torch.Tensor:
        """Bool mask ``(num_units,)`` of the units no task owns."""
        return self.owner[layer] == FREE

    def owned_by(self, layer: str, task: int) -> torch.Tensor:
        return self.owner[layer] == task

    def owned_through(self, layer: str, task: int) -> torch.Tensor:
        """Units owned by tasks ``0..task``: the ones task ``task`` may read."""
        o = self.owner[layer]
        return (o >= 0) & (o <= task)

    def assign(self, layer: str, units: torch.Tensor, task: int) -> None:
        """Give the units selected by bool mask ``units`` to ``task``.

        Raises:
            CapacityError: one of them is already owned (frozen capacity is never re-assigned).
        """
        units = units.to(self.owner[layer].device)
        taken = units & ~self.free(layer)
        if taken.any():
            raise CapacityError(
                f"layer '{layer}': units {taken.nonzero().flatten().tolist()[:10]} are already "
                f"owned by earlier tasks and cannot be assigned to task {task}")
        self.owner[layer][units] = task

    def widen(self, layer: str, units: int) -> None:
        """Append ``units`` free units to ``layer`` (the layer was widened)."""
        o = self.owner[layer]
        self.owner[layer] = torch.cat([o, o.new_full((units,), FREE)])

    def usage(self, layer: str) -> float:
        """Fraction of the layer's units owned by some task."""
        return float((~self.free(layer)).float().mean())

    def record(self) -> dict[str, float]:
        """Append the current per-layer usage to ``history`` (call once after each task)."""
        snapshot = {name: self.usage(name) for name in self.owner}
        self.history.append(snapshot)
        return snapshot

    def capacity(self) -> dict[str, list[float]]:
        """Layer name → owned fraction after each task so far."""
        return {name: [h[name] for h in self.history] for name in self.owner}

    def require_free(self, layer: str, task: int) -> None:
        """Raises ``CapacityError`` when ``layer`` has no free unit left for ``task``."""
        if not self.free(layer).any():
            n = len(self.owner[layer])
            raise CapacityError(
                f"layer '{layer}' has no free units left for task {task}: all {n} units are owned "
                f"by earlier tasks (usage {self.usage(layer):.0%}); make the layer wider, prune harder, "
                f"let the method widen it (--widen N, Linear layers), or let the task reuse the layer's frozen "
                f"units (--reuse-full)")
