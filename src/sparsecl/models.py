"""Reference models. Any ``nn.Module`` ending in an ``nn.Linear`` works with the engine; these are
the ones the CLI builds."""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from .errors import ConfigError


def mlp(input_shape: Sequence[int], hidden: Sequence[int] = (2000, 2000), num_classes: int = 10,
        dropout: float = 0.0) -> nn.Sequential:
    """Flatten → [Linear → ReLU → Dropout] per hidden width → Linear head.

    The Permuted-MNIST network of CLNP and EideticNets is ``mlp((1, 28, 28), (2000, 2000), 10)``
    (EideticNets uses dropout 0.1). The final Linear is the head prototype that
    ``ContinualNetwork`` replaces by one head per task.
    """
    if not 0 <= dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
