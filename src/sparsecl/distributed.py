"""Data-parallel training with PyTorch's ``DistributedDataParallel``, launched by ``torchrun``.

Every process (rank) holds the whole network, the method and the ledger. Training batches are
split between ranks with a ``DistributedSampler`` and DDP all-reduces (averages) the gradients,
so every rank takes the same optimizer step and the parameters stay bitwise equal. Everything
else a method does between training steps (scoring, pruning, the θ scan, re-initialization)
runs on every rank on the same data from the same state with the same seeded generators, so the
decisions are identical by construction; the trainer checks it after every task with a checksum
of the network, the method's state and the ledger across ranks (``check_identical``). BatchNorm
statistics: rank 0's are authoritative (broadcast to every rank after every epoch).

Evaluation is sharded without padding (each rank measures a contiguous slice of the test set and
the correct counts are summed), so no sample is counted twice.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .errors import ConfigError, SparseCLError

BACKENDS = ("gloo", "nccl")


class DistributedStateError(SparseCLError, RuntimeError):
    """Ranks of a data-parallel run hold different networks, ledgers or method states."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: ``rank`` of ``size`` processes; collective
    operations use tensors on ``device`` (the CPU for gloo, this rank's GPU for nccl)."""

    rank: int
    size: int
    device: str = "cpu"
    local_rank: int = 0  # the rank within this machine (torchrun's LOCAL_RANK)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and plots."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment carries torchrun's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def init_from_env(device: str, backend: str | None = None) -> tuple[World | None, str]:
    """Join the process group that ``torchrun`` set up, when it did.

    ``device``: the run's ``--device``; under torchrun a CUDA device becomes this rank's GPU
    (``cuda:LOCAL_RANK``). ``backend``: ``gloo`` or ``nccl``; ``None`` picks nccl for CUDA and gloo
    for the CPU. Returns ``(world, device)``; ``world`` is ``None`` outside torchrun or with one
    process (then nothing is initialized and training is the plain single-process loop).

    Raises:
        ConfigError: ``backend`` is given outside torchrun, is unknown, or nccl is asked for a
            CPU run.
    """
    if not launched_by_torchrun():
        if backend is not None:
            raise ConfigError(f"--dist-backend {backend} needs a launch by torchrun "
                              "(torchrun --nproc_per_node=N -m sparsecl run ...)")
        return None, device
    size, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in BACKENDS:
        raise ConfigError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "nccl" and not cuda:
        raise ConfigError("--dist-backend nccl needs --device cuda; use gloo on the CPU")
    if size == 1:
        return None, device
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, device if backend == "nccl" else "cpu", local_rank), device


def shutdown(world: World | None, meet: bool = True) -> None:
    """Leave the process group (call once at the end of a torchrun launch).

    The ranks meet at a barrier first: a gloo rank that tears its group down while its peer
    still has a collective or a connection in flight can abort the peer (SIGABRT,
    "terminate called without an active exception"). ``meet=False`` skips the barrier, for a
    rank leaving on an error (its peers may never reach it)."""
    if world is not None and dist.is_initialized():
        # DDP wrappers left from the tasks (reference cycles) are freed while their group lives,
        # not by the interpreter's teardown after it is gone
        gc.collect()
        if meet:
            dist.barrier()
        dist.destroy_process_group()


def barrier(world: World | None) -> None:
    if world is not None:
        dist.barrier()


def local_batch_size(batch_size: int, world: World) -> int:
    """Each rank's share of a global batch of ``batch_size`` samples.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the number of processes.
    """
    if batch_size % world.size:
        raise ConfigError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                          f"number of processes ({world.size})")
    return batch_size // world.size


def sampler_indices(n: int, world: World, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sample indices for one shuffled pass over ``n`` samples, from a
    ``DistributedSampler`` seeded with ``seed`` at ``epoch``, and a bool mask of the indices
    that are real (the sampler repeats up to ``size - 1`` samples so that every rank gets
    ``ceil(n / size)``; the repeats train, and are left out of the epoch's sample and correct
    counts, though not out of each rank's mean batch loss).

    Rank r's k-th batch of ``b`` indices holds positions ``k·b·size + r + j·size`` of the
    sampler's permutation: the ranks' k-th batches together are the permutation's k-th global
    batch, as in a single process with the same permutation."""
    sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler), dtype=torch.long)
    positions = torch.arange(len(indices)) * world.size + world.rank  # positions in the padded permutation
    return indices, positions < n


def shard(n: int, world: World) -> slice:
    """This rank's contiguous slice of ``n`` samples for evaluation; the slices of all ranks
    cover ``0 .. n - 1`` once each (no padding, so nothing is counted twice)."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (a new tensor on ``values``' device)."""
    out = values.detach().to(world.device, copy=True)
    dist.all_reduce(out)
    return out.to(values.device)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, world: World) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank: during an epoch each rank
    updates its statistics from its own batches."""
    for buf in module.buffers():
        staged = buf.to(world.device, _WIRE_DTYPES.get(buf.dtype, buf.dtype))
        dist.broadcast(staged, 0)
        if staged is not buf:
            buf.copy_(staged)


#: Buffer dtypes a process group backend cannot send (gloo refuses int16: weight-level owner
#: ids), sent as a wider dtype that holds every value.
_WIRE_DTYPES = {torch.int16: torch.int32}


def wrap(module: nn.Module) -> DistributedDataParallel:
    """``module`` under DDP. ``find_unused_parameters``: a training step reads the current
    task's head (joint training: the heads of the tasks in the batch) and never the others.
    Buffers are synchronized when the wrapper is built, not before every forward pass (the
    per-task masks and owner ids of weight-level methods would travel every step): training
    normalizes with batch statistics, and the trainer broadcasts rank 0's buffers after every
    epoch."""
    # DDP's start-up broadcast cannot send int16 buffers (owner ids) over gloo: it skips them;
    # every rank computes them alike (checked by the trainer after every task), and
    # broadcast_buffers sends them as int32 after every epoch
    unsendable = [name for name, buf in module.named_buffers() if buf.dtype in _WIRE_DTYPES]
    if unsendable:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, unsendable)
    return DistributedDataParallel(module, find_unused_parameters=True, forward_sync_buffers=False)


def state_checksum(tensors: dict[str, torch.Tensor], meta: object = None) -> str:
    """SHA-256 (hex) of named tensors (names, dtypes, shapes and bytes, in name order) and of
    JSON-serializable ``meta``: equal on two ranks iff their states are bitwise equal.

    Wall-clock measurements in ``meta`` (keys ``seconds`` or ending in ``_seconds``, e.g. a
    method's log of how long each task took) are left out: each rank measures its own clock, and
    they decide nothing."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(_without_timings(meta), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _without_timings(meta: object) -> object:
    """``meta`` without the values of its keys ``seconds`` / ``*_seconds``, at any depth."""
    if isinstance(meta, dict):
        return {k: _without_timings(v) for k, v in meta.items()
                if not (isinstance(k, str) and (k == "seconds" or k.endswith("_seconds")))}
    if isinstance(meta, (list, tuple)):
        return [_without_timings(v) for v in meta]
    return meta


def check_identical(checksum: str, world: World, what: str) -> list[str]:
    """Gather every rank's ``checksum`` of ``what`` and return them (rank order).

    Raises:
        DistributedStateError: the ranks differ; the message names the ranks that differ from
            rank 0.
    """
    gathered: list[str | None] = [None] * world.size
    dist.all_gather_object(gathered, checksum)
    differ = [r for r, c in enumerate(gathered) if c != gathered[0]]
    if differ:
        raise DistributedStateError(f"{what}: ranks {differ} hold a different state from rank 0 "
                                    f"(checksums {[c[:12] for c in gathered]}); the data-parallel ranks diverged")
    return gathered
