"""TinySubNets (paper 003: "TinySubNets: An efficient and low capacity continual learning
strategy", arXiv 2412.10869; DESIGN §5): a WSN subnetwork per task that shares earlier tasks'
frozen weights, then, with the subnetwork fixed,

1. adaptive pruning of the task's *new* weights: for a bounded number of rounds, drop the
   ``prune_fraction`` smallest new weights of a randomly chosen layer and revert the round if
   validation accuracy falls more than ``prune_tolerance`` below its value before pruning;
2. adaptive quantization of the task's new weights: per layer, a k-means codebook
   (scikit-learn) with the fewest levels in ``2, 4, …, max_levels`` that keeps validation accuracy
   within ``quant_margin`` of its value after pruning (layers in order, each with the earlier
   ones already quantized, so the final accuracy respects the margin too); a layer that no
   level count satisfies keeps float32 weights.

Weights shared with earlier tasks are never re-quantized (the reference code does, which silently
changes old tasks): only weights no task owns are pruned or quantized, and they become the task's
when it ends. ``sparsecl.compact`` writes the result as codebook indices, codebooks and
entropy-coded masks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ..compact import compact_payload
from ..errors import ConfigError
from .base import config_field as _opt
from .wsn import WSN, WSNConfig, top_fraction

log = logging.getLogger(__name__)

KMEANS_SAMPLE = 100_000  # k-means is fitted on at most this many of a layer's new weights


@dataclass
class TinySubNetsConfig(WSNConfig):
    """TinySubNets hyperparameters (``density`` is WSN's c). Defaults from DESIGN §5: drop 20% of
    a random layer's smallest new weights per round, revert above a 0.2-point drop; the paper's
    usual point is 16 levels (4-bit indices), here the fewest levels within the margin."""

    prune_rounds: int = _opt("rounds of adaptive pruning of the task's new weights", default=10)
    prune_fraction: float = _opt("fraction of a random layer's smallest new weights dropped per round", default=0.2)
    prune_tolerance: float = _opt("revert a pruning round when validation accuracy falls more than this below "
                                  "its value before pruning (a fraction: 0.002 = 0.2 points)", default=0.002)
    quant_margin: float = _opt("quantize each layer's new weights with the fewest k-means levels that keep "
                               "validation accuracy within this of its value after pruning (a fraction)",
                               default=0.002)
    max_levels: int = _opt("most codebook levels tried per layer and task (a power of two, 2..65536)", default=256)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_rounds < 0:
            raise ConfigError(f"--prune-rounds must be >= 0, got {self.prune_rounds}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ConfigError(f"--prune-fraction must be in (0, 1), got {self.prune_fraction}")
        for name in ("prune_tolerance", "quant_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.max_levels < 2 or self.max_levels > 65536 or self.max_levels & (self.max_levels - 1):
            raise ConfigError(f"--max-levels must be a power of two in 2..65536, got {self.max_levels}")

    @property
    def levels(self) -> list[int]:
        return [2 ** b for b in range(1, int(math.log2(self.max_levels)) + 1)]


def kmeans_codebook(values: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    """Sorted float32 codebook ``(≤ levels,)`` of 1-D ``values`` by k-means (scikit-learn,
    fitted on at most ``KMEANS_SAMPLE`` values drawn with ``seed``); with at most ``levels``
    distinct values, the values themselves."""
    flat = values.detach().float().cpu().flatten()
    distinct = torch.unique(flat)
    if len(distinct) <= levels:
        return distinct
    from sklearn.cluster import KMeans  # here, not at import: scikit-learn costs seconds at start-up

    rng = np.random.default_rng(seed)
    data = flat.numpy()
    if len(data) > KMEANS_SAMPLE:
        data = data[rng.choice(len(data), KMEANS_SAMPLE, replace=False)]
    # one OpenMP thread: scikit-learn sums the Lloyd steps' partial results per thread, so the
    # codebook (and every later task) would depend on the machine's thread count
    with threadpool_limits(1, user_api="openmp"):
        km = KMeans(n_clusters=levels, n_init=1, random_state=int(rng.integers(2**31 - 1))).fit(data.reshape(-1, 1))
    return torch.unique(torch.from_numpy(km.cluster_centers_.astype(np.float32).flatten()))


def quantize(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each of ``values`` replaced by its nearest entry of the sorted ``codebook`` (same shape
    and device as ``values``; midpoints in float64, so that a value equal to an entry maps to it
    even when two entries are adjacent floats)."""
    cb = codebook.to(values.device, values.dtype)
    if len(cb) == 1:
        return cb.expand_as(values).clone()
    wide = cb.double()
    mids = (wide[1:] + wide[:-1]) / 2
    return cb[torch.bucketize(values.double(), mids)]


class TinySubNets(WSN):
    name = "tinysubnets"

    def __init__(self, config: TinySubNetsConfig | None = None):
        super().__init__(config or TinySubNetsConfig())
        self.final: list[torch.Tensor] | None = None

    def start_task(self, net, t: int) -> None:
        self.final = None

    def effective(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        if self.final is not None:  # the subnetwork is fixed: pruning and quantization measure it
            return torch.where(self.final[i], weight, 0.0)
        return super().effective(i, weight)

    def train_task(self, session) -> None:
        if len(session.task.val_y) == 0:
            raise ConfigError("tinysubnets measures validation accuracy to prune and quantize: "
                              "--val-fraction must be above 0")
        super().train_task(session)
        t = session.t
        self.final = [top_fraction(s, self.config.density) for s in self.scores]
        entry = {"task": t, "val_accuracy": session.accuracy("val")}
        entry["pruning"] = self._prune(session)
        entry["val_accuracy_pruned"] = session.accuracy("val")
        entry["quantization"] = self._quantize(session, entry["val_accuracy_pruned"])
        entry["val_accuracy_quantized"] = session.accuracy("val")
        self._task_entry = entry

    @torch.no_grad()
    def _prune(self, session) -> list[dict]:
        cfg, net = self.config, session.net
        base = session.accuracy("val")
        rounds = []
        for _ in range(cfg.prune_rounds):
            # layers with at least one new weight to drop
            layers = [i for i, m in enumerate(self.final)
                      if math.floor(cfg.prune_fraction * int((m & self.free(net, i)).sum())) > 0]
            if not layers:
                break
            i = layers[int(torch.randint(len(layers), ()))]  # the global RNG: identical on every DDP rank
            w, new = self.weight(net, i), self.final[i] & self.free(net, i)
            k = math.floor(cfg.prune_fraction * int(new.sum()))
            drop = self.smallest(w, new, k)
            self.final[i] &= ~drop
            acc = session.accuracy("val")
            kept = acc >= base - cfg.prune_tolerance
            if not kept:
                self.final[i] |= drop
            rounds.append({"layer": net.subnetworks.layers[i], "dropped": k, "val_accuracy": acc, "kept": kept})
        return rounds

    @torch.no_grad()
    def _quantize(self, session, reference: float) -> list[dict]:
        cfg, net, t = self.config, session.net, session.t
        out = []
        for i, name in enumerate(net.subnetworks.layers):
            w, new = self.weight(net, i), self.final[i] & self.free(net, i)
            if not new.any():
                continue
            original = w[new].clone()
            tried = []
            for levels in cfg.levels:
                seed = int(torch.randint(2**31 - 1, ()))  # from the run's seed, the same on every DDP rank
                codebook = kmeans_codebook(original, levels, seed=seed)
                w[new] = quantize(original, codebook)
                acc = session.accuracy("val")
                tried.append({"levels": levels, "val_accuracy": acc})
                if acc >= reference - cfg.quant_margin:
                    self.codebooks[(t, i)] = codebook
                    break
            else:
                w[new] = original  # no level count within the margin: the layer keeps float32
                log.info("task %d: layer '%s' keeps float32 weights (no codebook within the margin)", t, name)
            out.append({"layer": name, "weights": int(new.sum()), "tried": tried,
                        "levels": len(self.codebooks[(t, i)]) if (t, i) in self.codebooks else None})
        return out

    def used(self, net, t: int) -> list[torch.Tensor]:
        used, self.final = self.final, None
        return used

    def task_log(self, net, t: int) -> dict:
        return self._task_entry

    def storage(self, net) -> dict[str, float]:
        """WSN's mask figures, plus the bits per parameter of the compact model
        (``sparsecl.compact``, what ``sparsecl export --compact`` writes) against a dense float32
        model: ``compact`` for every task so far, ``compact_task`` for the last task alone."""
        bits = compact_payload(net, self.codebooks).bits_per_parameter()
        return {**super().storage(net), "compact": bits["total"], "compact_task": bits["per_task"][-1]}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        tensors.update({f"codebook.{t}.{i}": cb for (t, i), cb in self.codebooks.items()})
        return tensors, meta

    def load_state(self, net, tensors, meta) -> None:
        super().load_state(net, tensors, meta)
        self.codebooks = {}
        for key, cb in tensors.items():
            if key.startswith("codebook."):
                _, t, i = key.split(".")
                self.codebooks[(int(t), int(i))] = cb
