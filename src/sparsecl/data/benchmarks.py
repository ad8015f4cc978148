"""Continual-learning benchmark builders and their registry.

Every builder returns a :class:`~sparsecl.data.types.Benchmark` whose tasks hold, in memory:

* ``train_x`` / ``val_x`` / ``test_x``: images ``(N, C, H, W)``, ``uint8`` 0..255 for the MNIST
  family (C = 1, H = W = 28) and the CIFAR benchmarks (C = 3, H = W = 32), ``float32`` in [0, 1]
  for ``split-digits`` (C = 1, H = W = 8);
* ``train_y`` / ``val_y`` / ``test_y``: ``int64`` ``(N,)`` task-local labels; ``classes[k]`` is the
  original label of local class ``k``;
* ``normalize`` / ``augment``: the CIFAR benchmarks set the data set's per-channel mean and std
  (``normalize=True``, the default) and ask for random crop + flip of the training batches
  (``augment=True``, the default); ``permuted-mnist`` sets MNIST's mean and std on request
  (``normalize=True``); the others leave ``normalize=None``, ``augment=False``.

Randomness (class order aside) comes from ``seed`` only, through ``torch.Generator`` objects derived
from ``(seed, purpose, task)``, so the same arguments always give identical tensors and changing
e.g. ``max_test_per_task`` does not move the validation split. Per task, ``max_train_per_task`` /
``max_test_per_task`` first take a seeded random subset, then ``val_fraction`` of the (subset)
training data is held out as the validation set; the test set is never used for validation.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError
from .formats import load_cifar, load_mnist_like, resolve_data_root
from .types import Benchmark, LazyTasks, TaskData, TaskHeader

__all__ = [
    "BENCHMARKS",
    "CIFAR_STATS",
    "CIFAR100_CLASS_ORDER_SEED",
    "cifar10_100",
    "load_benchmark",
    "permuted_mnist",
    "pixel_permutations",
    "split_cifar10",
    "split_cifar100",
    "split_digits",
    "split_fashion_mnist",
    "split_mnist",
]

_NUM_CLASSES = 10  # the MNIST family, the digits and CIFAR-10 have 10 classes
_CLASSES_PER_SPLIT_TASK = 2
_MAX_SPLIT_TASKS = _NUM_CLASSES // _CLASSES_PER_SPLIT_TASK

#: Per-channel (R, G, B) mean and std of the [0, 1]-scaled training images of each CIFAR data set,
#: the values every CIFAR recipe normalizes with.
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
#: Mean and std of MNIST's [0, 1]-scaled training pixels (the values of torchvision's MNIST recipes
#: and of the WSN and GPM reference code's Permuted MNIST).
MNIST_STATS: tuple[tuple[float, ...], tuple[float, ...]] = ((0.1307,), (0.3081,))

#: Default ``class_order_seed`` of split-cifar100: iCaRL's seed, as in FACIL. With it the class
#: order is ``numpy.random.RandomState(1993).permutation(100)`` = 68, 56, 78, 8, 23, ..., the order
#: of iCaRL and of FACIL's ``cifar100_icarl``.
CIFAR100_CLASS_ORDER_SEED = 1993


# ----------------------------------------------------------------------------- option checks


def _check_int(option: str, value: Any, minimum: int, maximum: int | None = None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{option} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{option} must be {bound}, got {value}")


def _check_fraction(option: str, value: Any, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{option} must be a number, got {value!r}")
    if not ((0.0 <= value if allow_zero else 0.0 < value) and value < 1.0):
        lower = "[0" if allow_zero else "(0"
        raise ConfigError(f"{option} must be in {lower}, 1), got {value}")


def _check_common(seed: Any, val_fraction: Any, max_train: Any, max_test: Any) -> None:
    _check_int("seed", seed, -(2**63), 2**63 - 1)
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    _check_int("max_train_per_task", max_train, 1, optional=True)
    _check_int("max_test_per_task", max_test, 1, optional=True)


def _check_split(
    num_tasks: Any, seed: Any, class_order_seed: Any, val_fraction: Any, max_train: Any, max_test: Any
) -> None:
    _check_int("num_tasks", num_tasks, 1)
    if num_tasks > _MAX_SPLIT_TASKS:
        raise ConfigError(
            f"num_tasks={num_tasks} is too large: {_NUM_CLASSES} classes split {_CLASSES_PER_SPLIT_TASK} "
            f"per task allow at most {_MAX_SPLIT_TASKS} tasks"
        )
    _check_int("class_order_seed", class_order_seed, -(2**63), 2**63 - 1, optional=True)
    _check_common(seed, val_fraction, max_train, max_test)


def _check_bool(option: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{option} must be True or False, got {value!r}")


# ----------------------------------------------------------------------------- shared helpers


def _generator(seed: int, *key: Any) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``(seed, *key)`` (stable across processes and platforms)."""
    digest = hashlib.sha256(repr((int(seed),) + key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _subset(idx: torch.Tensor, max_n: int | None, gen: torch.Generator) -> torch.Tensor:
    """At most ``max_n`` entries of ``idx`` chosen at random (kept in their original order)."""
    if max_n is None or len(idx) <= max_n:
        return idx
    return idx[torch.randperm(len(idx), generator=gen)[:max_n].sort().values]


def _val_split(idx: torch.Tensor, val_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``idx`` into (train, val) with ``round(val_fraction * len(idx))`` random entries in val;
    both parts keep the original order."""
    n_val = int(round(val_fraction * len(idx)))
    order = torch.randperm(len(idx), generator=gen)
    return idx[order[n_val:].sort().values], idx[order[:n_val].sort().values]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]``, or ``x`` itself (no copy) when ``idx`` selects every row in order."""
    if len(idx) == len(x) and torch.equal(idx, torch.arange(len(x))):
        return x
    return x[idx]


def _split_indices(
    task_id: int,
    classes: tuple[int, ...],
    train_y: torch.Tensor,
    test_y: torch.Tensor,
    *,
    seed: int,
    val_fraction: float,
    max_train: int | None,
    max_test: int | None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    pools: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The rows of ``train`` / ``test`` (by their labels ``train_y``, ``test_y``) each split of
    the task holds: seeded subsets and a seeded validation split of the training part, in the
    original order. ``splits``: the splits wanted (the test split alone is cheaper). ``pools``:
    the rows of ``classes`` in ``"train"`` and ``"test"`` when the caller knows them (every task
    of Permuted MNIST holds every class)."""
    wanted = torch.tensor(classes)

    def pool(split: str, y: torch.Tensor) -> torch.Tensor:
        if pools is not None and split in pools:
            return pools[split]
        return torch.isin(y, wanted).nonzero().flatten()

    out = {}
    if "test" in splits:
        out["test"] = _subset(pool("test", test_y), max_test, _generator(seed, "test-subset", task_id))
    if "train" in splits or "val" in splits:
        train_idx = _subset(pool("train", train_y), max_train, _generator(seed, "train-subset", task_id))
        out["train"], out["val"] = _val_split(train_idx, val_fraction, _generator(seed, "val-split", task_id))
    return out


def _make_task(
    task_id: int,
    name: str,
    classes: tuple[int, ...],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    val_fraction: float,
    max_train: int | None,
    max_test: int | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    augment: bool = False,
    pools: dict[str, torch.Tensor] | None = None,
) -> TaskData:
    """One task made of the samples of ``classes`` in ``train`` / ``test`` (``(x, y)`` pairs with
    original labels): seeded subsets, a seeded validation split of the training part, labels
    remapped to local indices, and ``transform`` applied to every image tensor. ``normalize`` and
    ``augment`` are stored in the task (see :class:`TaskData`); ``pools`` as in
    :func:`_split_indices`."""
    idx = _split_indices(task_id, classes, train[1], test[1], seed=seed, val_fraction=val_fraction,
                         max_train=max_train, max_test=max_test, pools=pools)
    if len(idx["train"]) == 0:
        raise ConfigError(
            f"task {task_id} ({name}) has no training samples left after holding out "
            f"val_fraction={val_fraction}; lower val_fraction or raise max_train_per_task"
        )
    train_x, train_y = _split_part(classes, train, idx["train"], transform)
    val_x, val_y = _split_part(classes, train, idx["val"], transform)
    test_x, test_y = _split_part(classes, test, idx["test"], transform)
    return TaskData(task_id, name, tuple(int(c) for c in classes), train_x, train_y, val_x, val_y, test_x, test_y,
                    normalize=normalize, augment=bool(augment))


def _split_part(classes: tuple[int, ...], xy: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor,
                transform: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` of ``xy``: images through ``transform``, labels remapped to local indices."""
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.int64)
    lut[list(classes)] = torch.arange(len(classes))
    x = _take(xy[0], idx)
    return (transform(x) if transform is not None else x), lut[xy[1][idx]]


def _sizes(tasks: list[TaskData]) -> list[dict[str, int]]:
    return [{"train": len(t.train_y), "val": len(t.val_y), "test": len(t.test_y)} for t in tasks]


def _class_order(num_classes: int, class_order_seed: int | None, rng: str = "torch") -> list[int]:
    """``0 .. num_classes - 1``, or shuffled by ``class_order_seed``: with ``rng="torch"``
    ``torch.randperm`` of a generator seeded with it (the MNIST family, split-cifar10), with
    ``rng="numpy"`` ``numpy.random.RandomState(seed).permutation`` (iCaRL's and FACIL's convention,
    used for CIFAR-100; the seed must then be in 0 .. 2**32 - 1)."""
    if class_order_seed is None:
        return list(range(num_classes))
    if rng == "numpy":
        return [int(c) for c in np.random.RandomState(class_order_seed).permutation(num_classes)]
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(class_order_seed)).tolist()


def _class_split_tasks(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    order: list[int],
    *,
    num_tasks: int,
    classes_per_task: int,
    first_task_id: int = 0,
    seed: int,
    val_fraction: float,
    max_train: int | None,
    max_test: int | None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    augment: bool = False,
) -> list[TaskData]:
    """``num_tasks`` tasks of ``classes_per_task`` consecutive classes of ``order``, numbered from
    ``first_task_id``."""
    tasks = []
    for k in range(num_tasks):
        classes = tuple(order[k * classes_per_task : (k + 1) * classes_per_task])
        task_name = f"{name}:{'-'.join(map(str, classes))}"
        tasks.append(
            _make_task(
                first_task_id + k, task_name, classes, train, test,
                seed=seed, val_fraction=val_fraction, max_train=max_train, max_test=max_test,
                normalize=normalize, augment=augment,
            )
        )
    return tasks


def _class_split_benchmark(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_tasks: int,
    seed: int,
    class_order_seed: int | None,
    val_fraction: float,
    max_train: int | None,
    max_test: int | None,
    info: dict[str, Any],
    num_classes: int = _NUM_CLASSES,
    classes_per_task: int = _CLASSES_PER_SPLIT_TASK,
    order_rng: str = "torch",
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    augment: bool = False,
) -> Benchmark:
    """Tasks of ``classes_per_task`` consecutive classes of the class order (``0 .. num_classes - 1``,
    or shuffled by ``class_order_seed``, see :func:`_class_order`)."""
    order = _class_order(num_classes, class_order_seed, order_rng)
    tasks = _class_split_tasks(
        name, train, test, order,
        num_tasks=num_tasks, classes_per_task=classes_per_task, seed=seed, val_fraction=val_fraction,
        max_train=max_train, max_test=max_test, normalize=normalize, augment=augment,
    )
    info = {
        **info,
        "seed": seed,
        "class_order_seed": class_order_seed,
        "class_order": order,
        "task_classes": [list(t.classes) for t in tasks],
        "val_fraction": val_fraction,
        "max_train_per_task": max_train,
        "max_test_per_task": max_test,
        "sizes": _sizes(tasks),
    }
    return Benchmark(name, tasks, tuple(train[0].shape[1:]), info)


def _mnist_tensors(
    data_root: str | os.PathLike | None, dataset: str, download: bool
) -> tuple[str, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(root, (train_x, train_y), (test_x, test_y)) with images ``uint8 (N, 1, 28, 28)``."""
    root = resolve_data_root(data_root, must_exist=not download)
    parts = []
    for train in (True, False):
        images, labels = load_mnist_like(root, dataset, train, download=download)
        parts.append((torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)))
    return str(root), parts[0], parts[1]


def _cifar_tensors(
    root: os.PathLike, dataset: str, download: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train_x, train_y), (test_x, test_y)) with images ``uint8 (N, 3, 32, 32)``."""
    parts = []
    for train in (True, False):
        images, labels = load_cifar(root, dataset, train, download=download)
        parts.append((torch.from_numpy(images), torch.from_numpy(labels)))
    return parts[0], parts[1]


def _cifar_info(dataset: str, root: os.PathLike, normalize: bool, augment: bool) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "data_root": str(root),
        "normalize": [list(v) for v in CIFAR_STATS[dataset]] if normalize else None,
        "augment": bool(augment),
    }


# ----------------------------------------------------------------------------- builders


def pixel_permutations(num_tasks: int, seed: int = 0, permute_first: bool = False) -> list[torch.Tensor | None]:
    """The pixel permutation of each permuted-MNIST task: ``int64 (784,)`` tensors, ``None`` for an
    unpermuted task 0. One permutation per task is drawn in order from ``torch.Generator`` seeded
    with ``seed``, so task ``k >= 1`` gets the same permutation whatever ``permute_first``."""
    table = _permutation_table(num_tasks, seed)
    perms: list[torch.Tensor | None] = [row.long() for row in table]
    if not permute_first and perms:
        perms[0] = None
    return perms


def _permutation_table(num_tasks: int, seed: int) -> torch.Tensor:
    """:func:`pixel_permutations` as one ``int16 (num_tasks, 784)`` tensor (1.5 kB per task)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.empty((num_tasks, 28 * 28), dtype=torch.int16)
    for t in range(num_tasks):
        table[t] = torch.randperm(28 * 28, generator=gen)
    return table


def permuted_mnist(
    data_root: str | os.PathLike | None = None,
    num_tasks: int = 10,
    seed: int = 0,
    permute_first: bool = False,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
    normalize: bool = False,
) -> Benchmark:
    """Permuted MNIST: each task holds all 10 digits with its own fixed pixel permutation
    (see :func:`pixel_permutations`); task 0 is unpermuted unless ``permute_first``.
    ``normalize``: each task's inputs are standardized by MNIST's pixel mean and std
    (:data:`MNIST_STATS`), as in the WSN and GPM reference code; off by default (pixels in [0, 1],
    as CLNP and EideticNets train).

    Images ``uint8 (N, 1, 28, 28)``; labels ``int64`` 0..9 (``classes == (0, ..., 9)``). The tasks
    are built when accessed (``Benchmark.tasks`` is a :class:`~sparsecl.data.types.LazyTasks`):
    each permuted task materializes its own copy of the images (about 55 MB for the full training
    set) only while it is in use, so the memory of a stream does not grow with its length (the
    permutations take 1.5 kB per task).

    Raises:
        ConfigError: an option out of range (``num_tasks < 1``, ``val_fraction`` outside [0, 1), ...).
        DataNotFoundError / DataFormatError: see :func:`sparsecl.data.formats.load_mnist_like`.
    """
    _check_int("num_tasks", num_tasks, 1)
    _check_common(seed, val_fraction, max_train_per_task, max_test_per_task)
    _check_bool("normalize", normalize)
    root, train, test = _mnist_tensors(data_root, "MNIST", download)
    table = _permutation_table(num_tasks, seed)
    stats = MNIST_STATS if normalize else None
    permute_first = bool(permute_first)
    classes = tuple(range(10))
    pools = {"train": torch.arange(len(train[1])), "test": torch.arange(len(test[1]))}  # every task: all digits
    options = dict(seed=seed, val_fraction=val_fraction, max_train=max_train_per_task, max_test=max_test_per_task)

    def transform(t: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if t == 0 and not permute_first:
            return None
        perm = table[t].long()
        return lambda x: x.flatten(1).index_select(1, perm).view(x.shape)

    def build(t: int) -> TaskData:
        return _make_task(t, f"permuted-mnist:{t}", classes, train, test, transform=transform(t), pools=pools,
                          normalize=stats, **options)

    def split(t: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # one split of task t from its permutation: the rows and pixels build(t) gives it
        idx = _split_indices(t, classes, train[1], test[1], splits=(name,), pools=pools, **options)[name]
        return _split_part(classes, test if name == "test" else train, idx, transform(t))

    tasks = LazyTasks(num_tasks, build, lambda t: TaskHeader(t, f"permuted-mnist:{t}", classes, stats),
                      split=split)
    first = tasks[0]
    info = {
        "dataset": "MNIST",
        "data_root": root,
        "seed": seed,
        "permute_first": permute_first,
        "normalize": [list(v) for v in stats] if stats else None,
        "val_fraction": val_fraction,
        "max_train_per_task": max_train_per_task,
        "max_test_per_task": max_test_per_task,
        # every task holds all ten classes: the same split sizes (their seeded subsets differ)
        "sizes": _sizes([first]) * num_tasks,
    }
    return Benchmark("permuted-mnist", tasks, (1, 28, 28), info)


def _split_mnist_like(
    name: str,
    dataset: str,
    data_root: str | os.PathLike | None,
    num_tasks: int,
    seed: int,
    class_order_seed: int | None,
    val_fraction: float,
    max_train_per_task: int | None,
    max_test_per_task: int | None,
    download: bool,
) -> Benchmark:
    _check_split(num_tasks, seed, class_order_seed, val_fraction, max_train_per_task, max_test_per_task)
    root, train, test = _mnist_tensors(data_root, dataset, download)
    return _class_split_benchmark(
        name, train, test,
        num_tasks=num_tasks, seed=seed, class_order_seed=class_order_seed, val_fraction=val_fraction,
        max_train=max_train_per_task, max_test=max_test_per_task,
        info={"dataset": dataset, "data_root": root},
    )


def split_mnist(
    data_root: str | os.PathLike | None = None,
    num_tasks: int = 5,
    seed: int = 0,
    class_order_seed: int | None = None,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
) -> Benchmark:
    """Split MNIST: up to 5 tasks of 2 digits, (0, 1), (2, 3), ... unless ``class_order_seed``
    shuffles the class order. Images ``uint8 (N, 1, 28, 28)``; labels ``int64`` in {0, 1}.

    Raises:
        ConfigError: ``num_tasks`` outside 1..5 or another option out of range.
        DataNotFoundError / DataFormatError: see :func:`sparsecl.data.formats.load_mnist_like`.
    """
    return _split_mnist_like(
        "split-mnist", "MNIST", data_root, num_tasks, seed, class_order_seed, val_fraction,
        max_train_per_task, max_test_per_task, download,
    )


def split_fashion_mnist(
    data_root: str | os.PathLike | None = None,
    num_tasks: int = 5,
    seed: int = 0,
    class_order_seed: int | None = None,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
) -> Benchmark:
    """Split Fashion-MNIST: as :func:`split_mnist` on Fashion-MNIST."""
    return _split_mnist_like(
        "split-fashion-mnist", "FashionMNIST", data_root, num_tasks, seed, class_order_seed,
        val_fraction, max_train_per_task, max_test_per_task, download,
    )


def split_digits(
    num_tasks: int = 5,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    class_order_seed: int | None = None,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
) -> Benchmark:
    """Split Digits: scikit-learn's bundled 8x8 digits (1797 images, no data root needed), up to 5
    tasks of 2 classes. A seeded stratified split puts ``round(test_fraction * n_c)`` images of each
    class ``c`` in the test set. Images ``float32 (N, 1, 8, 8)`` in [0, 1] (pixel / 16); labels
    ``int64`` in {0, 1}.

    Raises:
        ConfigError: ``num_tasks`` outside 1..5 or another option out of range.
    """
    from sklearn.datasets import load_digits

    _check_split(num_tasks, seed, class_order_seed, val_fraction, max_train_per_task, max_test_per_task)
    _check_fraction("test_fraction", test_fraction, allow_zero=False)
    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    gen = _generator(seed, "test-split")
    test_parts = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        test_parts.append(idx[torch.randperm(len(idx), generator=gen)[: int(round(test_fraction * len(idx)))]])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    return _class_split_benchmark(
        "split-digits", (x[~is_test], y[~is_test]), (x[is_test], y[is_test]),
        num_tasks=num_tasks, seed=seed, class_order_seed=class_order_seed, val_fraction=val_fraction,
        max_train=max_train_per_task, max_test=max_test_per_task,
        info={"dataset": "sklearn-digits", "test_fraction": test_fraction},
    )


def _check_cifar(num_tasks: Any, seed: Any, class_order_seed: Any, val_fraction: Any, max_train: Any,
                 max_test: Any, augment: Any, normalize: Any, *, numpy_seed: bool) -> None:
    _check_int("num_tasks", num_tasks, 1)
    if numpy_seed:
        _check_int("class_order_seed", class_order_seed, 0, 2**32 - 1, optional=True)
    else:
        _check_int("class_order_seed", class_order_seed, -(2**63), 2**63 - 1, optional=True)
    _check_common(seed, val_fraction, max_train, max_test)
    _check_bool("augment", augment)
    _check_bool("normalize", normalize)


def split_cifar100(
    data_root: str | os.PathLike | None = None,
    num_tasks: int | None = None,
    classes_per_task: int = 10,
    seed: int = 0,
    class_order_seed: int | None = CIFAR100_CLASS_ORDER_SEED,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
    augment: bool = True,
    normalize: bool = True,
) -> Benchmark:
    """Split CIFAR-100: the 100 classes in tasks of ``classes_per_task`` classes, consecutive in
    the class order (10 tasks of 10, or 20 of 5, ...; ``classes_per_task`` must divide 100);
    ``num_tasks`` (default: all ``100 // classes_per_task``) keeps the first tasks only.

    The class order is ``numpy.random.RandomState(class_order_seed).permutation(100)``, by default
    with iCaRL's seed 1993 (:data:`CIFAR100_CLASS_ORDER_SEED`), which gives iCaRL's order, the
    one FACIL uses (68, 56, 78, 8, 23, ...); ``class_order_seed=None`` keeps 0..99. The order is
    recorded in ``info["class_order"]``. Reads ``<root>/cifar-100-python/`` (see
    :func:`sparsecl.data.formats.load_cifar`); 500 training and 100 test images per class before
    ``max_*_per_task`` and ``val_fraction``.

    Images ``uint8 (N, 3, 32, 32)``; labels ``int64`` in 0..classes_per_task-1. With ``normalize``
    every task carries CIFAR-100's per-channel mean and std (:data:`CIFAR_STATS`), with ``augment``
    its training batches get random crop (padding 4) + horizontal flip.

    Raises:
        ConfigError: ``classes_per_task`` does not divide 100, ``num_tasks`` exceeds
            ``100 // classes_per_task``, or another option out of range.
        DataNotFoundError / DataFormatError: see :func:`sparsecl.data.formats.load_cifar`.
    """
    _check_int("classes_per_task", classes_per_task, 1, 100)
    if 100 % classes_per_task:
        divisors = ", ".join(str(d) for d in range(1, 101) if 100 % d == 0)
        raise ConfigError(f"classes_per_task={classes_per_task} does not split the 100 classes of CIFAR-100 "
                          f"evenly; expected one of {divisors}")
    max_tasks = 100 // classes_per_task
    num_tasks = max_tasks if num_tasks is None else num_tasks
    _check_int("num_tasks", num_tasks, 1, max_tasks)
    _check_cifar(num_tasks, seed, class_order_seed, val_fraction, max_train_per_task, max_test_per_task,
                 augment, normalize, numpy_seed=True)
    root = resolve_data_root(data_root, must_exist=not download)
    train, test = _cifar_tensors(root, "CIFAR100", download)
    return _class_split_benchmark(
        "split-cifar100", train, test,
        num_tasks=num_tasks, seed=seed, class_order_seed=class_order_seed, val_fraction=val_fraction,
        max_train=max_train_per_task, max_test=max_test_per_task,
        info={**_cifar_info("CIFAR100", root, normalize, augment), "classes_per_task": classes_per_task},
        num_classes=100, classes_per_task=classes_per_task, order_rng="numpy",
        normalize=CIFAR_STATS["CIFAR100"] if normalize else None, augment=augment,
    )


def split_cifar10(
    data_root: str | os.PathLike | None = None,
    num_tasks: int = 5,
    seed: int = 0,
    class_order_seed: int | None = None,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
    augment: bool = True,
    normalize: bool = True,
) -> Benchmark:
    """Split CIFAR-10: up to 5 tasks of 2 classes, (0, 1), (2, 3), ... unless ``class_order_seed``
    shuffles the class order (as :func:`split_mnist`: ``torch.randperm``). Reads
    ``<root>/cifar-10-batches-py/``. Images ``uint8 (N, 3, 32, 32)``; labels ``int64`` in {0, 1};
    ``normalize`` / ``augment`` as in :func:`split_cifar100`, with CIFAR-10's statistics.

    Raises:
        ConfigError: ``num_tasks`` outside 1..5 or another option out of range.
        DataNotFoundError / DataFormatError: see :func:`sparsecl.data.formats.load_cifar`.
    """
    _check_split(num_tasks, seed, class_order_seed, val_fraction, max_train_per_task, max_test_per_task)
    _check_bool("augment", augment)
    _check_bool("normalize", normalize)
    root = resolve_data_root(data_root, must_exist=not download)
    train, test = _cifar_tensors(root, "CIFAR10", download)
    return _class_split_benchmark(
        "split-cifar10", train, test,
        num_tasks=num_tasks, seed=seed, class_order_seed=class_order_seed, val_fraction=val_fraction,
        max_train=max_train_per_task, max_test=max_test_per_task,
        info=_cifar_info("CIFAR10", root, normalize, augment),
        normalize=CIFAR_STATS["CIFAR10"] if normalize else None, augment=augment,
    )


def cifar10_100(
    data_root: str | os.PathLike | None = None,
    num_tasks: int = 6,
    seed: int = 0,
    class_order_seed: int | None = None,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
    augment: bool = True,
    normalize: bool = True,
) -> Benchmark:
    """CIFAR-10/100 (Zenke et al. 2017, used by CLNP): task 0 is all of CIFAR-10 (10 classes,
    ``classes == (0, ..., 9)``, CIFAR-10 labels), then ``num_tasks - 1`` tasks of 10 consecutive
    CIFAR-100 classes (``classes`` holds CIFAR-100 labels): 0-9, 10-19, ... by default, or in the
    order ``numpy.random.RandomState(class_order_seed).permutation(100)``. ``num_tasks`` is 1..11
    (default 6: CIFAR-10 and the first 50 CIFAR-100 classes). Needs both ``cifar-10-batches-py/``
    and ``cifar-100-python/`` under the data root.

    Images ``uint8 (N, 3, 32, 32)``; labels ``int64`` in 0..9. With ``normalize`` each task carries
    the statistics of its own data set (:data:`CIFAR_STATS`); ``info["task_datasets"]`` names it.

    Raises:
        ConfigError: ``num_tasks`` outside 1..11 or another option out of range.
        DataNotFoundError / DataFormatError: see :func:`sparsecl.data.formats.load_cifar`.
    """
    _check_cifar(num_tasks, seed, class_order_seed, val_fraction, max_train_per_task, max_test_per_task,
                 augment, normalize, numpy_seed=True)
    if num_tasks > 11:
        raise ConfigError(f"num_tasks={num_tasks} is too large: CIFAR-10 and the 100 CIFAR-100 classes split "
                          "10 per task allow at most 11 tasks")
    root = resolve_data_root(data_root, must_exist=not download)
    common = dict(seed=seed, val_fraction=val_fraction, max_train=max_train_per_task, max_test=max_test_per_task,
                  augment=augment)
    train10, test10 = _cifar_tensors(root, "CIFAR10", download)
    tasks = [_make_task(0, "cifar10-100:cifar10", tuple(range(10)), train10, test10,
                        normalize=CIFAR_STATS["CIFAR10"] if normalize else None, **common)]
    order = _class_order(100, class_order_seed, "numpy")
    if num_tasks > 1:
        train100, test100 = _cifar_tensors(root, "CIFAR100", download)
        tasks += _class_split_tasks(
            "cifar10-100:cifar100", train100, test100, order, num_tasks=num_tasks - 1, classes_per_task=10,
            first_task_id=1, normalize=CIFAR_STATS["CIFAR100"] if normalize else None, **common,
        )
    info = {
        "dataset": "CIFAR10+CIFAR100",
        "data_root": str(root),
        "task_datasets": ["CIFAR10"] + ["CIFAR100"] * (num_tasks - 1),
        "normalize": {d: [list(v) for v in CIFAR_STATS[d]] for d in ("CIFAR10", "CIFAR100")} if normalize else None,
        "augment": bool(augment),
        "seed": seed,
        "class_order_seed": class_order_seed,
        "class_order": order,
        "task_classes": [list(t.classes) for t in tasks],
        "val_fraction": val_fraction,
        "max_train_per_task": max_train_per_task,
        "max_test_per_task": max_test_per_task,
        "sizes": _sizes(tasks),
    }
    return Benchmark("cifar10-100", tasks, (3, 32, 32), info)


# ----------------------------------------------------------------------------- registry

#: Benchmark name -> builder.
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "permuted-mnist": permuted_mnist,
    "split-mnist": split_mnist,
    "split-fashion-mnist": split_fashion_mnist,
    "split-digits": split_digits,
    "split-cifar10": split_cifar10,
    "split-cifar100": split_cifar100,
    "cifar10-100": cifar10_100,
}


def load_benchmark(name: str, **options: Any) -> Benchmark:
    """Build the benchmark registered as ``name`` in :data:`BENCHMARKS` with ``options`` passed to
    its builder (``_`` in ``name`` is read as ``-``).

    Raises:
        ConfigError: unknown ``name`` (the message lists the known ones), an option the builder
            does not accept (the message names it, the benchmark and the accepted options), or an
            option value out of range.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")
    builder = BENCHMARKS[key]
    accepted = list(inspect.signature(builder).parameters)
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise ConfigError(
            f"benchmark {key!r} does not accept option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted)}"
        )
    return builder(**options)
