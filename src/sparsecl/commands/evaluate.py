"""``sparsecl eval``: test accuracy of every task of a saved model (a run's checkpoint or a
compact model), with task ids or routed without them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from rich.table import Table

from .. import metrics
from ..atomic import write_json_atomic
from ..checkpoint import load_checkpoint
from ..compact import read_compact
from ..config import ROUTING_MODES, check_device
from ..console import make_console
from ..data.benchmarks import BENCHMARKS
from ..errors import ConfigError, SparseCLError
from ..evaluation import accuracy
from ..routing import evaluate_routing
from ..runs import RunSpec, build_stream, normalization_record, restore, spec_of
from ..trainer import check_task
from .common import check_parent, fail, flags


@click.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--benchmark", type=click.Choice(sorted(BENCHMARKS)), default=None,
              help="benchmark to evaluate, its task i on head i (default: the tasks the checkpoint learned)")
@click.option("--tasks", "num_tasks", type=int, default=None, help="number of tasks of --benchmark")
@click.option("--seed", type=int, default=0, show_default=True, help="--benchmark's seed (permutations, class order)")
@click.option("--permute-first", is_flag=True, default=None, help="permuted-mnist: permute task 0 too")
@click.option("--max-test-per-task", type=int, default=None, help="seeded subset of each task's test set")
@click.option("--classes-per-task", type=int, default=None, help="split-cifar100: classes per task [default: 10]")
@click.option("--normalize/--no-normalize", default=None,
              help="CIFAR benchmarks: per-channel normalization, as the model was trained [default: on]")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--download", is_flag=True, default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--routing", type=click.Choice(ROUTING_MODES), default="oracle", show_default=True,
              help="also measure task-agnostic accuracy: 'entropy' (needs nothing more), 'classifier' or "
                   "'classifier-all' (the task router the run saved with that --routing) or 'lda' (the feature "
                   "statistics the run saved with --routing lda)")
@click.option("--lda-shrinkage", type=float, default=None,
              help="--routing lda: shrinkage a in [0, 1] of the covariance towards (tr S / d) I, "
                   "(1 - a) S + a (tr S / d) I [default: the run's, 0.1]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the accuracies to this JSON file")
def evaluate(checkpoint, benchmark, num_tasks, seed, permute_first, max_test_per_task, classes_per_task,
             normalize, data_root, download, device, routing, lda_shrinkage, json_out) -> None:
    """Test accuracy of every task of a saved model (CHECKPOINT: a checkpoint file or run folder);
    with --routing, also without task ids."""
    ctx = click.get_current_context()
    try:
        check_device(device)
        if json_out is not None:
            check_parent(json_out, "--json")
        ckpt = load_checkpoint(checkpoint)
        if ckpt.manifest.get("compact_format"):  # a model written by export --compact
            net, state = read_compact(ckpt.path)[0], None
        else:
            net, _, state = restore(ckpt)
        net.to(device).eval()
        router = None
        if routing in ("classifier", "classifier-all", "lda"):
            saved = None if state is None else state.routing
            router = None if saved is None or saved.mode != routing else saved.router
            if router is None:
                why = ("a compact model keeps no router" if state is None
                       else f"its run did not use --routing {routing}")
                what = "feature statistics" if routing == "lda" else "task router"
                raise ConfigError(f"{ckpt.path} holds no {what} of --routing {routing} ({why}); "
                                  "--routing entropy needs none")
            router.to(device)
        if lda_shrinkage is not None:
            if routing != "lda":
                raise ConfigError(f"--lda-shrinkage sets the covariance shrinkage of --routing lda; --routing is {routing}")
            router.set_shrinkage(lda_shrinkage)
        if benchmark is None:
            only_with = [k for k in ("num_tasks", "seed", "permute_first", "max_test_per_task",
                                     "classes_per_task", "normalize")
                         if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT]
            if only_with:
                raise ConfigError(f"{flags(ctx, only_with)} select(s) the tasks of --benchmark; without it the "
                                  "checkpoint's own tasks are evaluated")
            bench = build_stream(spec_of(ckpt), data_root, download)
            bench = dataclasses.replace(bench, tasks=bench.tasks[: net.num_tasks])  # an interrupted run
        else:
            options = {k: v for k, v in dict(num_tasks=num_tasks, permute_first=permute_first,
                                             max_test_per_task=max_test_per_task, classes_per_task=classes_per_task,
                                             normalize=normalize).items() if v is not None}
            bench = build_stream(RunSpec([{"benchmark": benchmark, "seed": seed, "options": options}], {
                "name": "mlp", "options": {}, "single_head": False}, "finetune"), data_root, download)
        saved_norms = ckpt.manifest.get("normalize") or [None] * net.num_tasks
        for i, task in enumerate(bench.tasks[: net.num_tasks]):
            got = normalization_record(task.normalize)
            if got != saved_norms[i]:
                raise ConfigError(f"task {i} of benchmark '{bench.name}' normalizes its inputs with {got}, but "
                                  f"{ckpt.path} was trained with {saved_norms[i]}; use --normalize/--no-normalize "
                                  "as in training")
        saved_shape = tuple(ckpt.manifest["input_shape"])
        if tuple(bench.input_shape) != saved_shape:
            raise ConfigError(f"benchmark '{bench.name}' has inputs of shape {tuple(bench.input_shape)}, but "
                              f"{ckpt.path} was trained on inputs of shape {saved_shape}")
        if bench.num_tasks > net.num_tasks:
            raise ConfigError(f"{ckpt.path} has heads for {net.num_tasks} tasks, but benchmark "
                              f"'{bench.name}' has {bench.num_tasks}; use --tasks {net.num_tasks}")
        rows = []
        for i, task in enumerate(bench.tasks[: net.num_tasks]):
            check_task(task, i, head_classes=net.head_classes[i])
            rows.append({"task": i, "name": task.name, "samples": len(task.test_y),
                         "accuracy": accuracy(net, task.test_x, task.test_y, i, 1024, device, task.prepare)})
        routed = None
        if routing != "oracle":
            routing_net = net if router is None else router.install(net)
            routed = evaluate_routing(routing_net, bench.tasks[: net.num_tasks], routing, router, 1024, device)
            for r, acc, share in zip(rows, routed.routed, routed.routing):
                r.update(routed_accuracy=acc, routing_accuracy=share)
    except SparseCLError as exc:
        raise fail(exc) from exc
    table = Table(title=f"{ckpt.path}: test accuracy per task on {bench.name}")
    columns = ["task", "name", "samples", "accuracy (%)"]
    if routed is not None:
        columns += [f"routed, {routing} (%)", "routed to its task (%)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "name" else "right")
    for r in rows:
        extra = [] if routed is None else [f"{100 * r['routed_accuracy']:.2f}", f"{100 * r['routing_accuracy']:.2f}"]
        table.add_row(str(r["task"]), r["name"], str(r["samples"]), f"{100 * r['accuracy']:.2f}", *extra)
    make_console().print(table)
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    click.echo(f"mean accuracy {100 * mean:.2f}%")
    report = {"checkpoint": str(ckpt.path), "benchmark": bench.name, "tasks": rows, "mean_accuracy": mean}
    if routed is not None:
        mean_routed = sum(routed.routed) / len(rows)
        click.echo(f"mean routed accuracy ({routing}) {100 * mean_routed:.2f}%")
        mean_share = sum(routed.routing) / len(rows)
        drop = metrics.mean_class_drop([c["oracle"] for c in routed.per_class], [c["routed"] for c in routed.per_class])
        click.echo(f"routing accuracy {100 * mean_share:.2f}%   mean per-class drop "
                   f"{'n/a' if drop is None else f'{100 * drop:.2f} points'}")
        report["routing"] = {"mode": routing, "mean_routed_accuracy": mean_routed, "mean_routing_accuracy": mean_share,
                             "mean_class_drop": drop, "per_class": routed.per_class}
    if json_out is not None:
        write_json_atomic(json_out, report)



command = evaluate
