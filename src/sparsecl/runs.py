"""A run as data: the options that define it, how to build its task stream, model and method,
and how to save it to / restore it from a checkpoint at a task boundary.

A run's task stream is a list of benchmark *segments*: a plain run has one; a run that learns new
tasks on a saved model (``sparsecl run --from``) appends one, and its tasks are numbered after the
saved ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, save_checkpoint
from .data import load_benchmark
from .data.benchmarks import BENCHMARKS
from .data.types import Benchmark, LazyTasks, normalization_record
from .errors import CheckpointError, ConfigError, OutputError
from .manifest import stream_options, validate_run_manifest, validate_spec
from .methods import METHODS
from .methods.base import Method
from .models import build as build_model
from .network import ContinualNetwork
from .trainer import RunState, TrainConfig


@dataclass
class RunSpec:
    """Everything that defines a run, JSON-serializable (data locations and the device are not
    part of it: they may differ when a run is resumed elsewhere).

    ``stream``: segments ``{"benchmark": name, "seed": int, "options": {...}}``; ``model``:
    ``{"name": a key of models.MODELS, "options": {...}, "single_head": bool}`` (the spec of
    runs saved before models had names, ``{"hidden": [...], "dropout": float, "single_head":
    bool}``, reads as the MLP); ``method_options``: only the options given (the method's defaults
    fill the rest); ``train``: ``TrainConfig`` fields.
    """

    stream: list[dict]
    model: dict
    method: str
    method_options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "name" not in self.model:
            self.model = {"name": "mlp", "options": {"hidden": list(self.model["hidden"]),
                                                     "dropout": self.model["dropout"]},
                          "single_head": self.model["single_head"]}

    def model_description(self) -> str:
        """``--model NAME`` and its options, as a user would type them."""
        opts = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in self.model["options"].items())
        return f"--model {self.model['name']}" + (f" ({opts})" if opts else "")

    def train_config(self, device: str = "cpu", progress: bool = False) -> TrainConfig:
        return TrainConfig(**self.train, device=device, progress=progress)


def build_method(name: str, options: dict) -> Method:
    """The method registered as ``name`` with the hyperparameters in ``options``.

    Every option is checked against its field's type before the method sees it: a ``float``
    option must be a finite number, an ``int`` one an integer, and a comma-separated list of
    numbers (``--alpha``, ``--lrs``) may not hold NaN or infinity.

    Raises:
        ConfigError: an option the method does not take, or a value of the wrong type or not
            finite (the message names the flag and the argument).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    method_cls, config_cls = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(config_cls)} if config_cls else {}
    foreign = sorted(set(options) - set(fields))
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ConfigError(f"{flags} do(es) not apply to --method {name}")
    for key, value in options.items():
        _check_option_type(name, key, str(fields[key].type), value)
    return method_cls(config_cls(**options)) if config_cls else method_cls()


def _check_option_type(method: str, key: str, kind: str, value) -> None:
    """Refuse a method option whose value does not fit its field's annotation (``kind``)."""
    where = f"--{key.replace('_', '-')} (argument {key} of --method {method})"
    optional = kind.endswith(" | None")
    kind = kind.removesuffix(" | None")
    if value is None:
        if not optional:
            raise ConfigError(f"{where} needs a value, got None")
        return
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be True or False, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        for token in value.split(","):
            try:
                number = float(token)
            except ValueError:
                continue
            if not math.isfinite(number):
                raise ConfigError(f"{where} must list finite numbers, got '{token.strip()}' in '{value}'")


def build_stream(spec: RunSpec, data_root: Path | None = None, download: bool | None = None) -> Benchmark:
    """The run's tasks: each segment's benchmark in order, task ids renumbered ``0..T-1``.

    Raises:
        ConfigError: segments with different input shapes, or a benchmark option out of range.
        DataNotFoundError / DataFormatError: a data file is missing or corrupt.
    """
    place = {k: v for k, v in dict(data_root=data_root, download=download).items() if v is not None}
    parts = []
    for seg in spec.stream:
        # data_root and download come from the caller only, never from a (saved) spec; a
        # benchmark with bundled data (split-digits) accepts and ignores them
        builder = BENCHMARKS.get(str(seg["benchmark"]).strip().lower().replace("_", "-"))
        accepted = set(inspect.signature(builder).parameters) if builder is not None else set(place)
        here = {k: v for k, v in place.items() if k in accepted}
        parts.append(load_benchmark(seg["benchmark"], seed=seg["seed"], **stream_options(seg["options"]), **here))
    if len(parts) == 1:
        return parts[0]
    for bench in parts:
        if tuple(bench.input_shape) != tuple(parts[0].input_shape):
            raise ConfigError(f"benchmark '{bench.name}' has inputs of shape {tuple(bench.input_shape)}, but the "
                              f"saved tasks of '{parts[0].name}' have {tuple(parts[0].input_shape)}")
    return Benchmark("+".join(b.name for b in parts), LazyTasks.concat([b.tasks for b in parts]),
                     parts[0].input_shape, {"segments": [dict(b.info, name=b.name) for b in parts]})


def build_network(spec: RunSpec, bench: Benchmark, device: str = "cpu") -> ContinualNetwork:
    """The untrained network of the run, seeded by the run's seed, built on the CPU; ``device``:
    where it will train (its memory is checked too).

    Raises:
        ConfigError: the model's training would not fit in the memory available
            (:func:`check_model_fits`), or a bad model option.
    """
    num_classes = bench.tasks.header(0).num_classes if isinstance(bench.tasks, LazyTasks) else bench.tasks[0].num_classes
    check_model_fits(spec, bench.input_shape, num_classes)
    if torch.device(device).type != "cpu":
        check_model_fits(spec, bench.input_shape, num_classes, device)
    torch.manual_seed(spec.train.get("seed", 0))  # the initial weights are part of the run's seed
    try:
        model = _user_model(spec, bench.input_shape, num_classes)
        return ContinualNetwork(model, single_head=spec.model["single_head"])
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or "memory" in str(exc).lower():
            raise ConfigError(f"the model ({spec.model_description()}) does not fit in memory: "
                              f"{' '.join(str(exc).split())[:200]}") from None
        raise


#: Bytes per parameter while training: the weights, their gradients and two optimizer moments
#: (Adam), float32; the network's traced copy of the model is built before the move to the device.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def available_memory(device: str = "cpu") -> int | None:
    """Bytes of memory free for tensors on ``device`` (``None`` when unknown)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def count_parameters(spec: RunSpec, input_shape, num_classes: int) -> int | None:
    """The parameter count of the spec's model, from a build on the ``meta`` device (no memory
    allocated); ``None`` if the model cannot be built there."""
    try:
        with torch.device("meta"):
            model = _user_model(spec, tuple(input_shape), num_classes)
    except ConfigError:
        raise
    except Exception:  # a model that cannot be built on the meta device is measured by its real build
        return None
    return sum(p.numel() for p in model.parameters())


def check_model_fits(spec: RunSpec, input_shape, num_classes: int, device: str = "cpu") -> None:
    """Refuse, before allocating it, a model whose training would not fit in the memory
    available (:data:`TRAINING_BYTES_PER_PARAMETER` bytes per parameter).

    Raises:
        ConfigError: naming the model, its parameter count and the memory needed and available.
    """
    n = count_parameters(spec, input_shape, num_classes)
    free = available_memory(device)
    if n is None or free is None:
        return
    need = n * TRAINING_BYTES_PER_PARAMETER
    if need > free:
        raise ConfigError(f"the model ({spec.model_description()}) has {n:,} parameters: training it needs about "
                          f"{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB of memory is available on {device}; "
                          "choose a smaller model (--hidden, --width)")


class CheckpointWriter:
    """``on_task_end`` callback of ``Trainer.fit``: writes the run's checkpoint to ``path`` after
    every task, atomically replacing the previous one. ``normalize``: each task's per-channel
    input normalization (``TaskData.normalize``), kept for ``export``; ``world_size``: the number
    of data-parallel processes (a resume with another number is not bitwise)."""

    def __init__(self, path: Path, spec: RunSpec, method: Method, input_shape: tuple[int, ...],
                 num_tasks: int, device: str = "cpu", normalize: list | None = None, world_size: int = 1):
        self.path, self.spec, self.method = Path(path), spec, method
        self.world_size = world_size
        self.input_shape, self.num_tasks = list(input_shape), num_tasks
        self.device = torch.device(device).type
        self._normalize = normalize  # a list, or a callable task -> TaskData.normalize (a lazy stream)
        self.last_written: int | None = None  # tasks_done of the last checkpoint this writer wrote

    def _normalize_records(self, done: int) -> list:
        n = self._normalize
        if n is None:
            return [None] * self.num_tasks
        if callable(n):  # only the tasks learned so far: a lazy stream is not built to record the rest
            return [normalization_record(n(i)) for i in range(done)] + [None] * (self.num_tasks - done)
        return [normalization_record(x) for x in n]

    def __call__(self, net: ContinualNetwork, state: RunState) -> None:
        method_tensors, method_meta = self.method.state()
        run_tensors, run_meta = state.to_checkpoint()
        tensors = {**{f"net.{k}": v for k, v in net.state_dict().items()},
                   **{f"method.{k}": v for k, v in method_tensors.items()},
                   **{f"run.{k}": v for k, v in run_tensors.items()},
                   "rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        manifest = {"spec": dataclasses.asdict(self.spec), "input_shape": self.input_shape,
                    "structure": net.structure(),
                    "method": self.method.name, "method_state": method_meta, "run": run_meta,
                    "tasks_done": state.tasks_done, "total_tasks": self.num_tasks, "device": self.device,
                    "normalize": self._normalize_records(state.tasks_done), "world_size": self.world_size}
        try:
            save_checkpoint(self.path, manifest, tensors)
        except OSError as exc:
            kept = ("the previous checkpoint in it is kept" if self.last_written is None
                    else f"the checkpoint after task {self.last_written - 1} is kept")
            raise OutputError(f"cannot write the checkpoint after task {state.tasks_done - 1} to "
                                         f"{self.path} ({exc.strerror or exc}); {kept}") from None
        self.last_written = state.tasks_done


def spec_of(ckpt: Checkpoint) -> RunSpec:
    """The run spec saved in ``ckpt``, its schema checked (``manifest.validate_spec``).

    Raises:
        CheckpointError: a field of the spec is missing or of the wrong type (named).
    """
    if not ckpt.manifest.get("compact_format"):
        validate_run_manifest(ckpt.manifest, ckpt.tensors, ckpt.path)
    else:
        validate_spec(ckpt.manifest.get("spec"), ckpt.path)
    try:
        return RunSpec(**ckpt.manifest["spec"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: its manifest has no valid run spec ({exc})") from None


def restore(ckpt: Checkpoint, spec: RunSpec | None = None,
            continue_on: str | None = None) -> tuple[ContinualNetwork, Method, RunState]:
    """The network, method and task-loop state saved in ``ckpt``, ready for ``Trainer.fit``
    to continue with task ``state.tasks_done``; the torch RNG (CPU and, where saved, CUDA) is
    set to its saved state. ``continue_on``: the device training will continue on; it must be
    of the saved kind, since another device's arithmetic would move the earlier tasks' logits
    (``None``: only evaluating).

    Raises:
        CheckpointError: the saved tensors do not fit the network ``spec`` builds (the message
            names the tensors), the saved method differs from ``spec.method``, or
            ``continue_on`` is another kind of device.
    """
    if ckpt.manifest.get("compact_format"):
        raise CheckpointError(f"{ckpt.path} is a compact model (sparsecl export --compact): sparsecl eval and "
                              "sparsecl.compact.read_compact run it, but it holds no run to continue or export "
                              "from; use the run's checkpoint (its --out folder)")
    missing = [k for k in ("spec", "input_shape", "structure", "method", "run") if k not in ckpt.manifest]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path}: its manifest lacks {', '.join(missing)}")
    validate_run_manifest(ckpt.manifest, ckpt.tensors, ckpt.path)
    spec = spec or spec_of(ckpt)
    saved_device = ckpt.manifest.get("device", "cpu")
    if continue_on is not None and torch.device(continue_on).type != saved_device:
        raise CheckpointError(f"checkpoint {ckpt.path} was trained on {saved_device}; continuing on "
                              f"{continue_on} would not reproduce its tasks' logits bit for bit: use --device {saved_device}")
    saved_method = ckpt.manifest.get("method")
    if saved_method != spec.method:
        raise CheckpointError(f"checkpoint {ckpt.path} was trained with --method {saved_method}; it cannot "
                              f"be continued with --method {spec.method}")
    try:
        structure = ckpt.manifest["structure"]
        model = _user_model(spec, tuple(ckpt.manifest["input_shape"]), structure["head_classes"][0])
        net = ContinualNetwork.restore(model, structure)
        saved = ckpt.group("net")
        for name, tensor in net.state_dict().items():
            if name in saved and saved[name].dtype != tensor.dtype:
                raise CheckpointError(f"checkpoint {ckpt.path}: tensor '{name}' is {saved[name].dtype}, the "
                                      f"model's is {tensor.dtype}")
        net.load_state_dict(saved)
    except (RuntimeError, KeyError, IndexError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model ({spec.model_description()}): "
                              f"{' '.join(str(exc).split())}") from None
    method = build_method(spec.method, spec.method_options)
    method.setup(net)
    method.load_state(net, ckpt.group("method"), ckpt.manifest.get("method_state", {}))
    try:
        state = RunState.from_checkpoint(ckpt.group("run"), ckpt.manifest["run"])
        rng = ckpt.tensors["rng.torch"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: its run state is incomplete ({type(exc).__name__}: {exc})") from None
    # the MLP's layers were numbered before they were named: its per-layer records follow the names
    state.capacity = {net._legacy.get(k, k): v for k, v in state.capacity.items()}
    state.reuse = {net._legacy.get(k, k): v for k, v in state.reuse.items()}
    if state.tasks_done != net.num_tasks:
        raise CheckpointError(f"checkpoint {ckpt.path} records {state.tasks_done} finished tasks but "
                              f"{net.num_tasks} heads")
    torch.set_rng_state(rng)
    cuda_keys = sorted((k for k in ckpt.tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [ckpt.tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return net, method, state


def _user_model(spec: RunSpec, input_shape, num_classes: int) -> torch.nn.Module:
    """The model of the spec (``models.build``) with a head of task 0's width."""
    return build_model(spec.model["name"], input_shape, num_classes, **spec.model["options"])
