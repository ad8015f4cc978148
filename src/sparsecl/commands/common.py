"""What the commands share: errors in the command line's terms, flag names, output checks."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import ConfigError, SparseCLError


def fail(exc: SparseCLError) -> click.ClickException:
    """The error as the command line says it (``--lr``, not ``TrainConfig(lr=...)``)."""
    return click.ClickException(exc.cli_message)


def flags(ctx: click.Context, names) -> str:
    """The command-line flags of parameters ``names`` (``num_tasks`` → ``--tasks``)."""
    opts = {p.name: p.opts[0] for p in ctx.command.params}
    return ", ".join(opts.get(n, "--" + n.replace("_", "-")) for n in names)


def check_parent(path: Path, option: str) -> None:
    """Refuse an output file whose folder does not exist or cannot be written, before any work."""
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist or is not writable")
