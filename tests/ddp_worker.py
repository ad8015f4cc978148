"""Launched by ``torchrun`` from tests/test_distributed.py (not collected by pytest).

``python ddp_worker.py OUT_DIR DATA_ROOT MODE``: trains on a Split MNIST subset with the library
API under DDP (gloo) and writes what each rank holds to ``OUT_DIR/rank{r}.safetensors`` (the
network, the ledger) and ``OUT_DIR/rank{r}.json`` (the result and sharded-vs-whole accuracy
checks), so that the test compares the ranks itself, independently of the trainer's checksum.

MODE ``train``: EideticNets; ``wsn``, ``dst``: the weight-level methods (scores and drop/regrow
under DDP), with AdamW weight decay; ``tinysubnets`` (pruning and k-means decided on every rank); ``diverge``: a method whose rank 1 gives one extra unit
away, which the trainer's cross-rank check must refuse.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsecl import distributed
from sparsecl.data import load_benchmark
from sparsecl.methods import (DST, WSN, DSTConfig, EideticConfig, EideticNets, TinySubNets, TinySubNetsConfig,
                              WSNConfig)
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer, accuracy

BENCH = dict(max_train_per_task=600, max_test_per_task=301, seed=0, num_tasks=3)  # 301: odd shards
CONFIG = dict(epochs=2, batch_size=32, lr=1e-3, seed=0)


class DivergingEidetic(EideticNets):
    """EideticNets whose rank 1 gives one more unit away after task 0: a divergence to catch."""

    def end_task(self, session) -> None:
        super().end_task(session)
        if session.world.rank == 1 and session.t == 0:
            owner = next(iter(self.ledger.owner.values()))
            owner[(owner == -1).nonzero()[0]] = 0


def main(out: Path, data_root: str, mode: str) -> None:
    torch.set_num_threads(1)
    world, device = distributed.init_from_env("cpu", "gloo")
    assert world is not None and world.size == 2, "launch with torchrun --nproc_per_node=2"
    bench = load_benchmark("split-mnist", data_root=data_root, **BENCH)
    config = TrainConfig(**CONFIG)
    if mode == "wsn":
        method = WSN(WSNConfig(density=0.3))
        config = TrainConfig(**{**CONFIG, "optimizer": "adamw", "weight_decay": 0.05})
    elif mode == "tinysubnets":
        method = TinySubNets(TinySubNetsConfig(density=0.3, prune_rounds=2, max_levels=16))
    elif mode == "dst":
        method = DST(DSTConfig(sparsity=0.7, update_interval=5, growth="momentum"))
        config = TrainConfig(**{**CONFIG, "optimizer": "adamw", "weight_decay": 0.05})
    else:
        cls = DivergingEidetic if mode == "diverge" else EideticNets
        method = cls(EideticConfig(score="taylor", patience=2, prune_step=0.2, tolerance=0.01))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((1, 28, 28), (64, 64), 2))  # trained in place
    result = Trainer(method, config, world).fit(net, bench)
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}  # weight-level ledger and masks
    tensors.update({f"method.{k}": v.contiguous() for k, v in method.state()[0].items()})  # unit ledger, scores
    save_file(tensors, str(out / f"rank{world.rank}.safetensors"))
    task = bench.tasks[0]
    sharded = accuracy(net, task.test_x, task.test_y, 0, 64, device, task.prepare, world)
    whole = accuracy(net, task.test_x, task.test_y, 0, 64, device, task.prepare)
    (out / f"rank{world.rank}.json").write_text(json.dumps(
        {"acc": result.acc, "max_logit_change": result.max_logit_change, "matrix": result.accuracy_matrix,
         "sharded_accuracy": sharded, "whole_accuracy": whole, "test_samples": len(task.test_y)}))
    distributed.shutdown(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
