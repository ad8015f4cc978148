"""In-memory task and benchmark containers shared by the readers, the trainer and the methods."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError


@functools.lru_cache(maxsize=32)
def _channel_stats(stats: tuple[float, ...], dtype: torch.dtype, device: str, ndim: int) -> torch.Tensor:
    """``stats`` shaped ``(C, 1, ..., 1)`` to broadcast over the channel axis of an ``ndim``-D batch,
    as ``dtype`` on ``device``; made once per combination."""
    return torch.tensor(stats, dtype=dtype, device=device).view((-1,) + (1,) * (ndim - 2))


@dataclass(frozen=True)
class TaskData:
    """One task of a continual-learning benchmark, held in memory.

    Images are ``uint8`` tensors of shape ``(N, C, H, W)`` with pixel values 0..255 or ``float32``
    tensors already scaled to [0, 1]; :meth:`prepare` turns a batch of them into the network's input.
    Labels are ``int64`` of shape ``(N,)`` holding *task-local* class indices
    ``0 .. num_classes - 1``; ``classes[k]`` is the original dataset label of local class ``k``.

    ``normalize``: ``None`` (inputs are the [0, 1] pixels), or ``(mean, std)``, one value per
    channel of the [0, 1]-scaled pixels, subtracted and divided by :meth:`prepare`. ``augment``:
    whether the trainer applies random crop + horizontal flip
    (:func:`sparsecl.data.augment.random_crop_flip`) to this task's *training* batches.
    """

    task_id: int
    name: str
    classes: tuple[int, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    augment: bool = False

    def __post_init__(self) -> None:
        if self.normalize is None:
            return
        try:
            mean, std = self.normalize
            mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        except (TypeError, ValueError):
            raise ConfigError(
                f"task '{self.name}': normalize must be None or (mean, std), two sequences of numbers "
                f"with one value per channel; got {self.normalize!r}"
            ) from None
        channels = self.train_x.shape[1] if self.train_x.dim() >= 2 else None
        if len(mean) != len(std) or not mean or (channels is not None and len(mean) != channels):
            raise ConfigError(
                f"task '{self.name}': normalize needs one mean and one std per channel "
                f"({channels} channels), got {len(mean)} means and {len(std)} stds"
            )
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ConfigError(
                f"task '{self.name}': normalize needs finite means and positive stds, got {self.normalize!r}"
            )
        object.__setattr__(self, "normalize", (mean, std))  # plain tuples of floats, comparable and JSON-able

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A stored batch ``(N, C, H, W)`` as the network's input, on ``x``'s device: ``uint8``
        pixels are divided by 255 into ``float32`` (float input is taken as already scaled), then,
        when ``normalize`` is set, each channel ``c`` becomes ``(x[:, c] - mean[c]) / std[c]``.
        With ``normalize=None`` float input is returned as it is (not copied); ``x`` itself is never
        modified.

        Raises:
            ConfigError: ``normalize`` is set and ``x`` does not have one channel per value.
        """
        fresh = x.dtype == torch.uint8
        if fresh:
            x = x.float().div_(255.0)
        if self.normalize is None:
            return x
        mean, std = self.normalize
        if x.dim() < 2 or x.shape[1] != len(mean):
            raise ConfigError(
                f"task '{self.name}': normalize has {len(mean)} channels but the batch has shape "
                f"{tuple(x.shape)}; expected (N, {len(mean)}, H, W)"
            )
        m, s = (_channel_stats(v, x.dtype, str(x.device), x.dim()) for v in (mean, std))
        return x.sub_(m).div_(s) if fresh else (x - m) / s


@dataclass(frozen=True)
class Benchmark:
    """An ordered stream of tasks plus what is needed to reproduce it (``info``: seed, class order,
    whether the first permuted-MNIST task is permuted, sizes...)."""

    name: str
    tasks: list[TaskData]
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)
