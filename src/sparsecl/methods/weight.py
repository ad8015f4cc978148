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


def largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (``values``' shape) of exactly ``k`` entries of largest value: every entry in
    the mask is ≥ every entry outside it. Among values tied at the cut the lowest row-major
    indices are taken on the CPU; on other devices ``torch.topk`` picks.

    Without ties at the cut this is the set ``torch.topk`` selects. On the CPU it is found
    faster on the layers of millions of weights whose masks WSN recomputes at every forward
    (2 threads: about 1.5× at 1.6 M entries, 2.5× at 4 M). The k-th largest value is found by
    ``kthvalue`` within a narrow band of values bracketed by a strided sample, and the bracket
    is checked by exact counts (the whole tensor's ``kthvalue`` when it misses).

    Raises:
        ValueError: ``k`` is not in ``0 .. values.numel()``, or (on the CPU) a value is NaN.
    """
    flat = values.detach().flatten()
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} entries")
    if flat.device.type != "cpu":  # topk is fast there, and counting would synchronize
        return mask_of(torch.topk(flat, k, sorted=False).indices, values)
    if flat.is_floating_point() and bool(flat.isnan().any()):
        raise ValueError(f"cannot rank {n} entries of which some are NaN")
    if k in (0, n):
        return torch.full_like(values, k == n, dtype=torch.bool)
    cut = _kth_largest(flat, k)
    mask = flat > cut
    missing = k - int(mask.sum())
    if missing:  # ties at the cut: the first ones
        mask[(flat == cut).nonzero().squeeze(1)[:missing]] = True
    return mask.view_as(values)


def _kth_largest(flat: torch.Tensor, k: int, sample_size: int = 16384) -> torch.Tensor:
    """The k-th largest entry of 1-D ``flat`` (0 < k < numel), as a 0-d tensor."""
    n = flat.numel()
    stride = n // sample_size
    if stride >= 8:
        sample = flat[::stride].sort(descending=True).values
        m = sample.numel()
        rank = k * m / n  # where the cut falls in the sample, from the top
        slack = 4 * math.sqrt(rank * (1 - rank / m)) + 8  # binomial spread, with room
        high = sample[max(0, math.floor(rank - slack) - 1)]
        low = sample[min(m - 1, math.ceil(rank + slack) - 1)]
        above = int((flat > high).sum())
        if above < k:  # the cut is ≤ high ...
            band = flat[(flat >= low) & (flat <= high)]
            need = k - above
            if need <= band.numel():  # ... and ≥ low: it is the need-th largest of the band
                return band.kthvalue(band.numel() - need + 1).values
    return flat.kthvalue(n - k + 1).values
