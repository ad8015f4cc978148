"""Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017): after each task, the diagonal of the Fisher information of the task's
training data measures how much each parameter matters to it; later tasks pay

    L(theta) = L_t(theta) + sum_{tau < t} lambda/2 * sum_k F_tau,k (theta_k - theta*_tau,k)^2     (Eq. 3)

with theta*_tau the parameters after task tau. As the paper notes, a sum of quadratic penalties
is one quadratic penalty, so the earlier tasks' terms are merged into one importance, one anchor
and a constant as each task ends (the value and the gradient are those of the sum; memory does
not grow with the number of tasks).

Online EWC (Schwarz et al., "Progress & Compress: A scalable framework for continual learning",
ICML 2018): one running Fisher F* <- gamma * F* + F_t and one anchor, the parameters after the
latest task: L(theta) = L_t(theta) + lambda/2 * sum_k F*_k (theta_k - theta*_{t-1},k)^2 (the
running Fisher enters the penalty as it is, as in Mammoth's ``ewc_on``; gamma = 1 sums the
Fishers undecayed).

Forgets by design: not an isolation method; the trainer reports its forgetting and BWT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from ..errors import ConfigError
from .base import config_field as _opt
from .quadratic import QuadraticPenalty

FISHERS = ("empirical", "true")
#: Per-sample gradients are computed this many bytes at a time (batch size x parameters x 4).
_PER_SAMPLE_BYTES = 256 * 2**20


@dataclass
class EWCConfig:
    """EWC hyperparameters. The paper gives no lambda for Permuted MNIST (it was searched per
    experiment); the default 5000 is FACIL's (Masana et al., "Class-incremental learning: survey
    and performance evaluation", TPAMI 2022; mmasana/FACIL, ``--lamb``), the one common peer
    with a default (Avalanche and Mammoth require a value). CLNP Table 1 quotes 97.0% for EWC on
    10-task Permuted MNIST. ``ewc_fisher``: ``'empirical'`` uses the training labels (as
    Avalanche does); ``'true'`` the paper's Fisher information, the expectation over the model's
    own predictive distribution, computed exactly (one gradient per class and sample, so C
    times the cost). Either way from per-sample gradients (FACIL and Avalanche square the
    gradients of whole batches instead)."""

    ewc_lambda: float = _opt("strength lambda of the penalty lambda/2 * sum F (theta - theta*)^2", default=5000.0)
    ewc_online: bool = _opt("online EWC (Schwarz et al. 2018): one running Fisher decayed by --ewc-gamma "
                            "and one anchor, the latest task's parameters", default=False)
    ewc_gamma: float = _opt("decay gamma of the running Fisher of online EWC (F* <- gamma F* + F_t)",
                            default=1.0)
    ewc_fisher: str = _opt("'empirical' (the training labels) or 'true' (expectation over the model's "
                           "predictions, exact; C times the cost)", default="empirical")
    ewc_fisher_samples: int | None = _opt("training samples the Fisher is estimated on, the task's first N "
                                          "(default: all)", default=None)

    def __post_init__(self) -> None:
        if not self.ewc_lambda >= 0:
            raise ConfigError(f"--ewc-lambda must be non-negative, got {self.ewc_lambda}")
        if not 0 <= self.ewc_gamma <= 1:
            raise ConfigError(f"--ewc-gamma must be in [0, 1], got {self.ewc_gamma}")
        if self.ewc_gamma != 1.0 and not self.ewc_online:
            raise ConfigError(f"--ewc-gamma {self.ewc_gamma} decays the running Fisher of online EWC; "
                              "add --ewc-online")
        if self.ewc_fisher not in FISHERS:
            raise ConfigError(f"--ewc-fisher must be one of {', '.join(FISHERS)}, got '{self.ewc_fisher}'")
        if self.ewc_fisher_samples is not None and self.ewc_fisher_samples < 1:
            raise ConfigError(f"--ewc-fisher-samples must be at least 1, got {self.ewc_fisher_samples}")


class EWC(QuadraticPenalty):
    name = "ewc"

    def __init__(self, config: EWCConfig | None = None):
        super().__init__()
        self.config = config or EWCConfig()

    @property
    def strength(self) -> float:
        return self.config.ewc_lambda / 2

    def end_task(self, session) -> None:
        fisher = self.fisher(session)
        self.consolidate({name: p.detach() for name, p in self._trained}, fisher)

    @torch.no_grad()
    def consolidate(self, params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        """Fold a finished task's Fisher ``fisher`` and parameters ``params`` (name → tensor)
        into the penalty.

        EWC: a(x - p)^2 + b(x - q)^2 = (a + b)(x - (ap + bq)/(a + b))^2 + ab/(a + b) (p - q)^2,
        per parameter, so the importance becomes the sum of the Fishers, the anchor their
        Fisher-weighted mean, and the offset grows by the last term (where a + b > 0).
        Online EWC: importance <- gamma * importance + F, anchor <- params, no offset."""
        if self.config.ewc_online:
            for name in self.importance:
                self.importance[name] = self.config.ewc_gamma * self.importance[name]
            for name, value in params.items():
                old = self.importance.get(name)
                self.importance[name] = fisher[name].clone() if old is None else old + fisher[name]
                self.anchor[name] = value.clone()
            return
        offset = 0.0
        for name, value in params.items():
            f = fisher[name]
            if name not in self.importance:
                self.importance[name], self.anchor[name] = f.clone(), value.clone()
                continue
            a, p = self.importance[name], self.anchor[name]
            total = a + f
            positive = total > 0
            safe = torch.where(positive, total, torch.ones_like(total))
            offset += float(torch.where(positive, a * f / safe * (p - value) ** 2, 0.0).sum(dtype=torch.float64))
            self.anchor[name] = torch.where(positive, (a * p + f * value) / safe, value)
            self.importance[name] = total
        self.offset += offset

    def fisher(self, session) -> dict[str, torch.Tensor]:
        """Diagonal Fisher information of the current task, per trained parameter (name →
        tensor of the parameter's shape): the mean over training samples x (the first
        ``ewc_fisher_samples``, unaugmented) of ``(d log p(y|x) / d theta)^2``, y the sample's
        label (``empirical``) or, weighted by p(y|x), every class (``true``). In eval mode (no
        dropout, BatchNorm's running statistics), so that every sample's gradient is its own.

        Per-sample squared gradients of an ``nn.Linear`` called once per forward pass come from
        one backward pass of the batch: for a sample, d/dW = g a^T (g the gradient at the layer's
        output, a its input), so the batch's sum of squares is (g^2)^T (a^2) (Goodfellow,
        "Efficient per-example gradient computations", 2015). Every other parameter's per-sample
        gradients come from ``torch.func.vmap``."""
        net, t = session.net, session.t
        trained = dict(self._trained)
        linears = {name: m for name, m in net.named_modules() if type(m) is nn.Linear
                   and any(p is trained.get(f"{name}.{k}") for k, p in m.named_parameters(recurse=False))}
        total = {name: torch.zeros_like(p) for name, p in trained.items()}
        limit = self.config.ewc_fisher_samples
        seen = 0
        was_training = net.training
        net.eval()
        try:
            for x, y, _ in session.batches(shuffle=False, batch_size=session.config.eval_batch_size):
                if limit is not None:
                    x, y = x[: limit - seen], y[: limit - seen]
                if seen == 0:  # a layer called twice per forward pass mixes two inputs in one gradient
                    linears = {n: m for n, m in linears.items() if _calls(net, m, x[:1], t) == 1}
                if self.config.ewc_fisher == "empirical":
                    targets = [(y, None)]
                else:
                    with torch.no_grad():
                        probs = F.softmax(net(x, t), -1)
                    targets = [(torch.full_like(y, c), probs[:, c]) for c in range(probs.shape[1])]
                done = _linear_squares(net, t, linears, x, targets, total)
                rest = {name: p.detach() for name, p in trained.items() if name not in done}
                if rest:
                    _vmap_squares(net, t, rest, x, targets, total)
                seen += len(y)
                if limit is not None and seen >= limit:
                    break
        finally:
            net.train(was_training)
        return {name: f / seen for name, f in total.items()}


def _calls(net, module: nn.Module, x: torch.Tensor, t: int) -> int:
    """How many times ``module`` runs in one forward pass of task ``t``."""
    count = [0]
    handle = module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        handle.remove()
    return count[0]


def _linear_squares(net, t: int, linears: dict[str, nn.Module], x: torch.Tensor, targets, total) -> set[str]:
    """Add the batch's summed per-sample squared gradients of the ``linears``' weights and
    biases to ``total``; ``targets``: ``(labels (N,), weight (N,) or None)`` pairs, each a
    gradient of sum_n sqrt(weight_n) log p(label_n | x_n). Returns the names it filled."""
    if not linears:
        return set()
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inputs, out, name=name: seen.append((name, inputs[0].detach(), out)))
             for name, m in linears.items()]
    try:
        logp = F.log_softmax(net(x, t), -1)
    finally:
        for h in hooks:
            h.remove()
    for i, (labels, weight) in enumerate(targets):
        picked = logp.gather(1, labels.unsqueeze(1))[:, 0]
        if weight is not None:
            picked = picked * weight.sqrt()
        grads = torch.autograd.grad(picked.sum(), [out for _, _, out in seen], retain_graph=i < len(targets) - 1)
        for (name, a, _), g in zip(seen, grads):
            module = linears[name]
            if g.dim() == 2:
                w_sq, b_sq = (g * g).T @ (a * a), (g * g).sum(0)
            else:  # (N, ..., features): a sample's gradient sums over its positions
                per_sample = torch.einsum("n...o,n...i->noi", g, a)
                w_sq, b_sq = (per_sample * per_sample).sum(0), (g.flatten(1, -2).sum(1) ** 2).sum(0)
            if f"{name}.weight" in total:
                total[f"{name}.weight"] += w_sq
            if module.bias is not None and f"{name}.bias" in total:
                total[f"{name}.bias"] += b_sq
    return {f"{name}.{k}" for name, m in linears.items() for k, _ in m.named_parameters(recurse=False)}


def _vmap_squares(net, t: int, params: dict[str, torch.Tensor], x: torch.Tensor, targets, total) -> None:
    """As ``_linear_squares`` for ``params`` (name → detached tensor), from per-sample gradients
    by ``torch.func.vmap``, at most ``_PER_SAMPLE_BYTES`` of gradients at a time."""
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, _PER_SAMPLE_BYTES // (4 * max(numel, 1)))

    def log_prob(theta, sample, label):
        logits = functional_call(net, theta, (sample.unsqueeze(0), t))[0]
        return F.log_softmax(logits, -1).gather(0, label.unsqueeze(0))[0]

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    for labels, weight in targets:
        for start in range(0, len(x), chunk):
            part = slice(start, start + chunk)
            for name, g in per_sample(params, x[part], labels[part]).items():
                sq = g * g
                if weight is not None:
                    sq = sq * weight[part].view(-1, *([1] * (sq.dim() - 1)))
                total[name] += sq.sum(0)
