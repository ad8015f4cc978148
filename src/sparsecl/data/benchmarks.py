"""Continual-learning benchmark builders and their registry.

Every builder returns a :class:`~sparsecl.data.types.Benchmark` whose tasks hold, in memory:

* ``train_x`` / ``val_x`` / ``test_x``: images ``(N, 1, H, W)``, ``uint8`` 0..255 for the MNIST
  family (H = W = 28), ``float32`` in [0, 1] for ``split-digits`` (H = W = 8);
* ``train_y`` / ``val_y`` / ``test_y``: ``int64`` ``(N,)`` task-local labels; ``classes[k]`` is the
  original label of local class ``k``.

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
from .formats import load_mnist_like, resolve_data_root
from .types import Benchmark, TaskData

__all__ = [
    "BENCHMARKS",
    "load_benchmark",
    "permuted_mnist",
    "pixel_permutations",
    "split_digits",
    "split_fashion_mnist",
    "split_mnist",
]

_NUM_CLASSES = 10  # every data set here has 10 classes
_CLASSES_PER_SPLIT_TASK = 2
_MAX_SPLIT_TASKS = _NUM_CLASSES // _CLASSES_PER_SPLIT_TASK


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
) -> TaskData:
    """One task made of the samples of ``classes`` in ``train`` / ``test`` (``(x, y)`` pairs with
    original labels): seeded subsets, a seeded validation split of the training part, labels
    remapped to local indices, and ``transform`` applied to every image tensor."""
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.int64)
    lut[list(classes)] = torch.arange(len(classes))
    wanted = torch.tensor(classes)

    def indices(y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, wanted).nonzero().flatten()

    train_idx = _subset(indices(train[1]), max_train, _generator(seed, "train-subset", task_id))
    test_idx = _subset(indices(test[1]), max_test, _generator(seed, "test-subset", task_id))
    train_idx, val_idx = _val_split(train_idx, val_fraction, _generator(seed, "val-split", task_id))
    if len(train_idx) == 0:
        raise ConfigError(
            f"task {task_id} ({name}) has no training samples left after holding out "
            f"val_fraction={val_fraction}; lower val_fraction or raise max_train_per_task"
        )
    transform = transform or (lambda x: x)

    def part(xy: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(_take(xy[0], idx)), lut[xy[1][idx]]

    train_x, train_y = part(train, train_idx)
    val_x, val_y = part(train, val_idx)
    test_x, test_y = part(test, test_idx)
    return TaskData(task_id, name, tuple(int(c) for c in classes), train_x, train_y, val_x, val_y, test_x, test_y)


def _sizes(tasks: list[TaskData]) -> list[dict[str, int]]:
    return [{"train": len(t.train_y), "val": len(t.val_y), "test": len(t.test_y)} for t in tasks]


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
) -> Benchmark:
    """Tasks of 2 consecutive classes of the class order (0..9, or shuffled by ``class_order_seed``)."""
    if class_order_seed is None:
        order = list(range(_NUM_CLASSES))
    else:
        order = torch.randperm(_NUM_CLASSES, generator=torch.Generator().manual_seed(class_order_seed)).tolist()
    tasks = []
    for t in range(num_tasks):
        classes = tuple(order[t * _CLASSES_PER_SPLIT_TASK : (t + 1) * _CLASSES_PER_SPLIT_TASK])
        task_name = f"{name}:{'-'.join(map(str, classes))}"
        tasks.append(
            _make_task(
                t, task_name, classes, train, test,
                seed=seed, val_fraction=val_fraction, max_train=max_train, max_test=max_test,
            )
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


# ----------------------------------------------------------------------------- builders


def pixel_permutations(num_tasks: int, seed: int = 0, permute_first: bool = False) -> list[torch.Tensor | None]:
    """The pixel permutation of each permuted-MNIST task: ``int64 (784,)`` tensors, ``None`` for an
    unpermuted task 0. One permutation per task is drawn in order from ``torch.Generator`` seeded
    with ``seed``, so task ``k >= 1`` gets the same permutation whatever ``permute_first``."""
    gen = torch.Generator().manual_seed(seed)
    perms: list[torch.Tensor | None] = [torch.randperm(28 * 28, generator=gen) for _ in range(num_tasks)]
    if not permute_first and perms:
        perms[0] = None
    return perms


def permuted_mnist(
    data_root: str | os.PathLike | None = None,
    num_tasks: int = 10,
    seed: int = 0,
    permute_first: bool = False,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    download: bool = False,
) -> Benchmark:
    """Permuted MNIST: each task holds all 10 digits with its own fixed pixel permutation
    (see :func:`pixel_permutations`); task 0 is unpermuted unless ``permute_first``.

    Images ``uint8 (N, 1, 28, 28)``; labels ``int64`` 0..9 (``classes == (0, ..., 9)``). Each permuted
    task materializes its own copy of the images (about 55 MB for the full training set).

    Raises:
        ConfigError: an option out of range (``num_tasks < 1``, ``val_fraction`` outside [0, 1), ...).
        DataNotFoundError / DataFormatError: see :func:`sparsecl.data.formats.load_mnist_like`.
    """
    _check_int("num_tasks", num_tasks, 1)
    _check_common(seed, val_fraction, max_train_per_task, max_test_per_task)
    root, train, test = _mnist_tensors(data_root, "MNIST", download)
    tasks = []
    for t, perm in enumerate(pixel_permutations(num_tasks, seed, bool(permute_first))):
        transform = None if perm is None else (lambda x, p=perm: x.flatten(1)[:, p].view(x.shape))
        tasks.append(
            _make_task(
                t, f"permuted-mnist:{t}", tuple(range(10)), train, test,
                seed=seed, val_fraction=val_fraction, max_train=max_train_per_task,
                max_test=max_test_per_task, transform=transform,
            )
        )
    info = {
        "dataset": "MNIST",
        "data_root": root,
        "seed": seed,
        "permute_first": bool(permute_first),
        "val_fraction": val_fraction,
        "max_train_per_task": max_train_per_task,
        "max_test_per_task": max_test_per_task,
        "sizes": _sizes(tasks),
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


# ----------------------------------------------------------------------------- registry

#: Benchmark name -> builder.
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "permuted-mnist": permuted_mnist,
    "split-mnist": split_mnist,
    "split-fashion-mnist": split_fashion_mnist,
    "split-digits": split_digits,
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
