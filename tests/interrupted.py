"""A run of a ``RunSpec`` that writes its checkpoint after every task, optionally stopped after
some task as a crash would stop it: the reference side of the resume tests."""

from __future__ import annotations

from pathlib import Path

from sparsecl.checkpoint import CHECKPOINT_NAME
from sparsecl.data.types import Benchmark
from sparsecl.runs import CheckpointWriter, RunSpec, build_method, build_network
from sparsecl.trainer import RunResult, Trainer


def run_with_checkpoints(spec: RunSpec, bench: Benchmark, out: Path, stop_after: int | None = None) -> RunResult:
    """Train ``spec`` on ``bench`` writing ``out/checkpoint.safetensors`` after every task;
    raises ``KeyboardInterrupt`` right after the checkpoint of task ``stop_after - 1``."""
    out.mkdir()
    method = build_method(spec.method, spec.method_options)
    writer = CheckpointWriter(out / CHECKPOINT_NAME, spec, method, bench.input_shape, bench.num_tasks)

    def on_task_end(net, state):
        writer(net, state)
        if state.tasks_done == stop_after:
            raise KeyboardInterrupt

    return Trainer(method, spec.train_config()).fit(build_network(spec, bench), bench, on_task_end=on_task_end)
