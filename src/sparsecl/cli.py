"""``sparsecl`` command line: ``run`` trains a method over a benchmark's tasks (a run folder with
``metrics.json``, ``history.csv`` and a checkpoint after every task; ``--resume``, ``--from``,
``--seeds``), ``eval`` measures a saved model, ``export`` writes one task's subnetwork,
``report`` plots a run, ``summarize`` tabulates runs over seeds.

Each command lives in its own module of ``sparsecl.commands``, imported only when the command
runs (or its ``--help`` is asked for): ``sparsecl --help`` imports neither torch nor any method.
"""

from __future__ import annotations

import importlib

import click

#: command name -> (module of sparsecl.commands, one-line help shown by ``sparsecl --help``)
COMMANDS = {
    "run": ("run", "Train a method on a benchmark's tasks, one after another."),
    "eval": ("evaluate", "Test accuracy of every task of a saved model."),
    "export": ("export", "Write one task's subnetwork (or every task's, compact) as a standalone model."),
    "report": ("report", "Plot a run folder: accuracy matrix, capacity, reuse, history."),
    "summarize": ("summarize", "Mean ± std over seeds of the runs in the given folders."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented lazy-loading
    pattern), so that the group's ``--help`` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"sparsecl.commands.{COMMANDS[name][0]}")
        return getattr(module, "command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help) for name, (_, help) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="sparsecl")
def main() -> None:
    """Continual learning with sparse subnetworks: prune, freeze, recycle — zero forgetting,
    verified bit for bit."""
