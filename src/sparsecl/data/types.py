"""In-memory task and benchmark containers shared by the readers, the trainer and the methods."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence, overload

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
class TaskHeader:
    """What is known of a task without building its tensors: id, name, classes, input pipeline."""

    task_id: int
    name: str
    classes: tuple[int, ...]
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    augment: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def header_of(task: TaskData) -> TaskHeader:
    return TaskHeader(task.task_id, task.name, task.classes, task.normalize, task.augment)


class _Source:
    """The builder of a lazy task list and the cache of the tasks it built last."""

    def __init__(self, build: Callable[[int], TaskData], header: Callable[[int], TaskHeader], cache: int):
        self.build, self.header, self.size = build, header, cache
        self.cache: OrderedDict[int, TaskData] = OrderedDict()

    def get(self, i: int) -> TaskData:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        task = self.build(i)
        self.cache[i] = task
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return task


class LazyTasks(Sequence[TaskData]):
    """A benchmark's task list whose tasks are built when accessed (``build(i)``), so that a long
    stream (10,000 Permuted-MNIST tasks) does not hold every task's images at once: only the
    ``cache`` tasks accessed last are kept (plus those a caller holds). ``header(i)`` tells a
    task's id, classes and input pipeline without building it. Slices are lazy views."""

    def __init__(self, length: int, build: Callable[[int], TaskData],
                 header: Callable[[int], TaskHeader] | None = None, cache: int = 2,
                 _source: _Source | None = None, _indices: range | None = None):
        self._source = _source or _Source(build, header or (lambda i: header_of(build(i))), cache)
        self._indices = range(length) if _indices is None else _indices

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, i: int) -> TaskData: ...
    @overload
    def __getitem__(self, i: slice) -> "LazyTasks": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyTasks(0, self._source.build, _source=self._source, _indices=self._indices[i])
        return self._source.get(self._indices[i])

    def __iter__(self) -> Iterator[TaskData]:
        for i in self._indices:
            yield self._source.get(i)

    def header(self, i: int) -> TaskHeader:
        return self._source.header(self._indices[i])

    def __repr__(self) -> str:
        return f"LazyTasks({len(self)} tasks)"

    @staticmethod
    def concat(parts: Sequence[Sequence[TaskData]]) -> "list[TaskData] | LazyTasks":
        """The tasks of ``parts`` one after another, renumbered ``0..T-1``: a plain list when every
        part is one, else a lazy list."""
        if not any(isinstance(p, LazyTasks) for p in parts):
            out: list[TaskData] = []
            for p in parts:
                out += [replace(task, task_id=len(out) + i) for i, task in enumerate(p)]
            return out
        starts, total = [], 0
        for p in parts:
            starts.append(total)
            total += len(p)

        def where(i: int) -> tuple[Sequence[TaskData], int]:
            k = max(j for j, s in enumerate(starts) if s <= i)
            return parts[k], i - starts[k]

        def build(i: int) -> TaskData:
            p, j = where(i)
            return replace(p[j], task_id=i)

        def header(i: int) -> TaskHeader:
            p, j = where(i)
            return replace(task_header(p, j), task_id=i)

        return LazyTasks(total, build, header)


def task_header(tasks: Sequence[TaskData], i: int) -> TaskHeader:
    """Task ``i``'s header, without building it when ``tasks`` is lazy."""
    return tasks.header(i) if isinstance(tasks, LazyTasks) else header_of(tasks[i])


@dataclass(frozen=True)
class Benchmark:
    """An ordered stream of tasks plus what is needed to reproduce it (``info``: seed, class order,
    whether the first permuted-MNIST task is permuted, sizes...)."""

    name: str
    tasks: Sequence[TaskData]  # a list, or a LazyTasks that builds each task when accessed
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)
