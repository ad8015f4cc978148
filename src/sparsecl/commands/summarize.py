"""``sparsecl summarize``: mean ± std over seeds of ACC, BWT, forgetting, capacity and wall time of
the runs in the given folders, grouped by method, benchmark and configuration (``sparsecl.summary``)."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import make_console
from ..errors import SparseCLError
from ..summary import summarize_runs, to_markdown, write_summary
from .common import fail


@click.command("summarize")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the table to OUT.md and OUT.csv (e.g. results/pmnist)")
def summarize(run_dirs: tuple[Path, ...], out: Path | None) -> None:
    """Summarize RUN_DIRS over seeds: each a run folder (with metrics.json) or a folder of run
    folders (e.g. the seed-<n> folders of sparsecl run --seeds). Runs of the same method,
    benchmark and options but for the seed form one row: mean ± std of ACC, BWT, forgetting,
    capacity and wall time, with the seeds listed."""
    try:
        rows = summarize_runs(run_dirs)
        written = write_summary(rows, out) if out is not None else ()
    except SparseCLError as exc:
        raise fail(exc) from exc
    make_console().print(to_markdown(rows), highlight=False, markup=False)
    for path in written:
        click.echo(f"wrote {path}")


command = summarize
