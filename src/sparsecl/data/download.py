"""Checksum-verified download of MNIST / Fashion-MNIST into ``<root>/<dataset>/raw/`` and of the
CIFAR-10 / CIFAR-100 python-version archives into ``<root>/cifar-10-batches-py/`` and
``<root>/cifar-100-python/``.

Each file is streamed into a temporary file in the target directory, its MD5 compared with the
official one, and only then moved into place with :func:`os.replace` (atomic), so an interrupted
or corrupt download never leaves a partial file under the final name. A CIFAR archive is verified
the same way, then extracted (regular files and folders only, no absolute path, no ``..``, no link)
into a temporary folder in the data root, and the extracted folder is renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ConfigError, DataFormatError, DataNotFoundError
from .files import CIFAR_FOLDERS, cifar_file_names

__all__ = ["CIFAR_ARCHIVES", "MIRRORS", "MD5S", "SIZES", "download_cifar", "download_mnist_like", "file_md5"]

#: Default mirror of each data set (a ``base_url`` argument overrides it).
MIRRORS: dict[str, str] = {
    "MNIST": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "FashionMNIST": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "CIFAR10": "https://www.cs.toronto.edu/~kriz/",
    "CIFAR100": "https://www.cs.toronto.edu/~kriz/",
}

#: Official archive of each CIFAR data set: ``{archive name: MD5}``.
CIFAR_ARCHIVES: dict[str, dict[str, str]] = {
    "CIFAR10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "CIFAR100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
}

#: Official MD5 of each gzip file.
MD5S: dict[str, dict[str, str]] = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

#: Size in bytes of each official file: a download is never read past it (a server that sends
#: more, with or without a Content-Length, is cut off before the MD5 check rejects it).
SIZES: dict[str, int] = {
    "MNIST/train-images-idx3-ubyte.gz": 9912422,
    "MNIST/train-labels-idx1-ubyte.gz": 28881,
    "MNIST/t10k-images-idx3-ubyte.gz": 1648877,
    "MNIST/t10k-labels-idx1-ubyte.gz": 4542,
    "FashionMNIST/train-images-idx3-ubyte.gz": 26421880,
    "FashionMNIST/train-labels-idx1-ubyte.gz": 29515,
    "FashionMNIST/t10k-images-idx3-ubyte.gz": 4422102,
    "FashionMNIST/t10k-labels-idx1-ubyte.gz": 5148,
    "CIFAR10/cifar-10-python.tar.gz": 170498071,
    "CIFAR100/cifar-100-python.tar.gz": 169001437,
}
#: Cap of a download whose size is not in :data:`SIZES` (a file of another mirror or test).
MAX_DOWNLOAD_BYTES = 1 << 30

_CHUNK = 1 << 20


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file's bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, expected_md5: str, timeout: float, progress: bool,
           max_bytes: int | None = None) -> None:
    """Download ``url`` to ``dest`` through a temporary file in ``dest.parent``; verify its MD5.
    At most ``max_bytes`` (default :data:`MAX_DOWNLOAD_BYTES`) are read: a longer response is
    refused as soon as it passes the limit, whatever its Content-Length says."""
    limit = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    too_big = lambda n: DataFormatError(  # noqa: E731
        f"{url}: the server sends {n} bytes, more than the {limit} bytes of {dest.name} (MD5 {expected_md5}); "
        f"the download was stopped and discarded, nothing was written to {dest}")
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                if total is not None and total.isdigit() and int(total) > limit:
                    raise too_big(f"a Content-Length of {total}")
                for chunk in iter(lambda: response.read(min(_CHUNK, limit + 1 - size)), b""):
                    if size + len(chunk) > limit:
                        raise too_big(f"at least {size + len(chunk)}")
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if progress:
                        done = f"{size / 2**20:.1f} MiB" + (f" / {int(total) / 2**20:.1f} MiB" if total else "")
                        print(f"\r  {dest.name}: {done}", end="", file=sys.stderr, flush=True)
                if total is not None and total.isdigit() and size != int(total):
                    raise OSError(f"connection closed after {size} of {total} bytes")
        except DataFormatError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            plain_url_error = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
            reason = exc.reason if plain_url_error else exc
            raise DataNotFoundError(
                f"{url}: download failed ({reason}); expected {dest.name} with MD5 {expected_md5}. "
                f"Check the network or pass base_url to use another mirror; nothing was written to {dest}"
            ) from exc
        finally:
            if progress:
                print(file=sys.stderr, flush=True)
        actual = digest.hexdigest()
        if actual != expected_md5:
            raise DataFormatError(
                f"{url}: checksum mismatch for {dest.name}: expected MD5 {expected_md5}, got {actual} "
                f"({size} bytes); the download was discarded"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_mnist_like(
    root: str | os.PathLike,
    dataset: str,
    base_url: str | None = None,
    progress: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download the four gzip files of ``dataset`` ("MNIST" or "FashionMNIST") into
    ``<root>/<dataset>/raw/`` (created if needed), verifying each file's official MD5.

    Files already present with the right MD5 are skipped; a present file with a wrong MD5 is
    downloaded again and replaced. ``base_url`` (a directory URL holding the four files) overrides
    the default mirror in :data:`MIRRORS`. With ``progress`` a progress line goes to stderr.

    Returns:
        The ``raw`` directory.

    Raises:
        ConfigError: unknown ``dataset``.
        DataNotFoundError: a network or HTTP error (the message names the URL and expected MD5).
        DataFormatError: a downloaded file's MD5 differs from the official one (the message names
            the URL, expected and actual MD5).
        In both error cases no partial or temporary file is left behind.
    """
    if dataset not in MD5S:
        raise ConfigError(f"dataset {dataset!r} cannot be downloaded; known: {', '.join(MD5S)}")
    base = (base_url or MIRRORS[dataset]).rstrip("/") + "/"
    raw_dir = Path(root).expanduser() / dataset / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, md5 in MD5S[dataset].items():
        dest = raw_dir / name
        if dest.is_file() and file_md5(dest) == md5:
            continue
        if progress:
            print(f"downloading {base}{name}", file=sys.stderr, flush=True)
        _fetch(base + name, dest, md5, timeout, progress, SIZES.get(f"{dataset}/{name}"))
    return raw_dir


def _cifar_complete(folder: Path, dataset: str) -> bool:
    """Whether ``folder`` holds every train and test file of ``dataset``."""
    return all((folder / n).is_file() for n in cifar_file_names(dataset, True) + cifar_file_names(dataset, False))


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Extract the tar archive ``archive`` into ``dest``, refusing (before extracting anything) any
    member that is not a regular file or folder or whose name is absolute or contains ``..``; the
    ``"data"`` extraction filter of :mod:`tarfile` is applied on top where Python has it."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = m.name.replace("\\", "/").split("/")
                if m.name.startswith(("/", "\\")) or ".." in parts or (len(m.name) > 1 and m.name[1] == ":"):
                    raise DataFormatError(f"{url}: archive member {m.name!r} has an absolute or parent (..) path; "
                                          "expected paths inside the archive's folder; nothing was extracted")
                if not (m.isfile() or m.isdir()):
                    raise DataFormatError(f"{url}: archive member {m.name!r} is a link or special file; expected "
                                          "regular files and folders only; nothing was extracted")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python < 3.11.4: the checks above already refuse what the filter would
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{url}: the archive cannot be extracted ({exc}); expected a tar.gz archive") from None


def download_cifar(
    root: str | os.PathLike,
    dataset: str,
    base_url: str | None = None,
    progress: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download the official python-version archive of ``dataset`` ("CIFAR10" or "CIFAR100"),
    verify its MD5 (:data:`CIFAR_ARCHIVES`) and extract it into ``root``, giving
    ``<root>/cifar-10-batches-py/`` or ``<root>/cifar-100-python/``.

    Nothing is downloaded when the folder already holds every train and test file. Otherwise the
    archive is streamed into a temporary folder inside ``root`` (created if needed), checked,
    extracted there (regular files and folders only; absolute paths, ``..`` and links are refused),
    checked for the expected files, and the extracted folder is renamed into place; an incomplete
    folder already there is replaced. The archive itself is not kept. ``base_url`` (a directory URL
    holding the archive) overrides the default mirror in :data:`MIRRORS`. With ``progress`` a
    progress line goes to stderr.

    Returns:
        The data set's folder.

    Raises:
        ConfigError: unknown ``dataset``.
        DataNotFoundError: a network or HTTP error (the message names the URL and expected MD5).
        DataFormatError: the archive's MD5 differs from the official one, the archive is not a
            valid tar.gz, holds an unsafe member, or lacks an expected file (the message names the
            URL and what was expected).
        In every error case no partial or temporary file is left behind and an existing folder is
        left as it was.
    """
    if dataset not in CIFAR_ARCHIVES:
        raise ConfigError(f"dataset {dataset!r} is not a CIFAR data set; known: {', '.join(CIFAR_ARCHIVES)}")
    (name, md5), = CIFAR_ARCHIVES[dataset].items()
    base = (base_url or MIRRORS[dataset]).rstrip("/") + "/"
    root = Path(root).expanduser()
    folder_name = CIFAR_FOLDERS[dataset]
    final = root / folder_name
    if _cifar_complete(final, dataset):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{folder_name}.", suffix=".part") as tmp_name:
        tmp = Path(tmp_name)
        archive = tmp / name
        url = base + name
        if progress:
            print(f"downloading {url}", file=sys.stderr, flush=True)
        _fetch(url, archive, md5, timeout, progress, SIZES.get(f"{dataset}/{name}"))
        extracted = tmp / "extracted"
        extracted.mkdir()
        _safe_extract(archive, extracted, url)
        archive.unlink()
        new = extracted / folder_name
        if not _cifar_complete(new, dataset):
            expected = ", ".join(cifar_file_names(dataset, True) + cifar_file_names(dataset, False))
            raise DataFormatError(f"{url}: the archive does not hold {folder_name}/ with {expected}; "
                                  "nothing was written to " + str(final))
        if final.exists() or final.is_symlink():
            # an incomplete earlier copy: moved aside into the temporary folder, deleted with it
            os.replace(final, tmp / "old")
        os.replace(new, final)
    return final
