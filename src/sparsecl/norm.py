"""BatchNorm that is exact per task (DESIGN §2.4).

A channel frozen with its task keeps the affine parameters and running statistics it had when the
task ended. Holding the affine parameters is the freezer's job; the statistics are this module's:
while a later task trains in train mode, frozen channels are normalized with their frozen running
statistics (exactly what they compute in eval mode) and their statistics are never updated; free
channels use batch statistics and update theirs as usual. In eval mode, or with nothing frozen,
the module is a plain ``nn.BatchNorm1d``/``nn.BatchNorm2d`` with the same state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _TaskBatchNorm:
    """Mixin over ``nn.BatchNorm*d``: ``frozen`` is a bool buffer ``(num_features,)`` set by the
    isolation method (not saved in the state dict: the method derives it from its ledger)."""

    frozen: torch.Tensor

    def _init_frozen(self) -> None:
        self.register_buffer("frozen", torch.zeros(self.num_features, dtype=torch.bool,
                                                   device=self.running_mean.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.frozen.any():
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Work on copies: autograd keeps the statistics passed to batch_norm for the backward pass.
        frozen_mean, frozen_var = self.running_mean.clone(), self.running_var.clone()
        mean, var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)  # updates mean, var
        frozen = self.frozen
        self.running_mean.copy_(torch.where(frozen, frozen_mean, mean))
        self.running_var.copy_(torch.where(frozen, frozen_var, var))
        fixed = F.batch_norm(x, frozen_mean, frozen_var, self.weight, self.bias, False, 0.0, self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.where(frozen.view(shape), fixed, y)

    @classmethod
    def replacing(cls, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
        """A task-exact copy of ``bn`` (same parameters, buffers and options)."""
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device=bn.running_mean.device,
                  dtype=bn.running_mean.dtype)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new


class TaskBatchNorm1d(_TaskBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose ``frozen`` channels keep their statistics (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_frozen()


class TaskBatchNorm2d(_TaskBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose ``frozen`` channels keep their statistics (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_frozen()


TASK_NORMS = {nn.BatchNorm1d: TaskBatchNorm1d, nn.BatchNorm2d: TaskBatchNorm2d}


@torch.no_grad()
def reset_channels(bn: nn.modules.batchnorm._BatchNorm, channels: torch.Tensor) -> None:
    """Default state (weight 1, bias 0, mean 0, variance 1) for the channels of bool mask
    ``channels`` ``(num_features,)``: recycled units start as a fresh BatchNorm would."""
    channels = channels.to(bn.running_mean.device)
    bn.weight.masked_fill_(channels, 1.0)
    bn.bias.masked_fill_(channels, 0.0)
    bn.running_mean.masked_fill_(channels, 0.0)
    bn.running_var.masked_fill_(channels, 1.0)
