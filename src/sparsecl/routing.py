"""Task-agnostic inference: routing each sample to its task's head without being told the task.

The task-incremental setting (the accuracy matrix of the trainer) gives the network each test
sample's task id: the "oracle" router. Here the network finds the task itself, in one batched
pass: the body computes the penultimate features ``h = net.features(x)`` once, every seen task's
head reads them (a loop over tasks, never over samples), and a router picks, per sample, the
head whose prediction is returned.

Two routers:

* ``"classifier"`` (EideticNets, paper 001, Sec. 3 and Tables 7-8): a task router trained after
  every task on the *meta-task* of the tasks so far, whose targets are task ids
  (:func:`fit_router`). Its head, a :class:`TaskClassifier`, reads the same penultimate features
  ``h`` as the task heads, so inference is still one body pass. As in the paper's reference code,
  where the task classifier is trained as one more task of the network, the router also trains
  units of its own in the capacity that no task owns (methods with a unit ledger: EideticNets,
  CLNP; ``--router-free-units``, on by default): the tasks' units stay frozen and no task head
  reads a free unit, so every task's logits stay bit for bit the same. Without free units (or for
  a method without a unit ledger: fine-tuning, joint training) the head reads the frozen features
  only, which on Split MNIST routes far worse (``tests/test_routing.py`` prints both).
  **This router keeps data of earlier tasks**: it is retrained from scratch after each task on a
  bounded exemplar buffer (:class:`ExemplarBuffer`: at most ``size`` training samples per task,
  ``--router-buffer``, default 200), so a run with it is no longer free of stored data. The
  network itself is never trained on old data: only the router is.
* ``"entropy"`` (the alternative the paper mentions): every head predicts and the head whose
  softmax has the lowest entropy wins. It keeps no data (and on Split MNIST it routes poorly:
  binary heads are confident on digits they never saw).

* ``"classifier-all"``: the same task classifier trained as in the reference code's protocol, on
  the meta-task of *every* training sample of every task seen (``ExemplarBuffer(None)``): it
  keeps the whole stream of training inputs, ``sum_t N_t`` samples.
* ``"lda"`` (:mod:`sparsecl.feature_routing`, :func:`update_statistics`): class means and a shrunk
  covariance of the features, accumulated task by task; keeps no input, O(d^2) once plus O(d) per
  class (O(d^2) per task for weight-level methods). With a unit ledger (EideticNets, CLNP) the
  features are the outputs of every unit layer, each task reading the units frozen since its end
  (exact); otherwise the penultimate features.

Weight-level methods (PackNet, WSN, DST, TinySubNets) and single-task training have no shared
feature pass: ``entropy`` and ``lda`` run every task's subnetwork on the whole batch
(:func:`task_outputs`: a loop over tasks, batched over samples), about ``T`` task-id forwards per
sample (``benchmarks/routing_cost.py``); the classifier modes refuse them.

Routing never changes the network or a task's logits: the task-incremental results are the same
bit for bit (``tests/test_routing.py``). It works for every method whose tasks have their own head:
a head of their own (multi-head) or their own bias and unit mask on a shared output layer (single
head), because ``net.head_logits(h, t)`` is exactly what ``net(x, t)`` computes after the body.

One input pipeline: a task-agnostic sample has no task to choose its input normalization from,
so routing needs every task to prepare its inputs the same way (:func:`common_prepare`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import metrics
from .config import ROUTING_MODES
from .data.types import TaskData
from .errors import CheckpointError, ConfigError, DivergenceError, ForgettingError
from .evaluation import predict
from .network import ContinualNetwork

#: ``--routing`` values (``ROUTING_MODES``): ``oracle`` (task id given: task-incremental only), ``classifier``,
#: ``classifier-all``, ``entropy``, ``lda``.


def _generator(*key) -> torch.Generator:
    """A CPU generator seeded from ``key``: routing draws from generators of its own, never from
    the global torch RNG, so it cannot change any other randomness of a run."""
    digest = hashlib.sha256(repr(("routing",) + key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class ExemplarBuffer:
    """The training samples kept per task for the task classifier: for task ``t``, a random
    subset of at most ``size`` indices into ``task.train_x`` (indices, not copies: a run's tasks
    are rebuilt deterministically from its spec, also on resume), drawn from a generator seeded
    by ``(seed, t)`` alone, so the choice is the same in every run of that seed and never moves
    any other random draw.

    A user who deploys the router must keep these ``size`` samples of every task (``size x T``
    samples in all) to retrain it when a task is added. ``size=None`` keeps every training
    sample (``--routing classifier-all``: the reference code's protocol, the whole stream kept).

    Raises:
        ConfigError: ``size < 1`` (named as ``--router-buffer``).
    """

    def __init__(self, size: int | None, seed: int = 0):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"--router-buffer must be a whole number of samples per task, at least 1; got {size}")
        self.size, self.seed = size, int(seed)
        #: task id → the indices chosen for it, ``(min(size, N_train),)`` int64, ascending.
        self.indices: dict[int, torch.Tensor] = {}

    def select(self, task: TaskData) -> torch.Tensor:
        """The kept indices of ``task``'s training set, ``(min(size, N_train),)`` int64 ascending
        (recorded in ``indices``)."""
        n = len(task.train_y)
        if self.size is None:
            self.indices[task.task_id] = torch.arange(n)
            return self.indices[task.task_id]
        idx = torch.randperm(n, generator=_generator("buffer", self.seed, int(task.task_id)))[: self.size]
        self.indices[task.task_id] = idx.sort().values
        return self.indices[task.task_id]


def common_prepare(tasks: Sequence[TaskData]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The one input pipeline (``TaskData.prepare``) shared by ``tasks``.

    A task-agnostic sample has no task whose normalization could be applied, so routing needs
    every task to prepare its inputs the same way (the same ``normalize``, or none).

    Raises:
        ConfigError: ``tasks`` is empty or two tasks normalize differently (the message names
            them and their statistics).
    """
    if not tasks:
        raise ConfigError("routing needs at least one task")
    first = tasks[0]
    for task in tasks[1:]:
        if task.normalize != first.normalize:
            raise ConfigError(
                f"routing needs one input pipeline for every task, but task {first.task_id} ('{first.name}') "
                f"normalizes with {_describe(first.normalize)} and task {task.task_id} ('{task.name}') with "
                f"{_describe(task.normalize)}: a sample without a task id has no normalization to choose. "
                "Use --no-normalize, tasks of one data set, or --routing oracle")
    return first.prepare


def _describe(normalize) -> str:
    if normalize is None:
        return "none"
    mean, std = normalize
    return f"mean {tuple(round(m, 4) for m in mean)}, std {tuple(round(s, 4) for s in std)}"


class TaskClassifier(nn.Module):
    """The task router of EideticNets: task logits ``(N, num_tasks)`` from the penultimate
    features ``h`` ``(N, num_features)``.

    The features are standardized with the buffer's per-unit ``mean`` and ``scale`` (set by
    :func:`fit_router`; units that never vary get scale 1), then go through a Linear layer
    (``hidden=0``) or a 1-hidden-layer MLP (Linear → ReLU → Linear with ``hidden`` units). Weights
    are initialized like ``nn.Linear`` (uniform in ±1/sqrt(fan_in)) from ``generator``, never
    from the global RNG.

    Raises:
        ConfigError: ``num_features``, ``num_tasks`` < 1 or ``hidden`` < 0.
    """

    def __init__(self, num_features: int, num_tasks: int, hidden: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_features < 1 or num_tasks < 1 or hidden < 0:
            raise ConfigError(f"a task classifier needs num_features >= 1, num_tasks >= 1 and --router-hidden >= 0; "
                              f"got {num_features}, {num_tasks}, {hidden}")
        self.num_features, self.num_tasks, self.hidden = int(num_features), int(num_tasks), int(hidden)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        widths = [num_features] + ([hidden] if hidden else []) + [num_tasks]
        layers: list[nn.Module] = []
        for k, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
            if k:
                layers.append(nn.ReLU())
            linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # no draw from the global RNG
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.uniform_(-bound, bound, generator=generator)
            layers.append(linear)
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Task logits ``(N, num_tasks)`` of features ``h`` ``(N, num_features)``."""
        return self.layers((h - self.mean) / self.scale)

    def describe(self) -> dict:
        """What :meth:`restore` needs besides ``state_dict()`` (JSON-serializable)."""
        return {"num_features": self.num_features, "num_tasks": self.num_tasks, "hidden": self.hidden}

    @classmethod
    def restore(cls, description: dict, tensors: dict[str, torch.Tensor]) -> "TaskClassifier":
        """A classifier of ``description`` (from :meth:`describe`) with the saved ``tensors``.

        Raises:
            CheckpointError: the tensors do not fit the description.
        """
        try:
            router = cls(int(description["num_features"]), int(description["num_tasks"]), int(description["hidden"]))
            router.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
            raise CheckpointError(f"the saved task classifier does not fit its description {description}: "
                                  f"{' '.join(str(exc).split())}") from None
        return router.eval()


class TaskRouter(nn.Module):
    """A trained router: the task classifier ``head`` and, when it was trained with units of
    its own (``fit_router(free_units=...)``), ``units``: the network tensors (``state_dict``
    names) those units changed: whole tensors (their rows of owned units equal the network's),
    so about the size of the body's unit layers. Empty ``units``: the head reads the network's
    frozen features.

    :meth:`install` gives the network to route with: the network itself, or a copy with the
    router's units in the capacity that no task owns. Every task head reads only units owned by
    a task (the columns of free units are exact zeros), so in that copy every task's logits are
    the network's, bit for bit; the trainer checks this on the probe batches.
    """

    def __init__(self, head: TaskClassifier, units: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.head = head
        self.units = dict(units or {})

    @property
    def num_tasks(self) -> int:
        return self.head.num_tasks

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Task logits ``(N, num_tasks)`` of features ``h`` of the installed network."""
        return self.head(h)

    def install(self, net: ContinualNetwork) -> ContinualNetwork:
        """The network to route with: ``net`` itself when the router has no units, else a deep
        copy of ``net`` with the router's units loaded (``net`` is never changed).

        Raises:
            ConfigError: a saved tensor is not one of ``net``'s or has another shape.
        """
        if not self.units:
            return net
        own = net.state_dict()
        bad = [k for k, v in self.units.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ConfigError(f"the task router's units do not fit this network: tensors {', '.join(bad[:5])} "
                              "are missing or have another shape")
        routed = copy.deepcopy(net)
        with torch.no_grad():
            state = routed.state_dict()
            for k, v in self.units.items():
                state[k].copy_(v)
        routed._router_id = id(self)  # routed_predict refuses this router on another network
        return routed

    def describe(self) -> dict:
        """What :meth:`restore` needs besides the tensors (JSON-serializable)."""
        return {"head": self.head.describe(), "units": sorted(self.units)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the router: ``head.<name>`` and ``units.<state_dict name>``."""
        return {**{f"head.{k}": v for k, v in self.head.state_dict().items()},
                **{f"units.{k}": v for k, v in self.units.items()}}

    @classmethod
    def restore(cls, description: dict, tensors: dict[str, torch.Tensor]) -> "TaskRouter":
        """Inverse of :meth:`describe` and :meth:`tensors`.

        Raises:
            CheckpointError: a tensor is missing or does not fit.
        """
        try:
            head = TaskClassifier.restore(description["head"], {k[5:]: v for k, v in tensors.items()
                                                                if k.startswith("head.")})
            units = {k: tensors[f"units.{k}"] for k in description["units"]}
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the saved task router is incomplete ({type(exc).__name__}: {exc})") from None
        return cls(head, units).eval()


@torch.no_grad()
def _features(net: ContinualNetwork, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Penultimate features ``(N, head_features)`` of prepared inputs ``x``, eval mode, no grad."""
    was_training = net.training
    net.eval()
    out = [net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    net.train(was_training)
    return torch.cat(out)


@dataclass
class _Rows:
    """The free rows of one parameter the router's own units train: ``free`` bool over dim 0;
    ``fan_in`` for a layer's weight or bias (its default initialization), ``None`` for a
    BatchNorm scale or shift."""

    name: str
    param: nn.Parameter
    free: torch.Tensor
    fan_in: int | None


def _free_rows(net: ContinualNetwork, free_units: dict[str, torch.Tensor]) -> list[_Rows]:
    """Every unit layer's weight and bias and every BatchNorm affine parameter, with the rows
    of the units no task owns (parameters of groups without a free unit are left out)."""
    out = []
    for layer in net.graph.layers.values():
        free = free_units.get(layer.group)
        if free is None or not free.any():
            continue
        module = net.body.get_submodule(layer.name)
        fan_in = module.weight.shape[1:].numel()
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if p is not None:
                out.append(_Rows(f"body.{layer.name}.{pname}", p, free.to(p.device), fan_in))
    for name, group in net.graph.groups.items():
        free = free_units.get(name)
        if free is None or not free.any():
            continue
        for norm in group.norms:
            bn = net.body.get_submodule(norm)
            for pname in ("weight", "bias"):
                p = getattr(bn, pname, None)
                if p is not None:
                    out.append(_Rows(f"body.{norm}.{pname}", p, free.to(p.device), None))
    return out


@torch.no_grad()
def _init_free_rows(rows: list[_Rows], generator: torch.Generator) -> None:
    """Fresh free rows: a layer's weight and bias uniform in ±1/sqrt(fan_in) (the default of
    ``nn.Linear`` and ``nn.Conv2d``), a BatchNorm scale 1 and shift 0; drawn from ``generator``."""
    for r in rows:
        idx = r.free.nonzero().flatten()
        if r.fan_in is None:
            r.param.index_fill_(0, idx, 1.0 if r.name.endswith(".weight") else 0.0)
            continue
        bound = 1.0 / math.sqrt(max(1, r.fan_in))
        fresh = torch.empty((len(idx),) + tuple(r.param.shape[1:])).uniform_(-bound, bound, generator=generator)
        r.param.index_copy_(0, idx, fresh.to(device=r.param.device, dtype=r.param.dtype))


def free_units_of(method) -> dict[str, torch.Tensor] | None:
    """The units no task owns, per unit group (bool ``(num_units,)``), of a method that keeps a
    capacity ledger of units (``method.ledger``: EideticNets, CLNP); ``None`` for any other
    method (the router then reads the frozen features only)."""
    ledger = getattr(method, "ledger", None)
    if ledger is None or not hasattr(ledger, "free") or not hasattr(ledger, "owner"):
        return None
    return {name: ledger.free(name).clone() for name in ledger.owner}


def fit_router(net: ContinualNetwork, tasks: Sequence[TaskData], buffer: ExemplarBuffer, epochs: int = 20,
               lr: float = 1e-3, batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu",
               hidden: int = 0, free_units: dict[str, torch.Tensor] | None = None,
               feature_batch_size: int = 1024) -> TaskRouter:
    """Train a fresh task router on the meta-task of ``tasks`` (task ``i``'s kept training
    samples have target ``i``), as EideticNets does after every task. ``net`` is never changed.

    * ``free_units`` ``None`` (or no free unit): a :class:`TaskClassifier` head on the frozen
      penultimate features. The buffered samples go through the body once (eval mode, no
      gradients); only the head trains.
    * ``free_units`` (unit group → bool mask of the units no task owns, see
      :func:`free_units_of`): as in EideticNets' reference code, where the task classifier is
      one more task of the network, the router also gets units of its own: on a copy of the
      network, the free units are freshly initialized and trained with the head, reading the
      frozen units of every task (forward transfer); the rows of owned units are written back
      after every step. The trained tensors are the router's ``units``
      (:meth:`TaskRouter.install`). The copy trains in eval mode: no dropout, BatchNorm
      statistics unchanged.

    Training: ``epochs`` epochs of Adam (``lr``) on shuffled mini-batches of ``batch_size``, the
    cross-entropy of the task ids. Initialization and batch order come from generators seeded by
    ``(seed, number of tasks)``: reproducible, and the global RNG is never drawn from.

    ``tasks``: the tasks seen so far, ``task_id`` ``0 .. len(tasks) - 1`` in order, each with a
    head in ``net``. Returns the router in eval mode, on ``device``.

    Raises:
        ConfigError: the tasks are not numbered in order, have no common input pipeline
            (:func:`common_prepare`), or ``epochs``/``batch_size`` < 1 or ``lr`` <= 0.
        DivergenceError: the router's loss became non-finite.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"--router-epochs and the batch size must be at least 1 and --router-lr above 0; "
                          f"got {epochs}, {batch_size}, {lr}")
    for i, task in enumerate(tasks):
        if task.task_id != i:
            raise ConfigError(f"fit_router needs the tasks seen so far in order; task '{task.name}' has "
                              f"task_id {task.task_id} at position {i}")
    prepare = common_prepare(tasks)
    xs, ys = [], []
    for task in tasks:
        idx = buffer.select(task)
        xs.append(prepare(task.train_x[idx].to(device)))
        ys.append(torch.full((len(idx),), task.task_id, dtype=torch.long, device=xs[-1].device))
    x, y = torch.cat(xs), torch.cat(ys)
    own = free_units is not None and any(m.any() for m in free_units.values())
    body = copy.deepcopy(net).eval() if own else net
    rows = _free_rows(body, free_units) if own else []
    if own:
        _init_free_rows(rows, _generator("units", int(seed), len(tasks)))
    h = _features(body, x, feature_batch_size)
    head = TaskClassifier(h.shape[1], len(tasks), hidden, _generator("init", int(seed), len(tasks)))
    head.to(device=h.device, dtype=h.dtype)
    with torch.no_grad():
        head.mean.copy_(h.mean(0))
        std = h.std(0, unbiased=False) if len(h) > 1 else torch.zeros_like(head.scale)
        head.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    params = list(head.parameters()) + [r.param for r in rows]
    if own:
        for p in body.parameters():
            p.requires_grad_(False)
        for r in rows:
            r.param.requires_grad_(True)
    fixed = [(r.param, (~r.free).nonzero().flatten(), r.param.detach()[~r.free].clone()) for r in rows]
    optimizer = torch.optim.Adam(params, lr=lr)
    order_gen = _generator("order", int(seed), len(tasks))
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=order_gen).to(y.device)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            feats = body.features(x[idx]) if own else h[idx]
            loss = F.cross_entropy(head(feats), y[idx])
            if not torch.isfinite(loss):
                raise DivergenceError(f"the task router's loss became {float(loss)} in epoch {epoch + 1}; "
                                      "lower --router-lr")
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p, owned, values in fixed:
                    p.index_copy_(0, owned, values)
    head.eval()
    if not own:
        return TaskRouter(head).eval()
    names = {r.name for r in rows}
    units = {k: v.detach().clone() for k, v in body.state_dict().items() if k in names}
    return TaskRouter(head, units).eval()


def head_entropies(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entropy (nats) of each head's softmax, ``(N, T)``, from ``T`` logits tensors
    ``(N, C_t)`` (class counts may differ; a head with fewer classes has a lower maximum
    entropy, ``log C_t``, and is favoured accordingly)."""
    out = []
    for z in logits:
        logp = F.log_softmax(z.float(), dim=1)
        out.append(-(logp.exp() * logp).sum(1))
    return torch.stack(out, 1)


def shared_features(net: ContinualNetwork) -> bool:
    """Whether every task reads the features of one body pass (neuron-level methods,
    fine-tuning...), rather than each its own subnetwork or body (weight-level methods,
    single-task training)."""
    return net.subnetworks is None and not net.task_bodies


def task_outputs(net: ContinualNetwork, x: torch.Tensor, router=None):
    """``(features, logits)`` of prepared inputs ``x`` ``(N, ...)`` for every task the network
    has a head for, batched over the samples: ``logits[t]`` ``(N, C_t)`` equals ``net(x, t)``.
    ``features`` (what :func:`route` reads): one ``(N, d)`` tensor when the tasks share one body
    pass (:func:`shared_features`), else a list of ``T`` tensors ``(N, d)``, task ``t``'s features
    under its own subnetwork (one forward pass per task: a loop over tasks, never over samples).
    With feature statistics of unit layers (``router.layers``), ``features`` are those layers'
    outputs, read in the same body pass (:func:`sparsecl.feature_routing.unit_features`).
    """
    if shared_features(net):
        layers = getattr(router, "layers", None)
        if layers:
            from .feature_routing import unit_features

            h, u = unit_features(net, x, [n for n, _ in layers])
            return u, [net.head_logits(h, t) for t in range(net.num_tasks)]
        h = net.features(x)
        return h, [net.head_logits(h, t) for t in range(net.num_tasks)]
    hs = [net.features(x, t) for t in range(net.num_tasks)]
    return hs, [net.head_logits(h, t) for t, h in enumerate(hs)]


def route(h, logits: Sequence[torch.Tensor], mode: str, router=None) -> torch.Tensor:
    """The task of every sample, ``(N,)`` int64, from its features ``h`` (``(N, F)``, or per
    task a list of ``T`` such tensors, see :func:`task_outputs`) and every seen task's logits
    (``logits[t]``: ``(N, C_t)``).

    ``"classifier"``/``"classifier-all"``: ``router(h).argmax(1)``; ``"entropy"``: the head whose
    softmax has the lowest entropy (ties: the lowest task id); ``"lda"``: the argmax of
    ``router.task_scores(h)`` (:class:`sparsecl.feature_routing.FeatureStatistics`).

    Raises:
        ConfigError: an unknown ``mode`` (``"oracle"`` has no route: it needs the task id), a
            classifier or lda mode without its router, or a router of another number of tasks.
    """
    if mode in ("classifier", "classifier-all", "lda"):
        if router is None:
            raise ConfigError(f"--routing {mode} needs its router (fit_router, or FeatureStatistics for lda)")
        if router.num_tasks != len(logits):
            raise ConfigError(f"the router of --routing {mode} was trained on {router.num_tasks} tasks but the network "
                              f"has heads for {len(logits)}; refit it after every task")
        if mode == "lda":
            from .feature_routing import FeatureStatistics

            if not isinstance(router, FeatureStatistics):
                raise ConfigError("--routing lda needs feature statistics (FeatureStatistics), not a task classifier")
            return router.task_scores(h).argmax(1).to(logits[0].device)
        if not isinstance(h, torch.Tensor):
            raise ConfigError(f"--routing {mode} reads the features of one shared body pass; this network computes "
                              "each task's features with its own subnetwork: use --routing entropy or lda")
        return router(h).argmax(1)
    if mode == "entropy":
        return head_entropies(logits).argmin(1)
    raise ConfigError(f"--routing must be one of classifier, classifier-all, entropy, lda to route without a task id, "
                      f"got '{mode}'")


def _check_installed(net: ContinualNetwork, mode: str, router) -> None:
    if net.num_tasks == 0:
        raise ConfigError("routing needs a network with at least one task head")
    if mode.startswith("classifier") and isinstance(router, TaskRouter) and router.units \
            and getattr(net, "_router_id", None) != id(router):
        raise ConfigError("this task router has units of its own in the network's free capacity: route "
                          "with the network it installs, router.install(net)")


def _choose(logits: Sequence[torch.Tensor], tasks: torch.Tensor) -> torch.Tensor:
    """Class prediction ``(N,)`` of head ``tasks[n]`` for every sample ``n``, gathered in one go."""
    return torch.stack([z.argmax(1) for z in logits], 1).gather(1, tasks[:, None]).squeeze(1)


@torch.no_grad()
def routed_predict(net: ContinualNetwork, x: torch.Tensor, mode: str,
                   router=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-agnostic prediction of prepared inputs ``x`` ``(N, ...)`` (already through the tasks'
    common ``prepare``): ``(task_pred, class_pred)``, both ``(N,)`` int64, ``class_pred[n]`` a
    task-local class of task ``task_pred[n]``.

    :func:`task_outputs` (eval mode; the network's mode is restored): one body pass and every
    task head on the shared features, or one pass per task's subnetwork, batched over the
    samples; then :func:`route`; the class is the chosen head's argmax. ``net`` is the routing
    network: for a task router with units of its own, ``router.install(trained_net)``.

    Raises:
        ConfigError: see :func:`route`; the network has no task head, or ``router`` has units
            of its own and ``net`` is not a network it installed.
    """
    _check_installed(net, mode, router)
    was_training = net.training
    net.eval()
    h, logits = task_outputs(net, x, router)
    net.train(was_training)
    tasks = route(h, logits, mode, router)
    return tasks, _choose(logits, tasks)


@dataclass
class RoutedEvaluation:
    """Task-agnostic test results of every seen task (index ``i``), from :func:`evaluate_routing`.

    ``routed[i]``: fraction of task i's test samples routed to task i *and* classified right;
    ``routing[i]``: fraction routed to task i; ``oracle[i]``: fraction classified right with the
    task id given; ``per_class``: one entry per class of every task, ``{"task", "class"`` (the
    original data-set label), ``"samples", "oracle", "routed", "routing"}`` (accuracies as
    fractions, ``routing`` the share routed to the class's task; ``None`` for a class without
    test samples), the form of EideticNets' Table 8."""

    routed: list[float]
    routing: list[float]
    oracle: list[float]
    per_class: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_routing(net: ContinualNetwork, tasks: Sequence[TaskData], mode: str,
                     router: TaskRouter | TaskClassifier | None = None, batch_size: int = 1024,
                     device: str | torch.device = "cpu") -> RoutedEvaluation:
    """Route the test set of every task in ``tasks`` (the tasks seen so far, one head each)
    through :func:`routed_predict`'s single batched pass, in batches of ``batch_size``. ``net``
    is the routing network, as for :func:`routed_predict`.

    Raises:
        ConfigError: see :func:`common_prepare`, :func:`routed_predict` and :func:`route`.
    """
    prepare = common_prepare(tasks)
    _check_installed(net, mode, router)
    was_training = net.training
    net.eval()
    result = RoutedEvaluation([], [], [])
    for i, task in enumerate(tasks):
        y = task.test_y
        routed_to, routed_cls, oracle_cls = [], [], []
        for s in range(0, len(y), batch_size):
            h, logits = task_outputs(net, prepare(task.test_x[s:s + batch_size].to(device)), router)
            chosen = route(h, logits, mode, router)
            routed_to.append(chosen.cpu())
            routed_cls.append(_choose(logits, chosen).cpu())
            oracle_cls.append(logits[i].argmax(1).cpu())
        to, cls, orc = torch.cat(routed_to), torch.cat(routed_cls), torch.cat(oracle_cls)
        right_task = to == i
        routed_ok = right_task & (cls == y)
        oracle_ok = orc == y
        n = len(y)
        result.routed.append(int(routed_ok.sum()) / n)
        result.routing.append(int(right_task.sum()) / n)
        result.oracle.append(int(oracle_ok.sum()) / n)
        labels = y.tolist()
        oracle_by_class = metrics.per_class_accuracy(labels, oracle_ok.tolist(), task.num_classes)
        routed_by_class = metrics.per_class_accuracy(labels, routed_ok.tolist(), task.num_classes)
        routing_by_class = metrics.per_class_accuracy(labels, right_task.tolist(), task.num_classes)
        counts = torch.bincount(y, minlength=task.num_classes).tolist()
        result.per_class += [{"task": i, "class": task.classes[k], "samples": counts[k],
                              "oracle": oracle_by_class[k], "routed": routed_by_class[k],
                              "routing": routing_by_class[k]}
                             for k in range(task.num_classes)]
    net.train(was_training)
    return result


@dataclass
class RoutingRecord:
    """What the task loop keeps of task-agnostic evaluation, one entry per finished task
    (``None`` for a step measured without this routing, e.g. tasks of a saved run extended with
    ``--from``): ``rows[t][i]`` routed accuracy of task i after task t, ``routing_rows[t][i]``
    the fraction of task i's test samples routed to task i, ``per_class`` the latest step's
    per-class table (:class:`RoutedEvaluation`), ``router`` the latest task classifier
    (classifier modes) or the feature statistics (``lda``), ``seconds`` the time spent routing
    per task."""

    mode: str
    buffer_per_task: int | None
    rows: list[list[float] | None] = field(default_factory=list)
    routing_rows: list[list[float] | None] = field(default_factory=list)
    per_class: list[dict] = field(default_factory=list)
    seconds: list[float | None] = field(default_factory=list)
    router: "TaskRouter | FeatureStatistics | None" = None

    def kept(self) -> str:
        """What this routing keeps besides the network, in words (``metrics.json``'s ``kept``)."""
        if self.mode == "classifier":
            return f"{self.buffer_per_task} training samples per task (inputs), to retrain the task classifier"
        if self.mode == "classifier-all":
            return "every training sample of every task (inputs), to retrain the task classifier"
        if self.mode == "lda":
            stats = self.router
            if stats is None:
                return "feature statistics (no inputs)"
            K, d = stats.means.shape
            cov = "one (d, d) covariance" if stats.shared else f"{stats.num_tasks} (d, d) covariances, one per task"
            where = f" of the outputs of {len(stats.layers)} unit layers" if stats.layers else ""
            return f"feature statistics, no inputs: {K} class means and {cov}{where}, d = {d}"
        return "nothing (no inputs, no statistics)"

    def to_dict(self, num_tasks: int) -> dict:
        """The ``"routing"`` entry of ``metrics.json`` (matrices ``(num_tasks, num_tasks)``,
        ``None`` where not measured)."""
        def square(rows):
            return [(list(rows[t]) + [None] * (num_tasks - len(rows[t]))) if t < len(rows) and rows[t] is not None
                    else [None] * num_tasks for t in range(num_tasks)]

        R = square(self.rows)
        complete = all(row is not None for row in self.rows) and len(self.rows) == num_tasks
        last = self.rows[-1] if self.rows and len(self.rows) == num_tasks else None
        return {
            "mode": self.mode,
            "buffer_per_task": self.buffer_per_task,
            "kept": self.kept(),
            "accuracy_matrix": R,
            "acc": None if last is None else sum(last) / len(last),
            "bwt": metrics.backward_transfer(R) if complete else None,
            "forgetting": metrics.forgetting(R) if complete else None,
            "routing_accuracy": square(self.routing_rows),
            "per_class": self.per_class,
            "mean_class_drop": metrics.mean_class_drop([c["oracle"] for c in self.per_class],
                                                       [c["routed"] for c in self.per_class]),
            "seconds_per_task": list(self.seconds),
        }

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, JSON metadata)``: the router's tensors under ``router.``."""
        tensors = {} if self.router is None else {f"router.{k}": v for k, v in self.router.tensors().items()}
        meta = {"mode": self.mode, "buffer_per_task": self.buffer_per_task, "rows": self.rows,
                "routing_rows": self.routing_rows, "per_class": self.per_class, "seconds": self.seconds,
                "router": None if self.router is None else self.router.describe()}
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "RoutingRecord":
        """Inverse of :meth:`to_checkpoint`.

        Raises:
            CheckpointError: a key is missing or the router's tensors do not fit.
        """
        try:
            router = None
            if meta["router"] is not None:
                p = "router."
                own = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
                if meta["router"].get("kind") == "feature-statistics":
                    from .feature_routing import FeatureStatistics

                    router = FeatureStatistics.restore(meta["router"], own)
                else:
                    router = TaskRouter.restore(meta["router"], own)
            return cls(meta["mode"], meta["buffer_per_task"], [None if r is None else list(r) for r in meta["rows"]],
                       [None if r is None else list(r) for r in meta["routing_rows"]], list(meta["per_class"]),
                       list(meta["seconds"]), router)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint's routing record is incomplete ({type(exc).__name__}: {exc})") from None


@torch.no_grad()
def update_statistics(net: ContinualNetwork, tasks: Sequence[TaskData], stats=None, method=None,
                      batch_size: int = 1024, device: str | torch.device = "cpu", shrinkage: float | None = None,
                      all_layers: bool = True):
    """The feature statistics of ``--routing lda`` (:class:`sparsecl.feature_routing.FeatureStatistics`)
    for ``tasks`` (the tasks seen so far, in order): ``stats`` extended with every task it lacks
    (a new one when ``None``). Each missing task's whole training set goes once through the
    network (eval mode, no gradient; its own subnetwork for weight-level methods); only the
    class means and the within-class scatter are kept. ``method``'s unit ledger (EideticNets,
    CLNP) gives each task's view (the units it reads); with one, new statistics read the outputs
    of every unit layer (``all_layers``, :func:`sparsecl.feature_routing.unit_features`), else the
    penultimate features. ``net`` is never changed.

    Raises:
        ConfigError: see :func:`common_prepare` and ``FeatureStatistics.add_task``.
    """
    from .feature_routing import (SHRINKAGE, FeatureStatistics, head_source_owner, unit_features, unit_layers,
                                  unit_owner)

    prepare = common_prepare(tasks)
    shared = shared_features(net)
    if stats is None:
        layers = (unit_layers(net, method) if shared and all_layers else None) or []
        d = sum(w for _, w in layers) if layers else net.head_features
        stats = FeatureStatistics(shared, d, SHRINKAGE if shrinkage is None else shrinkage, layers)
    elif stats.shared != shared:
        raise ConfigError("these feature statistics were taken with another feature layout (shared body pass vs "
                          "a subnetwork per task)")
    names = [n for n, _ in stats.layers]
    if names:
        owner = unit_owner(net, method, names)
        widths = [net.graph.layers[n].num_units for n in names]
    else:
        owner, widths = head_source_owner(net, method) if shared else None, None
    was_training = net.training
    net.eval()
    for j in range(stats.num_tasks, len(tasks)):
        task = tasks[j]
        h = [(unit_features(net, x, names)[1] if names else net.features(x, j)).cpu()
             for x in (prepare(task.train_x[s:s + batch_size].to(device))
                       for s in range(0, len(task.train_y), batch_size))]
        stats.add_task(torch.cat(h), task.train_y, task.num_classes, owner, widths)
    net.train(was_training)
    return stats


class RoutingEvaluator:
    """Task-agnostic evaluation after every task, an evaluator of the task loop
    (``sparsecl.evaluation``): in ``lda`` mode, add the new task's feature statistics; in the
    classifier modes, refit the task router on the kept samples of the tasks seen so far and check on the probe batches that its units leave every task's
    logits bitwise as they are; then route every seen task's test set. The record lives in
    ``state.routing`` (:class:`RoutingRecord`), saved with the run's checkpoint. Draws from no
    RNG that the rest of the run uses."""

    def __init__(self, config, method):
        self.config, self.method = config, method

    def begin(self, benchmark, state) -> None:
        """Check that routing can run on the benchmark (one input pipeline) before any training,
        and start its record; steps measured with another routing (a saved run extended with
        ``--from``) are kept as ``None``.

        Raises:
            ConfigError: the method computes each task's features with its own subnetwork, or
                the tasks' input pipelines differ."""
        cfg = self.config
        if cfg.routing == "oracle":
            state.routing = None
            return
        if self.method.features_per_task and cfg.routing.startswith("classifier"):
            raise ConfigError(f"--routing {cfg.routing} reads the features of one shared body pass; method "
                              f"'{self.method.name}' computes each task's features with its own subnetwork: use "
                              "--routing entropy or --routing lda (they run every task's subnetwork)")
        common_prepare(benchmark.tasks)
        buffer = cfg.router_buffer if cfg.routing == "classifier" else None
        rec = state.routing
        if rec is None or (rec.mode, rec.buffer_per_task) != (cfg.routing, buffer) or len(rec.rows) != state.tasks_done:
            n = state.tasks_done
            state.routing = RoutingRecord(cfg.routing, buffer, [None] * n, [None] * n, [], [None] * n)

    def after_task(self, net: ContinualNetwork, benchmark, t: int, state) -> None:
        """Route after task t (its oracle row is measured already).

        Raises:
            ForgettingError: the task router's units changed a task's logits."""
        cfg, rec = self.config, state.routing
        if rec is None:
            return
        start = time.perf_counter()
        seen = benchmark.tasks[: t + 1]
        routing_net = net
        if cfg.routing == "lda":
            rec.router = update_statistics(net, seen, rec.router, self.method, cfg.eval_batch_size, cfg.device,
                                           shrinkage=cfg.lda_shrinkage)
        if cfg.routing.startswith("classifier"):
            free = free_units_of(self.method) if cfg.router_free_units else None
            size = cfg.router_buffer if cfg.routing == "classifier" else None
            rec.router = fit_router(net, seen, ExemplarBuffer(size, cfg.seed), cfg.router_epochs,
                                    cfg.router_lr, cfg.batch_size, cfg.seed, cfg.device, cfg.router_hidden,
                                    free, cfg.eval_batch_size)
            routing_net = rec.router.install(net)
            if routing_net is not net:  # the router's units must not reach any task's logits
                for i, (px, _) in enumerate(state.probes):
                    now = predict(routing_net, px, i, cfg.eval_batch_size, cfg.device, seen[i].prepare).cpu()
                    logits = predict(net, px, i, cfg.eval_batch_size, cfg.device, seen[i].prepare).cpu()
                    if not torch.equal(now, logits):
                        raise ForgettingError(
                            f"the task router's units changed the logits of task {i} (largest absolute change "
                            f"{float((now - logits).abs().max()):g}); a task reads a unit no task owns")
        result = evaluate_routing(routing_net, seen, cfg.routing, rec.router, cfg.eval_batch_size, cfg.device)
        rec.rows.append(result.routed)
        rec.routing_rows.append(result.routing)
        rec.per_class = result.per_class
        rec.seconds.append(time.perf_counter() - start)
