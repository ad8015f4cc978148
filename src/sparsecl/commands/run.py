"""``sparsecl run``: train a method on a benchmark's tasks, one after another, in a run folder.

Options are shown by section in ``--help`` (run, data, model, training, routing, output, and one
section per method); every default shown is the one used: training defaults are
``TrainConfig``'s, a method option's default is its config's (per method where several share a
flag), and options with a fixed set of values are ``click.Choice``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .. import distributed
from ..atomic import write_json_atomic
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..config import OPTIMIZERS, ROUTING_MODES, TrainConfig
from ..console import ConsoleProgress, make_console, setup_logging
from ..data.benchmarks import BENCHMARKS
from ..data.types import LazyTasks
from ..errors import ConfigError, OutputError, SparseCLError
from ..loggers import HISTORY_NAME, TENSORBOARD_DIR, CSVHistory, TensorBoardLogger
from ..methods import METHODS
from ..metrics import write_run_tables
from ..models import MODELS
from ..rundir import RunFolder, default_run_folder
from ..runs import CheckpointWriter, RunSpec, build_method, build_network, build_stream, restore, spec_of
from ..trainer import RunResult, Trainer
from .common import fail, flags

DEFAULT_BENCHMARK = "split-digits"  # bundled with scikit-learn: runs with no data root
_METHOD_FIELDS = {f.name for _, c in METHODS.values() if c for f in dataclasses.fields(c)}
# The model options: --from keeps the saved model's and refuses new values.
_MODEL_OPTIONS = ("model", "hidden", "width", "dropout", "bias", "single_head")
# The task classifier's options: only with --routing classifier.
_ROUTER_OPTIONS = ("router_buffer", "router_epochs", "router_lr", "router_hidden", "router_free_units")
_TRAIN = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

#: Sections of ``run --help``, in order; each method's options follow in a section of their own.
SECTIONS = ("Run", "Data", "Model", "Training", "Routing (task-agnostic evaluation)", "Output")
SHARED_SECTION = "Options of several methods"


class SectionOption(click.Option):
    """An option shown under ``section`` in ``--help``."""

    def __init__(self, *args, section: str = "Run", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options by section."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "section", "Other"), []).append(record)
        order = [s for s in SECTIONS if s in groups] + [s for s in groups if s not in SECTIONS]
        for name in order:
            with formatter.section(name):
                formatter.write_dl(groups[name])


def option(*decls, section: str, **kwargs):
    return click.option(*decls, cls=SectionOption, section=section, **kwargs)


def _method_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the methods' string options: a field's ``metadata['choices']``
    where the method declares them, else the values its config's validation accepts."""
    from ..methods import clnp, dst, eidetic, ewc
    from .. import scoring

    found = {"score": getattr(scoring, "SCORES", None), "init": getattr(dst, "INITS", None),
             "growth": getattr(dst, "GROWTHS", None), "theta_order": ("first", "last"),
             "theta_scan": getattr(clnp, "THETA_SCANS", None), "theta_eval": getattr(clnp, "THETA_EVALS", None),
             "prune_search": getattr(eidetic, "SEARCHES", None), "stop_on": getattr(eidetic, "STOP_ON", None),
             "score_scope": getattr(eidetic, "SCOPES", None), "prune_step_of": ("remaining", "available"),
             "ewc_fisher": getattr(ewc, "FISHERS", None)}
    for _, config_cls in METHODS.values():
        for f in dataclasses.fields(config_cls) if config_cls else ():
            if f.metadata.get("choices"):
                found[f.name] = tuple(f.metadata["choices"])
    return {k: tuple(v) for k, v in found.items() if v}


def _show_default(f: dataclasses.Field) -> str:
    if f.metadata.get("default_text"):
        return str(f.metadata["default_text"])
    value = f.default
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _method_options(func):
    """Add one ``--flag`` per field of every method's hyperparameter dataclass, in a section per
    method (a flag several methods take goes to a section of its own, with each method's
    default). Flags default to ``None`` so that only the options a user gave are checked
    against the chosen method, whose config then fills in its own defaults."""
    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method, (_, config_cls) in METHODS.items():
        for f in dataclasses.fields(config_cls) if config_cls else ():
            owners.setdefault(f.name, []).append((method, f))
    choices = _method_choices()
    for name, fields in reversed(list(owners.items())):
        f = fields[0][1]
        flag = "--" + name.replace("_", "-")
        text = next((g.metadata.get("help") for _, g in fields if g.metadata.get("help")), "")
        if len(fields) == 1:
            section, where = f"Method {fields[0][0]}", f"default: {_show_default(f)}"
        else:
            section = SHARED_SECTION
            where = "; ".join(f"{m}: default {_show_default(g)}" for m, g in fields)
        help = f"{text} [{where}]"
        kind = str(f.type).removesuffix(" | None")  # annotations are strings (PEP 563)
        if kind == "bool":
            func = option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help, section=section)(func)
        elif name in choices:
            func = option(flag, name, type=click.Choice(choices[name]), default=None, help=help,
                          section=section)(func)
        else:
            func = option(flag, name, type={"int": int, "float": float}.get(kind, str), default=None, help=help,
                          section=section)(func)
    return func


def _seed_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got '{value}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"needs one or more distinct seeds, got '{value}'")
    return seeds


R, D, M, T, RT, O = SECTIONS


@click.command("run", cls=SectionedCommand)
@option("--method", type=click.Choice(sorted(METHODS)), default="eidetic", show_default=True, section=R)
@option("--benchmark", type=click.Choice(sorted(BENCHMARKS)), default=DEFAULT_BENCHMARK, show_default=True,
        section=R)
@option("--tasks", "num_tasks", type=int, default=None, help="number of tasks (default: the benchmark's)", section=R)
@option("--seed", type=int, default=_TRAIN["seed"], show_default=True,
        help="seed of the data order, the initial weights and the benchmark's draws", section=R)
@option("--seeds", callback=_seed_list, default=None,
        help="run once per seed (e.g. 0,1,2,3,4), each in <out>/seed-<n>, then print the mean ± std over "
             "the seeds (sparsecl summarize)", section=R)
@option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="run folder for the checkpoint (after every task), metrics.json, history.csv "
             "[default: runs/<method>-<benchmark>-<YYYYmmdd-HHMMSS>]", section=R)
@option("--overwrite", is_flag=True, default=False,
        help="delete the files of another run in --out before this run starts (else such a folder is refused)",
        section=R)
@option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="continue the run in this folder after its last completed task, with its saved options", section=R)
@option("--from", "from_checkpoint", type=click.Path(path_type=Path), default=None,
        help="learn the tasks of --benchmark on the model saved in this checkpoint (file or run folder), "
             "after its own tasks", section=R)
@option("--init-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="start from these weights (a safetensors state dict of the model or its body, or a sparsecl "
             "checkpoint), loaded before task 0 and recorded in the run's spec", section=R)
@option("--device", default=_TRAIN["device"], show_default=True, help="torch device, e.g. cpu or cuda", section=R)
@option("--dist-backend", type=click.Choice(distributed.BACKENDS), default=None,
        help="under torchrun: the process group's backend [default: nccl with --device cuda, else gloo]", section=R)
@option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="folder holding MNIST/raw, FashionMNIST/raw, cifar-100-python... (default: env SPARSECL_DATA)",
        section=D)
@option("--download", is_flag=True, default=None, help="download missing data files (MD5-checked)", section=D)
@option("--permute-first", is_flag=True, default=None, help="permuted-mnist: permute task 0 too", section=D)
@option("--val-fraction", type=float, default=None,
        help="share of each task's training set held out for validation [default: 0.1]", section=D)
@option("--max-train-per-task", type=int, default=None, help="seeded subset of each task's training set", section=D)
@option("--max-test-per-task", type=int, default=None, help="seeded subset of each task's test set", section=D)
@option("--classes-per-task", type=int, default=None,
        help="split-cifar100: classes per task (10: 10 tasks, 5: 20 tasks) [default: 10]", section=D)
@option("--augment/--no-augment", default=None,
        help="CIFAR benchmarks: random crop (4-pixel padding) and flip of training batches [default: on]", section=D)
@option("--normalize/--no-normalize", default=None,
        help="per-channel input normalization by the data set's mean and std: CIFAR benchmarks [default: on] "
             "and permuted-mnist [default: off]", section=D)
@option("--model", type=click.Choice(list(MODELS)), default="mlp", show_default=True,
        help="the network (see sparsecl.models for each one's source)", section=M)
@option("--hidden", default="400,400", show_default=True, help="--model mlp: hidden widths, comma-separated",
        section=M)
@option("--width", type=int, default=None, help="convolutional models: base width; vit: embedding size; mobilenetv2: stem channels (multiplier width/32) [default: the paper's]", section=M)
@option("--dropout", type=float, default=None, help="dropout rate of models that have one [mlp default: 0]",
        section=M)
@option("--bias/--no-bias", default=None, help="--model mlp: biases in every Linear [default: on]", section=M)
@option("--single-head", is_flag=True, default=False,
        help="one output layer shared by all tasks, each task reading its own final-hidden units", section=M)
@option("--epochs", type=int, default=_TRAIN["epochs"], show_default=True,
        help="training epochs per task (EideticNets: the cap before pruning)", section=T)
@option("--batch-size", type=int, default=_TRAIN["batch_size"], show_default=True, section=T)
@option("--optimizer", type=click.Choice(OPTIMIZERS), default=_TRAIN["optimizer"], show_default=True, section=T)
@option("--lr", type=float, default=_TRAIN["lr"], show_default=True, help="learning rate", section=T)
@option("--weight-decay", type=float, default=_TRAIN["weight_decay"], show_default=True, section=T)
@option("--momentum", type=float, default=_TRAIN["momentum"], show_default=True, help="SGD momentum", section=T)
@option("--fused/--no-fused", default=_TRAIN["fused"], show_default=True,
        help="the optimizer's fused implementation (one kernel per parameter): faster steps; rounds "
             "differently from the default, so repeat a run with the same setting to get it bit for bit", section=T)
@option("--restore-best/--no-restore-best", default=_TRAIN["restore_best"], show_default=True,
        help="after a task's training epochs, return to the epoch with the lowest validation loss (the WSN and "
             "GPM reference code's schedule; needs --val-fraction > 0)", section=T)
@option("--lr-patience", type=int, default=_TRAIN["lr_patience"], show_default=True,
        help="divide the learning rate by --lr-factor after this many training epochs in a row without a lower "
             "validation loss, and end the task's training below --lr-min (0: constant learning rate)", section=T)
@option("--lr-factor", type=float, default=_TRAIN["lr_factor"], show_default=True,
        help="--lr-patience: what the learning rate is divided by", section=T)
@option("--lr-min", type=float, default=_TRAIN["lr_min"], show_default=True,
        help="--lr-patience: the task's training ends once the learning rate would fall below this", section=T)
@option("--eval-every", type=int, default=_TRAIN["eval_every"], show_default=True,
        help="re-evaluate the earlier tasks' test sets after every K-th task only (the new task and the bitwise "
             "probe check of every earlier task run after every task; every task after the last)", section=T)
@option("--eval-tasks", default=_TRAIN["eval_tasks"], show_default=True,
        help="the earlier tasks re-evaluated after a task: 'all' or indices and ranges such as 0,5,10-19 "
             "(every task after the last)", section=T)
@option("--routing", type=click.Choice(ROUTING_MODES), default=_TRAIN["routing"], show_default=True,
        help="also evaluate task-agnostic inference after every task: 'classifier' (EideticNets' task "
             "classifier; keeps --router-buffer training samples of every task), 'classifier-all' (the same, "
             "retrained on every training sample of every task seen: keeps the whole stream), 'entropy' (the "
             "head with the lowest entropy; keeps no data) or 'lda' (class means and a shrunk covariance of the "
             "features; keeps no inputs); entropy and lda also route weight-level methods, through every "
             "task's subnetwork; 'oracle': task ids given only", section=RT)
@option("--router-buffer", type=int, default=_TRAIN["router_buffer"], show_default=True,
        help="--routing classifier: training samples kept per task to retrain the router after every task",
        section=RT)
@option("--router-epochs", type=int, default=_TRAIN["router_epochs"], show_default=True,
        help="--routing classifier: training epochs of the router after every task", section=RT)
@option("--router-lr", type=float, default=_TRAIN["router_lr"], show_default=True,
        help="--routing classifier: the router's Adam learning rate", section=RT)
@option("--router-hidden", type=int, default=_TRAIN["router_hidden"], show_default=True,
        help="--routing classifier: hidden units of the router's head (0: one Linear layer)", section=RT)
@option("--router-free-units/--no-router-free-units", default=_TRAIN["router_free_units"], show_default=True,
        help="--routing classifier: the router also trains units of its own in the capacity no task owns "
             "(EideticNets, CLNP); off: a head on the frozen features only", section=RT)
@option("--lda-shrinkage", type=float, default=_TRAIN["lda_shrinkage"], show_default=True,
        help="--routing lda: shrinkage a of the feature covariance S towards (tr S / p) I, in [0, 1]", section=RT)
@option("--progress/--no-progress", default=True, show_default=True,
        help="a progress bar per task on a terminal (epoch, loss, accuracy); the summary line per task is "
             "printed either way", section=O)
@option("-v", "--verbose", count=True, help="also log the methods' steps (pruning steps, θ scans); -vv: debug",
        section=O)
@option("-q", "--quiet", is_flag=True, default=False, help="print the final tables alone (no progress, no per-task "
        "lines)", section=O)
@option("--tensorboard", is_flag=True, default=False,
        help=f"also write TensorBoard event files to <out>/{TENSORBOARD_DIR} (needs the tensorboard package)",
        section=O)
@_method_options
def run(data_root, download, device, out, overwrite, resume, from_checkpoint, init_weights, seeds, progress,
        verbose, quiet, tensorboard, dist_backend, **options) -> None:
    """Train METHOD on the tasks of BENCHMARK, one after another, and report the accuracy matrix,
    ACC, BWT, forgetting, the largest change of an earlier task's logits and the capacity used.

    Every run writes a run folder (--out, by default runs/<method>-<benchmark>-<time>), locked
    while the run lasts: a checkpoint after every task, history.csv (one row per epoch and
    phase), metrics.json with accuracy_matrix.csv and summary.csv at the end. --resume continues
    an interrupted run bit for bit, --from adds new tasks to a trained model. A folder holding
    another run's files is refused unless --overwrite.

    Launched by torchrun (torchrun --nproc_per_node=N -m sparsecl run ...), it trains data-parallel
    with DDP: --batch-size is the global batch, and only rank 0 writes files and prints."""
    ctx = click.get_current_context()
    if quiet and verbose:
        raise click.UsageError("-q and -v cannot be combined")
    setup_logging(-1 if quiet else verbose)
    try:
        world, device = distributed.init_from_env(device, dist_backend)
    except SparseCLError as exc:
        raise fail(exc) from exc
    view = dict(progress=progress and not quiet, quiet=quiet, tensorboard=tensorboard)
    finished = False
    try:
        if seeds is None:
            _run(world, data_root, download, device, out, overwrite, resume, from_checkpoint, init_weights, view,
                 options)
        else:
            _run_seeds(ctx, world, data_root, download, device, out, overwrite, resume, from_checkpoint,
                       init_weights, seeds, view, options)
        finished = True
    finally:
        distributed.shutdown(world, meet=finished)


def _run_seeds(ctx, world, data_root, download, device, out, overwrite, resume, from_checkpoint, init_weights,
               seeds, view, options) -> None:
    """One run per seed, in ``<out>/seed-<n>``, then the mean ± std over the seeds."""
    from ..summary import summarize_runs, to_markdown, write_summary

    try:
        if resume is not None or from_checkpoint is not None:
            raise ConfigError("--seeds starts new runs: continue each seed's folder with --resume <out>/seed-<n>; "
                              "--from is not combined with --seeds")
        if ctx.get_parameter_source("seed") is not click.core.ParameterSource.DEFAULT:
            raise ConfigError("give --seed (one run) or --seeds (one run per seed), not both")
        out = Path(out) if out is not None else default_run_folder(options["method"], options["benchmark"])
    except SparseCLError as exc:
        raise fail(exc) from exc
    folders = []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        _run(world, data_root, download, device, folder, overwrite, None, None, init_weights, view,
             {**options, "seed": seed}, given_extra={"seed"})
        folders.append(folder)
    if world is not None and not world.is_main:
        return
    try:
        rows = summarize_runs(folders)
        md, csv_path = write_summary(rows, out / "summary-over-seeds")
    except SparseCLError as exc:
        raise fail(exc) from exc
    make_console().print(to_markdown(rows), highlight=False, markup=False)
    click.echo(f"wrote {md} and {csv_path}")


def _run(world, data_root, download, device, out, overwrite, resume, from_checkpoint, init_weights, view, options,
         given_extra: set[str] = frozenset()) -> None:
    main_rank = world is None or world.is_main
    quiet = view["quiet"]
    say = (lambda text: None) if quiet or not main_rank else click.echo
    ctx = click.get_current_context()
    given = {k for k in options if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    given |= set(given_extra)
    folder = None
    try:
        if resume is not None and from_checkpoint is not None:
            raise ConfigError("--resume and --from cannot be combined")
        if init_weights is not None and (resume is not None or from_checkpoint is not None):
            raise ConfigError("--init-weights sets the weights before task 0 of a new run; "
                              f"{'--resume continues' if resume is not None else '--from continues'} a trained model")
        if resume is not None:
            if given or out is not None or overwrite:
                names = sorted(given | ({"out"} if out else set()) | ({"overwrite"} if overwrite else set()))
                raise ConfigError(f"--resume continues the run in its own folder with its saved options; "
                                  f"drop {flags(ctx, names)}")
            out = resume
        spec, ckpt = _spec(options, given, resume, from_checkpoint)  # a bad checkpoint fails here
        if init_weights is not None:
            spec.model["init_weights"] = {"path": str(init_weights), "sha256": _sha256(init_weights)}
        config = spec.train_config(device, False)  # bad training options fail before any work
        if world is not None:
            distributed.local_batch_size(config.batch_size, world)
        callbacks = []
        if main_rank:  # every run writes a run folder; refused before training if it cannot be used
            out = Path(out) if out is not None else default_run_folder(spec.method, spec.stream[-1]["benchmark"])
            folder = RunFolder.open(out, resume=resume is not None, overwrite=overwrite,
                                    option="--resume" if resume is not None else "--out")
            tasks_done = ckpt.manifest.get("tasks_done", 0) if resume is not None else None
            callbacks.append(CSVHistory(Path(out) / HISTORY_NAME, keep_tasks_below=tasks_done))
            if view["tensorboard"]:
                callbacks.append(TensorBoardLogger(Path(out) / TENSORBOARD_DIR))
            if not quiet:
                callbacks.append(ConsoleProgress(bar=view["progress"]))
        first = world is None or world.local_rank == 0  # one process per machine downloads missing files
        if not first:
            distributed.barrier(world)
        bench = build_stream(spec, data_root, download)
        if first:
            distributed.barrier(world)
        if ckpt is None:
            net, method_obj, state = build_network(spec, bench, device), build_method(spec.method, spec.method_options), None
            if init_weights is not None:
                from ..pretrained import load_initial_weights

                loaded = load_initial_weights(net, init_weights)
                say(f"initial weights from {init_weights}: {len(loaded['loaded'])} tensors of the body"
                    + (f" (the model's final layer, {', '.join(loaded['skipped'])}, left as built)"
                       if loaded.get("skipped") else ""))
        else:
            net, method_obj, state = restore(ckpt, spec, continue_on=device)
            if state.tasks_done >= bench.num_tasks:
                say(f"the run in {ckpt.path.parent} has finished all {bench.num_tasks} tasks")
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
        say(f"run folder {out}: checkpoint {Path(out) / CHECKPOINT_NAME} after every task, {HISTORY_NAME} after every "
            "epoch, metrics.json at the end")
        result = Trainer(method_obj, config, world, callbacks=callbacks).fit(net, bench, state, writer)
        if not main_rank:
            return
        result_dict = result.to_dict()
        result_dict["config"].update(
            method=spec.method, benchmark=bench.name, model=spec.model["name"], **spec.model["options"],
            single_head=spec.model["single_head"], stream=spec.stream, world_size=1 if world is None else world.size,
            method_options=dataclasses.asdict(method_obj.config) if hasattr(method_obj, "config") else {})
        if spec.model.get("init_weights"):
            result_dict["config"]["init_weights"] = spec.model["init_weights"]
        if hasattr(method_obj, "log"):
            result_dict["method_log"] = method_obj.log
        _print_summary(result)
        try:
            path = write_json_atomic(Path(out) / "metrics.json", result_dict)
            tables = write_run_tables(Path(out), result_dict)
        except OSError as exc:
            raise OutputError(f"cannot write {Path(out) / 'metrics.json'} ({exc.strerror or exc}); the checkpoint "
                              f"{Path(out) / CHECKPOINT_NAME} holds every task's results (sparsecl report "
                              f"{out} reads it)") from None
        say(f"run folder {out}: checkpoint {Path(out) / CHECKPOINT_NAME}, {path.name}, "
            f"{', '.join(p.name for p in tables)}, {HISTORY_NAME}")
    except SparseCLError as exc:
        if folder is not None and out is not None and (Path(out) / CHECKPOINT_NAME).exists():
            click.echo(f"run folder {out}: checkpoint {Path(out) / CHECKPOINT_NAME} (continue with "
                       f"sparsecl run --resume {out})", err=True)
        raise fail(exc) from exc
    finally:
        if folder is not None:  # a run refused before it wrote anything leaves no folder behind
            folder.close(remove_if_empty=folder.created)


def _sha256(path: Path) -> str:
    """SHA-256 of a file, recorded with --init-weights (a missing file is reported by the loader)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


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
                                     "fused", "restore_best", "lr_patience", "lr_factor", "lr_min",
                                     "eval_every", "eval_tasks", "routing", "lda_shrinkage", *_ROUTER_OPTIONS)}
    if "lda_shrinkage" in given and options["routing"] != "lda":
        raise ConfigError(f"--lda-shrinkage configures --routing lda; --routing is {options['routing']}")
    if options["routing"] != "classifier":
        stray = sorted(k for k in _ROUTER_OPTIONS if k in given
                       and (options["routing"] != "classifier-all" or k == "router_buffer"))
        if stray:
            raise ConfigError(f"{flags(click.get_current_context(), stray)} configure(s) the task classifier of "
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
        clashing = flags(click.get_current_context(), clash)
        raise ConfigError(f"--from keeps the saved model ({saved.model_description()}, single head "
                          f"{saved.model['single_head']}); drop {clashing}")
    method = options["method"] if "method" in given else saved.method
    if method != saved.method:
        raise ConfigError(f"checkpoint {ckpt.path} was trained with --method {saved.method}; "
                          f"--method {method} cannot continue it")
    return RunSpec(saved.stream + [segment], saved.model, method,
                   {**saved.method_options, **method_options}, train), ckpt


def _model_options(options: dict, given: set[str]) -> dict:
    """The options of ``--model``: the MLP's widths, dropout and biases, or a conv model's given ones."""
    name = options["model"]
    if name == "mlp":
        if "width" in given:
            raise ConfigError("--width sets a convolutional model's base width; the MLP takes --hidden")
        return {"hidden": list(_widths(options["hidden"])), "dropout": options["dropout"] or 0.0,
                **({} if options["bias"] is None else {"bias": options["bias"]})}
    if "hidden" in given:
        raise ConfigError(f"--hidden sets the MLP's widths; --model {name} takes --width")
    if options["bias"] is not None:
        raise ConfigError(f"--bias/--no-bias sets the MLP's biases; --model {name} has its own")
    return {k: options[k] for k in ("width", "dropout") if options[k] is not None}


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
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # rich would squeeze the tables into 80 columns in a log file
        console = Console(width=max(120, 10 * (len(R) + 2)), soft_wrap=True)
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



command = run
