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

Steps alternate in small blocks so that machine noise hits every side alike; the script prints
the medians and each engine/plain ratio. ``--method`` takes a comma-separated list (or ``all``:
the four weight-level methods), measured side by side in one run against one plain model.
``--fused`` builds every side's Adam with ``fused=True`` (one kernel per parameter instead of
seven elementwise passes; what the ratios would be if the trainer did so).

    python benchmarks/step_time.py [--method eidetic|packnet,wsn,...|all] [--model mlp] [--steps 200]
                                   [--hidden 2000,2000] [--batch-size 256] [--fused]
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
    parser.add_argument("--method", default="eidetic",
                        help=f"eidetic, one of {', '.join(WEIGHT_LEVEL)}, a comma-separated list, or all")
    parser.add_argument("--model", choices=tuple(SHAPES), default="mlp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=5, help="steps per side before switching")
    parser.add_argument("--hidden", default="2000,2000", help="the MLP's hidden widths")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fused", action="store_true", help="Adam with fused=True on every side")
    args = parser.parse_args()
    methods = list(WEIGHT_LEVEL) if args.method == "all" else args.method.split(",")
    for name in methods:
        if name not in ("eidetic", *WEIGHT_LEVEL):
            parser.error(f"--method: unknown method '{name}' (expected eidetic, {', '.join(WEIGHT_LEVEL)} or all)")
    shape, classes = SHAPES[args.model], 10
    options = {"hidden": tuple(int(h) for h in args.hidden.split(","))} if args.model == "mlp" else {}
    model = lambda: build(args.model, shape, classes, **options)  # noqa: E731
    torch.manual_seed(0)
    if args.fused:
        config = TrainConfig(optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, fused=True), lr=1e-3)
    else:
        config = TrainConfig(optimizer="adam", lr=1e-3)

    plain = model()
    plain_opt = make_optimizer(list(plain.parameters()), config)
    plain.train()
    x = torch.rand(args.batch_size, *shape)
    y = torch.randint(0, classes, (args.batch_size,))
    tasks = torch.ones(args.batch_size, dtype=torch.long)
    sides = {"plain": (lambda: plain_step(plain, plain_opt, x, y), "plain PyTorch")}
    for name in methods:
        net = ContinualNetwork(model())
        if name == "eidetic":
            method = eidetic_second_task(net, random_task(0, shape, classes, 1))
            what = "EideticNets, task 1, 50% of units frozen"
        else:
            method, owned = learned_second_task(name, net, shape, classes, args.batch_size)
            what = f"{name}, task 1, default hyperparameters, {owned:.0%} of the weights owned by task 0"
        engine_opt = make_optimizer(list(method.parameters(net, 1)), config)  # as the trainer builds it
        net.train()
        sides[name] = (lambda net=net, method=method, opt=engine_opt: training_step(net, method, opt, x, y, tasks),
                       what)
    for _ in range(10):  # warm-up
        for fn, _ in sides.values():
            fn()
    times: dict[str, list[float]] = {side: [] for side in sides}
    done = 0
    while done < args.steps:
        for side, (fn, _) in sides.items():
            for _ in range(args.block):
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
        done += args.block
    medians = {side: statistics.median(ts) for side, ts in times.items()}
    arch = f"MLP 784-{args.hidden.replace(',', '-')}-10" if args.model == "mlp" else args.model
    adam = "Adam (fused)" if args.fused else "Adam"
    print(f"{arch}, batch {args.batch_size}, {adam}, {args.steps} steps per side, {torch.get_num_threads()} threads")
    for side, (_, what) in sides.items():
        label = "plain PyTorch" if side == "plain" else f"sparsecl {side}"
        print(f"{label:22s} median step {1000 * medians[side]:8.2f} ms  ({what})")
    for side in methods:
        print(f"ratio engine/plain {side}: {medians[side] / medians['plain']:.3f}")


if __name__ == "__main__":
    main()
