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


class TaylorAccumulator:
    """Taylor importance (Molchanov et al., ICLR 2017, Eq. 8, as :func:`taylor_scores`) gathered
    from the training steps that run anyway, instead of a scoring pass of its own.

    While attached, every forward pass in train mode with gradients records each unit layer's
    output z, and the backward pass adds Σ_samples |z · ∂C/∂z · N| (a channel: z · ∂C/∂z averaged
    over its spatial positions first; ``N`` the batch size, so that the mean loss weighs every
    sample alike) to a per-unit-group sum, float64 ``(num_units,)``. :meth:`scores` gives the mean
    over the samples seen since the last :meth:`reset` — the EideticNets method resets at the start
    of every training epoch, so the scores are those of the last epoch (train mode: with dropout,
    while the weights move; a fresh :func:`taylor_scores` pass scores fixed weights in eval mode).
    Eval-mode and no-grad passes (accuracy measurements) are not counted.
    """

    def __init__(self, net) -> None:
        self.net = net
        self.sums = _zeros(net)
        self.count = 0
        self._hooks = []

    def attach(self) -> None:
        if self._hooks:
            return
        first = next(iter(self.net.graph.layers), None)
        for name, layer in self.net.graph.layers.items():
            self._hooks.append(layer.module.register_forward_hook(self._keep(layer.group, name == first)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def reset(self) -> None:
        self.sums = _zeros(self.net)
        self.count = 0

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """A copy of the sums and the sample count, for :meth:`load`."""
        return {n: s.clone() for n, s in self.sums.items()}, self.count

    def load(self, state: tuple[dict[str, torch.Tensor], int]) -> None:
        self.sums, self.count = {n: s.clone() for n, s in state[0].items()}, state[1]

    def _keep(self, group: str, counts: bool):
        def hook(module, inputs, output):
            if not (module.training and output.requires_grad):
                return
            z = output.detach()
            n = len(z)
            if counts:  # one layer counts the samples
                self.count += n

            def grad_hook(grad):
                prod = z * grad * n
                if prod.dim() > 2:
                    prod = prod.flatten(2).mean(2)
                self.sums[group] += prod.abs().sum(0).double().cpu()
            output.register_hook(grad_hook)
        return hook

    def scores(self, world=None) -> dict[str, torch.Tensor]:
        """Mean importance per unit over the samples seen since the last reset; with ``world``
        (data-parallel), summed over the ranks first, so that every rank gets the same scores.

        Raises:
            ValueError: no training sample was seen since the last reset.
        """
        sums, count = self.sums, self.count
        if world is not None:
            from . import distributed
            names = list(sums)
            flat = torch.cat([sums[n] for n in names] + [torch.tensor([float(count)], dtype=torch.float64)])
            flat = distributed.all_reduce_sum(flat, world)
            sums = dict(zip(names, flat[:-1].split([len(sums[n]) for n in names])))
            count = int(flat[-1])
        if count == 0:
            raise ValueError("no training step was seen since the Taylor scores were reset")
        return {name: (s / count).float() for name, s in sums.items()}


def layer_normalized(scores: dict[str, torch.Tensor], among: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores divided by their layer's L2 norm over the units ``among`` (bool ``(num_units,)``
    per group), so that one threshold can compare units of different layers (Molchanov et al.,
    ICLR 2017, Sec. 2.2, "normalization": Θ(z) / sqrt(Σ_j Θ(z_j)²); EideticNets prunes by one
    threshold over the whole network this way). A layer whose scores are all zero is left as is."""
    out = {}
    for name, s in scores.items():
        norm = s[among[name]].double().norm() if among[name].any() else torch.zeros((), dtype=torch.float64)
        out[name] = (s.double() / norm).float() if norm > 0 else s.clone()
    return out
