"""A run as data: the options that define it, how to build its task stream, model and method,
and how to save it to / restore it from a checkpoint at a task boundary.

A run's task stream is a list of benchmark *segments*: a plain run has one; a run that learns new
tasks on a saved model (``sparsecl run --from``) appends one, and its tasks are numbered after the
saved ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, save_checkpoint
from .data import load_benchmark
from .data.types import Benchmark
from .errors import CheckpointError, ConfigError
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

    Raises:
        ConfigError: an option the method does not take (the message names the flags).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    method_cls, config_cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)} if config_cls else set()
    foreign = sorted(set(options) - fields)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ConfigError(f"{flags} do(es) not apply to --method {name}")
    return method_cls(config_cls(**options)) if config_cls else method_cls()


def build_stream(spec: RunSpec, data_root: Path | None = None, download: bool | None = None) -> Benchmark:
    """The run's tasks: each segment's benchmark in order, task ids renumbered ``0..T-1``.

    Raises:
        ConfigError: segments with different input shapes, or a benchmark option out of range.
        DataNotFoundError / DataFormatError: a data file is missing or corrupt.
    """
    place = {k: v for k, v in dict(data_root=data_root, download=download).items() if v is not None}
    parts = [load_benchmark(seg["benchmark"], seed=seg["seed"], **seg["options"], **place) for seg in spec.stream]
    if len(parts) == 1:
        return parts[0]
    tasks = []
    for bench in parts:
        if tuple(bench.input_shape) != tuple(parts[0].input_shape):
            raise ConfigError(f"benchmark '{bench.name}' has inputs of shape {tuple(bench.input_shape)}, but the "
                              f"saved tasks of '{parts[0].name}' have {tuple(parts[0].input_shape)}")
        tasks += [dataclasses.replace(task, task_id=len(tasks) + i) for i, task in enumerate(bench.tasks)]
    return Benchmark("+".join(b.name for b in parts), tasks, parts[0].input_shape,
                     {"segments": [dict(b.info, name=b.name) for b in parts]})


def build_network(spec: RunSpec, bench: Benchmark) -> ContinualNetwork:
    """The untrained network of the run, seeded by the run's seed."""
    torch.manual_seed(spec.train.get("seed", 0))  # the initial weights are part of the run's seed
    model = _user_model(spec, bench.input_shape, bench.tasks[0].num_classes)
    return ContinualNetwork(model, single_head=spec.model["single_head"])


def normalization_record(normalize) -> list | None:
    """A task's ``TaskData.normalize`` as the checkpoint manifest keeps it: ``[mean, std]``
    lists, or ``None``."""
    return None if normalize is None else [list(normalize[0]), list(normalize[1])]


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
        self.normalize = [normalization_record(n) for n in normalize or [None] * num_tasks]

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
                    "normalize": self.normalize, "world_size": self.world_size}
        save_checkpoint(self.path, manifest, tensors)


def spec_of(ckpt: Checkpoint) -> RunSpec:
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
