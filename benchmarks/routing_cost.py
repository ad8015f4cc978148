"""Cost per test sample of task-agnostic routing against the task-id forward pass, side by side
on one trained network.

A weight-level method (WSN, PackNet, DST, TinySubNets) has no shared feature pass: routing runs
every task's subnetwork on the whole batch (a loop over the T tasks, batched over samples), so it
costs about T task-id forwards plus the router's scoring. A neuron-level method (EideticNets)
routes with one body pass and T heads. Prints microseconds per sample and the ratio to the
task-id forward, for entropy and lda routing.

    python benchmarks/routing_cost.py --method wsn --tasks 5 --device cpu
    python benchmarks/routing_cost.py --method eidetic
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsecl.data import load_benchmark
from sparsecl.methods import WSN, EideticConfig, EideticNets, PackNet, PackNetConfig, WSNConfig
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.routing import common_prepare, route, task_outputs, update_statistics
from sparsecl.trainer import TrainConfig, Trainer


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("wsn", "packnet", "eidetic"), default="wsn")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1024, help="test batch size")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()

    bench = load_benchmark("split-mnist", data_root=args.data_root, num_tasks=args.tasks,
                           max_train_per_task=args.train_per_task, seed=0)
    method = {"wsn": lambda: WSN(WSNConfig(density=0.5)),
              "packnet": lambda: PackNet(PackNetConfig(retrain_epochs=1)),
              "eidetic": lambda: EideticNets(EideticConfig(patience=1, prune_step=0.2))}[args.method]()
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((1, 28, 28), (400, 400), 2))
    Trainer(method, TrainConfig(epochs=1, batch_size=64, device=args.device)).fit(net, bench)
    net.eval()
    stats = update_statistics(net, bench.tasks, method=method, device=args.device)
    x = torch.cat([t.test_x for t in bench.tasks])[: args.batch].to(args.device)
    x = common_prepare(bench.tasks)(x)

    with torch.no_grad():
        base = _time(lambda: net(x, 0), args.repeats)
        rows = [("task-id forward (one task)", base)]
        for mode, router in (("entropy", None), ("lda", stats)):
            def routed(mode=mode, router=router):
                h, logits = task_outputs(net, x, router)
                return route(h, logits, mode, router)
            rows.append((f"routed, {mode}", _time(routed, args.repeats)))
    print(f"{args.method}, {args.tasks} tasks, batch {len(x)}, device {args.device}")
    for name, seconds in rows:
        print(f"  {name:28s} {1e6 * seconds / len(x):9.2f} us/sample   x{seconds / base:6.2f}")


if __name__ == "__main__":
    main()
