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


#: Bytes of split tensors (e.g. every task's test set) a lazy task list keeps besides its cached
#: tasks, so that re-evaluating earlier tasks does not rebuild them (:meth:`LazyTasks.split`).
SPLIT_CACHE_BYTES = 512 * 2**20


class _Source:
    """The builder of a lazy task list, the cache of the tasks it built last, and the cache of
    single splits (:meth:`LazyTasks.split`)."""

    def __init__(self, build: Callable[[int], TaskData], header: Callable[[int], TaskHeader], cache: int,
                 split: Callable[[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 split_cache_bytes: int = SPLIT_CACHE_BYTES):
        self.build, self.header, self.size = build, header, cache
        self.cache: OrderedDict[int, TaskData] = OrderedDict()
        self.build_split, self.split_budget = split, split_cache_bytes
        self.splits: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.split_bytes = 0

    def get(self, i: int) -> TaskData:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        task = self.build(i)
        self.cache[i] = task
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return task

    def split(self, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (i, name)
        if key in self.splits:
            return self.splits[key]
        if i in self.cache or self.build_split is None:
            task = self.get(i)
            xy = (getattr(task, f"{name}_x"), getattr(task, f"{name}_y"))
        else:
            xy = self.build_split(i, name)
        size = sum(t.numel() * t.element_size() for t in xy)
        # Keep the first splits that fit and never evict: an evaluation pass reads the tasks in
        # the same order every time, which an LRU cache smaller than the stream would always miss.
        if self.split_bytes + size <= self.split_budget:
            self.splits[key] = xy
            self.split_bytes += size
        return xy


class LazyTasks(Sequence[TaskData]):
    """A benchmark's task list whose tasks are built when accessed (``build(i)``), so that a long
    stream (10,000 Permuted-MNIST tasks) does not hold every task's images at once: only the
    ``cache`` tasks accessed last are kept (plus those a caller holds). ``header(i)`` tells a
    task's id, classes and input pipeline without building it. Slices are lazy views.

    ``split(i, name)`` derives one split of task ``i`` (``"train"``, ``"val"`` or ``"test"``:
    ``(x, y)`` as the built task would hold them) without building the whole task, e.g. a
    permuted task's test set from its permutation; without it, :meth:`split` builds the task.
    Splits read through :meth:`split` are kept up to ``split_cache_bytes`` in all (the first that
    fit), so re-evaluating every earlier task after every task derives each test set once."""

    def __init__(self, length: int, build: Callable[[int], TaskData],
                 header: Callable[[int], TaskHeader] | None = None, cache: int = 2,
                 split: Callable[[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 split_cache_bytes: int = SPLIT_CACHE_BYTES,
                 _source: _Source | None = None, _indices: range | None = None):
        self._source = _source or _Source(build, header or (lambda i: header_of(build(i))), cache, split,
                                          split_cache_bytes)
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

    def split(self, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of split ``name`` (``"train"``, ``"val"``, ``"test"``) of task ``i``, the
        tensors the built task holds (or equal ones), derived without building the task when the
        list has a split builder; kept in the split cache while it has room.

        Raises:
            ConfigError: ``name`` is not a split."""
        if name not in SPLITS:
            raise ConfigError(f"LazyTasks.split(name=...): must be one of {', '.join(SPLITS)}, got {name!r}")
        return self._source.split(self._indices[i], name)

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

        def split(i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
            p, j = where(i)
            return task_split(p, j, name)

        return LazyTasks(total, build, header, split=split, split_cache_bytes=0)  # the parts cache their splits


def normalization_record(normalize) -> list | None:
    """A task's ``TaskData.normalize`` as a checkpoint manifest or a compact file keeps it:
    ``[mean, std]`` lists, or ``None``."""
    return None if normalize is None else [list(normalize[0]), list(normalize[1])]


#: The splits of a task.
SPLITS = ("train", "val", "test")


def task_split(tasks: Sequence[TaskData], i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of split ``name`` of task ``i``, without building the task when ``tasks`` is
    lazy (:meth:`LazyTasks.split`)."""
    if isinstance(tasks, LazyTasks):
        return tasks.split(i, name)
    task = tasks[i]
    return getattr(task, f"{name}_x"), getattr(task, f"{name}_y")


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

    @classmethod
    def from_datasets(cls, tasks: Sequence[Any], name: str = "datasets", *, val_fraction: float = 0.1,
                      seed: int = 0, normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                      augment: bool = False) -> "Benchmark":
        """A benchmark of your own data: one entry of ``tasks`` per task, in order, each a dict
        ``{"train": ..., "test": ..., "val": ... (optional), "name": ... (optional)}`` or a tuple
        ``(train, test)`` / ``(train, val, test)``. A split is any map-style
        ``torch.utils.data.Dataset`` whose items are ``(x, y)`` (``x`` a tensor or array of the
        input shape, ``y`` an integer label), or a pair of tensors ``(x (N, ...), y (N,))``.

        The splits are read once into memory. Labels may be any integers: each task's classes
        (the sorted labels of its splits) become the task-local classes ``0 .. C-1`` of its head,
        the originals kept in ``TaskData.classes``. Without a ``val`` split, a seeded
        ``val_fraction`` of the training samples is held out for validation (``seed`` and the
        task's index draw it). Inputs: ``uint8`` pixels 0..255 are scaled to [0, 1] when a batch
        is prepared, floating-point inputs are used as they are, other integer inputs are
        converted to float32; ``normalize`` (``(mean, std)`` per channel) and ``augment``
        (random crop + flip of training batches, images only) apply to every task.

        Raises:
            ConfigError: a task or split of the wrong form, an item that is not ``(x, y)``,
                inputs of different shapes, an empty train or test split, or ``val_fraction``
                outside [0, 1); the message names the task and split (``tasks[1]['train']``).
        """
        if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
            raise ConfigError(f"Benchmark.from_datasets(val_fraction=...): must be in [0, 1), got {val_fraction!r}")
        if isinstance(tasks, (dict, str)) or len(tasks) == 0:
            raise ConfigError("Benchmark.from_datasets(tasks=...): expected a non-empty list with one entry per task")
        built: list[TaskData] = []
        for i, entry in enumerate(tasks):
            built.append(_task_from_splits(i, entry, val_fraction, seed, normalize, augment))
            if built[-1].train_x.shape[1:] != built[0].train_x.shape[1:]:
                raise ConfigError(f"Benchmark.from_datasets: tasks[{i}] has inputs of shape "
                                  f"{tuple(built[-1].train_x.shape[1:])}, tasks[0] of "
                                  f"{tuple(built[0].train_x.shape[1:])}; every task needs the same input shape")
        info = {"source": "datasets", "val_fraction": val_fraction, "seed": seed,
                "sizes": [{"train": len(t.train_y), "val": len(t.val_y), "test": len(t.test_y)} for t in built]}
        return cls(name, built, tuple(built[0].train_x.shape[1:]), info)


def _split_tensors(where: str, split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a split given as a pair of tensors or a map-style dataset of ``(x, y)`` items."""
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(t, torch.Tensor) for t in split):
        x, y = split
    else:
        if not (hasattr(split, "__len__") and hasattr(split, "__getitem__")):
            raise ConfigError(f"Benchmark.from_datasets: {where} must be a map-style torch Dataset (with __len__ "
                              f"and __getitem__) or a pair of tensors (x, y), got {type(split).__name__}")
        xs, ys = [], []
        for j in range(len(split)):
            item = split[j]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ConfigError(f"Benchmark.from_datasets: {where}[{j}] must be an (x, y) pair, got "
                                  f"{type(item).__name__}")
            xs.append(torch.as_tensor(item[0]))
            ys.append(int(item[1]))
        if not xs:
            return torch.empty(0), torch.empty(0, dtype=torch.int64)
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise ConfigError(f"Benchmark.from_datasets: the inputs of {where} have different shapes "
                              f"{sorted(shapes)[:3]}; every x must have the same shape")
        x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ConfigError(f"Benchmark.from_datasets: {where} must hold inputs x (N, ...) and labels y (N,), got "
                          f"shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ConfigError(f"Benchmark.from_datasets: the labels of {where} must be integers, got {y.dtype}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        x = x.float()
    return x, y.long()


def _task_from_splits(i: int, entry: Any, val_fraction: float, seed: int, normalize, augment: bool) -> TaskData:
    """Task ``i`` of :meth:`Benchmark.from_datasets`."""
    where = f"tasks[{i}]"
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"train", "val", "test", "name"})
        if unknown or "train" not in entry or "test" not in entry:
            raise ConfigError(f"Benchmark.from_datasets: {where} must have the keys 'train' and 'test' (and may have "
                              f"'val', 'name'); got {sorted(entry)}")
        splits = {k: entry.get(k) for k in ("train", "val", "test")}
        name = str(entry.get("name", f"task {i}"))
    elif isinstance(entry, (tuple, list)) and len(entry) in (2, 3):
        splits = dict(zip(("train", "test") if len(entry) == 2 else ("train", "val", "test"), entry))
        splits.setdefault("val", None)
        name = f"task {i}"
    else:
        raise ConfigError(f"Benchmark.from_datasets: {where} must be a dict {{'train', 'test', 'val'?}} or a tuple "
                          f"(train, test) / (train, val, test), got {type(entry).__name__}")
    data = {k: None if v is None else _split_tensors(f"{where}['{k}']", v) for k, v in splits.items()}
    for k in ("train", "test"):
        if len(data[k][1]) == 0:
            raise ConfigError(f"Benchmark.from_datasets: {where}['{k}'] is empty")
    if data["val"] is None:
        train_x, train_y = data["train"]
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * i + 1)
        order = torch.randperm(len(train_y), generator=gen)
        n_val = int(round(val_fraction * len(train_y)))
        if n_val >= len(train_y):
            raise ConfigError(f"Benchmark.from_datasets: {where} has {len(train_y)} training samples, none left "
                              f"after holding out val_fraction={val_fraction}")
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        data["val"] = (train_x[val_idx], train_y[val_idx])
        data["train"] = (train_x[train_idx], train_y[train_idx])
    shapes = {k: tuple(v[0].shape[1:]) for k, v in data.items() if len(v[1])}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"Benchmark.from_datasets: the splits of {where} have different input shapes {shapes}")
    classes = sorted(set(torch.cat([v[1] for v in data.values()]).tolist()))
    lut = {c: k for k, c in enumerate(classes)}
    local = {k: torch.tensor([lut[int(c)] for c in v[1].tolist()], dtype=torch.int64) for k, v in data.items()}
    x_val = data["val"][0] if len(local["val"]) else data["train"][0][:0]
    return TaskData(i, name, tuple(int(c) for c in classes), data["train"][0], local["train"], x_val, local["val"],
                    data["test"][0], local["test"], normalize=normalize, augment=bool(augment))
