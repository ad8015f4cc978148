"""Feature-statistics routing (``--routing lda``): Gaussian class models of the penultimate
features, kept as running statistics, never as samples.

After each task, the task's training data go once through the network (eval mode, no gradient)
and only these statistics are kept: the mean of every class's features and a within-class
scatter matrix. A test sample is routed to the task whose classes explain its features best.
This is linear discriminant analysis with a shrunk shared covariance, as in streaming LDA
(Hayes & Kanan, "Lifelong Machine Learning with Deep Streaming Linear Discriminant Analysis",
CVPR-W 2020, eq. 1-3), with the covariance shrunk towards a scaled identity,
``(1 - a) S + a (tr S / p) I`` (the shrinkage target of Ledoit & Wolf, "A well-conditioned
estimator for large-dimensional covariance matrices", J. Multivariate Anal. 2004).

Two layouts, chosen by the network:

* **One shared feature pass** (neuron-level methods, fine-tuning...; ``shared=True``). Storage:
  one ``(d, d)`` scatter matrix, one ``(d,)`` mean per class, one owner id per feature and one
  count per task: O(d^2) once plus O(d) per class. For a method with a unit ledger (EideticNets,
  CLNP) task ``i`` reads only the *view* ``U_i``: the head-source units owned by tasks
  ``0..i``, frozen once ``i`` ends, so the statistics of task ``i`` taken in its view stay exact
  for ever; units of later tasks are not part of them (their values on task ``i``'s data change
  with every task and were never observed). Views are nested, ``U_0 ⊆ U_1 ⊆ ...``, so in view
  ``U_k`` the means of every task ``j >= k`` are exact (their restriction to ``U_k``). The
  shared covariance is the pooled within-class scatter, accumulated task by task: task ``j``
  adds ``sum_n (h_n - mu_c)(h_n - mu_c)^T`` over its samples in its view and ``N_j - C_j``
  degrees of freedom; entry ``(a, b)`` is divided by the degrees of freedom of the tasks whose
  view holds both ``a`` and ``b`` (every task from ``max(owner(a), owner(b))`` on): the pooled
  estimate over exactly the samples that observed it. A sample is routed by the chain rule
  ``P(task = i) = P(i | >= i; U_i) * prod_{k < i} P(> k | >= k; U_k)``, each factor an LDA
  posterior over the classes of tasks ``>= k`` in view ``U_k`` (equal class priors). Without a
  ledger every view is the whole feature vector and this is plain LDA over all classes (the
  product telescopes); the features of such methods drift, so their statistics are only
  approximately valid.
* **A subnetwork per task** (weight-level methods, single-task training; ``shared=False``): each
  task's features come from its own subnetwork, so each task keeps its own ``(d, d)`` scatter
  (O(T d^2) plus O(d) per class); the sample runs through every task's subnetwork (a loop over
  tasks, batched over samples) and goes to the task whose nearest class is closest in
  Mahalanobis distance under that task's covariance (the confidence score of Lee et al., "A
  Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
  NeurIPS 2018, eq. 2).

**Which features** (shared layout). With a unit ledger the feature vector is, by default, the
output of *every unit layer* of the body, concatenated (:func:`unit_layers`,
:func:`unit_features`): a Linear layer's pre-activations, a convolution's channels averaged over
space. Every unit owned by a task ``<= k`` is frozen from task ``k``'s end on and reads only
units of tasks ``<= k`` (the ledger's invariant that keeps earlier tasks' logits bitwise), so its
output on any input stays what it was when task ``k``'s statistics were taken: the views of all
layers are as exact as the head's, and much larger (EideticNets may keep a task 2 units of the
penultimate layer but more in other layers). The owner of each feature is its layer's ledger
entry; the pooled covariance is accumulated as above over the concatenated vector. Without a
ledger (or with ``FeatureStatistics(layers=())``, e.g. statistics saved before) the features are
the penultimate ones, ``net.features(x)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

#: The default shrinkage ``a`` of the covariance towards ``(tr S / p) I``.
SHRINKAGE = 0.1


def head_source_owner(net, method) -> torch.Tensor | None:
    """The owner task of every penultimate feature, ``(head_features,)`` int64 (``-1``: no
    task owns it), from the unit ledger of ``method`` (EideticNets, CLNP); ``None`` for a method
    without one (every feature is then read by every task)."""
    ledger = getattr(method, "ledger", None)
    source = net.graph.head_source
    if ledger is None or source is None or source not in getattr(ledger, "owner", {}):
        return None
    return net.graph.head_columns(ledger.owner[source].to(torch.int64).cpu())


def _check_shrinkage(shrinkage: float) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"the covariance shrinkage (--lda-shrinkage) must lie in [0, 1], got {shrinkage}")


def unit_layers(net, method) -> list[tuple[str, int]] | None:
    """``(name, units)`` of every unit layer of ``net``'s body whose unit group ``method``'s
    ledger tracks (EideticNets, CLNP), in the graph's topological order; ``None`` for a method
    without a unit ledger or a network without a unit graph."""
    ledger = getattr(method, "ledger", None)
    owners = getattr(ledger, "owner", None)
    layers = getattr(getattr(net, "graph", None), "layers", None)
    if not owners or not layers:
        return None
    out = [(name, layer.num_units) for name, layer in layers.items() if layer.group in owners]
    return out or None


def unit_owner(net, method, names: Sequence[str]) -> torch.Tensor:
    """The owner task of every unit of the layers ``names`` (``-1``: free), concatenated in that
    order, ``(sum of their units,)`` int64, from ``method``'s unit ledger (the owner of a layer's
    unit group)."""
    owners = method.ledger.owner
    return torch.cat([owners[net.graph.layers[n].group].to("cpu", torch.int64) for n in names])


def unit_features(net, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One body pass over prepared inputs ``x`` ``(N, ...)``: ``(h, u)``, the penultimate features
    ``h`` ``(N, head_features)`` and the outputs of the unit layers ``names`` concatenated,
    ``u`` ``(N, sum of their units)``: a Linear layer's output (pre-activation), a convolution's
    ``(N, C, H, W)`` output averaged over ``H, W``. Read through forward hooks, removed again.

    Raises:
        ConfigError: a name is not a unit layer of ``net``.
    """
    graph_layers = net.graph.layers
    missing = [n for n in names if n not in graph_layers]
    if missing:
        raise ConfigError(f"the feature statistics read unit layers {', '.join(missing)}, which this network lacks")
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            outs[name] = output.flatten(2).mean(2) if output.ndim > 2 else output
        return hook

    handles = [net.body.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        h = net.features(x)
    finally:
        for handle in handles:
            handle.remove()
    return h, torch.cat([outs[n] for n in names], 1)


class FeatureStatistics(nn.Module):
    """Class means and within-class scatter of the penultimate features, task by task (see the
    module's doc). Tensors (``state_dict``; float64, on the CPU):

    * ``means`` ``(K, d)``: the mean features of every class seen (``K`` classes of all tasks,
      in task order); ``class_task`` ``(K,)`` int64, the task of each class;
    * ``scatter``: ``(d, d)`` pooled (``shared``) or ``(T, d, d)`` per task;
    * ``dof`` ``(T,)``: samples minus classes of each task;
    * ``owner`` ``(d,)`` int64 (``shared`` only, else empty): the first task whose view holds
      the feature, ``-1`` for none.

    ``layers`` (``shared`` only): ``(name, units)`` of the unit layers whose outputs, concatenated
    in that order, are the features (:func:`unit_features`; ``d`` their total); empty: the
    penultimate features.

    No input sample is kept.

    Raises:
        ConfigError: ``shrinkage`` outside ``[0, 1]``; ``layers`` given without ``shared`` or
            not adding up to ``num_features``.
    """

    def __init__(self, shared: bool, num_features: int, shrinkage: float = SHRINKAGE,
                 layers: Sequence[tuple[str, int]] = ()):
        super().__init__()
        _check_shrinkage(shrinkage)
        self.layers = [(str(n), int(w)) for n, w in layers]
        if self.layers and (not shared or sum(w for _, w in self.layers) != int(num_features)):
            raise ConfigError(f"feature statistics of unit layers {self.layers} need the shared layout and "
                              f"num_features = their total units, got shared={shared}, {num_features}")
        self.shared, self.shrinkage = bool(shared), float(shrinkage)
        #: shared layout's rule: "chain" (the chain rule over nested views) or "novelty"
        self.rule = "chain"
        d = int(num_features)
        f64 = torch.float64
        self.register_buffer("means", torch.zeros(0, d, dtype=f64))
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("scatter", torch.zeros(d, d, dtype=f64) if shared else torch.zeros(0, d, d, dtype=f64))
        self.register_buffer("dof", torch.zeros(0, dtype=f64))
        self.register_buffer("owner", torch.full((d,) if shared else (0,), -1, dtype=torch.int64))
        self._cache: dict | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.dof)

    def set_shrinkage(self, shrinkage: float) -> None:
        """Score with another shrinkage ``a`` from now on: the scatter is kept unshrunk, so this
        is exact after the fact (``sparsecl eval --lda-shrinkage``).

        Raises:
            ConfigError: ``shrinkage`` outside ``[0, 1]``.
        """
        _check_shrinkage(shrinkage)
        self.shrinkage = float(shrinkage)
        self._cache = None

    @property
    def num_features(self) -> int:
        return self.means.shape[1]

    # ---- accumulation --------------------------------------------------------------------------
    @torch.no_grad()
    def add_task(self, h: torch.Tensor, y: torch.Tensor, num_classes: int,
                 owner: torch.Tensor | None = None, widths: Sequence[int] | None = None) -> None:
        """Add the next task's statistics from its training features ``h`` ``(N, d)`` (its own
        subnetwork's for ``shared=False``) and task-local labels ``y`` ``(N,)``. ``owner``
        (``shared`` only): the current owner task of every feature (``head_source_owner`` or
        :func:`unit_owner`; may be longer than before if a layer was widened), ``None``: every
        feature belongs to task 0. ``widths``: with ``layers``, the layers' unit counts now (a
        widened layer's new units are padded in at the end of its block).

        Raises:
            ConfigError: ``h`` does not have ``d`` features, a label is out of range, or a class
                has no sample.
        """
        t = self.num_tasks
        h = h.detach().to("cpu", torch.float64)
        y = y.detach().to("cpu", torch.int64)
        if self.layers and widths is not None and list(widths) != [w for _, w in self.layers]:
            self._widen_layers([int(w) for w in widths])
        elif self.shared and owner is not None and len(owner) > self.num_features:
            self._widen(len(owner))
        d = self.num_features
        if h.ndim != 2 or h.shape[1] != d or len(y) != len(h):
            raise ConfigError(f"task {t}'s features have shape {tuple(h.shape)} for {len(y)} labels; expected "
                              f"(N, {d}) with one label per row")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ConfigError(f"task {t}'s labels must lie in 0..{num_classes - 1}")
        counts = torch.bincount(y, minlength=num_classes)
        if bool((counts == 0).any()):
            raise ConfigError(f"task {t} has no training sample of class(es) "
                              f"{(counts == 0).nonzero().flatten().tolist()}: no mean to route to")
        if self.shared:
            if owner is None:
                new = torch.zeros(d, dtype=torch.int64)
            else:
                new = owner.to("cpu", torch.int64)
            view_now = (new >= 0) & (new <= t)
            self.owner[(self.owner < 0) & view_now] = t
            h = h * (self.owner >= 0).to(h.dtype) * (self.owner <= t).to(h.dtype)
        mu = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, h) / counts[:, None]
        centred = h - mu[y]
        s = centred.T @ centred
        self.means = torch.cat([self.means, mu])
        self.class_task = torch.cat([self.class_task, torch.full((num_classes,), t, dtype=torch.int64)])
        self.dof = torch.cat([self.dof, torch.tensor([float(len(y) - num_classes)], dtype=torch.float64)])
        self.scatter = self.scatter + s if self.shared else torch.cat([self.scatter, s[None]])
        self._cache = None

    def _widen(self, d: int) -> None:
        """New features (a widened layer): zero in every earlier view, so padding is exact."""
        k = d - self.num_features
        self.means = torch.cat([self.means, self.means.new_zeros(len(self.means), k)], 1)
        s = self.scatter.new_zeros(d, d)
        s[: d - k, : d - k] = self.scatter
        self.scatter = s
        self.owner = torch.cat([self.owner, self.owner.new_full((k,), -1)])

    def _widen_layers(self, widths: list[int]) -> None:
        """Widened unit layers: each layer's new units are zero in every earlier view, inserted
        at the end of its block."""
        old = [w for _, w in self.layers]
        if len(widths) != len(old) or any(n < o for n, o in zip(widths, old)):
            raise ConfigError(f"the unit layers {[n for n, _ in self.layers]} had {old} units and now {widths}: "
                              "a layer can only grow")
        keep = torch.cat([torch.cat([torch.ones(o, dtype=torch.bool), torch.zeros(n - o, dtype=torch.bool)])
                          for o, n in zip(old, widths)])
        pos = keep.nonzero().flatten()
        d = len(keep)
        means = self.means.new_zeros(len(self.means), d)
        means[:, pos] = self.means
        s = self.scatter.new_zeros(d, d)
        s[pos[:, None], pos[None, :]] = self.scatter
        owner = self.owner.new_full((d,), -1)
        owner[pos] = self.owner
        self.means, self.scatter, self.owner = means, s, owner
        self.layers = [(n, w) for (n, _), w in zip(self.layers, widths)]

    # ---- scoring -------------------------------------------------------------------------------
    def _shrunk(self, cov: torch.Tensor) -> torch.Tensor:
        p = cov.shape[0]
        target = cov.diagonal().sum() / p
        if not target > 0:
            target = cov.new_tensor(1.0)
        out = (1 - self.shrinkage) * cov
        out.diagonal().add_(self.shrinkage * target + 1e-9 * float(target))
        return out

    def _whitener(self, cov: torch.Tensor) -> torch.Tensor:
        """``W`` with ``W^T W = shrunk(cov)^-1``, from the eigendecomposition. The pooled
        estimate of the shared layout divides entries by different counts, so it need not be
        positive semi-definite: eigenvalues are floored at the shrinkage's share of the mean
        variance (what shrinkage gives a positive semi-definite estimate)."""
        if len(cov) == 0:
            return cov.new_zeros(0, 0)
        shrunk = self._shrunk(cov)
        lam, V = torch.linalg.eigh((shrunk + shrunk.T) / 2)
        mean_var = float(cov.diagonal().sum()) / len(cov)
        floor = max(self.shrinkage * mean_var, 1e-9 * max(mean_var, 1e-12), 1e-12)
        return lam.clamp_min(floor).rsqrt()[:, None] * V.T

    def _views(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per view ``k`` (shared layout): its feature indices, whitener ``(p, p)`` and the
        whitened means ``(K_k, p)`` of the classes of tasks ``>= k``."""
        if self._cache is not None:
            return self._cache["views"]
        T = self.num_tasks
        # degrees of freedom behind entry (a, b): every task from max(owner a, owner b) on
        later = torch.flip(torch.cumsum(torch.flip(self.dof, [0]), 0), [0])  # later[j] = sum_{i >= j} dof_i
        views = []
        for k in range(T):
            idx = ((self.owner >= 0) & (self.owner <= k)).nonzero().flatten()
            o = self.owner[idx]
            n = later[torch.maximum(o[:, None], o[None, :])]
            cov = self.scatter[idx][:, idx] / n.clamp_min(1.0)
            W = self._whitener(cov) if len(idx) else torch.zeros(0, 0, dtype=torch.float64)
            cand = self.class_task >= k
            views.append((idx, W, self.means[cand][:, idx] @ W.T))
        self._cache = {"views": views}
        return views

    def _task_whiteners(self) -> list[torch.Tensor]:
        if self._cache is None:
            self._cache = {"tasks": [self._whitener(self.scatter[t] / self.dof[t].clamp_min(1.0))
                                     for t in range(self.num_tasks)]}
        return self._cache["tasks"]

    @torch.no_grad()
    def task_scores(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Log-score of every task for every sample, ``(N, T)`` float64; the route is its argmax.

        ``features``: shared layout, the features ``h`` ``(N, d)`` of one body pass; per-task
        layout, a list of ``T`` tensors ``(N, d)``, task ``t``'s features under its own
        subnetwork. Shared: ``log P(task = i)`` by the chain rule over the nested views (see the
        module's doc); per task: ``-0.5 min_c`` squared Mahalanobis distance to task ``t``'s
        class means under its covariance.

        Raises:
            ConfigError: no task statistics yet, or features of the wrong layout or size.
        """
        T = self.num_tasks
        if T == 0:
            raise ConfigError("--routing lda has no feature statistics yet: add_task after every task")
        if self.shared:
            if not isinstance(features, torch.Tensor):
                raise ConfigError("these feature statistics are of one shared feature pass: pass one (N, d) tensor")
            h = features.detach().to("cpu", torch.float64)
            if h.ndim != 2 or h.shape[1] != self.num_features:
                raise ConfigError(f"features of shape {tuple(h.shape)}; the statistics have {self.num_features}")
            if self.rule == "novelty":
                return self._novelty(h)
            out = h.new_zeros(len(h), T)
            carry = h.new_zeros(len(h))  # log P(task > k - 1)
            for k, (idx, W, wmeans) in enumerate(self._views()):
                z = h[:, idx] @ W.T
                g = -0.5 * torch.cdist(z, wmeans).square() if len(idx) else h.new_zeros(len(h), len(wmeans))
                total = torch.logsumexp(g, 1)
                own = self.class_task[self.class_task >= k] == k
                out[:, k] = carry + torch.logsumexp(g[:, own], 1) - total
                if k + 1 < T:
                    carry = carry + torch.logsumexp(g[:, ~own], 1) - total
            return out
        if isinstance(features, torch.Tensor) or len(features) != T:
            raise ConfigError(f"these feature statistics are per task: pass a list of {T} (N, d) tensors, "
                              "task t's features under its own subnetwork")
        scores = []
        for t, W in enumerate(self._task_whiteners()):
            h = features[t].detach().to("cpu", torch.float64)
            z = h @ W.T
            m = self.means[self.class_task == t] @ W.T
            scores.append(-0.5 * torch.cdist(z, m).square().min(1).values)
        return torch.stack(scores, 1)

    def _novelty(self, h: torch.Tensor) -> torch.Tensor:
        """Per task ``k``, in its own view ``U_k`` (``p_k`` features): the squared Mahalanobis
        distance ``D^2`` to its nearest class, standardized as a chi-square with ``p_k`` degrees of
        freedom, ``-(D^2 - p_k) / sqrt(2 p_k)``: comparable across views of different sizes."""
        out = []
        for k, (idx, W, wmeans) in enumerate(self._views()):
            p = max(len(idx), 1)
            own = self.class_task[self.class_task >= k] == k
            d2 = torch.cdist(h[:, idx] @ W.T, wmeans[own]).square().min(1).values if len(idx) else h.new_zeros(len(h))
            out.append(-(d2 - p) / (2 * p) ** 0.5)
        return torch.stack(out, 1)

    def install(self, net):
        """The network to route with: ``net`` itself (statistics add no units)."""
        return net

    # ---- checkpoint ----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"kind": "feature-statistics", "shared": self.shared, "num_features": self.num_features,
                "shrinkage": self.shrinkage, "rule": self.rule, "layers": [list(layer) for layer in self.layers]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    @classmethod
    def restore(cls, description: dict, tensors: dict[str, torch.Tensor]) -> "FeatureStatistics":
        """Inverse of :meth:`describe` and :meth:`tensors`.

        Raises:
            CheckpointError: a tensor is missing or does not fit.
        """
        try:
            stats = cls(bool(description["shared"]), int(description["num_features"]), float(description["shrinkage"]),
                        [(n, w) for n, w in description.get("layers", [])])
            stats.rule = str(description.get("rule", "chain"))
            for name in ("means", "class_task", "scatter", "dof", "owner"):
                setattr(stats, name, tensors[name].clone())
            K, d = stats.means.shape
            T = len(stats.dof)
            ok = (len(stats.class_task) == K and (stats.scatter.shape == (d, d) if stats.shared
                                                   else stats.scatter.shape == (T, d, d))
                  and len(stats.owner) == (d if stats.shared else 0))
        except (KeyError, TypeError, ValueError, ConfigError, AttributeError) as exc:
            raise CheckpointError(f"the saved feature statistics are incomplete ({type(exc).__name__}: {exc})") from None
        if not ok:
            raise CheckpointError("the saved feature statistics do not fit together: means "
                                  f"{tuple(stats.means.shape)}, scatter {tuple(stats.scatter.shape)}, "
                                  f"{T} tasks, owner {tuple(stats.owner.shape)}")
        return stats

    def to(self, *args, **kwargs):  # statistics stay on the CPU in float64 (scores are moved there)
        return self
