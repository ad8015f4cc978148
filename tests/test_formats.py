"""IDX reader and MNIST-layout loader: real files, and corrupt copies written into tmp_path."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecl.data import load_mnist_like, read_idx
from sparsecl.data.formats import resolve_data_root
from sparsecl.errors import ConfigError, DataFormatError, DataNotFoundError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file (big-endian)."""
    code = _CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def make_root(tmp_path: Path, images: np.ndarray, labels: np.ndarray, *, gz: bool = False) -> Path:
    """A data root holding an MNIST test split made of ``images`` and ``labels``."""
    suffix = ".gz" if gz else ""
    raw = tmp_path / "root" / "MNIST" / "raw"
    write(raw / f"t10k-images-idx3-ubyte{suffix}", idx_bytes(images))
    write(raw / f"t10k-labels-idx1-ubyte{suffix}", idx_bytes(labels))
    return tmp_path / "root"


@pytest.fixture(scope="module")
def mnist_test_raw(data_root: Path) -> dict[str, bytes]:
    """Decompressed bytes of the real MNIST test files."""
    raw = data_root / "MNIST" / "raw"
    return {n: gzip.decompress((raw / f"{n}.gz").read_bytes()) for n in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    "dataset, train, n, counts",
    [
        ("MNIST", True, 60000, MNIST_TRAIN_COUNTS),
        ("MNIST", False, 10000, MNIST_TEST_COUNTS),
        ("FashionMNIST", True, 60000, [6000] * 10),
        ("FashionMNIST", False, 10000, [1000] * 10),
    ],
)
def test_real_files_shapes_dtypes_and_class_counts(data_root, dataset, train, n, counts):
    images, labels = load_mnist_like(data_root, dataset, train)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == counts
    assert images.max() == 255 and images.min() == 0
    assert images.flags.writeable


def test_uncompressed_copy_reads_the_same(data_root, mnist_test_raw, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    for name, data in mnist_test_raw.items():
        write(raw / name, data)
    assert not list(raw.glob("*.gz"))
    images, labels = load_mnist_like(tmp_path, "MNIST", train=False)
    ref_images, ref_labels = load_mnist_like(data_root, "MNIST", train=False)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(read_idx(raw / "t10k-images-idx3-ubyte"), ref_images)


def test_gz_preferred_when_both_exist(data_root, mnist_test_raw, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist_test_raw:
        shutil.copy(data_root / "MNIST" / "raw" / f"{name}.gz", raw)
        write(raw / name, b"not an idx file")  # would fail if read
    images, labels = load_mnist_like(tmp_path, "MNIST", train=False)
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == MNIST_TEST_COUNTS


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip_every_dtype(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write(tmp_path / f"a.idx{suffix}", idx_bytes(array))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_dims_and_values(tmp_path):
    # header: int32, 1 dim of 2; values 0x01020304 and -2 stored big-endian
    data = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 1, 2, 3, 4, 0xFF, 0xFF, 0xFF, 0xFE])
    assert read_idx(write(tmp_path / "a.idx", data)).tolist() == [0x01020304, -2]


def test_bad_magic_number(tmp_path, mnist_test_raw):
    data = mnist_test_raw["t10k-labels-idx1-ubyte"]
    path = write(tmp_path / "labels", b"\x01" + data[1:])
    with pytest.raises(DataFormatError) as info:
        read_idx(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "magic number" in msg and "two zero bytes" in msg


def test_unknown_type_code(tmp_path):
    path = write(tmp_path / "x.idx", bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(DataFormatError, match=r"type code 0x0A is not one of 0x08, 0x09, 0x0B") as info:
        read_idx(path)
    assert str(info.value).startswith(str(path))


def test_gzip_data_without_gz_suffix_gets_a_hint(tmp_path, mnist_test_raw):
    path = tmp_path / "labels"
    path.write_bytes(gzip.compress(mnist_test_raw["t10k-labels-idx1-ubyte"]))
    with pytest.raises(DataFormatError, match="looks gzip-compressed"):
        read_idx(path)


@pytest.mark.parametrize("cut", [0, 3, 4, 7, 8, 100, 10007])
def test_real_labels_truncated(tmp_path, mnist_test_raw, cut):
    data = mnist_test_raw["t10k-labels-idx1-ubyte"]  # 8-byte header + 10000 labels
    path = write(tmp_path / "t10k-labels-idx1-ubyte", data[:cut])
    with pytest.raises(DataFormatError) as info:
        read_idx(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "expected" in msg
    if cut >= 8:
        assert "truncated IDX payload" in msg and "expected 10000 bytes" in msg and f"got {cut - 8} bytes" in msg


@pytest.mark.parametrize("cut", [16, 16 + 784 * 5000, 16 + 7840000 - 1])
def test_real_images_truncated_gz(tmp_path, mnist_test_raw, cut):
    data = mnist_test_raw["t10k-images-idx3-ubyte"]
    path = write(tmp_path / "t10k-images-idx3-ubyte.gz", data[:cut])  # valid gzip of a short payload
    with pytest.raises(DataFormatError, match=r"expected 7840000 bytes after the header for dimensions \(10000, 28, 28\) of uint8, got \d+ bytes") as info:
        read_idx(path)
    assert str(info.value).startswith(str(path))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_is_a_format_error(tmp_path, data):
    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    full = idx_bytes(array)
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    path = write(tmp_path / "t.idx", full[:cut])
    with pytest.raises(DataFormatError) as info:
        read_idx(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "expected" in msg
    if cut >= 16:  # header complete: the payload check reports expected vs got bytes
        assert f"expected 48 bytes after the header for dimensions (2, 3, 4) of int16, got {cut - 16} bytes" in msg


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.binary(min_size=1, max_size=50))
def test_trailing_bytes_are_an_error(tmp_path, extra):
    full = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    path = write(tmp_path / "t.idx", full + extra)
    with pytest.raises(DataFormatError, match=rf"{len(extra)} trailing bytes: expected exactly 6 bytes after the header.*, got {6 + len(extra)} bytes") as info:
        read_idx(path)
    assert str(info.value).startswith(str(path))


def test_real_images_with_trailing_bytes(tmp_path, mnist_test_raw):
    path = write(tmp_path / "t10k-images-idx3-ubyte", mnist_test_raw["t10k-images-idx3-ubyte"] + b"\0\0\0")
    with pytest.raises(DataFormatError, match=r"3 trailing bytes: expected exactly 7840000 bytes"):
        read_idx(path)


def test_corrupt_gzip_streams(tmp_path, data_root):
    good = (data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    cases = {
        "flipped.gz": bytes(flipped),  # deflate error or CRC mismatch
        "truncated.gz": good[: len(good) // 2],  # stream ends early
        "garbage-after.gz": good + b"garbage",  # not a second gzip member
        "notgzip.gz": b"\x00\x00\x08\x01\x00\x00\x00\x01\x05",  # a raw IDX file named .gz
        "empty.gz": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataFormatError) as info:
            read_idx(path)
        msg = str(info.value)
        assert msg.startswith(str(path)), name
        assert "gzip" in msg and "expected" in msg, (name, msg)


def test_missing_file_for_read_idx(tmp_path):
    with pytest.raises(DataNotFoundError, match="not found") as info:
        read_idx(tmp_path / "nope.idx")
    assert str(tmp_path / "nope.idx") in str(info.value)


# ----------------------------------------------------------------------------- load_mnist_like


def test_count_mismatch_names_both_files_and_counts(tmp_path):
    root = make_root(tmp_path, np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8), gz=True)
    with pytest.raises(DataFormatError) as info:
        load_mnist_like(root, "MNIST", train=False)
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "5 images" in msg and "4 labels" in msg


def test_real_images_with_fewer_labels(tmp_path, mnist_test_raw):
    raw = tmp_path / "MNIST" / "raw"
    write(raw / "t10k-images-idx3-ubyte", mnist_test_raw["t10k-images-idx3-ubyte"])
    labels = read_idx(write(tmp_path / "l", mnist_test_raw["t10k-labels-idx1-ubyte"]))
    write(raw / "t10k-labels-idx1-ubyte", idx_bytes(labels[:9999]))
    with pytest.raises(DataFormatError, match=r"10000 images but .*t10k-labels-idx1-ubyte holds 9999 labels"):
        load_mnist_like(tmp_path, "MNIST", train=False)


def test_labels_out_of_range(tmp_path):
    root = make_root(tmp_path, np.zeros((3, 28, 28), np.uint8), np.array([0, 10, 9], np.uint8))
    with pytest.raises(DataFormatError, match=r"t10k-labels-idx1-ubyte: expected labels in 0\.\.9, got 1 labels outside \(max 10\)"):
        load_mnist_like(root, "MNIST", train=False)


@pytest.mark.parametrize(
    "images, labels, bad_file, expected",
    [
        (np.zeros((3, 784), np.uint8), np.zeros(3, np.uint8), "images", r"uint8 images of shape \(N, 28, 28\)"),
        (np.zeros((3, 28, 28), np.int16), np.zeros(3, np.uint8), "images", r"uint8 images of shape \(N, 28, 28\)"),
        (np.zeros((3, 32, 32), np.uint8), np.zeros(3, np.uint8), "images", r"uint8 images of shape \(N, 28, 28\)"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.int32), "labels", "1-D uint8 labels"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), "labels", "1-D uint8 labels"),
    ],
)
def test_wrong_dtype_or_rank(tmp_path, images, labels, bad_file, expected):
    root = make_root(tmp_path, images, labels)
    with pytest.raises(DataFormatError, match=expected) as info:
        load_mnist_like(root, "MNIST", train=False)
    assert str(info.value).startswith(str(root / "MNIST" / "raw" / f"t10k-{bad_file}-idx"))


def test_missing_files_list_every_path_and_a_hint(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write(raw / "train-labels-idx1-ubyte", idx_bytes(np.zeros(1, np.uint8)))  # only the labels exist
    with pytest.raises(DataNotFoundError) as info:
        load_mnist_like(tmp_path, "FashionMNIST", train=True)
    msg = str(info.value)
    assert "FashionMNIST" in msg and "train-images-idx3-ubyte" in msg
    assert str(raw / "train-images-idx3-ubyte.gz") in msg and str(raw / "train-images-idx3-ubyte") in msg
    assert "train-labels" not in msg  # the labels were found
    assert "data_root=" in msg and "SPARSECL_DATA" in msg and "download=True" in msg  # the API's terms
    cli = info.value.cli_message  # what the sparsecl command prints
    assert "--data-root" in cli and "--download" in cli and "download=True" not in cli


def test_missing_root_lists_both_files(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_mnist_like(tmp_path, "MNIST", train=False)
    msg = str(info.value)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(tmp_path / "MNIST" / "raw" / f"{name}.gz") in msg


def test_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError, match="'KMNIST' is not one of MNIST, FashionMNIST"):
        load_mnist_like(tmp_path, "KMNIST", train=True)


# ----------------------------------------------------------------------------- resolve_data_root


def test_resolve_data_root(tmp_path, monkeypatch):
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv("SPARSECL_DATA", str(other))
    assert resolve_data_root(tmp_path) == tmp_path  # explicit wins
    assert resolve_data_root(None) == other
    monkeypatch.delenv("SPARSECL_DATA")
    with pytest.raises(DataNotFoundError) as info:
        resolve_data_root(None)
    assert "data_root argument" in str(info.value) and "SPARSECL_DATA" in str(info.value)
    assert "--data-root" in info.value.cli_message
    with pytest.raises(DataNotFoundError, match="does not exist"):
        resolve_data_root(tmp_path / "missing")
    monkeypatch.setenv("SPARSECL_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataNotFoundError, match="gone: data root from the SPARSECL_DATA environment variable does not exist"):
        resolve_data_root(None)
    assert resolve_data_root(tmp_path / "later", must_exist=False) == tmp_path / "later"


def test_load_uses_env_root(data_root, monkeypatch):
    monkeypatch.setenv("SPARSECL_DATA", str(data_root))
    _, labels = load_mnist_like(None, "MNIST", train=False)
    assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS
