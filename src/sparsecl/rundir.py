"""The run folder of ``sparsecl run``: where a run's checkpoint, ``metrics.json`` and report go.

One folder holds one run. Opening it for a run (:meth:`RunFolder.open`):

* takes an exclusive lock for the whole run: ``fcntl.flock`` on ``.sparsecl.lock``, which holds
  the holder's process id; a second run on the folder is refused naming that process. The
  kernel releases a ``flock`` when its holder dies, so the lock of a killed run is free and the
  next run takes it over;
* removes stale temporary files (``.*.tmp``) that a kill inside an atomic write left behind;
* refuses a folder that holds another run's files (a checkpoint, ``metrics.json``, a report),
  unless the run continues it (``--resume``) or ``overwrite`` (``--overwrite``) removes them
  first, so two runs' results are never mixed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME
from .errors import RunFolderError

LOCK_NAME = ".sparsecl.lock"
DEFAULT_PARENT = Path("runs")
#: Files a run or its report writes: what makes a folder "another run's".
RUN_FILES = (CHECKPOINT_NAME, "metrics.json", "history.csv", "accuracy_matrix.csv", "summary.csv", "report.md",
             "accuracy_matrix.png", "capacity.png", "reuse.png", "routing.png", "bits.png", "history.png")
#: Folders a run writes (TensorBoard event files, ``--tensorboard``).
RUN_DIRS = ("tensorboard",)


def default_run_folder(method: str, benchmark: str, parent: Path = DEFAULT_PARENT) -> Path:
    """``runs/<method>-<benchmark>-<YYYYmmdd-HHMMSS>`` (a ``-2``, ``-3``... suffix when a folder
    of that name exists already, e.g. two runs started in the same second)."""
    base = parent / f"{method}-{benchmark}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def run_files(folder: Path) -> list[Path]:
    """The run files (:data:`RUN_FILES`) present in ``folder``."""
    files = [folder / n for n in RUN_FILES if (folder / n).exists() or (folder / n).is_symlink()]
    return files + [folder / n for n in RUN_DIRS if (folder / n).is_dir() and not (folder / n).is_symlink()]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files an interrupted atomic write left in ``folder`` (call it only
    while holding the folder's lock: a live writer's temporary file would go too)."""
    removed = []
    for p in folder.glob(".*.tmp"):
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


class RunFolder:
    """A locked run folder; use :meth:`open`, then :meth:`close` (or ``with``)."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path, self._fd, self.created = Path(path), fd, created

    @classmethod
    def open(cls, path: Path, *, resume: bool = False, overwrite: bool = False, option: str = "--out") -> "RunFolder":
        """Create ``path`` if needed, lock it, clear stale temporary files and check that it holds
        no other run's files (``resume``: the run's own files are expected; ``overwrite``: they
        are removed).

        Raises:
            RunFolderError: another process holds the folder (its pid is named), or the folder
                holds another run's files and neither ``resume`` nor ``overwrite`` is set.
            ConfigError: the folder cannot be created or written.
        """
        path = Path(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"{option} {path}: cannot create the folder ({exc.strerror})") from None
        if not os.access(path, os.W_OK):
            raise RunFolderError(f"{option} {path}: the folder is not writable")
        fd = _lock(path, option)
        folder = cls(path, fd, created)
        try:
            remove_stale_temporaries(path)
            present = run_files(path)
            if present and not resume:
                if not overwrite:
                    names = ", ".join(p.name for p in present)
                    raise RunFolderError(
                        f"{option} {path} holds another run's files ({names}); continue that run with "
                        f"--resume {path}, write this one to a new folder, or pass --overwrite to delete them first")
                for p in present:
                    if p.is_dir() and not p.is_symlink():
                        import shutil

                        shutil.rmtree(p)
                    else:
                        p.unlink()
        except BaseException:
            folder.close(remove_if_empty=created)
            raise
        return folder

    def close(self, remove_if_empty: bool = False) -> None:
        """Release the lock (its file is removed); with ``remove_if_empty``, also remove the
        folder when nothing else is in it (a run refused before it wrote anything)."""
        if self._fd is None:
            return
        lock = self.path / LOCK_NAME
        try:
            lock.unlink()  # while still locked: a run waiting on the old file sees it vanish and retries
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if remove_if_empty:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(folder: Path, option: str) -> int:
    """An fd holding ``folder/.sparsecl.lock`` locked exclusively, with this process's pid in it."""
    lock = folder / LOCK_NAME
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"{option} {folder}: cannot create its lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"{option} {folder}: cannot lock the folder ({exc.strerror})") from None
            who = f"process {holder}" if holder else "another process"
            raise RunFolderError(f"{option} {folder} is in use by {who} (a run holds {lock}); wait for it to end "
                                 "or choose another folder") from None
        # the holder we waited for may have removed the file after we opened it: lock the file that is there
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    raise RunFolderError(f"{option} {folder}: its lock file keeps changing; another run is starting there")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
