"""``sparsecl report``: the pictures and the Markdown summary of a run folder (``sparsecl.report``,
which imports matplotlib: imported only here, when a report is asked for)."""

from __future__ import annotations

from pathlib import Path

import click

from ..atomic import write_json_atomic
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..errors import SparseCLError
from ..runs import spec_of
from .common import fail


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Plot RUN_DIR/metrics.json: accuracy_matrix.png, capacity.png, reuse.png and a Markdown
    summary, report.md, written next to it. A run that was stopped before its end (a checkpoint,
    no metrics.json) is reported from its checkpoint: the tasks it finished."""
    from ..report import write_report  # matplotlib is only imported when a report is asked for

    run_dir = Path(run_dir)
    try:
        if run_dir.is_dir() and not (run_dir / "metrics.json").exists() and (run_dir / CHECKPOINT_NAME).is_file():
            written, done, total = _report_unfinished(run_dir, write_report)
        else:
            written, done, total = write_report(run_dir), None, None
        for path in written:
            click.echo(f"wrote {path}")
        if done is not None and done < total:
            click.echo(f"the run in {run_dir} stopped after {done} of its {total} tasks; the report covers those. "
                       f"Continue it with: sparsecl run --resume {run_dir}")
    except SparseCLError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write the report of {run_dir}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from None


def _report_unfinished(run_dir: Path, write_report) -> tuple[list[Path], int, int]:
    """Report a run from its checkpoint (the run was stopped before metrics.json was written):
    the metrics of its finished tasks, made as the run makes them, reported by report.py in a
    temporary folder, then moved into ``run_dir``."""
    import shutil
    import tempfile

    from ..metrics import versions
    from ..trainer import RunResult, RunState

    ckpt = load_checkpoint(run_dir)
    spec = spec_of(ckpt)  # checks the manifest's schema
    state = RunState.from_checkpoint(ckpt.group("run"), ckpt.manifest["run"])
    done, total = state.tasks_done, ckpt.manifest["total_tasks"]
    name = "+".join(seg["benchmark"] for seg in spec.stream)
    result = RunResult(state.matrix(done), state.max_change, state.capacity, state.seconds,
                       dict(spec.train), state.reuse, spec.method, name, {},
                       None if state.routing is None else state.routing.to_dict(done), state.bits)
    metrics = result.to_dict()
    metrics["versions"] = versions()
    metrics["config"].update(method=spec.method, benchmark=name, stream=spec.stream, tasks_done=done,
                             total_tasks=total, unfinished=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".report.", suffix=".tmp") as tmp:
        write_json_atomic(Path(tmp) / "metrics.json", metrics)
        made = write_report(Path(tmp))
        written = []
        for path in made:
            final = run_dir / Path(path).name
            shutil.move(str(path), final)
            written.append(final)
        for stale in ("reuse.png", "routing.png"):  # plots an earlier report left that these metrics lack
            if all(p.name != stale for p in written):
                (run_dir / stale).unlink(missing_ok=True)
    return written, done, total



command = report
