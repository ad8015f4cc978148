"""Exact freezing that holds under any optimizer.

Masking gradients is not enough: weight decay and momentum still move an entry whose gradient is
zero. The ``Freezer`` instead writes the recorded values of every fixed entry back right after
each optimizer step, whatever the optimizer did to them. Gradients of fixed entries are left as
they are: Adam, AdamW and SGD update each entry from its own gradient and state only, so they
cannot leak into trainable entries, and zeroing them cost ~4% of a training step for nothing.

Neuron-level methods fix whole rows (units) and whole columns (inputs from pruned units), so the
freezer stores fixed rows by index and fixed-zero columns by index: its per-step cost is
proportional to the frozen rows, not to the whole parameter.
"""

from __future__ import annotations

import torch
from torch import nn


_FLAT, _ENTRIES = -1, -2  # single entries fixed by flat index or through a bool mask (fix_entries)


class Freezer:
    """Holds rows or columns of parameters at fixed values, and columns at zero.

    ``fix(param, rows, zero_cols, cols)``: after each optimizer step ``restore()`` sets
    ``param[:, zero_cols] = 0`` and then writes back the values that ``param[rows]`` and
    ``param[:, cols]`` had when ``fix`` was called (bool masks over dim 0 / dim 1, or ``None``).
    A 1-D parameter (a bias) takes ``rows`` only. Column-fixing serves a weight shared by all
    tasks (a single head), whose columns belong to different tasks. ``fix_entries(param,
    entries)`` holds single entries (weight-level methods).
    """

    def __init__(self) -> None:
        self._fixed: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor | None]] = []

    def clear(self) -> None:
        self._fixed.clear()

    def fix(self, param: nn.Parameter, rows: torch.Tensor | None = None,
            zero_cols: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        for what, mask, dim in (("rows", rows, 0), ("zero_cols", zero_cols, 1), ("cols", cols, 1)):
            if mask is not None and (mask.dim() != 1 or param.dim() <= dim or len(mask) != param.shape[dim]):
                raise ValueError(f"freeze {what} mask of shape {tuple(mask.shape)} does not match "
                                 f"dimension {dim} of a parameter of shape {tuple(param.shape)}")
        # Zeroed columns first, so that a fixed row keeps its recorded value in every column.
        for mask, dim, keep in ((zero_cols, 1, False), (rows, 0, True), (cols, 1, True)):
            if mask is None or not mask.any():
                continue
            idx = mask.nonzero().flatten().to(param.device)
            values = param.detach().index_select(dim, idx).clone() if keep else None
            self._fixed.append((param, dim, idx, values))

    def fix_entries(self, param: nn.Parameter, entries: torch.Tensor) -> None:
        """Hold the entries of bool mask ``entries`` (``param``'s shape) at their current values:
        weight-level methods freeze single weights. A contiguous parameter is restored by flat
        index (cost proportional to the frozen entries); any other memory layout
        (``channels_last``) through the mask."""
        if entries.shape != param.shape:
            raise ValueError(f"freeze entries mask of shape {tuple(entries.shape)} does not match a "
                             f"parameter of shape {tuple(param.shape)}")
        if entries.any():
            entries = entries.to(param.device)
            if param.is_contiguous():
                idx = entries.reshape(-1).nonzero().flatten()
                self._fixed.append((param, _FLAT, idx, param.detach().view(-1).index_select(0, idx).clone()))
            else:
                self._fixed.append((param, _ENTRIES, entries, param.detach()[entries].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for param, dim, idx, values in self._fixed:
            if dim == _FLAT:
                param.view(-1).index_copy_(0, idx, values)
            elif dim == _ENTRIES:
                param.data[idx] = values
            elif values is None:
                param.index_fill_(dim, idx, 0.0)
            else:
                param.index_copy_(dim, idx, values)
