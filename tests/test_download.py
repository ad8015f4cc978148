"""Checksum-verified download against a local HTTP server on 127.0.0.1 serving copies of the real
files (no outside network)."""

from __future__ import annotations

import functools
import hashlib
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from sparsecl.data import download_mnist_like, load_benchmark, load_mnist_like
from sparsecl.data import download as download_module
from sparsecl.data.download import MD5S
from sparsecl.errors import DataFormatError, DataNotFoundError

FILES = sorted(MD5S["MNIST"])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


class _TruncatingHandler(_QuietHandler):
    """Announces 1 MB of content, sends 10 bytes and closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True


def _serve(directory: Path, handler=_QuietHandler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture
def serve():
    servers = []

    def start(directory: Path, handler=_QuietHandler) -> str:
        server, url = _serve(directory, handler)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def mirror(data_root, tmp_path_factory) -> Path:
    """A directory holding copies of the real MNIST .gz files, as a mirror would."""
    directory = tmp_path_factory.mktemp("mirror")
    for name in FILES:
        shutil.copy(data_root / "MNIST" / "raw" / name, directory)
    return directory


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_loads(mirror, serve, tmp_path, data_root):
    url = serve(mirror)
    raw = download_mnist_like(tmp_path / "root", "MNIST", base_url=url)
    assert raw == tmp_path / "root" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == FILES  # no temporary files left
    for name in FILES:
        assert _md5(raw / name) == MD5S["MNIST"][name]
    images, labels = load_mnist_like(tmp_path / "root", "MNIST", train=False)
    ref_images, ref_labels = load_mnist_like(data_root, "MNIST", train=False)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_present_files_are_not_downloaded_again(mirror, serve, tmp_path):
    root = tmp_path / "root"
    download_mnist_like(root, "MNIST", base_url=serve(mirror))
    before = {p.name: p.stat().st_mtime_ns for p in (root / "MNIST" / "raw").iterdir()}
    # nothing listens at this URL: any request would fail
    download_mnist_like(root, "MNIST", base_url=_closed_port_url())
    after = {p.name: p.stat().st_mtime_ns for p in (root / "MNIST" / "raw").iterdir()}
    assert after == before


def test_present_file_with_wrong_md5_is_replaced(mirror, serve, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale")
    download_mnist_like(tmp_path, "MNIST", base_url=serve(mirror))
    assert _md5(raw / "t10k-labels-idx1-ubyte.gz") == MD5S["MNIST"]["t10k-labels-idx1-ubyte.gz"]


def test_checksum_mismatch_leaves_nothing_behind(mirror, serve, tmp_path):
    bad_mirror = tmp_path / "bad-mirror"
    shutil.copytree(mirror, bad_mirror)
    bad = bad_mirror / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0x01
    bad.write_bytes(bytes(data))
    url = serve(bad_mirror)
    root = tmp_path / "root"
    with pytest.raises(DataFormatError) as info:
        download_mnist_like(root, "MNIST", base_url=url)
    msg = str(info.value)
    assert f"{url}t10k-labels-idx1-ubyte.gz" in msg
    assert f"expected MD5 {MD5S['MNIST']['t10k-labels-idx1-ubyte.gz']}" in msg
    assert f"got {_md5(bad)}" in msg
    raw = root / "MNIST" / "raw"
    names = sorted(p.name for p in raw.iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in names
    assert all(not n.startswith(".") and not n.endswith(".part") for n in names), names
    # the files verified before the bad one are complete and kept
    for name in names:
        assert _md5(raw / name) == MD5S["MNIST"][name]


def test_unreachable_server_leaves_nothing_behind(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DataNotFoundError) as info:
        download_mnist_like(tmp_path, "MNIST", base_url=url, timeout=5)
    msg = str(info.value)
    assert url in msg and "download failed" in msg and "expected" in msg and "MD5" in msg
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def test_http_404_is_a_not_found_error(mirror, serve, tmp_path):
    partial = tmp_path / "partial-mirror"
    partial.mkdir()
    url = serve(partial)  # serves an empty directory
    with pytest.raises(DataNotFoundError, match="404") as info:
        download_mnist_like(tmp_path / "root", "MNIST", base_url=url)
    assert url in str(info.value)
    assert list((tmp_path / "root" / "MNIST" / "raw").iterdir()) == []


def test_connection_dropped_mid_file_leaves_nothing_behind(serve, tmp_path):
    url = serve(tmp_path, _TruncatingHandler)
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError, match=r"download failed \(connection closed after 10 of 1048576 bytes\)") as info:
        download_mnist_like(root, "MNIST", base_url=url, timeout=5)
    assert url in str(info.value)
    assert list((root / "MNIST" / "raw").iterdir()) == []


def test_load_with_download_true_fetches_missing_files(mirror, serve, tmp_path, monkeypatch):
    monkeypatch.setitem(download_module.MIRRORS, "MNIST", serve(mirror))
    root = tmp_path / "new-root"  # does not exist yet
    with pytest.raises(DataNotFoundError):
        load_mnist_like(root, "MNIST", train=False)
    images, labels = load_mnist_like(root, "MNIST", train=False, download=True)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    # a benchmark builder with download=True accepts a data root that does not exist yet
    bench = load_benchmark(
        "split-mnist", data_root=tmp_path / "other-root", download=True, num_tasks=1,
        max_train_per_task=20, max_test_per_task=10,
    )
    assert bench.num_tasks == 1 and len(bench.tasks[0].test_y) == 10


def test_progress_goes_to_stderr(mirror, serve, tmp_path, capsys):
    download_mnist_like(tmp_path, "MNIST", base_url=serve(mirror), progress=True)
    err = capsys.readouterr().err
    assert "t10k-labels-idx1-ubyte.gz" in err and "MiB" in err


# ----------------------------------------------------------------------------- CIFAR archives

import io  # noqa: E402
import os  # noqa: E402
import tarfile  # noqa: E402

from sparsecl.data import download_cifar, load_cifar  # noqa: E402
from sparsecl.data.download import CIFAR_ARCHIVES  # noqa: E402

from test_cifar import write_cifar10  # noqa: E402

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"


def _cifar_mirror(directory: Path, tmp_path: Path, extra=None, skip=()) -> Path:
    """``directory/cifar-10-python.tar.gz`` in the official layout (folder cifar-10-batches-py/),
    from files written by the test; ``extra(tar)`` may add members, ``skip`` leaves files out."""
    src = tmp_path / "cifar-src"
    write_cifar10(src, per_class_train=1, per_class_test=1)
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        folder = src / "cifar-10-batches-py"
        tar.add(folder, arcname="cifar-10-batches-py", recursive=False)
        for p in sorted(folder.iterdir()):
            if p.name not in skip:
                tar.add(p, arcname=f"cifar-10-batches-py/{p.name}")
        if extra is not None:
            extra(tar)
    return archive


@pytest.fixture
def cifar_md5(monkeypatch):
    """Make the MD5 table accept the archive at ``path``."""

    def accept(path: Path) -> None:
        monkeypatch.setitem(CIFAR_ARCHIVES, "CIFAR10", {CIFAR10_ARCHIVE: _md5(path)})

    return accept


def test_cifar_download_verifies_extracts_and_loads(serve, tmp_path, cifar_md5):
    archive = _cifar_mirror(tmp_path / "mirror", tmp_path)
    cifar_md5(archive)
    root = tmp_path / "root"
    folder = download_cifar(root, "CIFAR10", base_url=serve(tmp_path / "mirror"))
    assert folder == root / "cifar-10-batches-py"
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # no archive, no temporary folder
    src = tmp_path / "cifar-src" / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (folder / p.name).read_bytes() == p.read_bytes()
    images, labels = load_cifar(root, "CIFAR10", train=True)
    assert images.shape == (50, 3, 32, 32) and labels.shape == (50,)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    download_cifar(root, "CIFAR10", base_url=_closed_port_url())  # complete: no request made
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_cifar_checksum_mismatch_leaves_nothing_behind(serve, tmp_path):
    _cifar_mirror(tmp_path / "mirror", tmp_path)  # the official MD5 cannot match it
    url = serve(tmp_path / "mirror")
    root = tmp_path / "root"
    with pytest.raises(DataFormatError) as info:
        download_cifar(root, "CIFAR10", base_url=url)
    msg = str(info.value)
    assert f"{url}{CIFAR10_ARCHIVE}" in msg and "expected MD5 c58f30108f718f92721af3b95e74349a" in msg
    assert list(root.iterdir()) == []


def test_cifar_download_errors_leave_nothing_behind(serve, tmp_path):
    with pytest.raises(DataNotFoundError, match="404"):
        download_cifar(tmp_path / "a", "CIFAR100", base_url=serve(tmp_path))
    assert list((tmp_path / "a").iterdir()) == []
    with pytest.raises(DataNotFoundError, match="download failed"):
        download_cifar(tmp_path / "b", "CIFAR10", base_url=_closed_port_url(), timeout=5)
    assert list((tmp_path / "b").iterdir()) == []


def _symlink(tar):
    info = tarfile.TarInfo("cifar-10-batches-py/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _member(name):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return add


@pytest.mark.parametrize("extra, fragment", [
    (_member("../evil"), "absolute or parent (..) path"),
    (_member("cifar-10-batches-py/../../evil"), "absolute or parent (..) path"),
    (_member("/tmp/sparsecl-evil"), "absolute or parent (..) path"),
    (_symlink, "is a link or special file"),
])
def test_unsafe_archives_are_refused_before_extracting(serve, tmp_path, cifar_md5, extra, fragment):
    archive = _cifar_mirror(tmp_path / "mirror", tmp_path, extra=extra)
    cifar_md5(archive)
    root = tmp_path / "deep" / "root"
    with pytest.raises(DataFormatError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        download_cifar(root, "CIFAR10", base_url=serve(tmp_path / "mirror"))
    assert list(root.iterdir()) == []
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/sparsecl-evil").exists()


def test_archive_without_the_expected_files(serve, tmp_path, cifar_md5):
    archive = _cifar_mirror(tmp_path / "mirror", tmp_path, skip={"data_batch_4"})
    cifar_md5(archive)
    with pytest.raises(DataFormatError, match="does not hold cifar-10-batches-py/ with data_batch_1"):
        download_cifar(tmp_path / "root", "CIFAR10", base_url=serve(tmp_path / "mirror"))
    assert list((tmp_path / "root").iterdir()) == []
    (tmp_path / "mirror" / CIFAR10_ARCHIVE).write_bytes(b"not a tar archive")
    cifar_md5(tmp_path / "mirror" / CIFAR10_ARCHIVE)
    with pytest.raises(DataFormatError, match="cannot be extracted"):
        download_cifar(tmp_path / "root", "CIFAR10", base_url=serve(tmp_path / "mirror"))
    assert list((tmp_path / "root").iterdir()) == []


def test_incomplete_folder_is_replaced(serve, tmp_path, cifar_md5):
    archive = _cifar_mirror(tmp_path / "mirror", tmp_path)
    cifar_md5(archive)
    stale = tmp_path / "root" / "cifar-10-batches-py"
    stale.mkdir(parents=True)
    (stale / "data_batch_1").write_bytes(b"stale")
    download_cifar(tmp_path / "root", "CIFAR10", base_url=serve(tmp_path / "mirror"))
    assert (stale / "data_batch_1").read_bytes() != b"stale" and (stale / "test_batch").is_file()
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["cifar-10-batches-py"]


def test_cifar_load_and_benchmark_with_download_true(serve, tmp_path, cifar_md5, monkeypatch):
    archive = _cifar_mirror(tmp_path / "mirror", tmp_path)
    cifar_md5(archive)
    monkeypatch.setitem(download_module.MIRRORS, "CIFAR10", serve(tmp_path / "mirror"))
    (tmp_path / "root").mkdir()
    with pytest.raises(DataNotFoundError, match="download=True") as info:
        load_cifar(tmp_path / "root", "CIFAR10", train=False)
    assert "--download" in info.value.cli_message and "download=True" not in info.value.cli_message
    images, _ = load_cifar(tmp_path / "root", "CIFAR10", train=False, download=True)
    assert images.shape == (10, 3, 32, 32)
    bench = load_benchmark("split-cifar10", data_root=tmp_path / "new-root", download=True, num_tasks=1)
    assert bench.num_tasks == 1 and len(bench.tasks[0].test_y) == 2
    assert os.listdir(tmp_path / "new-root") == ["cifar-10-batches-py"]


def test_unknown_cifar_dataset(tmp_path):
    from sparsecl.errors import ConfigError

    with pytest.raises(ConfigError, match="CIFAR10, CIFAR100"):
        download_cifar(tmp_path, "MNIST")


class _EndlessHandler(_QuietHandler):
    """Sends no Content-Length and 64 MiB of zeros (a file that never ends, as far as it says)."""

    sent = 0

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        chunk = bytes(1 << 16)
        try:
            for _ in range(1024):
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class _LyingLengthHandler(_QuietHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(300 << 20))
        self.end_headers()
        self.close_connection = True


def test_a_download_is_never_read_past_the_official_size(serve, tmp_path):
    assert download_module.SIZES["MNIST/t10k-labels-idx1-ubyte.gz"] == 4542
    url = serve(tmp_path, _EndlessHandler)
    root = tmp_path / "root"
    with pytest.raises(DataFormatError, match=r"more than the 9912422 bytes of train-images-idx3-ubyte.gz") as info:
        download_mnist_like(root, "MNIST", base_url=url, timeout=5)
    assert "at least 99" in str(info.value) and url in str(info.value)
    assert list((root / "MNIST" / "raw").iterdir()) == []  # the partial file is gone


def test_a_content_length_over_the_official_size_is_refused_before_reading(serve, tmp_path):
    url = serve(tmp_path, _LyingLengthHandler)
    root = tmp_path / "root"
    with pytest.raises(DataFormatError, match=r"a Content-Length of 314572800 bytes, more than the 9912422 bytes"):
        download_mnist_like(root, "MNIST", base_url=url, timeout=5)
    assert list((root / "MNIST" / "raw").iterdir()) == []
