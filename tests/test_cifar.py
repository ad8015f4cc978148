"""CIFAR: the restricted pickle readers (real CIFAR-100, written CIFAR-10 files), their errors, the
CIFAR benchmarks, per-channel normalization (``TaskData.prepare``), random crop + flip, and the
trainer's input pipeline.

CIFAR-10 is not in the shared data folder: the tests write small files in its official layout
(``pickle.dump`` of dicts like the official ones)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecl.data import TaskData, load_benchmark, random_crop_flip
from sparsecl.data.benchmarks import CIFAR_STATS, cifar10_100, split_cifar10, split_cifar100
from sparsecl.data.formats import cifar_class_names, load_cifar, read_cifar_pickle
from sparsecl.data.types import Benchmark
from sparsecl.errors import ConfigError, DataFormatError, DataNotFoundError
from sparsecl.methods import METHODS
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TaskSession, Trainer, TrainConfig, accuracy, as_float, predict

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
SMALL = {"max_train_per_task": 40, "max_test_per_task": 20}


# ----------------------------------------------------------------------------- written CIFAR-10 files


def _dump(path: Path, obj, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root: Path, per_class_train: int = 6, per_class_test: int = 4, seed: int = 0,
                  protocol: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``<root>/cifar-10-batches-py/`` in the official layout: five ``data_batch_*`` files
    with ``per_class_train`` images of each class, ``test_batch`` with ``per_class_test``, and
    ``batches.meta``. Images are random (hence distinct), labels shuffled. ``data_batch_2`` uses
    bytes keys, as the official files read with ``encoding="bytes"`` do. Returns each file's
    ``(data (N, 3072), labels (N,))``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in CIFAR10_TRAIN_FILES + ["test_batch"]:
        per_class = per_class_test if name == "test_batch" else per_class_train
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        d = {"batch_label": f"{name} of 5", "labels": [int(v) for v in labels], "data": data,
             "filenames": [f"img_{name}_{i}.png" for i in range(len(labels))]}
        if name == "data_batch_2":
            d = {k.encode(): v for k, v in d.items()}
        _dump(folder / name, d, protocol)
        written[name] = (data, labels)
    _dump(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072},
          protocol)
    return written


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """A data root holding written CIFAR-10 files and a link to the real cifar-100-python."""
    root = tmp_path_factory.mktemp("cifar-root")
    return root, write_cifar10(root)


@pytest.fixture(scope="module")
def both_root(cifar10, data_root):
    root = cifar10[0]
    link = root / "cifar-100-python"
    if not link.exists():
        link.symlink_to((data_root / "cifar-100-python").resolve(), target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def cifar100(data_root):
    folder = data_root / "cifar-100-python"
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: the data root must hold the real CIFAR-100 (see its README.md)",
                    pytrace=False)
    return {train: load_cifar(data_root, "CIFAR100", train) for train in (True, False)}


class RawIndex:
    """Maps an image's bytes to the raw labels it has (a few CIFAR-100 images occur twice, under
    two labels)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        rows = np.ascontiguousarray(images).reshape(len(images), -1)
        self.labels: dict[bytes, set[int]] = {}
        for row, label in zip(rows, labels):
            self.labels.setdefault(row.tobytes(), set()).add(int(label))

    def check(self, x: torch.Tensor, labels: np.ndarray) -> None:
        """Every image of ``x`` occurs in the raw split under the label ``labels[i]``."""
        for row, label in zip(x.reshape(len(x), -1).numpy(), labels):
            assert int(label) in self.labels[row.tobytes()]


# ----------------------------------------------------------------------------- readers


def test_cifar100_real_files(data_root, cifar100):
    for train, n, per_class in ((True, 50000, 500), (False, 10000, 100)):
        images, labels = cifar100[train]
        assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8 and images.flags.writeable
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert labels.min() == 0 and labels.max() == 99
        np.testing.assert_array_equal(np.bincount(labels, minlength=100), np.full(100, per_class))
    images = cifar100[True][0]
    mean, std = [], []
    for c in range(3):  # exact statistics from the histogram of each channel's pixel values
        hist = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        v = np.arange(256) / 255.0
        m = (hist * v).sum() / hist.sum()
        mean.append(m)
        std.append(np.sqrt((hist * (v - m) ** 2).sum() / hist.sum()))
    np.testing.assert_allclose(mean, CIFAR_STATS["CIFAR100"][0], atol=1e-4)
    np.testing.assert_allclose(std, CIFAR_STATS["CIFAR100"][1], atol=1e-4)
    names = cifar_class_names(data_root, "CIFAR100")
    assert len(names) == 100 and names[:3] == ["apple", "aquarium_fish", "baby"]


def test_cifar100_reader_matches_a_plain_unpickle_in_chw_order(data_root, cifar100):
    with open(data_root / "cifar-100-python" / "test", "rb") as f:
        d = pickle.load(f, encoding="latin1")  # the trusted shared files, to compare with
    images, labels = cifar100[False]
    np.testing.assert_array_equal(images.reshape(len(images), -1), d["data"])
    np.testing.assert_array_equal(labels, d["fine_labels"])
    np.testing.assert_array_equal(images[:, 1], d["data"][:, 1024:2048].reshape(-1, 32, 32))  # green plane


def test_returned_arrays_are_fresh_copies(data_root, cifar100):
    a, _ = load_cifar(data_root, "CIFAR100", False)
    a[0] = 0
    b, _ = load_cifar(data_root, "CIFAR100", False)
    np.testing.assert_array_equal(b[0], cifar100[False][0][0])  # the per-process cache is untouched


def test_cifar10_written_layout(cifar10):
    root, written = cifar10
    images, labels = load_cifar(root, "CIFAR10", train=True)
    data = np.concatenate([written[n][0] for n in CIFAR10_TRAIN_FILES])
    assert images.shape == (300, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images.reshape(300, -1), data)
    np.testing.assert_array_equal(labels, np.concatenate([written[n][1] for n in CIFAR10_TRAIN_FILES]))
    images, labels = load_cifar(root, "CIFAR10", train=False)
    np.testing.assert_array_equal(images.reshape(len(images), -1), written["test_batch"][0])
    np.testing.assert_array_equal(labels, written["test_batch"][1])
    assert cifar_class_names(root, "CIFAR10") == CIFAR10_NAMES


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_any_pickle_protocol_reads(tmp_path, protocol):
    written = write_cifar10(tmp_path, per_class_train=1, per_class_test=1, protocol=protocol)
    images, labels = load_cifar(tmp_path, "CIFAR10", train=False)
    np.testing.assert_array_equal(images.reshape(10, -1), written["test_batch"][0])
    d = read_cifar_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    assert set(d) == {"batch_label", "labels", "data", "filenames"}  # bytes keys read as str


def test_env_var_root(cifar10, monkeypatch):
    monkeypatch.setenv("SPARSECL_DATA", str(cifar10[0]))
    assert load_cifar(None, "CIFAR10", train=False)[0].shape == (40, 3, 32, 32)


# ----------------------------------------------------------------------------- reader errors


@pytest.fixture
def small10(tmp_path):
    write_cifar10(tmp_path, per_class_train=1, per_class_test=2)
    return tmp_path, tmp_path / "cifar-10-batches-py"


def test_missing_folder_names_the_layout_and_download(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_cifar(tmp_path, "CIFAR100", train=True)
    msg = str(info.value)
    assert str(tmp_path / "cifar-100-python") in msg
    assert "train, test, meta" in msg and "cifar-100-python.tar.gz" in msg
    assert "download=True" in msg and "--download" in info.value.cli_message  # API terms, CLI terms


def test_missing_file_is_named(small10):
    root, folder = small10
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3") as info:
        load_cifar(root, "CIFAR10", train=True)
    assert str(folder / "data_batch_3") in str(info.value)
    load_cifar(root, "CIFAR10", train=False)  # the test split is complete
    (folder / "batches.meta").unlink()
    with pytest.raises(DataNotFoundError, match="batches.meta"):
        cifar_class_names(root, "CIFAR10")


@pytest.mark.parametrize("keep", [0, 1, 20, 0.5, -1])
def test_truncated_pickle(small10, keep):
    root, folder = small10
    path = folder / "test_batch"
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:cut])
    with pytest.raises(DataFormatError) as info:
        load_cifar(root, "CIFAR10", train=False)
    assert str(path) in str(info.value) and "expected" in str(info.value)


@pytest.mark.parametrize("content", [b"garbage, not a pickle", b"\x80\x02}q\x00.\x00\x00", pickle.dumps([1, 2])])
def test_corrupt_or_foreign_pickle(small10, content):
    root, folder = small10
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataFormatError) as info:
        load_cifar(root, "CIFAR10", train=False)
    assert str(folder / "test_batch") in str(info.value)


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(data=d["data"][:, :1024]), "expected 'data' to be a uint8 array of shape (N, 3072)"),
    (lambda d: d.update(data=d["data"].astype(np.float32)), "expected 'data' to be a uint8 array"),
    (lambda d: d.update(data=d["data"].reshape(-1, 3, 32, 32)), "expected 'data' to be a uint8 array"),
    (lambda d: d.update(data=d["data"].tolist()), "got list"),
    (lambda d: d["labels"].__setitem__(0, 10), "expected 'labels' in 0..9"),
    (lambda d: d["labels"].__setitem__(0, -1), "expected 'labels' in 0..9"),
    (lambda d: d.update(labels=d["labels"][:-1]), "holds 20 images but 19 'labels'; expected equal counts"),
    (lambda d: d.update(labels=[float(v) for v in d["labels"]]), "1-D list of integers"),
    (lambda d: d.pop("labels"), "missing key(s) 'labels'"),
])
def test_wrong_content(small10, change, fragment):
    root, folder = small10
    path = folder / "test_batch"
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    change(d)
    _dump(path, d)
    with pytest.raises(DataFormatError) as info:
        load_cifar(root, "CIFAR10", train=False)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_cifar100_labels_are_checked_against_100_classes(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), np.uint8)
    _dump(folder / "train", {"data": data, "fine_labels": [0, 99, 5], "coarse_labels": [0, 1, 2]})
    _dump(folder / "test", {"data": data, "fine_labels": [0, 100, 5], "coarse_labels": [0, 1, 2]})
    assert load_cifar(tmp_path, "CIFAR100", train=True)[1].tolist() == [0, 99, 5]
    with pytest.raises(DataFormatError, match=r"test: expected 'fine_labels' in 0\.\.99"):
        load_cifar(tmp_path, "CIFAR100", train=False)


def test_trailing_bytes(small10):
    root, folder = small10
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataFormatError, match="trailing bytes"):
        load_cifar(root, "CIFAR10", train=False)


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'touch {marker}'\ntR.",  # os.system("touch ...")
    b"cbuiltins\nexec\n(S'open(\"{marker}\", \"w\")'\ntR.",
    b"c__builtin__\neval\n(S'open(\"{marker}\", \"w\")'\ntR.",
    b"(dp0\nS'data'\np1\ncsubprocess\ncall\n(S'touch {marker}'\ntRs.",  # inside the dict
])
def test_disallowed_globals_are_refused_without_running(small10, tmp_path, payload):
    root, folder = small10
    marker = tmp_path / "pwned"
    path = folder / "test_batch"
    path.write_bytes(payload.replace(b"{marker}", str(marker).encode()))
    with pytest.raises(DataFormatError) as info:
        load_cifar(root, "CIFAR10", train=False)
    assert not marker.exists()
    msg = str(info.value)
    assert str(path) in msg and "refused to load the global" in msg


def test_reduce_based_exploit_is_refused(small10, tmp_path):
    root, folder = small10
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    _dump(folder / "test_batch", {"data": Exploit(), "labels": []})
    with pytest.raises(DataFormatError, match="refused to load the global .*system"):
        load_cifar(root, "CIFAR10", train=False)
    assert not marker.exists()


def test_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError, match="CIFAR10, CIFAR100"):
        load_cifar(tmp_path, "CIFAR1000", train=True)


# ----------------------------------------------------------------------------- benchmarks


@pytest.fixture(scope="module")
def raw100(cifar100):
    return {train: RawIndex(*cifar100[train]) for train in (True, False)}


def _check_class_task(task, raw, classes):
    assert task.classes == tuple(classes)
    for part, split in (("train", True), ("val", True), ("test", False)):
        x, y = getattr(task, f"{part}_x"), getattr(task, f"{part}_y")
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(len(classes)))
        raw[split].check(x, np.array(classes)[y.numpy()])


def test_split_cifar100_defaults(data_root, raw100):
    bench = split_cifar100(data_root, **SMALL)
    order = np.random.RandomState(1993).permutation(100).tolist()
    assert order[:5] == [68, 56, 78, 8, 23]  # iCaRL's order, as in FACIL
    assert bench.name == "split-cifar100" and bench.num_tasks == 10 and bench.input_shape == (3, 32, 32)
    info = bench.info
    assert info["class_order_seed"] == 1993 and info["class_order"] == order
    assert info["task_classes"] == [order[10 * t:10 * t + 10] for t in range(10)]
    assert info["classes_per_task"] == 10 and info["dataset"] == "CIFAR100" and info["augment"] is True
    assert info["normalize"] == [[0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]]
    assert info["sizes"] == [{"train": 36, "val": 4, "test": 20}] * 10
    seen = set()
    for t, task in enumerate(bench.tasks):
        assert task.task_id == t and task.num_classes == 10 and not seen & set(task.classes)
        seen |= set(task.classes)
        assert task.normalize == CIFAR_STATS["CIFAR100"] and task.augment is True
        assert task.name == "split-cifar100:" + "-".join(map(str, task.classes))
    assert seen == set(range(100))
    for task in bench.tasks[:2]:
        _check_class_task(task, raw100, info["task_classes"][task.task_id])


def test_split_cifar100_full_sizes_and_20_tasks(data_root, raw100):
    bench = split_cifar100(data_root, classes_per_task=5, class_order_seed=None, normalize=False, augment=False)
    assert bench.num_tasks == 20
    assert bench.info["class_order"] == list(range(100)) and bench.info["classes_per_task"] == 5
    assert bench.info["sizes"] == [{"train": 2250, "val": 250, "test": 500}] * 20
    assert [t.classes for t in bench.tasks[:2]] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert bench.tasks[0].normalize is None and bench.tasks[0].augment is False
    assert bench.info["normalize"] is None and bench.info["augment"] is False
    _check_class_task(bench.tasks[19], raw100, range(95, 100))


def test_split_cifar100_seeds(data_root):
    a = split_cifar100(data_root, classes_per_task=20, class_order_seed=7, seed=1, **SMALL)
    b = split_cifar100(data_root, classes_per_task=20, class_order_seed=7, seed=1, **SMALL)
    assert a.num_tasks == 5 and [len(t.classes) for t in a.tasks] == [20] * 5
    assert a.info["class_order"] == np.random.RandomState(7).permutation(100).tolist()
    assert a.info["class_order"] != split_cifar100(data_root, classes_per_task=20, **SMALL).info["class_order"]
    first2 = split_cifar100(data_root, num_tasks=2, classes_per_task=20, class_order_seed=7, seed=1, **SMALL)
    assert [t.classes for t in first2.tasks] == [t.classes for t in a.tasks[:2]]  # the first tasks only
    for ta, tb in zip(a.tasks, b.tasks):
        for part in ("train_x", "train_y", "val_x", "test_x", "test_y"):
            assert torch.equal(getattr(ta, part), getattr(tb, part))
    c = split_cifar100(data_root, classes_per_task=20, class_order_seed=7, seed=2, **SMALL)
    assert not torch.equal(a.tasks[0].train_x, c.tasks[0].train_x)  # another subset


@pytest.mark.parametrize("options, match", [
    ({"classes_per_task": 7}, r"classes_per_task=7 does not split the 100 classes of CIFAR-100 evenly; expected one of 1, 2, 4, 5"),
    ({"num_tasks": 11}, "num_tasks must be between 1 and 10"),
    ({"num_tasks": 0}, "num_tasks must be between 1 and 10"),
    ({"class_order_seed": -1}, "class_order_seed must be between 0 and 4294967295"),
    ({"augment": "yes"}, "augment must be True or False"),
    ({"normalize": 1}, "normalize must be True or False"),
    ({"val_fraction": 1.0}, "val_fraction"),
])
def test_split_cifar100_bad_options(options, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_benchmark("split-cifar100", data_root=tmp_path, **options)


def test_split_cifar10(cifar10):
    root, written = cifar10
    bench = load_benchmark("split_cifar10", data_root=root, val_fraction=0.2)
    assert bench.num_tasks == 5 and bench.input_shape == (3, 32, 32)
    assert [t.classes for t in bench.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert bench.info["sizes"] == [{"train": 48, "val": 12, "test": 8}] * 5
    raw = {True: RawIndex(*load_cifar(root, "CIFAR10", True)), False: RawIndex(*load_cifar(root, "CIFAR10", False))}
    for task in bench.tasks:
        assert task.normalize == CIFAR_STATS["CIFAR10"] and task.augment
        _check_class_task(task, raw, task.classes)
    shuffled = split_cifar10(root, num_tasks=2, class_order_seed=3, max_train_per_task=10)
    assert shuffled.info["class_order"] == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert shuffled.info["sizes"][0] == {"train": 9, "val": 1, "test": 8}
    with pytest.raises(ConfigError, match="at most 5 tasks"):
        split_cifar10(root, num_tasks=6)


def test_cifar10_100(both_root, raw100):
    root = both_root
    bench = load_benchmark("cifar10-100", data_root=root, num_tasks=3, max_train_per_task=50, max_test_per_task=30)
    assert bench.name == "cifar10-100" and bench.num_tasks == 3 and bench.input_shape == (3, 32, 32)
    assert bench.info["task_datasets"] == ["CIFAR10", "CIFAR100", "CIFAR100"]
    assert bench.info["task_classes"] == [list(range(10)), list(range(10)), list(range(10, 20))]
    t0, t1, t2 = bench.tasks
    raw10 = {train: RawIndex(*load_cifar(root, "CIFAR10", train)) for train in (True, False)}
    _check_class_task(t0, raw10, range(10))  # all of CIFAR-10, from the CIFAR-10 files
    assert len(t0.train_y) + len(t0.val_y) == 50 and len(t0.test_y) == 30
    _check_class_task(t1, raw100, range(10))
    _check_class_task(t2, raw100, range(10, 20))
    assert t0.normalize == CIFAR_STATS["CIFAR10"] and t1.normalize == t2.normalize == CIFAR_STATS["CIFAR100"]
    assert [t.task_id for t in bench.tasks] == [0, 1, 2]
    assert t0.name == "cifar10-100:cifar10" and t1.name.startswith("cifar10-100:cifar100:0-1-")
    default = cifar10_100(root, max_train_per_task=5, max_test_per_task=5, class_order_seed=1993)
    assert default.num_tasks == 6
    assert default.info["task_classes"][1] == np.random.RandomState(1993).permutation(100)[:10].tolist()
    with pytest.raises(ConfigError, match="at most 11 tasks"):
        cifar10_100(root, num_tasks=12)


def test_cifar10_100_needs_both_data_sets(data_root, cifar10, tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        cifar10_100(data_root, num_tasks=2)
    (tmp_path / "cifar-10-batches-py").symlink_to(cifar10[0] / "cifar-10-batches-py")
    assert cifar10_100(tmp_path, num_tasks=1).num_tasks == 1  # task 0 only needs CIFAR-10
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        cifar10_100(tmp_path, num_tasks=2)


# ----------------------------------------------------------------------------- augmentation


def _padded_crop(x: torch.Tensor, dy: int, dx: int, flip: bool, padding: int = 4) -> torch.Tensor:
    """Reference for one sample ``(C, H, W)``, written out with Python slicing."""
    c, h, w = x.shape
    padded = torch.zeros((c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
    padded[:, padding:padding + h, padding:padding + w] = x
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop.flip(-1) if flip else crop


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_is_exactly_a_padded_crop(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), generator=g).to(dtype)
    before = x.clone()
    out = random_crop_flip(x, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == dtype and torch.equal(x, before)
    # the documented draws: N row offsets, N column offsets, N coins
    ref = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 9, (64,), generator=ref), torch.randint(0, 9, (64,), generator=ref)
    flip = torch.rand(64, generator=ref) < 0.5
    for n in range(64):
        assert torch.equal(out[n], _padded_crop(x[n], int(dy[n]), int(dx[n]), bool(flip[n])))
        # and no other offset / flip gives this sample (pixels are non-zero, distinct enough)
        matches = [(a, b, f) for a in range(9) for b in range(9) for f in (False, True)
                   if torch.equal(out[n], _padded_crop(x[n], a, b, f))]
        assert matches == [(int(dy[n]), int(dx[n]), bool(flip[n]))]
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))


def test_random_crop_flip_is_deterministic_given_the_generator():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = random_crop_flip(x, g1), random_crop_flip(x, g2)
    assert torch.equal(a, b)
    assert torch.equal(random_crop_flip(x, g1), random_crop_flip(x, g2))  # states advanced alike
    assert not torch.equal(random_crop_flip(x, torch.Generator().manual_seed(2)), a)
    assert not torch.equal(random_crop_flip(x, g1), a)  # the generator moved on


def test_flip_frequency_is_about_half():
    x = torch.arange(4000 * 4, dtype=torch.float32).view(4000, 1, 1, 4)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    same, flipped = (out == x).all(-1).flatten(), (out == x.flip(-1)).all(-1).flatten()
    assert bool((same ^ flipped).all())  # with no padding, each sample is kept or mirrored
    assert 0.46 < float(flipped.float().mean()) < 0.54


def test_random_crop_flip_small_and_bad_inputs():
    assert random_crop_flip(torch.zeros((0, 3, 32, 32), dtype=torch.uint8), torch.Generator()).shape == (0, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        random_crop_flip(torch.zeros((3, 32, 32)), torch.Generator())
    with pytest.raises(ConfigError, match="padding"):
        random_crop_flip(torch.zeros((1, 3, 32, 32)), torch.Generator(), padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_crop_flip_on_cuda_equals_cpu():
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    cpu = random_crop_flip(x, torch.Generator().manual_seed(3))
    gpu = random_crop_flip(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------- prepare


def _task(x: torch.Tensor, normalize=None, augment=False, task_id=0, classes=2, n_test=None) -> TaskData:
    y = torch.arange(len(x)) % classes
    k = n_test or len(x)
    return TaskData(task_id, f"t{task_id}", tuple(range(classes)), x, y, x[:k], y[:k], x[:k], y[:k],
                    normalize=normalize, augment=augment)


def test_prepare_without_normalization_is_as_float():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    task = _task(x)
    assert torch.equal(task.prepare(x), as_float(x)) and task.prepare(x).dtype == torch.float32
    assert torch.equal(task.prepare(x), x.float() / 255)
    f = torch.rand(5, 1, 4, 4)
    assert task.prepare(f) is f  # float input: as it is, like as_float


def test_prepare_normalizes_each_channel():
    mean, std = CIFAR_STATS["CIFAR100"]
    x = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8)
    task = _task(x, normalize=(list(mean), list(std)))
    assert task.normalize == (mean, std)  # stored as tuples of floats
    out = task.prepare(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        expected = (x[:, c].double() / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[:, c].double(), expected, atol=1e-6, rtol=0)
    # a black pixel is -mean/std, a white one (1 - mean)/std
    black = task.prepare(torch.zeros((1, 3, 1, 1), dtype=torch.uint8)).flatten()
    white = task.prepare(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
    torch.testing.assert_close(black, torch.tensor([-m / s for m, s in zip(mean, std)]))
    torch.testing.assert_close(white, torch.tensor([(1 - m) / s for m, s in zip(mean, std)]))
    f = x.float() / 255
    before = f.clone()
    torch.testing.assert_close(task.prepare(f), out)  # float input taken as scaled, not modified
    assert torch.equal(f, before)
    with pytest.raises(ConfigError, match=r"normalize has 3 channels but the batch has shape \(2, 1, 5, 5\)"):
        task.prepare(torch.zeros((2, 1, 5, 5)))


@pytest.mark.parametrize("normalize, match", [
    (((0.5, 0.5), (0.2, 0.2)), "one mean and one std per channel"),
    (((0.5, 0.5, 0.5), (0.2, 0.0, 0.2)), "positive stds"),
    ((0.5, 0.2), "two sequences of numbers"),
])
def test_bad_normalize_is_refused(normalize, match):
    with pytest.raises(ConfigError, match=match):
        _task(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), normalize=normalize)


# ----------------------------------------------------------------------------- trainer input pipeline


def _image_bench(normalize=CIFAR_STATS["CIFAR10"], augment=True, num_tasks=2, n=40) -> Benchmark:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(num_tasks):
        x = torch.randint(1, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        tasks.append(_task(x, normalize=normalize if t == 0 else None, augment=augment, task_id=t, n_test=10))
    return Benchmark("images", tasks, (3, 8, 8))


def _session(bench, seed=0, t=0):
    net = ContinualNetwork(mlp(bench.input_shape, (8,), 2))
    for _ in range(t + 1):
        net.add_head(2)
    method = METHODS["finetune"][0]()
    return TaskSession(net, method, t, bench.tasks[: t + 1], TrainConfig(batch_size=16, seed=seed), None)


def test_augmentation_does_not_change_the_sample_order():
    plain = list(_session(_image_bench(augment=False)).batches())
    augmented = list(_session(_image_bench(augment=True)).batches())
    assert len(plain) == len(augmented) == 3
    for (xp, yp, ip), (xa, ya, ia) in zip(plain, augmented):
        assert torch.equal(yp, ya) and torch.equal(ip, ia)
        assert xp.shape == xa.shape and not torch.equal(xp, xa)
    again = list(_session(_image_bench(augment=True)).batches())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(augmented, again))  # seeded from (seed, t)
    other = list(_session(_image_bench(augment=True), seed=1).batches())
    assert not torch.equal(other[0][0], augmented[0][0])


def test_training_batches_are_prepared_crops_and_measurement_batches_are_not_augmented():
    bench = _image_bench()
    task = bench.tasks[0]
    session = _session(bench)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    aug = torch.Generator()
    aug.set_state(session.aug_generator.get_state())
    x, _, _ = next(session.batches())
    assert torch.equal(x, task.prepare(random_crop_flip(task.train_x[order[:16]], aug)))
    for split in ("val", "test"):
        x, _, _ = next(session.batches(split=split, shuffle=False))
        assert torch.equal(x, task.prepare(getattr(task, f"{split}_x")[:16]))
    x, _, _ = next(session.batches(shuffle=False))  # e.g. activation statistics of the training data
    assert torch.equal(x, task.prepare(task.train_x[:16]))
    x, _, _ = next(session.batches(shuffle=False, augment=True))
    assert not torch.equal(x, task.prepare(task.train_x[:16]))


def test_mixed_tasks_each_get_their_own_normalization():
    bench = _image_bench(augment=False)
    assert bench.tasks[0].normalize is not None and bench.tasks[1].normalize is None
    session = _session(bench, t=1)
    stored = torch.cat([t.train_x for t in bench.tasks])
    x, _, ids = next(session.batches(tasks=bench.tasks, batch_size=80))  # joint training
    order = torch.randperm(80, generator=torch.Generator().manual_seed(1))  # the session's: seed 0, task 1
    for task in bench.tasks:
        rows = (ids == task.task_id).nonzero().flatten()
        assert 0 < len(rows) < 80
        assert torch.equal(x[rows], task.prepare(stored[order[rows]]))
    augmented = [b[0] for b in _session(_image_bench(augment=True), t=1).batches(tasks=bench.tasks)]
    again = [b[0] for b in _session(_image_bench(augment=True), t=1).batches(tasks=bench.tasks)]
    assert all(torch.equal(a, b) for a, b in zip(augmented, again))


def test_predict_and_accuracy_use_the_tasks_normalization():
    bench = _image_bench(augment=False)
    task = bench.tasks[0]
    net = ContinualNetwork(mlp((3, 8, 8), (8,), 2))
    net.add_head(2)
    net.eval()
    with torch.no_grad():
        expected = net(task.prepare(task.test_x), 0)
    # batches of 4 against one batch: the kernels may round differently, so compare with a tolerance
    torch.testing.assert_close(predict(net, task.test_x, 0, 4, "cpu", task.prepare), expected)
    assert not torch.allclose(predict(net, task.test_x, 0, 4, "cpu"), expected, atol=1e-3)  # as_float only
    batched = predict(net, task.test_x, 0, 4, "cpu", task.prepare)
    acc = float((batched.argmax(1) == task.test_y).float().mean())  # the same batching as accuracy()
    assert accuracy(net, task.test_x, task.test_y, 0, 4, "cpu", task.prepare) == acc


@pytest.mark.parametrize("method", ["finetune", "clnp"])
def test_trainer_runs_on_split_cifar100(data_root, method):
    bench = split_cifar100(data_root, num_tasks=2, classes_per_task=5, max_train_per_task=40, max_test_per_task=20)
    cls, config = METHODS[method]
    m = cls(config()) if config else cls()
    result = Trainer(m, TrainConfig(epochs=1, batch_size=16, probe_size=8)).fit(mlp((3, 32, 32), (32, 32), 5), bench)
    assert len(result.accuracy_matrix) == 2 and result.accuracy_matrix[1][1] is not None
    if method == "clnp":
        assert result.max_logit_change == 0.0
