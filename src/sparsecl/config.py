"""The task loop's options (:class:`TrainConfig`), one set of defaults for the Python API and the
command line (``sparsecl run`` reads its flags' defaults from here).

Importing this module imports neither torch nor any method, so that ``sparsecl --help`` stays
fast; torch is imported when a config checks its device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The optimizers named by a string (``TrainConfig(optimizer="adamw")``, ``--optimizer adamw``).
OPTIMIZERS = ("adam", "adamw", "sgd")
#: How the task of a test sample is known: given (``oracle``), or inferred (``sparsecl.routing``).
ROUTING_MODES = ("oracle", "classifier", "classifier-all", "entropy", "lda")

#: ``params -> optimizer``: e.g. ``lambda params: torch.optim.RAdam(params, lr=1e-3, weight_decay=0.01)``.
OptimizerFactory = Callable[[Iterable["torch.nn.Parameter"]], "torch.optim.Optimizer"]
#: ``(logits (N, C), labels (N,)) -> mean loss (a scalar tensor)``, e.g. ``torch.nn.CrossEntropyLoss(label_smoothing=0.1)``.
LossFunction = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, text: str) -> ConfigError:
    """A bad field, said in the API's terms (``TrainConfig(lr=...)``) and the command line's (``--lr``)."""
    return ConfigError(f"TrainConfig({name}=...): {name} {text}", cli=f"{_flag(name)} {text}")


@dataclass
class TrainConfig:
    """Options of the task loop shared by every method.

    ``epochs`` is the training budget per task (for EideticNets, the cap of training before
    pruning); ``batch_size`` the training batch (under data-parallel training, the global one).

    ``optimizer``: ``"adam"``, ``"adamw"`` or ``"sgd"``, configured by ``lr``, ``weight_decay``
    and ``momentum`` (SGD's; Adam/AdamW use their default betas) — or your own factory, a
    callable ``params -> torch.optim.Optimizer`` (e.g. ``lambda p: torch.optim.RAdam(p,
    lr=1e-3, weight_decay=0.01)``), called once per task with the parameters the method lets
    that task train; ``lr`` is then only what methods that scale the learning rate start from
    when they set it. Zero forgetting holds under any optimizer: frozen entries are written
    back after every step, whatever the optimizer did to them.

    ``fused``: build the named optimizer with ``fused=True`` (PyTorch's one-kernel-per-parameter
    implementation): faster steps, most of all for the weight-level methods, whose scores and
    masks double the tensors stepped; its rounding differs from the default implementation's, so
    a run is repeatable bit for bit only with the same setting. Not for an optimizer factory.

    ``loss``: ``None`` (cross-entropy) or a callable ``(logits (N, C), labels (N,)) -> scalar``
    mean loss over the batch, e.g. ``torch.nn.CrossEntropyLoss(label_smoothing=0.1)``; methods
    add their own terms (penalties, distillation) to it.

    ``probe_size`` test samples per task are kept to verify zero forgetting bitwise.
    ``progress``: a progress bar per task on the console (the command line's default).

    ``routing``: besides the task-incremental accuracy matrix (task id given, ``"oracle"``),
    evaluate task-agnostic inference after every task (``sparsecl.routing``): ``"classifier"``,
    EideticNets' task classifier, retrained after every task for ``router_epochs`` epochs (Adam,
    ``router_lr``; a Linear head, or an MLP head with ``router_hidden`` hidden units) on at most
    ``router_buffer`` kept training samples *per task* (so this mode keeps data of earlier
    tasks), with units of its own in the capacity no task owns when ``router_free_units`` and the
    method keeps a unit ledger (else a head on the frozen features); ``"classifier-all"``, the same
    on every training sample of every task (keeps the whole stream); ``"entropy"``, the head
    with the lowest softmax entropy (keeps no data); or ``"lda"``, class means and a shrunk
    covariance of the features (keeps no inputs; ``lda_shrinkage`` a pulls the covariance S to
    ``(1 - a) S + a (tr S / p) I``). Entropy and lda also route weight-level
    methods, through every task's subnetwork. Routing draws from generators of its own
    and never changes the network: the task-incremental results are the same bit for bit
    whatever ``routing`` is.

    ``eval_every`` and ``eval_tasks``: how much of the accuracy matrix is measured, for long
    streams. After every task the trainer always measures the new task (the diagonal R[t][t])
    and checks every earlier task's probe logits bit for bit (cheap: ``probe_size`` samples);
    the re-evaluation of earlier tasks on their whole test sets runs after task t only when
    ``(t + 1) % eval_every == 0``, and then only on the tasks ``eval_tasks`` names (``"all"``,
    or indices and inclusive ranges such as ``"0,5,10-19"``; the API also takes a list of
    ints). After the last task every task is evaluated, so the last row is complete; the cells
    not measured are ``None`` and the metrics average over the measured ones
    (``sparsecl.metrics``).

    ``restore_best`` and ``lr_patience``: the validation schedule of the reference code of WSN
    (Kang et al., "Forget-free Continual Learning with Winning Subnetworks", ICML 2022) and GPM,
    for the task's training epochs (the ``"train"`` phase of a method's training on the current
    task; pruning, recovery and fine-tuning phases are not scheduled). After every epoch the
    task's validation loss is measured (eval mode); ``restore_best`` returns the network (and
    the method's own trained tensors, e.g. WSN's scores) to the epoch with the lowest validation
    loss when the epochs end; ``lr_patience`` > 0 divides the learning rate by ``lr_factor`` after
    that many epochs in a row without a lower validation loss, and ends the task's training
    once it falls below ``lr_min``. Both need a validation split (``val_fraction`` > 0).

    Raises:
        ConfigError: a field of the wrong type or out of range; the message names the argument
            (``TrainConfig(lr=...)``), and its ``cli_message`` the flag (``--lr``).
    """

    epochs: int = 20
    batch_size: int = 64
    optimizer: Any = "adam"  # a name of OPTIMIZERS or an OptimizerFactory
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    fused: bool = False
    seed: int = 0
    eval_batch_size: int = 1024
    probe_size: int = 256
    device: str = "cpu"
    progress: bool = False
    routing: str = "oracle"
    router_buffer: int = 200
    router_epochs: int = 20
    router_lr: float = 1e-3
    router_hidden: int = 0
    router_free_units: bool = True
    lda_shrinkage: float = 0.1
    loss: Any = None  # None (cross-entropy) or a LossFunction
    eval_every: int = 1
    eval_tasks: str = "all"  # "all" or indices / inclusive ranges: "0,5,10-19"
    restore_best: bool = False
    lr_patience: int = 0
    lr_factor: float = 2.0
    lr_min: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.eval_tasks, (list, tuple, range)):  # the API's list of task indices
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.eval_tasks):
                raise _bad("eval_tasks", f"must be 'all' or task indices (integers), got {list(self.eval_tasks)!r}")
            self.eval_tasks = ",".join(str(i) for i in self.eval_tasks)
        for f in dataclasses.fields(self):  # API callers (and saved specs) get the CLI's checks, by argument name
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise _bad(f.name, f"must be an integer, got {value!r}")
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _bad(f.name, f"must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise _bad(f.name, f"must be a finite number, got {value}")
            if kind == "bool" and not isinstance(value, bool):
                raise _bad(f.name, f"must be True or False, got {value!r}")
            if kind == "str" and not isinstance(value, str):
                raise _bad(f.name, f"must be a string, got {value!r}")
        if self.routing not in ROUTING_MODES:
            raise _bad("routing", f"must be one of {', '.join(ROUTING_MODES)}, got '{self.routing}'")
        if isinstance(self.optimizer, str):
            if self.optimizer not in OPTIMIZERS:
                raise _bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        elif not callable(self.optimizer):
            raise ConfigError(f"TrainConfig(optimizer=...): optimizer must be one of {', '.join(OPTIMIZERS)} or a "
                              f"callable params -> torch.optim.Optimizer, got {self.optimizer!r}")
        if self.fused and callable(self.optimizer):
            raise _bad("fused", "applies to the named optimizers ('adam', 'adamw', 'sgd'); build your "
                                "factory's optimizer with fused=True instead")
        if self.loss is not None and not callable(self.loss):
            raise ConfigError(f"TrainConfig(loss=...): loss must be None (cross-entropy) or a callable "
                              f"(logits, labels) -> scalar loss, got {self.loss!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "probe_size", "router_buffer", "router_epochs",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise _bad(name, f"must be at least 1, got {getattr(self, name)}")
        check_device(self.device, api="TrainConfig(device=...): device")
        for name in ("lr", "weight_decay", "momentum", "router_hidden", "lr_patience", "lr_min"):
            if getattr(self, name) < 0:
                raise _bad(name, f"must be non-negative, got {getattr(self, name)}")
        if not self.router_lr > 0:
            raise _bad("router_lr", f"must be above 0, got {self.router_lr}")
        if not 0 <= self.lda_shrinkage <= 1:
            raise _bad("lda_shrinkage", f"must lie in [0, 1], got {self.lda_shrinkage}")
        if not self.lr_factor > 1:
            raise _bad("lr_factor", f"must be above 1 (the learning rate is divided by it), got {self.lr_factor}")
        parse_eval_tasks(self.eval_tasks)

    def evaluated_tasks(self, t: int, num_tasks: int) -> list[int]:
        """The tasks whose test accuracy is measured after task ``t`` of ``num_tasks``: every task
        ``0..t`` after the last task; else the new task ``t`` and, when ``(t + 1) % eval_every ==
        0``, the earlier tasks ``eval_tasks`` names; in increasing order."""
        if t == num_tasks - 1:
            return list(range(t + 1))
        if (t + 1) % self.eval_every:
            return [t]
        named = parse_eval_tasks(self.eval_tasks)
        return list(range(t + 1)) if named is None else sorted({i for i in named if i < t} | {t})

    def describe(self) -> dict:
        """The fields as JSON-serializable values (a custom optimizer or loss by its name), for
        ``metrics.json``."""
        out = dataclasses.asdict(self)
        for name in ("optimizer", "loss"):
            value = out[name]
            if value is not None and not isinstance(value, str):
                out[name] = "custom: " + getattr(value, "__qualname__", type(value).__qualname__)
        if out["loss"] is None:
            del out["loss"]
        return out


def parse_eval_tasks(spec: str) -> tuple[int, ...] | None:
    """The task indices of ``TrainConfig.eval_tasks`` / ``--eval-tasks``: ``None`` for ``"all"``,
    else the sorted indices of a comma-separated list of indices and inclusive ranges
    (``"0,5,10-19"``).

    Raises:
        ConfigError: anything else (a negative index, a range whose end is below its start)."""
    text = spec.strip().lower()
    if text == "all":
        return None
    bad = _bad("eval_tasks", f"must be 'all' or task indices and ranges such as '0,5,10-19', got '{spec}'")
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise bad
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise bad
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def check_device(device: str, option: str = "--device", api: str | None = None) -> None:
    """Refuse a device this build of torch cannot use (``cuda`` on a CPU build, a missing GPU
    index) with one line, instead of the error of the first tensor moved there.

    Raises:
        ConfigError: naming ``api`` (default: ``option``) and the device; its ``cli_message``
            names ``option``.
    """
    import torch

    def bad(text: str, hint: str = "") -> ConfigError:
        if api is None:
            return ConfigError(f"{option} {text}{hint}")
        return ConfigError(f"{api} {text}{hint.replace('use --device', 'use device=')}", cli=f"{option} {text}{hint}")

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad(f"must be a torch device such as cpu or cuda, got '{device}'") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise bad(f"{device}: {why}", "; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise bad(f"{device}: there are {torch.cuda.device_count()} CUDA device(s), "
                      f"0..{torch.cuda.device_count() - 1}")
        return
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise bad(f"{device}: torch cannot use this device here ({' '.join(str(exc).split())[:160]})") from None
