"""WSN, Winning SubNetworks (Kang et al., "Forget-free Continual Learning with Winning
Subnetworks", ICML 2022): every weight has a learnable score; per layer the top-c fraction of
scores (by magnitude) form the task's mask, trained through a straight-through estimator. Selected
weights of earlier tasks are reused frozen; newly selected free weights train and become the
task's. Each task stores its binary mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import config_field as _opt
from .weight import TopSelection, WeightIsolation, largest


@dataclass
class WSNConfig:
    """WSN hyperparameters. ``density`` is the paper's c (the reference code's ``--sparsity``
    after its ``1 - x``): c = 0.5 for its CIFAR-100 and Permuted-MNIST results. Scores train with
    the weights' optimizer and learning rate (and its weight decay, if any: the reference uses
    none) and are never re-initialized between tasks, as in the reference code (ihaeyong/WSN)."""

    density: float = _opt("c: fraction of each layer's weights in a task's subnetwork", default=0.5)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"--density must be in (0, 1], got {self.density}")


def top_count(scores: torch.Tensor, fraction: float) -> int:
    """``round(fraction · numel)`` (half up, as ``sparsity.layer_budget``), at least one."""
    return max(1, math.floor(fraction * scores.numel() + 0.5))


def top_fraction(scores: torch.Tensor, fraction: float, selection: TopSelection | None = None) -> torch.Tensor:
    """Bool mask (``scores``' shape) of exactly ``top_count(scores, fraction)`` entries of largest
    ``|scores|`` (ties at the cut: see ``weight.largest``). ``selection`` carries the previous
    cut of the same scores to bracket this one (faster, same mask)."""
    magnitude, k = scores.detach().abs(), top_count(scores, fraction)
    return selection(magnitude, k) if selection is not None else largest(magnitude, k)


class _StraightThrough(torch.autograd.Function):
    """``weight · mask`` (``mask`` 0/1 in the weight's dtype) with WSN's straight-through
    gradient to the scores: the gradient of ``weight · (mask + |s| − sg(|s|))`` (sg:
    stop-gradient), i.e. ``g · mask`` to the weight and ``g · weight · sgn(s)`` to the scores
    ``s``, written out so that the forward is one product and the backward four elementwise
    operations (autograd's graph of the expression above takes more, and keeps more alive)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scores, mask = ctx.saved_tensors
        to_weight = grad * mask if ctx.needs_input_grad[0] else None
        to_scores = (grad * weight).mul_(scores.sgn()) if ctx.needs_input_grad[1] else None
        return to_weight, to_scores, None


class WSN(WeightIsolation):
    name = "wsn"
    mode = "masks"

    def __init__(self, config: WSNConfig | None = None):
        super().__init__()
        self.config = config or WSNConfig()
        self.scores: list[nn.Parameter] = []
        self._selections: list[TopSelection] = []  # per layer: the previous cut (a speed-up, never state)

    def setup(self, net) -> None:
        super().setup(net)
        if not self.scores:
            for i in range(len(net.subnetworks.layers)):
                s = torch.empty_like(self.weight(net, i), requires_grad=False)
                nn.init.kaiming_uniform_(s, a=math.sqrt(5))  # WSN's score initialization
                self.scores.append(nn.Parameter(s))

    def own_parameters(self) -> list[nn.Parameter]:
        return self.scores

    def start_task(self, net, t: int) -> None:
        pass

    def effective(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        while len(self._selections) <= i:
            self._selections.append(TopSelection())
        s = self.scores[i]
        # through uint8: a bool → float copy is not vectorized on the CPU (about 9× slower)
        mask = top_fraction(s, self.config.density, self._selections[i]).view(torch.uint8).to(weight.dtype)
        # straight-through: the value is the masked weight, the gradient reaches the scores
        return _StraightThrough.apply(weight, s, mask)

    def used(self, net, t: int) -> list[torch.Tensor]:
        return [top_fraction(s, self.config.density) for s in self.scores]
