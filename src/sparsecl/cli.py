"""``sparsecl`` command line: ``run`` trains a method over a benchmark's tasks (writing
``metrics.json`` and a checkpoint after every task; ``--resume``, ``--from``), ``eval`` measures
a saved model, ``export`` writes one task's subnetwork, ``report`` plots a run."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import distributed
from .atomic import write_json_atomic
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .data.benchmarks import BENCHMARKS
from .data.types import LazyTasks
from .compact import read_compact, write_compact
from .export import export_task
from .errors import ConfigError, OutputError, SparseCLError
from .methods import METHODS
from .models import MODELS
from .runs import (CheckpointWriter, RunSpec, build_method, build_network, build_stream, normalization_record,
                   restore, spec_of)
from .routing import ROUTING_MODES, evaluate_routing
from .rundir import RunFolder, default_run_folder
from .trainer import OPTIMIZERS, RunResult, TrainConfig, Trainer, accuracy, check_device, check_task

DEFAULT_BENCHMARK = "split-digits"  # bundled with scikit-learn: runs with no data root
_METHOD_FIELDS = {f.name for _, c in METHODS.values() if c for f in dataclasses.fields(c)}


def _method_options(func):
    """Add one ``--flag`` per field of every method's hyperparameter dataclass. Flags default to
    ``None`` so that only the options a user gave are checked against the chosen method."""
    seen: dict[str, dataclasses.Field] = {}
    for _, config_cls in METHODS.values():
        for f in dataclasses.fields(config_cls or ()) if config_cls else ():
            seen.setdefault(f.name, f)
    for name, f in reversed(list(seen.items())):
        flag = "--" + name.replace("_", "-")
        owners = [m for m, (_, c) in METHODS.items() if c and name in {x.name for x in dataclasses.fields(c)}]
        help = f"{f.metadata.get('help', '')} [{', '.join(owners)}; default {f.default}]"
        kind = str(f.type).removesuffix(" | None")  # annotations are strings (PEP 563)
        if kind == "bool":
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help)(func)
        else:
            func = click.option(flag, name, type={"int": int, "float": float}.get(kind, str),
                                default=None, help=help)(func)
    return func


@click.group()
@click.version_option(package_name="sparsecl")
def main() -> None:
    """Continual learning with sparse subnetworks: prune, freeze, recycle — zero forgetting,
    verified bit for bit."""


# The model options: --from keeps the saved model's and refuses new values.
_MODEL_OPTIONS = ("model", "hidden", "width", "dropout", "single_head")
# The task classifier's options: only with --routing classifier.
_ROUTER_OPTIONS = ("router_buffer", "router_epochs", "router_lr", "router_hidden", "router_free_units")


@main.command()
@click.option("--method", type=click.Choice(sorted(METHODS)), default="eidetic", show_default=True)
@click.option("--benchmark", type=click.Choice(sorted(BENCHMARKS)), default=DEFAULT_BENCHMARK, show_default=True)
@click.option("--tasks", "num_tasks", type=int, default=None, help="number of tasks (default: the benchmark's)")
@click.option("--epochs", type=int, default=20, show_default=True, help="training epochs per task (EideticNets: the cap before pruning)")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder holding MNIST/raw, FashionMNIST/raw (default: env SPARSECL_DATA)")
@click.option("--download", is_flag=True, default=None, help="download missing data files (MD5-checked)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--momentum", type=float, default=0.0, show_default=True, help="SGD momentum")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--model", type=click.Choice(list(MODELS)), default="mlp", show_default=True,
              help="the network (see sparsecl.models for each one's source)")
@click.option("--hidden", default="400,400", show_default=True, help="--model mlp: hidden widths, comma-separated")
@click.option("--width", type=int, default=None, help="convolutional models: base width (default: the paper's)")
@click.option("--dropout", type=float, default=None, help="dropout rate of models that have one (mlp: default 0)")
@click.option("--single-head", is_flag=True, default=False,
              help="one output layer shared by all tasks, each task reading its own final-hidden units")
@click.option("--permute-first", is_flag=True, default=None, help="permuted-mnist: permute task 0 too")
@click.option("--val-fraction", type=float, default=None, help="share of each task's training set held out for validation (default 0.1)")
@click.option("--max-train-per-task", type=int, default=None, help="seeded subset of each task's training set")
@click.option("--max-test-per-task", type=int, default=None, help="seeded subset of each task's test set")
@click.option("--classes-per-task", type=int, default=None, help="split-cifar100: classes per task (10: 10 tasks, 5: 20 tasks) [default: 10]")
@click.option("--augment/--no-augment", default=None, help="CIFAR benchmarks: random crop (4-pixel padding) and flip of training batches [default: on]")
@click.option("--normalize/--no-normalize", default=None, help="CIFAR benchmarks: per-channel normalization [default: on]")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda")
@click.option("--routing", type=click.Choice(ROUTING_MODES), default="oracle", show_default=True,
              help="also evaluate task-agnostic inference after every task: 'classifier' (EideticNets' task "
                   "classifier; keeps --router-buffer training samples of every task) or 'entropy' (the "
                   "head with the lowest entropy; keeps no data); 'oracle': task ids given only")
@click.option("--router-buffer", type=int, default=TrainConfig.router_buffer, show_default=True,
              help="--routing classifier: training samples kept per task to retrain the router after every task")
@click.option("--router-epochs", type=int, default=TrainConfig.router_epochs, show_default=True,
              help="--routing classifier: training epochs of the router after every task")
@click.option("--router-lr", type=float, default=TrainConfig.router_lr, show_default=True,
              help="--routing classifier: the router's Adam learning rate")
@click.option("--router-hidden", type=int, default=TrainConfig.router_hidden, show_default=True,
              help="--routing classifier: hidden units of the router's head (0: one Linear layer)")
@click.option("--router-free-units/--no-router-free-units", default=TrainConfig.router_free_units, show_default=True,
              help="--routing classifier: the router also trains units of its own in the capacity no task owns "
                   "(EideticNets, CLNP); off: a head on the frozen features only")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="run folder for metrics.json and the checkpoint written after every task "
                   "[default: runs/<method>-<benchmark>-<YYYYmmdd-HHMMSS>]")
@click.option("--overwrite", is_flag=True, default=False,
              help="delete the files of another run in --out before this run starts (else such a folder is refused)")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="continue the run in this folder after its last completed task, with its saved options")
@click.option("--from", "from_checkpoint", type=click.Path(path_type=Path), default=None,
              help="learn the tasks of --benchmark on the model saved in this checkpoint (file or run folder), "
                   "after its own tasks")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--dist-backend", type=click.Choice(distributed.BACKENDS), default=None,
              help="under torchrun: the process group's backend [default: nccl with --device cuda, else gloo]")
@_method_options
def run(data_root, download, device, out, overwrite, resume, from_checkpoint, progress, dist_backend,
        **options) -> None:
    """Train METHOD on the tasks of BENCHMARK, one after another, and report the accuracy matrix,
    ACC, BWT, forgetting, the largest change of an earlier task's logits and the capacity used.
    Every run writes a run folder (--out, by default runs/<method>-<benchmark>-<time>), locked
    while the run lasts, with a checkpoint after every task: --resume continues an interrupted
    run bit for bit, --from adds new tasks to a trained model. A folder holding another run's
    files is refused unless --overwrite.

    Launched by torchrun (torchrun --nproc_per_node=N -m sparsecl run ...), it trains data-parallel
    with DDP: --batch-size is the global batch, and only rank 0 writes files and prints."""
    try:
        world, device = distributed.init_from_env(device, dist_backend)
    except SparseCLError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        _run(world, data_root, download, device, out, overwrite, resume, from_checkpoint, progress, options)
    finally:
        distributed.shutdown(world)


def _run(world, data_root, download, device, out, overwrite, resume, from_checkpoint, progress, options) -> None:
    main_rank = world is None or world.is_main
    progress = progress and main_rank
    if progress:
        logging.basicConfig(level=logging.INFO, format="%(message)s",
                            handlers=[RichHandler(show_path=False)])
    ctx = click.get_current_context()
    given = {k for k in options if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    folder = None
    try:
        if resume is not None and from_checkpoint is not None:
            raise ConfigError("--resume and --from cannot be combined")
        if resume is not None:
            if given or out is not None or overwrite:
                flags = _flags(ctx, sorted(given | ({"out"} if out else set()) | ({"overwrite"} if overwrite else set())))
                raise ConfigError(f"--resume continues the run in its own folder with its saved options; drop {flags}")
            out = resume
        spec, ckpt = _spec(options, given, resume, from_checkpoint)  # a bad checkpoint fails here
        config = spec.train_config(device, progress)  # bad training options fail before any work
        if world is not None:
            distributed.local_batch_size(config.batch_size, world)
        if main_rank:  # every run writes a run folder; refused before training if it cannot be used
            out = Path(out) if out is not None else default_run_folder(spec.method, spec.stream[-1]["benchmark"])
            folder = RunFolder.open(out, resume=resume is not None, overwrite=overwrite,
                                    option="--resume" if resume is not None else "--out")
        first = world is None or world.local_rank == 0  # one process per machine downloads missing files
        if not first:
            distributed.barrier(world)
        bench = build_stream(spec, data_root, download)
        if first:
            distributed.barrier(world)
        if ckpt is None:
            net, method_obj, state = build_network(spec, bench, device), build_method(spec.method, spec.method_options), None
        else:
            net, method_obj, state = restore(ckpt, spec, continue_on=device)
            if state.tasks_done >= bench.num_tasks and main_rank:
                click.echo(f"the run in {ckpt.path.parent} has finished all {bench.num_tasks} tasks")
            saved_world, world_size = ckpt.manifest.get("world_size", 1), 1 if world is None else world.size
            if resume is not None and saved_world != world_size and main_rank:
                click.echo(f"warning: the run was trained with {saved_world} process(es) and continues with "
                           f"{world_size}: its remaining tasks see another sample order, so it will not end bit "
                           "for bit as an uninterrupted run", err=True)
        normalize = ((lambda i: bench.tasks.header(i).normalize) if isinstance(bench.tasks, LazyTasks)
                     else [t.normalize for t in bench.tasks])
        writer = None if not main_rank else CheckpointWriter(Path(out) / CHECKPOINT_NAME, spec, method_obj,
                                                             bench.input_shape, bench.num_tasks, device, normalize,
                                                             1 if world is None else world.size)
        if main_rank:
            click.echo(f"run folder {out}: checkpoint {Path(out) / CHECKPOINT_NAME} after every task, "
                       "metrics.json at the end")
        result = Trainer(method_obj, config, world).fit(net, bench, state, writer)
        if not main_rank:
            return
        result_dict = result.to_dict()
        result_dict["config"].update(
            method=spec.method, benchmark=bench.name, model=spec.model["name"], **spec.model["options"],
            single_head=spec.model["single_head"], stream=spec.stream, world_size=1 if world is None else world.size,
            method_options=dataclasses.asdict(method_obj.config) if hasattr(method_obj, "config") else {})
        if hasattr(method_obj, "log"):
            result_dict["method_log"] = method_obj.log
        _print_summary(result)
        try:
            path = write_json_atomic(Path(out) / "metrics.json", result_dict)
        except OSError as exc:
            raise OutputError(f"cannot write {Path(out) / 'metrics.json'} ({exc.strerror or exc}); the checkpoint "
                              f"{Path(out) / CHECKPOINT_NAME} holds every task's results (sparsecl report "
                              f"{out} reads it)") from None
        click.echo(f"wrote {path}")
        click.echo(f"run folder {out}: checkpoint {Path(out) / CHECKPOINT_NAME}")
    except SparseCLError as exc:
        if folder is not None and out is not None and (Path(out) / CHECKPOINT_NAME).exists():
            click.echo(f"run folder {out}: checkpoint {Path(out) / CHECKPOINT_NAME} (continue with "
                       f"sparsecl run --resume {out})", err=True)
        raise click.ClickException(str(exc)) from exc
    finally:
        if folder is not None:  # a run refused before it wrote anything leaves no folder behind
            folder.close(remove_if_empty=folder.created)


def _spec(options: dict, given: set[str], resume: Path | None, from_checkpoint: Path | None):
    """The run's spec and, when it continues a saved run, the checkpoint."""
    if resume is not None:
        ckpt = load_checkpoint(resume)
        return spec_of(ckpt), ckpt
    segment = {"benchmark": options["benchmark"], "seed": options["seed"], "options": {
        k: v for k, v in dict(num_tasks=options["num_tasks"], permute_first=options["permute_first"],
                              val_fraction=options["val_fraction"], max_train_per_task=options["max_train_per_task"],
                              max_test_per_task=options["max_test_per_task"], augment=options["augment"],
                              classes_per_task=options["classes_per_task"],
                              normalize=options["normalize"]).items() if v is not None}}
    train = {k: options[k] for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "seed",
                                     "routing", *_ROUTER_OPTIONS)}
    if options["routing"] != "classifier":
        stray = sorted(k for k in _ROUTER_OPTIONS if k in given)
        if stray:
            raise ConfigError(f"{_flags(click.get_current_context(), stray)} configure(s) the task classifier of "
                              f"--routing classifier; --routing is {options['routing']}")
    method_options = {k: v for k, v in options.items() if k in _METHOD_FIELDS and v is not None}
    if from_checkpoint is None:
        model = {"name": options["model"], "options": _model_options(options, given),
                 "single_head": options["single_head"]}
        return RunSpec([segment], model, options["method"], method_options, train), None
    ckpt = load_checkpoint(from_checkpoint)
    saved = spec_of(ckpt)
    done, total = ckpt.manifest.get("tasks_done"), ckpt.manifest.get("total_tasks")
    if done != total:
        raise ConfigError(f"checkpoint {ckpt.path} stopped after {done} of its run's {total} tasks; finish "
                          f"that run with --resume {ckpt.path.parent} before adding tasks with --from")
    clash = sorted(k for k in _MODEL_OPTIONS if k in given)
    if clash:
        flags = _flags(click.get_current_context(), clash)
        raise ConfigError(f"--from keeps the saved model ({saved.model_description()}, single head "
                          f"{saved.model['single_head']}); drop {flags}")
    method = options["method"] if "method" in given else saved.method
    if method != saved.method:
        raise ConfigError(f"checkpoint {ckpt.path} was trained with --method {saved.method}; "
                          f"--method {method} cannot continue it")
    return RunSpec(saved.stream + [segment], saved.model, method,
                   {**saved.method_options, **method_options}, train), ckpt


def _model_options(options: dict, given: set[str]) -> dict:
    """The options of ``--model``: the MLP's widths and dropout, or a conv model's given ones."""
    name = options["model"]
    if name == "mlp":
        if "width" in given:
            raise ConfigError("--width sets a convolutional model's base width; the MLP takes --hidden")
        return {"hidden": list(_widths(options["hidden"])), "dropout": options["dropout"] or 0.0}
    if "hidden" in given:
        raise ConfigError(f"--hidden sets the MLP's widths; --model {name} takes --width")
    return {k: options[k] for k in ("width", "dropout") if options[k] is not None}


@main.command("eval")
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
              help="also measure task-agnostic accuracy: 'entropy' (needs nothing more) or 'classifier' (the "
                   "task router the run saved with --routing classifier)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the accuracies to this JSON file")
def evaluate(checkpoint, benchmark, num_tasks, seed, permute_first, max_test_per_task, classes_per_task,
             normalize, data_root, download, device, routing, json_out) -> None:
    """Test accuracy of every task of a saved model (CHECKPOINT: a checkpoint file or run folder);
    with --routing, also without task ids."""
    ctx = click.get_current_context()
    try:
        check_device(device)
        if json_out is not None:
            _check_parent(json_out, "--json")
        ckpt = load_checkpoint(checkpoint)
        if ckpt.manifest.get("compact_format"):  # a model written by export --compact
            net, state = read_compact(ckpt.path)[0], None
        else:
            net, _, state = restore(ckpt)
        net.to(device).eval()
        router = None
        if routing == "classifier":
            router = None if state is None or state.routing is None else state.routing.router
            if router is None:
                why = ("a compact model keeps no task router" if state is None
                       else "its run did not use --routing classifier")
                raise ConfigError(f"{ckpt.path} holds no task router ({why}); --routing entropy needs none")
            router.to(device)
        if benchmark is None:
            only_with = [k for k in ("num_tasks", "seed", "permute_first", "max_test_per_task",
                                     "classes_per_task", "normalize")
                         if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT]
            if only_with:
                raise ConfigError(f"{_flags(ctx, only_with)} select(s) the tasks of --benchmark; without it the "
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
        raise click.ClickException(str(exc)) from exc
    table = Table(title=f"{ckpt.path}: test accuracy per task on {bench.name}")
    columns = ["task", "name", "samples", "accuracy (%)"]
    if routed is not None:
        columns += [f"routed, {routing} (%)", "routed to its task (%)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "name" else "right")
    for r in rows:
        extra = [] if routed is None else [f"{100 * r['routed_accuracy']:.2f}", f"{100 * r['routing_accuracy']:.2f}"]
        table.add_row(str(r["task"]), r["name"], str(r["samples"]), f"{100 * r['accuracy']:.2f}", *extra)
    Console().print(table)
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    click.echo(f"mean accuracy {100 * mean:.2f}%")
    report = {"checkpoint": str(ckpt.path), "benchmark": bench.name, "tasks": rows, "mean_accuracy": mean}
    if routed is not None:
        mean_routed = sum(routed.routed) / len(rows)
        click.echo(f"mean routed accuracy ({routing}) {100 * mean_routed:.2f}%")
        report["routing"] = {"mode": routing, "mean_routed_accuracy": mean_routed, "per_class": routed.per_class}
    if json_out is not None:
        write_json_atomic(json_out, report)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--task", "task", type=int, default=None, help="the task whose subnetwork is exported")
@click.option("--compact", is_flag=True, default=False,
              help="instead: every task's subnetwork in one compact file (weight-level methods with task "
                   "masks: WSN, DST, TinySubNets), read back with sparsecl.compact.read_compact or sparsecl eval")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="file to write (a torch.export program, e.g. task3.pt2; with --compact, e.g. model.compact)")
def export(checkpoint, task, compact, out) -> None:
    """Write task TASK's subnetwork, only the units it uses, as a standalone model that plain
    PyTorch loads: ``torch.export.load(OUT).module()(x)`` gives the task's logits for float32
    inputs ``x`` with image pixels divided by 255 (a benchmark's per-channel normalization, if
    any, is part of the exported model).

    With --compact, every task's subnetwork in one file: codebook indices bit-packed at their bit
    width (TinySubNets) or float32 values, codebooks, entropy-coded task masks, and each task's
    biases, BatchNorm and head; read back, every task's logits are bitwise those of the saved model."""
    if compact == (task is not None):
        raise click.ClickException("give --task T (one task's subnetwork) or --compact (every task), not both"
                                   if compact else "give --task T, or --compact for every task")
    try:
        _check_parent(out, "--out")
        ckpt = load_checkpoint(checkpoint)
        net, method, _ = restore(ckpt)
        net.eval()
        if compact:
            model = write_compact(out, net, getattr(method, "codebooks", None), spec_of(ckpt),
                                  tuple(ckpt.manifest["input_shape"]), ckpt.manifest.get("normalize"))
            bits = model.bits_per_parameter()
            click.echo(f"wrote {out}: {net.num_tasks} tasks in {out.stat().st_size} bytes, "
                       f"{bits['total']:.3f} bits per parameter of the dense float32 model's "
                       f"{model.dense_parameters} (32 bits each)")
            return
        if not 0 <= task < net.num_tasks:
            raise ConfigError(f"--task {task} is out of range: {ckpt.path} has tasks 0..{net.num_tasks - 1}")
        normalize = (ckpt.manifest.get("normalize") or [None] * net.num_tasks)[task]
        small = export_task(net, task, tuple(ckpt.manifest["input_shape"]), out, normalize)
    except SparseCLError as exc:
        raise click.ClickException(str(exc)) from exc
    full = sum(p.numel() for p in net.body.parameters()) + sum(p.numel() for p in net.head_parameters(task))
    kept = sum(p.numel() for p in small.parameters())
    click.echo(f"wrote {out}: task {task}'s subnetwork, {kept} parameters of the full model's {full} "
               f"({100 * kept / full:.1f}%), {out.stat().st_size} bytes; input: float32 of shape "
               f"(N, {', '.join(map(str, ckpt.manifest['input_shape']))}), pixels scaled to [0, 1]")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Plot RUN_DIR/metrics.json: accuracy_matrix.png, capacity.png, reuse.png and a Markdown
    summary, report.md, written next to it. A run that was stopped before its end (a checkpoint,
    no metrics.json) is reported from its checkpoint: the tasks it finished."""
    from .report import write_report  # matplotlib is only imported when a report is asked for

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
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write the report of {run_dir}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from None


def _report_unfinished(run_dir: Path, write_report) -> tuple[list[Path], int, int]:
    """Report a run from its checkpoint (the run was stopped before metrics.json was written):
    the metrics of its finished tasks, made as the run makes them, reported by report.py in a
    temporary folder, then moved into ``run_dir``."""
    import shutil
    import tempfile

    from .metrics import versions
    from .trainer import RunState

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


def _flags(ctx: click.Context, names) -> str:
    """The command-line flags of parameters ``names`` (``num_tasks`` → ``--tasks``)."""
    opts = {p.name: p.opts[0] for p in ctx.command.params}
    return ", ".join(opts.get(n, "--" + n.replace("_", "-")) for n in names)


def _check_parent(path: Path, option: str) -> None:
    """Refuse an output file whose folder does not exist or cannot be written, before any work."""
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist or is not writable")


def _widths(hidden: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in hidden.split(",") if w.strip())
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated integers, got '{hidden}'") from None
    if not widths or min(widths) < 1:
        raise ConfigError(f"--hidden needs at least one positive width, got '{hidden}'")
    return widths


def _print_summary(result: RunResult) -> None:
    R = result.accuracy_matrix
    console = Console()
    if not console.is_terminal:  # rich would squeeze the tables into 80 columns in a log file
        console = Console(width=max(120, 10 * (len(R) + 2)))
    table = Table(title=f"{result.method} on {result.benchmark}: accuracy matrix R[t][i] (%)")
    table.add_column("after task")
    for i in range(len(R)):
        table.add_column(f"task {i}", justify="right")
    for t, row in enumerate(R):
        table.add_row(str(t), *("" if a is None else f"{100 * a:.2f}" for a in row))
    console.print(table)
    fmt = lambda v: "n/a" if v is None else f"{100 * v:+.2f}"
    console.print(f"ACC {100 * result.acc:.2f}%   BWT {fmt(result.bwt)}   forgetting {fmt(result.forgetting)}   "
                  f"max logit change {result.max_logit_change:g}   time {sum(result.seconds_per_task):.1f}s")
    unit = "weights" if result.bits_per_parameter else "units"
    cap = Table(title=f"capacity: fraction of each layer's {unit} owned after each task")
    cap.add_column("layer")
    for i in range(len(R)):
        cap.add_column(f"task {i}", justify="right")
    for name, used in result.capacity.items():
        cap.add_row(name, *(f"{u:.3f}" for u in used))
    console.print(cap)
    bits = result.bits_per_parameter
    if bits:
        console.print(f"bits per parameter to run every task: {bits['stored'][-1]:.3f} stored "
                      f"(raw {bits['raw'][-1]:.3f}, entropy-coded {bits['coded'][-1]:.3f}, "
                      f"Shannon bound {bits['entropy'][-1]:.3f}); float32 weights: 32")
        if "compact" in bits:
            console.print(f"compact model (sparsecl export --compact): {bits['compact'][-1]:.3f} bits per parameter "
                          f"of the dense float32 model; the last task alone {bits['compact_task'][-1]:.3f}")
    if result.routing is not None:
        _print_routing(console, result.routing, R)


def _print_routing(console: Console, routing: dict, R: list) -> None:
    """The task-agnostic results after the last task: per task, oracle vs routed accuracy and
    the share routed to the right task; routed ACC and the mean per-class drop."""
    buffer = "" if routing["buffer_per_task"] is None else f", {routing['buffer_per_task']} samples kept per task"
    table = Table(title=f"task-agnostic inference (--routing {routing['mode']}{buffer}), after the last task (%)")
    for column in ("task", "oracle", "routed", "routed to its task"):
        table.add_column(column, justify="right")
    routed, to_task = routing["accuracy_matrix"][-1], routing["routing_accuracy"][-1]
    for i, oracle in enumerate(R[-1]):
        cell = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        table.add_row(str(i), cell(oracle), cell(routed[i]), cell(to_task[i]))
    console.print(table)
    acc = routing["acc"]
    drop = routing["mean_class_drop"]
    console.print(f"routed ACC {'n/a' if acc is None else f'{100 * acc:.2f}%'}   "
                  f"routing accuracy {100 * sum(to_task) / len(to_task):.2f}%   "
                  f"mean per-class drop {'n/a' if drop is None else f'{100 * drop:.2f} points'}"
                  if all(v is not None for v in to_task) else "routing was not measured after the last task")
