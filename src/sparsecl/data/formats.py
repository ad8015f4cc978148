"""Readers for the IDX file format and the MNIST / Fashion-MNIST on-disk layout, and for the
CIFAR-10 / CIFAR-100 "python version" layout.

The layouts are the ones torchvision uses: ``<root>/<dataset>/raw/<name>[.gz]`` with ``<name>`` one
of ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``; ``<root>/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
``test_batch``, ``batches.meta``) and ``<root>/cifar-100-python/`` (``train``, ``test``, ``meta``),
as extracted from the official archives. CIFAR files are pickles: they are read by an unpickler that
only rebuilds numpy arrays and plain containers, never arbitrary objects.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataFormatError, DataNotFoundError, SparseCLError
from .files import CIFAR_DATASETS, CIFAR_FOLDERS, MNIST_LIKE_DATASETS, cifar_file_names, mnist_like_file_names

__all__ = [
    "CIFAR_DATASETS",
    "CIFAR_FOLDERS",
    "DATA_ENV_VAR",
    "MNIST_LIKE_DATASETS",
    "cifar_class_names",
    "cifar_file_names",
    "load_cifar",
    "load_mnist_like",
    "mnist_like_file_names",
    "read_cifar_pickle",
    "read_idx",
    "resolve_data_root",
]

#: Environment variable naming the data root when no explicit one is given.
DATA_ENV_VAR = "SPARSECL_DATA"

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

    A gzip file is decompressed as a stream, never beyond the payload size its IDX header
    declares (plus 1 MiB to report trailing bytes): a small file that inflates to gigabytes is
    refused without holding them.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: corrupt gzip stream, bad magic number, unknown type code, header or
            payload shorter than announced, or trailing bytes after the payload. The message
            starts with the file path and says what was expected.
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: IDX file not found") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: expected an IDX file, found a directory") from None
    with raw:
        gz = path.suffix == ".gz"
        stream: Any = raw
        if gz:
            magic = raw.read(2)
            if magic != _GZIP_MAGIC:
                raise DataFormatError(
                    f"{path}: expected a gzip stream (magic bytes 1f 8b), got {magic.hex(' ') or 'an empty file'}"
                )
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            return _parse_idx(path, stream, None if gz else os.fstat(raw.fileno()).st_size)
        except SparseCLError:
            raise
        except (OSError, EOFError, zlib.error) as exc:
            if gz:
                raise DataFormatError(f"{path}: corrupt gzip stream, expected a complete gzip file ({exc})") from None
            raise DataFormatError(f"{path}: cannot be read ({exc}); expected an IDX file") from None


_CHUNK = 1 << 20
_TRAILING_PROBE = 1 << 20  # bytes read past a gzip payload to report how many trail it


def _read_up_to(stream: Any, n: int) -> bytearray:
    """At most ``n`` bytes of ``stream``, read in chunks (memory follows the data, not ``n``)."""
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(min(_CHUNK, n - len(out)))
        if not chunk:
            break
        out += chunk
    return out


def _parse_idx(path: Path, stream: Any, file_size: int | None) -> np.ndarray:
    """The IDX array in ``stream`` (``file_size``: the size of a raw file, ``None`` for gzip)."""
    head = _read_up_to(stream, 4)
    if len(head) < 4:
        raise DataFormatError(f"{path}: expected a 4-byte IDX magic number, got only {len(head)} bytes")
    zero0, zero1, code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0:
        hint = " (the file looks gzip-compressed: its name should end in .gz)" if bytes(head[:2]) == _GZIP_MAGIC else ""
        raise DataFormatError(
            f"{path}: bad IDX magic number {bytes(head).hex(' ')}: expected two zero bytes, then a type "
            f"code and the number of dimensions{hint}"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataFormatError(f"{path}: bad IDX magic number: type code 0x{code:02X} is not one of {known}")

    header_len = 4 + 4 * ndim
    dim_bytes = _read_up_to(stream, 4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise DataFormatError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dimensions, "
            f"got {4 + len(dim_bytes)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(bytes(dim_bytes), dtype=">u4", count=ndim))
    dtype = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    described = f"after the header for dimensions {dims} of {dtype.name}"
    if file_size is not None and file_size - header_len < expected:  # known without reading the payload
        raise DataFormatError(
            f"{path}: truncated IDX payload: expected {expected} bytes {described}, got {file_size - header_len} bytes"
        )
    payload = _read_up_to(stream, expected)
    got = len(payload)
    if got < expected:
        raise DataFormatError(f"{path}: truncated IDX payload: expected {expected} bytes {described}, got {got} bytes")
    if file_size is not None:
        extra = file_size - header_len - expected
        more = ""
    else:
        tail = _read_up_to(stream, _TRAILING_PROBE + 1)
        extra = len(tail)
        more = "more than " if extra > _TRAILING_PROBE else ""
        extra = min(extra, _TRAILING_PROBE)
        if not extra:
            stream.read(1)  # reaches the end of the gzip member: its CRC and length are checked
    if extra:
        raise DataFormatError(
            f"{path}: {more}{extra} trailing bytes: expected exactly {expected} bytes {described}, "
            f"got {more}{expected + extra} bytes"
        )
    array = np.frombuffer(payload, dtype=dtype, count=count).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # copies: writable and native-endian


def resolve_data_root(data_root: str | os.PathLike | None, *, must_exist: bool = True) -> Path:
    """The data root: ``data_root`` if given, else the ``SPARSECL_DATA`` environment variable.

    Raises:
        DataNotFoundError: neither is set, or (when ``must_exist``) the chosen directory does not
            exist.
    """
    if data_root is not None and str(data_root) != "":
        root, source, cli = Path(data_root).expanduser(), "the data_root argument", "--data-root"
    elif os.environ.get(DATA_ENV_VAR):
        root, source = Path(os.environ[DATA_ENV_VAR]).expanduser(), f"the {DATA_ENV_VAR} environment variable"
        cli = source
    else:
        raise DataNotFoundError(
            f"no data root: tried the data_root argument and the {DATA_ENV_VAR} environment variable, neither "
            "is set", cli=f"no data root: tried --data-root and the {DATA_ENV_VAR} environment variable, neither "
            "is set")
    if must_exist and not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataNotFoundError(f"{root}: data root from {source} {what}", cli=f"{root}: data root from {cli} {what}")
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
        head = f"{dataset} {'train' if train else 'test'} files missing:\n{lines}\n"
        raise DataNotFoundError(
            head + f"Pass data_root= (or set the {DATA_ENV_VAR} environment variable) with the directory that "
            f"holds {dataset}/raw/, or download=True to fetch the files.",
            cli=head + f"Point --data-root (or the {DATA_ENV_VAR} environment variable) at the directory that "
            f"holds {dataset}/raw/, or pass --download to fetch the files.")

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


# ----------------------------------------------------------------------------- CIFAR

_CIFAR_NUM_CLASSES = {"CIFAR10": 10, "CIFAR100": 100}
_CIFAR_LABEL_KEY = {"CIFAR10": "labels", "CIFAR100": "fine_labels"}
_CIFAR_META = {"CIFAR10": ("batches.meta", "label_names"), "CIFAR100": ("meta", "fine_label_names")}
_CIFAR_ARCHIVE = {"CIFAR10": "cifar-10-python.tar.gz", "CIFAR100": "cifar-100-python.tar.gz"}
_CIFAR_IMAGE_SHAPE = (3, 32, 32)


def _numpy_global(module: str, name: str) -> Any:
    """``name`` from numpy's private ``_core`` module (numpy >= 2) or ``core`` (numpy 1.x)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what rebuilding numpy arrays, numpy scalars and
    plain containers needs. Pickles written by Python 2 (the official files) name ``numpy.core``;
    ones written by numpy 2 name ``numpy._core``; protocol 2 pickles of bytes use ``_codecs.encode``."""
    import builtins
    import codecs

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        obj = _numpy_global(module, name)
        for package in ("numpy.core", "numpy._core"):
            allowed[(f"{package}.{module}", name)] = obj
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                 "bytearray", "bool"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :func:`_allowed_globals`: a pickle naming any
    other callable (``os.system``, ``builtins.eval``...) is refused before anything is called."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name}: only numpy arrays, numpy scalars and "
                f"plain containers are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: expected a self-contained pickle")


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read one file of the CIFAR "python version" (a pickled ``dict``, Python 2 or 3) safely.

    The file is unpickled with ``encoding="latin1"`` by an unpickler that only resolves the globals
    numpy arrays, numpy scalars and plain containers need, so a file naming any other global (a
    malicious ``os.system`` call, say) is refused without anything being executed. ``bytes`` keys
    (``b"data"``) are returned as ``str`` keys.

    Returns:
        The file's ``dict`` with ``str`` keys.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: the file is truncated or corrupt, names a global that is not allowed, or
            does not hold a ``dict``. The message starts with the file path and says what was
            expected.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: CIFAR file not found") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: expected a CIFAR pickle file, found a directory") from None
    with f:
        try:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
        except EOFError:
            raise DataFormatError(
                f"{path}: truncated pickle (ended before its STOP opcode); expected a complete CIFAR "
                f"python-version file"
            ) from None
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                OverflowError, MemoryError, RecursionError, UnicodeError) as exc:
            raise DataFormatError(f"{path}: corrupt pickle ({exc}); expected a CIFAR python-version file") from None
        trailing = f.read(1)
    if trailing:
        raise DataFormatError(f"{path}: trailing bytes after the pickle; expected exactly one pickled dict")
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out[key.decode("latin1") if isinstance(key, bytes) else key] = value
    return out


def _check_cifar_dataset(dataset: str) -> None:
    if dataset not in CIFAR_DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not one of {', '.join(CIFAR_DATASETS)}")


def _cifar_missing_error(dataset: str, folder: Path, missing: list[Path], what: str) -> DataNotFoundError:
    names = ", ".join(cifar_file_names(dataset, True) + cifar_file_names(dataset, False) + (_CIFAR_META[dataset][0],))
    where = "the folder does not exist" if not folder.is_dir() else "missing: " + ", ".join(str(p) for p in missing)
    head = (f"{dataset} {what} files not found in {folder} ({where}). Expected the official python-version "
            f"layout <root>/{CIFAR_FOLDERS[dataset]}/ holding {names}, as extracted from the official "
            f"{_CIFAR_ARCHIVE[dataset]}. ")
    return DataNotFoundError(
        head + f"Pass data_root= (or set the {DATA_ENV_VAR} environment variable) with the directory that holds "
        f"{CIFAR_FOLDERS[dataset]}/, or download=True to fetch the archive.",
        cli=head + f"Point --data-root (or the {DATA_ENV_VAR} environment variable) at the directory that holds "
        f"{CIFAR_FOLDERS[dataset]}/, or pass --download to fetch the archive.")


def _labels_array(path: Path, key: str, value: Any, num_classes: int) -> np.ndarray:
    """``value`` (a list or array of integers) as ``int64 (N,)`` with values in 0..num_classes-1."""
    try:
        labels = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataFormatError(f"{path}: '{key}' is not a list of integers ({exc})") from None
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or (labels.size == 0)):
        raise DataFormatError(
            f"{path}: expected '{key}' to be a 1-D list of integers, got {labels.dtype} of shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataFormatError(
            f"{path}: expected '{key}' in 0..{num_classes - 1}, got {int(bad.sum())} labels outside "
            f"(min {int(labels.min())}, max {int(labels.max())})"
        )
    return labels


@functools.lru_cache(maxsize=8)
def _read_cifar_split_file(path_str: str, size: int, mtime_ns: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 3, 32, 32)`` and labels ``int64 (N,)`` of one CIFAR file, read-only.
    Cached per process on (resolved path, size, modification time), so rebuilding a benchmark does
    not read the same 150 MB again; callers copy before handing the arrays out."""
    path = Path(path_str)
    d = read_cifar_pickle(path)
    label_key = _CIFAR_LABEL_KEY[dataset]
    missing = [k for k in ("data", label_key) if k not in d]
    if missing:
        raise DataFormatError(
            f"{path}: missing key(s) {', '.join(map(repr, missing))}; expected a dict with 'data' and "
            f"'{label_key}' (found {', '.join(map(repr, sorted(map(str, d))))})"
        )
    data = d["data"]
    pixels = int(np.prod(_CIFAR_IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: expected 'data' to be a uint8 array of shape (N, {pixels}), got {got}")
    labels = _labels_array(path, label_key, d[label_key], _CIFAR_NUM_CLASSES[dataset])
    if len(labels) != len(data):
        raise DataFormatError(
            f"{path}: holds {len(data)} images but {len(labels)} '{label_key}'; expected equal counts"
        )
    images = np.ascontiguousarray(data.reshape((len(data),) + _CIFAR_IMAGE_SHAPE))
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_cifar(
    root: str | os.PathLike | None,
    dataset: str,
    train: bool,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 or CIFAR-100 from the official python-version layout.

    ``dataset="CIFAR10"`` reads ``<root>/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``
    for train, ``test_batch`` for test; key ``labels``); ``dataset="CIFAR100"`` reads
    ``<root>/cifar-100-python/`` (``train`` / ``test``; key ``fine_labels``, the 100 classes). Files
    are read with :func:`read_cifar_pickle` (no code is executed) and cached per process, keyed on
    their resolved path, size and modification time. ``root=None`` falls back to ``SPARSECL_DATA``.
    With ``download=True`` missing files are first fetched with
    :func:`sparsecl.data.download.download_cifar`.

    Returns:
        ``(images, labels)``: images ``uint8`` of shape ``(N, 3, 32, 32)`` (channels R, G, B), labels
        ``int64`` of shape ``(N,)`` with values 0..9 (CIFAR-10) or 0..99 (CIFAR-100). Fresh,
        writable arrays.

    Raises:
        ConfigError: ``dataset`` is not ``"CIFAR10"`` or ``"CIFAR100"``.
        DataNotFoundError: the folder or a file is missing (the message names the paths and the
            expected layout).
        DataFormatError: a file is truncated or corrupt, names a global that is not allowed, lacks
            ``data`` or the labels, has data that is not ``uint8 (N, 3072)``, labels out of range,
            or image and label counts that differ.
    """
    _check_cifar_dataset(dataset)
    root = resolve_data_root(root, must_exist=not download)
    folder = root / CIFAR_FOLDERS[dataset]
    paths = [folder / name for name in cifar_file_names(dataset, train)]
    missing = [p for p in paths if not p.is_file()]
    if missing and download:
        from .download import download_cifar

        download_cifar(root, dataset)
        missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _cifar_missing_error(dataset, folder, missing, "train" if train else "test")
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(_read_cifar_split_file(str(p.resolve()), st.st_size, st.st_mtime_ns, dataset))
    if len(parts) == 1:
        return parts[0][0].copy(), parts[0][1].copy()
    return np.concatenate([im for im, _ in parts]), np.concatenate([lb for _, lb in parts])


def cifar_class_names(root: str | os.PathLike | None, dataset: str) -> list[str]:
    """The class names of ``dataset`` from its meta file (``batches.meta`` key ``label_names`` for
    CIFAR-10, ``meta`` key ``fine_label_names`` for CIFAR-100): ``names[label]``.

    Raises:
        ConfigError: unknown ``dataset``.
        DataNotFoundError: the meta file is missing.
        DataFormatError: the file is not a valid pickle, lacks the key, or does not list exactly
            10 / 100 names.
    """
    _check_cifar_dataset(dataset)
    folder = resolve_data_root(root) / CIFAR_FOLDERS[dataset]
    name, key = _CIFAR_META[dataset]
    path = folder / name
    if not path.is_file():
        raise _cifar_missing_error(dataset, folder, [path], "meta")
    d = read_cifar_pickle(path)
    names = d.get(key)
    n = _CIFAR_NUM_CLASSES[dataset]
    if not isinstance(names, (list, tuple)) or len(names) != n or not all(isinstance(s, (str, bytes)) for s in names):
        raise DataFormatError(f"{path}: expected '{key}' to be a list of {n} class names, got {type(names).__name__}"
                              + (f" of length {len(names)}" if isinstance(names, (list, tuple)) else ""))
    return [s.decode("latin1") if isinstance(s, bytes) else s for s in names]
