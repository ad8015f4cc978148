"""Unit importance scores for structured pruning. Higher means more important.

Each function returns ``{unit group name: float32 tensor of shape (num_units,)}`` for the unit
groups of a ``ContinualNetwork`` (a group is one layer unless a residual add couples several;
a coupled unit's score sums its layers' scores); callers restrict the choice to the units they
may prune. A convolutional unit is an output channel.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

SCORES = ("l1", "l2", "taylor")  # EideticNets' choices


def _zeros(net) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(g.num_units, dtype=torch.float64) for name, g in net.graph.groups.items()}


def weight_norm_scores(net, p: int) -> dict[str, torch.Tensor]:
    """L1 (``p=1``) or L2 (``p=2``) norm of each unit's incoming weights (its row, or a channel's
    whole filter; bias excluded, as in the EideticNets reference implementation)."""
    scores = _zeros(net)
    for layer in net.graph.layers.values():
        scores[layer.group] += layer.module.weight.detach().flatten(1).norm(p=p, dim=1).double().cpu()
    return {name: s.float() for name, s in scores.items()}


def taylor_scores(net, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  loss_fn: Callable) -> dict[str, torch.Tensor]:
    """First-order Taylor importance (Molchanov et al., ICLR 2017, Eq. 8): the mean over samples
    of |z · ∂C/∂z| for each unit's pre-activation output z (the layer's output; for a channel,
    z · ∂C/∂z averaged over its spatial positions before the absolute value, the paper's Eq. 8),
    i.e. the estimated change of the loss C if the unit were removed.

    ``batches`` yields ``(x, y, task_ids)``; ``loss_fn(x, y, task_ids) -> (mean loss, _)``. The
    network is put in eval mode (no dropout) while scoring and its parameter gradients are
    cleared afterwards. ∂C/∂z of the *mean* loss is rescaled by the batch size so that every
    sample weighs the same whatever the batch size.
    """
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in net.graph.layers.items():
        def keep(module, inputs, output, name=name):
            output.retain_grad()
            outputs[name] = output
        hooks.append(layer.module.register_forward_hook(keep))
    sums = _zeros(net)
    count = 0
    was_training = net.training
    net.eval()
    try:
        for x, y, tasks in batches:
            net.zero_grad(set_to_none=True)
            loss, _ = loss_fn(x, y, tasks)
            loss.backward()
            for name, z in outputs.items():
                prod = z.detach() * z.grad * len(x)
                if prod.dim() > 2:
                    prod = prod.flatten(2).mean(2)
                sums[net.graph.layers[name].group] += prod.abs().sum(0).double().cpu()
            count += len(x)
    finally:
        for h in hooks:
            h.remove()
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return {name: (s / max(count, 1)).float() for name, s in sums.items()}


def _per_unit(a: torch.Tensor, fan: int) -> torch.Tensor:
    """Mean |activation| per unit and sample, ``(N, units)``, of activations ``a``: features
    ``(N, units·fan)`` or feature maps ``(N, units, H, W)``."""
    a = a.abs()
    if a.dim() > 2:
        return a.flatten(2).mean(2)
    return a.view(len(a), -1, fan).mean(2) if fan > 1 else a


@torch.no_grad()
def activation_scores(net, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean absolute activation of each unit over the samples of ``batches`` (CLNP, paper 000
    Sec. 2.2 and Alg. 1: E_S(|N_l|)), in eval mode; a channel's activation is averaged over its
    spatial positions.

    A unit's activation is what the layers after it read: the input of every unit layer that
    consumes it (after the activation function, BatchNorm, pooling and any dropout) and, for the
    group the heads read, the body's output. A unit group of a residual stream is read at several
    depths; its score is the mean over those reading points. ``batches`` yields float input
    batches ``(N, ...)``.
    """
    sums = _zeros(net)
    points = {name: 0 for name in sums}
    hooks = []
    for layer in net.graph.layers.values():
        if layer.source is None:
            continue
        points[layer.source] += 1
        def keep(module, inputs, name=layer.source, fan=layer.fan):
            sums[name] += _per_unit(inputs[0], fan).sum(0).double().cpu()
        hooks.append(layer.module.register_forward_pre_hook(keep))
    source = net.graph.head_source
    if source is not None:
        points[source] += 1
    count = 0
    was_training = net.training
    net.eval()
    try:
        for x in batches:
            h = net.features(x)
            if source is not None:
                sums[source] += _per_unit(h, net.graph.head_fan).sum(0).double().cpu()
            count += len(x)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return {name: (s / max(count * points[name], 1)).float() for name, s in sums.items()}
