"""Exact freezing that holds under any optimizer.

Masking gradients is not enough: weight decay and momentum still move an entry whose gradient is
zero. The ``Freezer`` therefore (1) zeroes the gradient of every fixed entry before the optimizer
step, so that the optimizer's state and any gradient clipping only see trainable entries, and
(2) writes the recorded values back after the step. Step (2) is what makes freezing exact.
"""

from __future__ import annotations

import torch
from torch import nn


class Freezer:
    """Holds selected entries of parameters at fixed values.

    ``fix(param, mask)`` records ``param``'s current values; after each optimizer step
    ``restore()`` writes them back wherever ``mask`` (bool, same shape as ``param``) is True.
    """

    def __init__(self) -> None:
        self._fixed: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def clear(self) -> None:
        self._fixed.clear()

    def fix(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        if mask.shape != param.shape:
            raise ValueError(f"freeze mask of shape {tuple(mask.shape)} does not match parameter "
                             f"of shape {tuple(param.shape)}")
        if mask.any():
            self._fixed.append((param, mask.to(param.device), param.detach().clone()))

    def zero_grads(self) -> None:
        for param, mask, _ in self._fixed:
            if param.grad is not None:
                param.grad.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        for param, mask, values in self._fixed:
            torch.where(mask, values, param, out=param)
