"""Median training-step time of the sparsecl engine over plain PyTorch, measured side by side.

Both sides train the same model with Adam on random data of the benchmark's input shape: the MLP
784-2000-2000-10 at batch 256 (MNIST's shape) by default, or ``--model alexnet-like`` (CIFAR's
shape, 10 classes per task). The plain side is the bare model with its optimizer. The engine side
is a ContinualNetwork in its *second* task under ``--method``, so that the step includes the
method's work with a first task frozen:

- ``eidetic`` (default): half of every hidden layer frozen by the first task (set directly), the
  freezer restoring the frozen entries after each optimizer step; the forward is dense.
- ``packnet``, ``wsn``, ``dst``, ``tinysubnets``: the first task is learned on random data through
  the ``Trainer`` with the method's default hyperparameters and one training epoch (plus what the
  method adds: PackNet's pruning and retraining, TinySubNets' pruning and quantization), so that
  PackNet keeps 25% of each layer, WSN and TinySubNets a mask of c = 0.5, DST a mask at 80%
  sparsity. Then the second task begins as the trainer begins it: the step includes the masked
  forward and the method's ``before_step``/``after_step`` hooks. DST's mask update (every ΔT =
  400 steps by default) does not happen within the timed steps: what is timed is the step
  between updates.

Steps alternate in small blocks so that machine noise hits both sides alike; the script prints
both medians and their ratio.

    python benchmarks/step_time.py [--method eidetic] [--model mlp] [--steps 200] [--hidden 2000,2000]
                                   [--batch-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sparsecl.data.types import Benchmark, TaskData
from sparsecl.methods import METHODS, EideticNets
from sparsecl.models import build
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer, make_optimizer, training_step

WEIGHT_LEVEL = ("packnet", "wsn", "dst", "tinysubnets")
SHAPES = {"mlp": (1, 28, 28), "alexnet-like": (3, 32, 32)}


def plain_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def random_task(t: int, shape: tuple[int, ...], classes: int, n: int) -> TaskData:
    x = lambda: torch.rand(n, *shape)  # noqa: E731
    y = lambda: torch.randint(0, classes, (n,))  # noqa: E731
    return TaskData(t, f"random-{t}", tuple(range(classes)), x(), y(), x(), y(), x(), y())


def eidetic_second_task(net: ContinualNetwork, task: TaskData) -> EideticNets:
    """EideticNets in task 1 with the first half of every hidden layer frozen by task 0."""
    method = EideticNets()
    method.setup(net)
    net.add_head(task.num_classes)
    method.begin_task(net, 0, task)
    for name in net.graph.layers:
        n = len(method.pruned[name])
        method.pruned[name][n // 2:] = True
    method.freeze(net, 0)
    net.add_head(task.num_classes)
    method.begin_task(net, 1, task)
    return method


def learned_second_task(name: str, net: ContinualNetwork, shape, classes: int, batch_size: int):
    """``name``'s method after learning task 0 (random data, one training epoch), in task 1; also the
    fraction of the weights task 0 owns, mean over layers."""
    method_cls, config_cls = METHODS[name]
    method = method_cls(config_cls() if config_cls else None)
    first = random_task(0, shape, classes, 4 * batch_size)
    bench = Benchmark("random", [first], shape)
    result = Trainer(method, TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, progress=False)).fit(net, bench)
    second = random_task(1, shape, classes, batch_size)
    net.add_head(classes)
    method.begin_task(net, 1, second)
    return method, statistics.mean(used[-1] for used in result.capacity.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("eidetic", *WEIGHT_LEVEL), default="eidetic")
    parser.add_argument("--model", choices=tuple(SHAPES), default="mlp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=5, help="steps per side before switching")
    parser.add_argument("--hidden", default="2000,2000", help="the MLP's hidden widths")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    shape, classes = SHAPES[args.model], 10
    options = {"hidden": tuple(int(h) for h in args.hidden.split(","))} if args.model == "mlp" else {}
    model = lambda: build(args.model, shape, classes, **options)  # noqa: E731
    torch.manual_seed(0)
    config = TrainConfig(optimizer="adam", lr=1e-3)

    plain = model()
    plain_opt = make_optimizer(list(plain.parameters()), config)

    net = ContinualNetwork(model())
    if args.method == "eidetic":
        method = eidetic_second_task(net, random_task(0, shape, classes, 1))
        what = "EideticNets, task 1, 50% of units frozen"
    else:
        method, owned = learned_second_task(args.method, net, shape, classes, args.batch_size)
        what = f"{args.method}, task 1, default hyperparameters, {owned:.0%} of the weights owned by task 0"
    engine_opt = make_optimizer(list(method.parameters(net, 1)), config)  # as the trainer builds it
    net.train()
    plain.train()

    x = torch.rand(args.batch_size, *shape)
    y = torch.randint(0, classes, (args.batch_size,))
    tasks = torch.ones(args.batch_size, dtype=torch.long)
    run_plain = lambda: plain_step(plain, plain_opt, x, y)  # noqa: E731
    run_engine = lambda: training_step(net, method, engine_opt, x, y, tasks)  # noqa: E731
    for _ in range(10):  # warm-up
        run_plain()
        run_engine()
    times = {"plain": [], "engine": []}
    done = 0
    while done < args.steps:
        for side, fn in (("plain", run_plain), ("engine", run_engine)):
            for _ in range(args.block):
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
        done += args.block
    p, e = statistics.median(times["plain"]), statistics.median(times["engine"])
    arch = f"MLP 784-{args.hidden.replace(',', '-')}-10" if args.model == "mlp" else args.model
    print(f"{arch}, batch {args.batch_size}, Adam, {args.steps} steps per side, {torch.get_num_threads()} threads")
    print(f"plain PyTorch  median step {1000 * p:.2f} ms")
    print(f"sparsecl       median step {1000 * e:.2f} ms  ({what})")
    print(f"ratio engine/plain: {e / p:.3f}")


if __name__ == "__main__":
    main()
