"""Readers for the IDX file format and the MNIST / Fashion-MNIST on-disk layout.

The layout is the one torchvision uses: ``<root>/<dataset>/raw/<name>[.gz]`` with ``<name>`` one of
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataFormatError, DataNotFoundError

__all__ = [
    "DATA_ENV_VAR",
    "MNIST_LIKE_DATASETS",
    "read_idx",
    "load_mnist_like",
    "mnist_like_file_names",
    "resolve_data_root",
]

#: Environment variable naming the data root when no explicit one is given.
DATA_ENV_VAR = "SPARSECL_DATA"

#: Data sets stored in the MNIST layout.
MNIST_LIKE_DATASETS = ("MNIST", "FashionMNIST")

# IDX type code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed (name ends in ``.gz``) or raw.

    Returns a writable, native-endian array whose dtype is given by the file's type code (uint8,
    int8, int16, int32, float32 or float64) and whose shape is the file's dimensions.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: corrupt gzip stream, bad magic number, unknown type code, header or
            payload shorter than announced, or trailing bytes after the payload. The message
            starts with the file path and says what was expected.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: IDX file not found") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: expected an IDX file, found a directory") from None

    if path.suffix == ".gz":
        if data[:2] != _GZIP_MAGIC:
            raise DataFormatError(
                f"{path}: expected a gzip stream (magic bytes 1f 8b), got {data[:2].hex(' ') or 'an empty file'}"
            )
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"{path}: corrupt gzip stream, expected a complete gzip file ({exc})") from None

    if len(data) < 4:
        raise DataFormatError(f"{path}: expected a 4-byte IDX magic number, got only {len(data)} bytes")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        hint = " (the file looks gzip-compressed: its name should end in .gz)" if data[:2] == _GZIP_MAGIC else ""
        raise DataFormatError(
            f"{path}: bad IDX magic number {data[:4].hex(' ')}: expected two zero bytes, then a type "
            f"code and the number of dimensions{hint}"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataFormatError(f"{path}: bad IDX magic number: type code 0x{code:02X} is not one of {known}")

    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataFormatError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dimensions, got {len(data)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    got = len(data) - header_len
    if got < expected:
        raise DataFormatError(
            f"{path}: truncated IDX payload: expected {expected} bytes after the header for "
            f"dimensions {dims} of {dtype.name}, got {got} bytes"
        )
    if got > expected:
        raise DataFormatError(
            f"{path}: {got - expected} trailing bytes: expected exactly {expected} bytes after the "
            f"header for dimensions {dims} of {dtype.name}, got {got} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # copies: writable and native-endian


def mnist_like_file_names(train: bool) -> tuple[str, str]:
    """File names (without ``.gz``) of the images and labels of the train or test split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def resolve_data_root(data_root: str | os.PathLike | None, *, must_exist: bool = True) -> Path:
    """The data root: ``data_root`` if given, else the ``SPARSECL_DATA`` environment variable.

    Raises:
        DataNotFoundError: neither is set, or (when ``must_exist``) the chosen directory does not
            exist.
    """
    if data_root is not None and str(data_root) != "":
        root, source = Path(data_root).expanduser(), "the data_root argument (--data-root)"
    elif os.environ.get(DATA_ENV_VAR):
        root, source = Path(os.environ[DATA_ENV_VAR]).expanduser(), f"the {DATA_ENV_VAR} environment variable"
    else:
        raise DataNotFoundError(
            f"no data root: tried the data_root argument (--data-root) and the {DATA_ENV_VAR} "
            f"environment variable, neither is set"
        )
    if must_exist and not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataNotFoundError(f"{root}: data root from {source} {what}")
    return root


def _find(raw_dir: Path, name: str) -> tuple[Path | None, list[Path]]:
    """The ``.gz`` file if present, else the uncompressed one; plus the candidates looked at."""
    candidates = [raw_dir / f"{name}.gz", raw_dir / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, candidates
    return None, candidates


def load_mnist_like(
    root: str | os.PathLike | None,
    dataset: str,
    train: bool,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST or Fashion-MNIST from ``<root>/<dataset>/raw/``.

    Each file may be gzip-compressed or not; ``.gz`` is preferred when both exist. ``root=None``
    falls back to ``SPARSECL_DATA``. With ``download=True`` missing files are first fetched with
    :func:`sparsecl.data.download.download_mnist_like`.

    Returns:
        ``(images, labels)``: images ``uint8`` of shape ``(N, 28, 28)``, labels ``int64`` of shape
        ``(N,)`` with values 0..9.

    Raises:
        ConfigError: ``dataset`` is not ``"MNIST"`` or ``"FashionMNIST"``.
        DataNotFoundError: a file is missing (the message lists every path looked at).
        DataFormatError: a file is not valid IDX, has the wrong dtype/rank/image size, the image and
            label counts differ, or a label is outside 0..9.
    """
    if dataset not in MNIST_LIKE_DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not one of {', '.join(MNIST_LIKE_DATASETS)}")
    root = resolve_data_root(root, must_exist=not download)
    raw_dir = root / dataset / "raw"
    names = mnist_like_file_names(train)

    found = [_find(raw_dir, name) for name in names]
    if download and any(path is None for path, _ in found):
        from .download import download_mnist_like

        download_mnist_like(root, dataset)
        found = [_find(raw_dir, name) for name in names]
    missing = [(name, looked) for name, (path, looked) in zip(names, found) if path is None]
    if missing:
        lines = "\n".join(
            f"  {name}[.gz]: looked at " + ", ".join(str(p) for p in looked) for name, looked in missing
        )
        raise DataNotFoundError(
            f"{dataset} {'train' if train else 'test'} files missing:\n{lines}\n"
            f"Point --data-root (or the {DATA_ENV_VAR} environment variable) at the directory that "
            f"holds {dataset}/raw/, or pass download=True to fetch the files."
        )

    images_path, labels_path = (path for path, _ in found)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataFormatError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(f"{labels_path}: expected 1-D uint8 labels, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path}: holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            f"expected equal counts"
        )
    if len(labels) and labels.max() > 9:
        bad = int(np.count_nonzero(labels > 9))
        raise DataFormatError(
            f"{labels_path}: expected labels in 0..9, got {bad} labels outside (max {int(labels.max())})"
        )
    return images, labels.astype(np.int64)
