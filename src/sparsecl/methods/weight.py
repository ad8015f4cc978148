"""Weight-level isolation: the part shared by PackNet, WSN and DST-CL.

Rules, for every masked parameter (every trainable weight of the body with at least 2 dimensions:
Linear, convolution, attention projection, embedding and custom weights; ``sparsecl.subnetworks``),
while task t trains:

* weights owned by earlier tasks are frozen: the freezer writes their values back after every
  optimizer step (gradient masking alone would let weight decay and momentum move them);
* free weights train where the method's effective weight lets a gradient through;
* task t's biases, normalization parameters and statistics, other per-task tensors and head are
  its own (earlier tasks' are not handed to the optimizer and never run in train mode again).

When t ends the method names the weights t uses; the free ones among them become t's. Task i
evaluates with ``where(mask_i, weight, 0)``: every weight it reads is frozen, so its logits
cannot move.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator

import torch
from torch import nn

from ..errors import CheckpointError
from ..freeze import Freezer
from ..ledger import FREE
from ..storage import mask_storage_bits
from ..subnetworks import MAX_TASKS
from .base import Method


class WeightIsolation(Method):
    """Base of the weight-level methods. Subclasses implement ``start_task`` (choose the task's
    first active weights), ``effective`` (layer i's weight in the training forward pass),
    ``train_task`` and ``used`` (the weights the finished task uses)."""

    isolates = True
    features_per_task = True
    #: owner ids are int16 (``sparsecl.subnetworks``): the longest task stream one model holds
    max_tasks: ClassVar[int | None] = MAX_TASKS
    #: "owner": task t uses the weights of tasks <= t (PackNet); "masks": a stored mask per task
    mode: ClassVar[str] = "owner"

    def __init__(self) -> None:
        self.freezer = Freezer()
        self.log: list[dict] = []
        #: (task, layer index) → sorted codebook of the task's weights in that layer, for the
        #: compact file (``sparsecl.compact``); empty unless the method quantizes (TinySubNets)
        self.codebooks: dict[tuple[int, int], torch.Tensor] = {}

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self, net) -> None:
        net.install_subnetworks(self.mode)

    def begin_task(self, net, t: int, task) -> None:
        sub = net.subnetworks
        with torch.no_grad():  # the method's own parameters follow the network (restored on the CPU, moved later)
            for p in self.own_parameters():
                p.data = p.data.to(net._head_like.device)
        self.freezer.clear()
        for i in range(len(sub.layers)):
            self.freezer.fix_entries(self.weight(net, i), sub.owner(i) != FREE)
        self.start_task(net, t)
        sub.begin_training(t, self.effective)

    def parameters(self, net, t: int) -> Iterator[nn.Parameter]:
        sub = net.subnetworks
        for i in range(len(sub.layers)):
            yield self.weight(net, i)
        yield from sub.tasks[t].parameters()
        yield from net.head_parameters(t)
        yield from self.own_parameters()

    def after_step(self, net) -> None:
        self.freezer.restore()

    def end_task(self, session) -> None:
        net, t = session.net, session.t
        used = self.used(net, t)
        sub = net.subnetworks
        sub.end_training()
        sub.commit(t, used)
        self.freezer.clear()
        entry = {"task": t, "used": sum(int(u.sum()) for u in used),
                 "new": sum(int((sub.owner(i) == t).sum()) for i in range(len(used))),
                 "weights": sum(u.numel() for u in used)}
        self.log.append({**entry, **self.task_log(net, t)})

    # ---- for subclasses ----------------------------------------------------------------------
    @staticmethod
    def weight(net, i: int) -> nn.Parameter:
        return net.subnetworks.weight(net.body, i)

    @staticmethod
    def smallest(weight: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
        """Bool mask (``weight``'s shape) of the ``k`` entries of bool mask ``among`` with the
        smallest ``|weight|``: what PackNet, TinySubNets and DST drop."""
        magnitude = torch.where(among, weight.abs(), torch.inf).flatten()
        return mask_of(torch.topk(magnitude, k, largest=False).indices, weight)

    @staticmethod
    def free(net, i: int) -> torch.Tensor:
        """Bool mask of layer i's weights no task owns (trainable now)."""
        return net.subnetworks.owner(i) == FREE

    def start_task(self, net, t: int) -> None:
        raise NotImplementedError

    def effective(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def used(self, net, t: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def task_log(self, net, t: int) -> dict:
        """Extra entries of the method log for task t."""
        return {}

    # ---- reports -----------------------------------------------------------------------------
    def capacity(self, net) -> dict[str, float]:
        """Per masked layer, the fraction of weights owned by some task."""
        sub = net.subnetworks
        return {name: float((sub.owner(i) != FREE).float().mean()) for i, name in enumerate(sub.layers)}

    def reuse(self, net) -> dict[str, dict[str, int]]:
        """Per masked layer, for the task just ended: ``weights``, ``owned`` (its new weights),
        ``free`` (weights left), ``used`` (weights its subnetwork reads) and ``reused`` (earlier
        tasks' frozen weights it reads)."""
        sub, t = net.subnetworks, net.num_tasks - 1
        out = {}
        for i, name in enumerate(sub.layers):
            owner, mask = sub.owner(i), sub.mask(t, i)
            out[name] = {"weights": owner.numel(), "owned": int((owner == t).sum()), "free": int((owner == FREE).sum()),
                         "used": int(mask.sum()), "reused": int((mask & (owner >= 0) & (owner < t)).sum())}
        return out

    def storage(self, net) -> dict[str, float]:
        """Bits per masked weight to run every task so far: owner ids (owner mode) or the
        tasks' masks (masks mode), raw and entropy-coded (``storage.mask_storage_bits``)."""
        sub, T = net.subnetworks, net.num_tasks
        totals = {"raw_bits": 0, "coded_bits": 0, "stored_bits": 0, "entropy_bits": 0.0}
        n = 0
        for i in range(len(sub.layers)):
            if sub.mode == "owner":
                bits = mask_storage_bits(owner=sub.owner(i), num_tasks=T)
            else:
                bits = mask_storage_bits(masks=[sub.mask(t, i) for t in range(T)])
            for key in totals:
                totals[key] += bits[key]
            n += bits["weights"]
        return {key.removesuffix("_bits"): value / n for key, value in totals.items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The ledger and masks are the network's (``net.subnetworks``); here: the method's own
        parameters and its log."""
        return {f"own.{i}": p.detach() for i, p in enumerate(self.own_parameters())}, {"log": self.log}

    def load_state(self, net, tensors, meta) -> None:
        """Raises ``CheckpointError`` when the saved parameters do not fit."""
        with torch.no_grad():
            for i, p in enumerate(self.own_parameters()):
                saved = tensors.get(f"own.{i}")
                if saved is None or saved.shape != p.shape:
                    got = "missing" if saved is None else f"of shape {tuple(saved.shape)}"
                    raise CheckpointError(f"the checkpoint's {self.name} parameter own.{i} is {got}; "
                                          f"expected shape {tuple(p.shape)}")
                p.copy_(saved)
        self.log = list(meta.get("log", []))


def mask_of(flat_indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bool mask of ``like``'s shape with the entries at row-major ``flat_indices`` set."""
    out = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    out[flat_indices] = True
    return out.view(like.shape)


def largest(values: torch.Tensor, k: int, bracket: tuple[float, float] | None = None) -> torch.Tensor:
    """Bool mask (``values``' shape) of exactly ``k`` entries of largest value: every entry in
    the mask is ≥ every entry outside it. Among values tied at the cut the lowest row-major
    indices are taken on the CPU; on other devices ``torch.topk`` picks.

    Without ties at the cut this is the set ``torch.topk`` selects. On the CPU it is found
    faster on the layers of millions of weights whose masks WSN recomputes at every forward:
    the k-th largest value is found by ``kthvalue`` within a narrow band ``[lo, hi]`` of values,
    checked by exact counts: ``bracket`` when given (``TopSelection`` passes one around the
    previous step's cut), else one read off a strided sample; the whole tensor's ``kthvalue``
    when both miss. The bracket changes the cost, never the mask.

    Raises:
        ValueError: ``k`` is not in ``0 .. values.numel()``, or (on the CPU) a value is NaN.
    """
    return _largest(values, k, bracket)[0]


class TopSelection:
    """Exact top-k masks of a tensor that moves a little between calls (WSN's scores after each
    optimizer step): each call brackets the cut around the previous call's and widens the
    bracket when the cut moves (``largest``, which verifies the bracket by exact counts and
    falls back when it misses, so that the mask never depends on this state)."""

    def __init__(self) -> None:
        self.cut: float | None = None
        self.width = 0.0

    def __call__(self, values: torch.Tensor, k: int) -> torch.Tensor:
        bracket = None
        if self.cut is not None and self.width > 0:
            bracket = (self.cut - self.width, self.cut + self.width)
        mask, cut, hit = _largest(values, k, bracket)
        if cut is None or not math.isfinite(cut):  # nothing to track (k = 0 or numel, not on the CPU, ±inf)
            self.cut, self.width = None, 0.0
            return mask
        if self.cut is not None:
            moved = abs(cut - self.cut)
            # room for a few steps' drift; shrinks geometrically while the cut stands still
            self.width = max(4 * moved, self.width / 2) if hit else max(8 * self.width, 8 * moved)
        if not 0 < self.width < math.inf:
            self.width = max(abs(cut) * 1e-4, 1e-30)
        self.cut = cut
        return mask


def _largest(values: torch.Tensor, k: int,
             bracket: tuple[float, float] | None) -> tuple[torch.Tensor, float | None, bool]:
    """``largest``'s mask, the cut (the k-th largest value; None when nothing is ranked) and
    whether ``bracket`` held it."""
    flat = values.detach().flatten()
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} entries")
    if flat.device.type != "cpu":  # topk is fast there, and counting would synchronize
        return mask_of(torch.topk(flat, k, sorted=False).indices, values), None, False
    if k in (0, n):
        if flat.is_floating_point() and bool(flat.isnan().any()):
            raise ValueError(f"cannot rank {n} entries of which some are NaN")
        return torch.full_like(values, k == n, dtype=torch.bool), None, False
    if bracket is not None:
        found = _band_select(flat, k, *bracket)
        if found is not None:
            return found[0].view_as(values), found[1], True
    sampled = _sample_bracket(flat, k)
    if sampled is not None:
        found = _band_select(flat, k, *sampled)
        if found is not None:
            return found[0].view_as(values), found[1], False
    # every entry is in the band: one kthvalue over the whole tensor
    found = _band_select(flat, k, -math.inf, math.inf)
    assert found is not None
    return found[0].view_as(values), found[1], False


def _sample_bracket(flat: torch.Tensor, k: int, sample_size: int = 16384) -> tuple[float, float] | None:
    """A bracket ``(lo, hi)`` likely to hold the k-th largest of 1-D ``flat``, read off a
    strided sample (None for a tensor too small to sample)."""
    n = flat.numel()
    stride = n // sample_size
    if stride < 8:
        return None
    sample = flat[::stride].sort(descending=True).values
    m = sample.numel()
    rank = k * m / n  # where the cut falls in the sample, from the top
    slack = 4 * math.sqrt(rank * (1 - rank / m)) + 8  # binomial spread, with room
    high = float(sample[max(0, math.floor(rank - slack) - 1)])
    low = float(sample[min(m - 1, math.ceil(rank + slack) - 1)])
    if not low <= high:  # a NaN in the sample: the band finds and reports it
        return -math.inf, math.inf
    return low, high


def _band_select(flat: torch.Tensor, k: int, lo: float, hi: float) -> tuple[torch.Tensor, float] | None:
    """Exactly ``largest(flat, k)`` and the cut, when the cut lies in ``[lo, hi]``; else None.

    Entries above ``hi`` are all in the mask; the band (entries neither below ``lo`` nor above
    ``hi``, hence also every NaN) is gathered, and the rest of the mask is chosen in it. Costs
    three comparisons over the whole tensor and work proportional to the band.

    Raises:
        ValueError: a value is NaN (every NaN falls in the band).
    """
    above = flat > hi
    n_above = int(torch.count_nonzero(above))
    if n_above >= k:  # the cut is above hi (checked before NaN: a NaN anywhere is found below)
        if not bool(flat.isnan().any()):
            return None
        raise ValueError(f"cannot rank {flat.numel()} entries of which some are NaN")
    band = torch.lt(flat, lo).logical_or_(above).logical_not_()
    idx = band.nonzero().squeeze(1)  # ascending: ties are taken first-index first
    vals = flat[idx]
    if vals.is_floating_point() and bool(vals.isnan().any()):
        raise ValueError(f"cannot rank {flat.numel()} entries of which some are NaN")
    need = k - n_above
    if need > vals.numel():  # the cut is below lo
        return None
    cut = vals.kthvalue(vals.numel() - need + 1).values
    taken = vals > cut
    ties = (vals == cut).nonzero().squeeze(1)[:need - int(torch.count_nonzero(taken))]
    above[idx[taken]] = True
    above[idx[ties]] = True
    return above, float(cut)
