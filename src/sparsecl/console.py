"""The console while a run learns: a progress bar per task (epoch, phase, loss, accuracy) and one
summary line per task (accuracy, units kept per layer, seconds), through the trainer's callbacks
(``sparsecl.loggers``); and the logging set-up of the command line (one timestamp style, lines
never wrapped, method INFO lines such as pruning steps only when asked for).
"""

from __future__ import annotations

import logging
import math
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .loggers import Callback, HistoryRow, TaskSummary

#: One timestamp style for every line the command line logs.
TIME_FORMAT = "%H:%M:%S"


def make_console(stderr: bool = False) -> Console:
    """A rich console that never wraps a line at 80 columns when writing to a file or a pipe."""
    console = Console(stderr=stderr, soft_wrap=True)
    return console


def setup_logging(verbosity: int, console: Console | None = None) -> None:
    """Route sparsecl's log records to the console: warnings and errors by default
    (``verbosity`` 0), method INFO lines (pruning steps, θ scans) with 1 (``-v``), DEBUG with 2
    (``-vv``), errors only with -1 (``-q``). A terminal gets rich's handler; a file or a pipe
    plain ``HH:MM:SS LEVEL name: message`` lines, one per record."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("sparsecl")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = console or make_console(stderr=True)
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, log_time_format=f"[{TIME_FORMAT}]")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", TIME_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def units_text(summary: TaskSummary) -> str:
    """``fc1 120/400, fc2 80/400`` (units the task kept / the layer's units), or the capacity
    in use per group (``fc1 31%``) where the method does not assign units."""
    if summary.units:
        return ", ".join(f"{name} {kept}/{total}" for name, (kept, total) in summary.units.items())
    return ", ".join(f"{name} {100 * used:.0f}% in use" for name, used in summary.capacity.items())


def summary_line(summary: TaskSummary) -> str:
    """One line per task: its accuracy, the mean over the tasks seen, units kept, seconds."""
    acc = summary.accuracies
    measured = [a for a in acc if not math.isnan(a)]  # --eval-every leaves earlier tasks unmeasured
    mean = sum(measured) / len(measured)
    text = (f"task {summary.task + 1}/{summary.num_tasks} ({summary.name}): accuracy {100 * acc[-1]:.2f}%, "
            f"mean over {len(measured)} measured task(s) {100 * mean:.2f}%")
    if summary.routed is not None and all(r is not None for r in summary.routed):
        text += f", routed {100 * sum(summary.routed) / len(summary.routed):.2f}%"
    units = units_text(summary)
    return text + (f"; kept {units}" if units and summary.units else f"; {units}" if units else "") + \
        f"; {summary.seconds:.1f}s"


class ConsoleProgress(Callback):
    """A progress bar per task (shown on a terminal only) over the batches of the current epoch,
    with the epoch, its phase and the last epoch's loss and accuracy; and a summary line per
    task (``summaries``), also written when the output is a file."""

    def __init__(self, console: Console | None = None, bar: bool = True, summaries: bool = True):
        self.console = console or make_console()
        self.show_bar = bar and self.console.is_terminal
        self.summaries = summaries
        self._progress: Progress | None = None
        self._bar = None

    def on_run_start(self, num_tasks, first_task):
        if self.show_bar and self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()

    def on_task_start(self, t, name, batches):
        if self._progress is not None:
            self._bar = self._progress.add_task(f"task {t} ({name})", total=batches, stats="")

    def on_epoch_start(self, t: int, phase: str, epoch: int, batches: int) -> None:
        if self._progress is not None and self._bar is not None:
            self._progress.reset(self._bar, total=batches)
            self._progress.update(self._bar, description=f"task {t} {phase} epoch {epoch}")

    def on_batch_end(self, t):
        if self._progress is not None and self._bar is not None:
            self._progress.advance(self._bar)

    def on_epoch_end(self, row: HistoryRow):
        if self._progress is not None and self._bar is not None:
            loss = "" if row.loss is None else f"loss {row.loss:.4f} "
            self._progress.update(self._bar, stats=f"{row.phase} {row.epoch}: {loss}acc {100 * row.accuracy:.2f}%")

    def on_task_end(self, summary: TaskSummary):
        if self._progress is not None and self._bar is not None:
            self._progress.remove_task(self._bar)
            self._bar = None
        if self.summaries:
            self.console.print(summary_line(summary), highlight=False)

    def on_run_end(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
