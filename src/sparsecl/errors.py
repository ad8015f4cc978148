"""Exceptions raised by sparsecl. Every message names the file, tensor, layer or option at fault
and says what was expected."""


class SparseCLError(Exception):
    """Base class of every error sparsecl raises on purpose.

    The message (``str(exc)``) speaks the Python API's terms (argument names, e.g.
    ``TrainConfig(lr=...)``); ``cli``, when given, is the same message in the command line's
    terms (``--lr``), which the ``sparsecl`` command prints instead (:attr:`cli_message`)."""

    def __init__(self, message: str = "", *, cli: str | None = None):
        super().__init__(message)
        self.cli = cli

    @property
    def cli_message(self) -> str:
        """The message as the command line says it."""
        return self.cli if self.cli is not None else str(self)


class DataError(SparseCLError, ValueError):
    """A task's data cannot be learned or measured as it is (a non-finite value in an image
    tensor); the message names the task, the split and the first bad sample."""


class DataFormatError(DataError):
    """A data file exists but its content is not what its format promises (bad magic number,
    truncated payload, image/label count mismatch, checksum mismatch)."""


class DataNotFoundError(SparseCLError, FileNotFoundError):
    """A required data file is missing; the message lists every path that was looked at."""


class UnsupportedModelError(SparseCLError, TypeError):
    """The traced model contains an operation or topology the unit graph cannot follow."""


class CapacityError(SparseCLError, RuntimeError):
    """A layer has no free units left for a new task."""


class ForgettingError(SparseCLError, AssertionError):
    """An isolation method changed an earlier task's logits: the zero-forgetting promise broke."""


class ConfigError(SparseCLError, ValueError):
    """An option has a value outside what it accepts."""


class DivergenceError(SparseCLError, FloatingPointError):
    """Training produced a non-finite loss; the message names the task and the epoch."""


class CheckpointError(SparseCLError, ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the model or method
    it is loaded into; the message names the file and, where it can, the tensor."""


class OutputError(SparseCLError, OSError):
    """A result file (checkpoint, metrics, report) cannot be written: a full disk, a read-only
    folder. The message names the file and says what was kept."""


class RunFolderError(ConfigError):
    """A run folder cannot be used: it holds another run's files, or another process is using it
    (the message names the holder's process id)."""
