"""Benchmark builders: task structure, label remapping, permutations, splits, determinism, errors.

Task images are traced back to the raw data sets by their bytes (no image occurs twice within a
raw split of MNIST, Fashion-MNIST or the digits), which recovers each sample's raw index and label.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecl.data import BENCHMARKS, Benchmark, load_benchmark, load_mnist_like
from sparsecl.data.benchmarks import _subset, _val_split, permuted_mnist, pixel_permutations, split_digits, split_mnist
from sparsecl.errors import ConfigError, DataNotFoundError

SMALL = {"max_train_per_task": 200, "max_test_per_task": 100}


class RawIndex:
    """Maps an image's bytes to its index in a raw split."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.labels = np.asarray(labels)
        rows = np.ascontiguousarray(images).reshape(len(images), -1)
        self.index = {row.tobytes(): i for i, row in enumerate(rows)}
        assert len(self.index) == len(images), "raw split holds duplicate images"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        rows = x.reshape(len(x), -1).numpy()
        return np.array([self.index[row.tobytes()] for row in rows], dtype=np.int64)


@pytest.fixture(scope="module")
def mnist(data_root):
    return {train: RawIndex(*load_mnist_like(data_root, "MNIST", train)) for train in (True, False)}


@pytest.fixture(scope="module")
def full_split_mnist(data_root) -> Benchmark:
    return split_mnist(data_root)


def _all_tensors(bench: Benchmark):
    for t in bench.tasks:
        yield from (t.train_x, t.train_y, t.val_x, t.val_y, t.test_x, t.test_y)


def _check_task_against_raw(task, raw, val_fraction):
    """Local labels in 0..k-1, each image's raw label equals classes[local label], train and val
    come from the raw train split and are disjoint, test comes from the raw test split."""
    classes = np.array(task.classes)
    idx = {}
    for part, split in (("train", True), ("val", True), ("test", False)):
        x, y = getattr(task, f"{part}_x"), getattr(task, f"{part}_y")
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert set(y.tolist()) <= set(range(task.num_classes))
        idx[part] = raw[split](x)
        np.testing.assert_array_equal(raw[split].labels[idx[part]], classes[y.numpy()])
    assert not set(idx["train"]) & set(idx["val"])
    n = len(idx["train"]) + len(idx["val"])
    assert len(idx["val"]) == round(val_fraction * n)
    return idx


# ----------------------------------------------------------------------------- split benchmarks


def test_split_mnist_full(full_split_mnist, mnist):
    bench = full_split_mnist
    assert bench.name == "split-mnist" and bench.num_tasks == 5 and bench.input_shape == (1, 28, 28)
    assert [t.classes for t in bench.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert bench.info["class_order"] == list(range(10)) and bench.info["seed"] == 0
    for t, task in enumerate(bench.tasks):
        assert task.task_id == t and task.num_classes == 2
        assert task.train_x.dtype == torch.uint8 and task.train_x.shape[1:] == (1, 28, 28)
        idx = _check_task_against_raw(task, mnist, 0.1)
        # every raw sample of the task's classes is used exactly once
        for split, parts in ((True, ("train", "val")), (False, ("test",))):
            used = np.sort(np.concatenate([idx[p] for p in parts]))
            expected = np.flatnonzero(np.isin(mnist[split].labels, task.classes))
            np.testing.assert_array_equal(used, expected)
        assert bench.info["sizes"][t] == {"train": len(task.train_y), "val": len(task.val_y), "test": len(task.test_y)}
    assert bench.info["sizes"][0] == {"train": 11399, "val": 1266, "test": 2115}  # 5923 + 6742 = 12665 train


def test_split_mnist_remaps_labels_within_task(full_split_mnist):
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    for t, task in enumerate(full_split_mnist.tasks):
        assert torch.bincount(task.test_y).tolist() == test_counts[2 * t : 2 * t + 2]


def test_class_order_seed_shuffles_classes(data_root, mnist):
    bench = split_mnist(data_root, class_order_seed=3, **SMALL)
    order = bench.info["class_order"]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert [list(t.classes) for t in bench.tasks] == [order[2 * i : 2 * i + 2] for i in range(5)]
    assert bench.info["task_classes"] == [list(t.classes) for t in bench.tasks]
    for task in bench.tasks:
        _check_task_against_raw(task, mnist, 0.1)
    assert split_mnist(data_root, class_order_seed=3, num_tasks=1, **SMALL).info["class_order"] == order
    assert split_mnist(data_root, class_order_seed=4, num_tasks=1, **SMALL).info["class_order"] != order


def test_num_tasks_takes_the_first_tasks(data_root):
    bench = split_mnist(data_root, num_tasks=3, **SMALL)
    assert [t.classes for t in bench.tasks] == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(ConfigError, match="num_tasks=6 is too large.*at most 5 tasks"):
        split_mnist(data_root, num_tasks=6)
    with pytest.raises(ConfigError, match="num_tasks=6 is too large"):
        load_benchmark("split-digits", num_tasks=6)


def test_subsets_are_applied_before_the_val_split(data_root, mnist):
    bench = split_mnist(data_root, num_tasks=2, max_train_per_task=200, max_test_per_task=50, val_fraction=0.25)
    for task in bench.tasks:
        assert (len(task.train_y), len(task.val_y), len(task.test_y)) == (150, 50, 50)
        _check_task_against_raw(task, mnist, 0.25)
    assert bench.info["max_train_per_task"] == 200 and bench.info["val_fraction"] == 0.25


def test_zero_val_fraction_gives_empty_val(data_root):
    task = split_mnist(data_root, num_tasks=1, val_fraction=0.0, **SMALL).tasks[0]
    assert task.val_x.shape == (0, 1, 28, 28) and task.val_y.shape == (0,) and len(task.train_y) == 200


def test_split_fashion_mnist(data_root):
    images, labels = load_mnist_like(data_root, "FashionMNIST", train=True)
    raw = {True: RawIndex(images, labels), False: RawIndex(*load_mnist_like(data_root, "FashionMNIST", False))}
    bench = load_benchmark("split-fashion-mnist", data_root=data_root, **SMALL)
    assert bench.name == "split-fashion-mnist" and bench.info["dataset"] == "FashionMNIST"
    assert [t.classes for t in bench.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task in bench.tasks:
        _check_task_against_raw(task, raw, 0.1)


def test_split_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    raw = {True: RawIndex(images, digits.target), False: RawIndex(images, digits.target)}
    bench = split_digits()
    assert bench.input_shape == (1, 8, 8) and bench.num_tasks == 5
    assert [t.classes for t in bench.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    seen = []
    for task in bench.tasks:
        assert task.train_x.dtype == torch.float32 and task.train_x.shape[1:] == (1, 8, 8)
        for x in (task.train_x, task.val_x, task.test_x):
            assert 0.0 <= x.min() and x.max() <= 1.0
            assert torch.equal(x * 16, (x * 16).round())
        idx = _check_task_against_raw(task, raw, 0.1)
        # stratified test split: round(0.2 * n_c) images of each class
        for local, c in enumerate(task.classes):
            n_c = int((digits.target == c).sum())
            assert int((task.test_y == local).sum()) == round(0.2 * n_c)
        seen += [idx["train"], idx["val"], idx["test"]]
    seen = np.concatenate(seen)
    assert len(seen) == len(np.unique(seen)) == 1797  # every image used once, test disjoint from train/val


# ----------------------------------------------------------------------------- permuted MNIST


def test_permuted_mnist(data_root, mnist):
    bench = permuted_mnist(data_root, num_tasks=3, max_train_per_task=300)
    assert bench.num_tasks == 3 and bench.input_shape == (1, 28, 28)
    assert bench.info["permute_first"] is False and bench.info["seed"] == 0
    perms = pixel_permutations(3, seed=0)
    assert perms[0] is None
    base_test = load_mnist_like(data_root, "MNIST", train=False)[0].reshape(10000, 784)
    for t, task in enumerate(bench.tasks):
        assert task.classes == tuple(range(10)) and task.train_x.dtype == torch.uint8
        assert task.train_x.shape == (270, 1, 28, 28) and task.val_x.shape == (30, 1, 28, 28)
        assert task.test_x.shape == (10000, 1, 28, 28)
        expected = base_test if perms[t] is None else base_test[:, perms[t].numpy()]
        np.testing.assert_array_equal(task.test_x.reshape(10000, 784).numpy(), expected)
        np.testing.assert_array_equal(task.test_y.numpy(), mnist[False].labels)
        # undo the permutation: the images come from the raw train split with their own labels
        inverse = slice(None) if perms[t] is None else torch.argsort(perms[t])
        unpermuted = {p: getattr(task, f"{p}_x").flatten(1)[:, inverse] for p in ("train", "val")}
        for p, x in unpermuted.items():
            np.testing.assert_array_equal(mnist[True].labels[mnist[True](x)], getattr(task, f"{p}_y").numpy())
        assert not set(mnist[True](unpermuted["train"])) & set(mnist[True](unpermuted["val"]))


def test_permutations_seeded_distinct_and_valid():
    perms = pixel_permutations(5, seed=7, permute_first=True)
    for p in perms:
        assert torch.equal(torch.sort(p).values, torch.arange(784))
    assert len({tuple(p.tolist()) for p in perms}) == 5  # all different
    again = pixel_permutations(5, seed=7, permute_first=True)
    assert all(torch.equal(a, b) for a, b in zip(perms, again))
    other = pixel_permutations(5, seed=8, permute_first=True)
    assert not any(torch.equal(a, b) for a, b in zip(perms, other))
    # permute_first only changes task 0
    default = pixel_permutations(5, seed=7)
    assert default[0] is None and all(torch.equal(a, b) for a, b in zip(perms[1:], default[1:]))


def test_permute_first(data_root):
    plain = permuted_mnist(data_root, num_tasks=2, **SMALL)
    first = permuted_mnist(data_root, num_tasks=2, permute_first=True, **SMALL)
    assert first.info["permute_first"] is True
    perm = pixel_permutations(1, seed=0, permute_first=True)[0]
    t0, p0 = plain.tasks[0], first.tasks[0]
    assert torch.equal(p0.train_x.flatten(1), t0.train_x.flatten(1)[:, perm])
    assert not torch.equal(p0.train_x, t0.train_x)
    assert torch.equal(plain.tasks[1].train_x, first.tasks[1].train_x)


def test_a_permuted_task_split_is_derived_without_building_the_task(data_root):
    """LazyTasks.split gives the tensors the built task holds (the same computation, repeated),
    builds no task for it, and keeps each derived split so that it is derived once."""
    from sparsecl.data.types import LazyTasks, task_split

    options = dict(num_tasks=4, max_train_per_task=300, max_test_per_task=100)
    bench, reference = permuted_mnist(data_root, **options), permuted_mnist(data_root, **options)
    built = []
    source = bench.tasks._source
    original = source.build
    source.build = lambda i: built.append(i) or original(i)
    for t in (3, 1, 2):
        for split in ("test", "val", "train"):
            x, y = task_split(bench.tasks, t, split)
            assert torch.equal(x, getattr(reference.tasks[t], f"{split}_x"))
            assert torch.equal(y, getattr(reference.tasks[t], f"{split}_y"))
    assert built == []
    again = bench.tasks.split(3, "test")
    assert again[0] is bench.tasks.split(3, "test")[0]  # kept, not derived again
    task = bench.tasks[0]  # a task in the cache: its own tensors
    assert bench.tasks.split(0, "test")[0] is task.test_x
    assert bench.tasks[1:].split(1, "test")[0] is bench.tasks.split(2, "test")[0]  # a slice's index
    with pytest.raises(ConfigError, match="LazyTasks.split\\(name=...\\): must be one of train, val, test"):
        bench.tasks.split(0, "valid")
    tiny = LazyTasks(3, lambda i: reference.tasks[i], split_cache_bytes=0)  # no builder, no room
    assert torch.equal(tiny.split(2, "test")[1], reference.tasks[2].test_y) and tiny._source.splits == {}
    assert task_split([task], 0, "val")[0] is task.val_x  # a plain list


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "name, options",
    [
        ("permuted-mnist", {"num_tasks": 3, **SMALL}),
        ("split-mnist", {"class_order_seed": 1, **SMALL}),
        ("split-digits", {}),
    ],
)
def test_same_arguments_give_identical_tensors(data_root, name, options):
    if name != "split-digits":
        options = {**options, "data_root": data_root}
    a, b = load_benchmark(name, **options), load_benchmark(name, **options)
    assert a.info == b.info and [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    for x, y in zip(_all_tensors(a), _all_tensors(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    c = load_benchmark(name, **options, seed=1)
    assert not torch.equal(a.tasks[0].train_x, c.tasks[0].train_x)  # the seed moves the split
    if "max_test_per_task" in options:  # ... and the test subset
        assert not torch.equal(a.tasks[0].test_x, c.tasks[0].test_x)


def test_seed_leaves_test_set_alone_without_subsetting():
    a, b = split_digits(seed=0), split_digits(seed=0, val_fraction=0.3)
    assert torch.equal(a.tasks[0].test_x, b.tasks[0].test_x)  # val_fraction never touches test
    assert len(b.tasks[0].val_y) > len(a.tasks[0].val_y)


def test_subset_and_val_split_helpers():
    idx = torch.arange(100, 200)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sub = _subset(idx, 30, gen())
    assert len(sub) == 30 and set(sub.tolist()) <= set(idx.tolist()) and torch.equal(sub, sub.sort().values)
    assert torch.equal(sub, _subset(idx, 30, gen()))
    assert _subset(idx, None, gen()) is idx and _subset(idx, 500, gen()) is idx
    train, val = _val_split(idx, 0.15, gen())
    assert len(val) == 15 and len(train) == 85
    assert sorted(train.tolist() + val.tolist()) == idx.tolist()


# ----------------------------------------------------------------------------- registry and errors


def test_registry_keys():
    assert set(BENCHMARKS) == {"permuted-mnist", "split-mnist", "split-fashion-mnist", "split-digits",
                               "split-cifar10", "split-cifar100", "cifar10-100"}
    assert load_benchmark("split_digits", num_tasks=2).num_tasks == 2  # "_" read as "-"


def test_unknown_benchmark_lists_known_names():
    with pytest.raises(ConfigError) as info:
        load_benchmark("split-cifar")
    msg = str(info.value)
    assert "'split-cifar'" in msg and all(name in msg for name in BENCHMARKS)


def test_unknown_option_names_option_and_benchmark():
    with pytest.raises(ConfigError) as info:
        load_benchmark("split-digits", data_root="/tmp", num_task=3)
    msg = str(info.value)
    assert "'split-digits'" in msg and "'data_root'" in msg and "'num_task'" in msg and "num_tasks" in msg


@pytest.mark.parametrize(
    "options, match",
    [
        ({"num_tasks": 0}, "num_tasks must be >= 1"),
        ({"num_tasks": 2.0}, "num_tasks must be an integer"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
        ({"max_train_per_task": 0}, "max_train_per_task must be >= 1"),
        ({"max_test_per_task": True}, "max_test_per_task must be an integer"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"class_order_seed": 1.5}, "class_order_seed must be an integer"),
        ({"max_train_per_task": 1, "val_fraction": 0.9}, "no training samples left"),
    ],
)
def test_bad_option_values(options, match):
    with pytest.raises(ConfigError, match=match):
        load_benchmark("split-digits", **options)


def test_missing_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSECL_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="SPARSECL_DATA"):
        load_benchmark("split-mnist")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_benchmark("permuted-mnist", data_root=tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="data_root=") as info:
        load_benchmark("split-fashion-mnist", data_root=tmp_path)  # exists but holds no files
    assert "--data-root" in info.value.cli_message
