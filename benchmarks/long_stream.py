"""Seconds per task over a long Permuted-MNIST stream: does a task cost more late in the stream?

After task t the trainer re-evaluates the earlier tasks (``--eval-every K``: after every K-th
task only; always after the last) and checks every earlier task's probe logits bit for bit. This
script runs the stream with each method and each ``--eval-every`` value given, one run after
another in this process, and prints per run the seconds of the first and the last tasks
(``--window`` tasks averaged at each end, the first window from task 1: task 0 carries start-up
costs), split into training (the epochs of every phase, from the run history), evaluation (the
accuracy matrix's row and the probe check) and the rest (pruning, scoring, the method's
bookkeeping), then the last/first ratios. With ``PYTHONPATH`` pointing at an older source tree
(before ``eval_every``), it measures that tree with ``--eval-every 1`` (evaluation not split out).

    python benchmarks/long_stream.py [--data-root DIR] [--tasks 50] [--methods packnet,eidetic]
        [--eval-every 1,10] [--hidden 100,100] [--json OUT.json]

Defaults: MLP 784-100-100, 1,000 training images (10% held out for validation) and 500 test
images per task, 1 epoch, batch 10, Adam lr 1e-3 (WSN's Permuted-MNIST batch); PackNet keeps shares of the capacity
(``--shares`` = the number of tasks: each task owns about 1/T of each layer) with 1 retraining
epoch; EideticNets scores by L2 norm with the bisect search, patience 1, 1 recovery epoch,
tolerance 5%, and ``reuse_full`` (a layer with no free unit is reused frozen by the later tasks).
The machine's load average is printed before and after: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sparsecl.data.benchmarks import permuted_mnist
from sparsecl.methods import EideticConfig, EideticNets, PackNet, PackNetConfig
from sparsecl.models import mlp
from sparsecl.trainer import TrainConfig, Trainer


def make_method(name: str, tasks: int):
    if name == "packnet":
        return PackNet(PackNetConfig(shares=tasks, retrain_epochs=1))
    if name == "eidetic":
        return EideticNets(EideticConfig(score="l2", patience=1, recovery_epochs=1, tolerance=0.05,
                                         reuse_full=True))
    raise SystemExit(f"--methods: unknown method '{name}' (packnet, eidetic)")


def run(method_name: str, eval_every: int, args, hidden: tuple[int, ...]) -> dict:
    bench = permuted_mnist(args.data_root, num_tasks=args.tasks, max_train_per_task=args.max_train_per_task,
                           max_test_per_task=args.max_test_per_task)
    # eval_every only when asked: the script also runs on a source tree older than the option (PYTHONPATH)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         **({"eval_every": eval_every} if eval_every != 1 else {}))
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    result = Trainer(make_method(method_name, args.tasks), config).fit(mlp((1, 28, 28), hidden, 10), bench)
    seconds = time.perf_counter() - start
    train = [0.0] * args.tasks
    for row in result.history:
        if row.phase != "theta-scan":  # epochs that trained (a θ scan row only measures)
            train[row.task] += row.seconds
    # NaN where the tree does not time its evaluation (older trees): "rest" then includes it
    evaluation = getattr(result, "eval_seconds_per_task", None) or [float("nan")] * args.tasks
    rest = [total - tr - (0.0 if ev != ev else ev) for total, tr, ev in zip(result.seconds_per_task, train, evaluation)]
    sets = [sum(a is not None for a in row) for row in result.accuracy_matrix]  # test sets evaluated per task
    return {"method": method_name, "eval_every": eval_every, "seconds": seconds, "acc": result.acc,
            "bwt": result.bwt, "max_logit_change": result.max_logit_change,
            "total": result.seconds_per_task, "train": train, "eval": evaluation, "rest": rest,
            "eval_per_set": [ev / n for ev, n in zip(evaluation, sets)], "sets": sets,
            "capacity": {name: used[-1] for name, used in result.capacity.items()},
            "cells_measured": sum(sets)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=os.environ.get("SPARSECL_DATA"))
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--methods", default="packnet,eidetic")
    p.add_argument("--eval-every", default="1,10", help="comma-separated values, one run each")
    p.add_argument("--hidden", default="100,100")
    p.add_argument("--max-train-per-task", type=int, default=1000)
    p.add_argument("--max-test-per-task", type=int, default=500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", type=int, default=5, help="tasks averaged at each end of the stream")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write every run's per-task seconds here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = tuple(int(w) for w in args.hidden.split(","))
    w = max(1, min(args.window, (args.tasks - 1) // 2))
    import sparsecl

    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}; "
          f"sparsecl from {os.path.dirname(sparsecl.__file__)}")
    print(f"Permuted MNIST, {args.tasks} tasks, MLP 784-{'-'.join(map(str, hidden))}, {args.max_train_per_task} "
          f"train / {args.max_test_per_task} test images per task, {args.epochs} epoch(s)")
    runs = []
    for name in args.methods.split(","):
        for k in (int(v) for v in args.eval_every.split(",")):
            r = run(name, k, args, hidden)
            runs.append(r)
            # the first window starts at task 1: task 0 carries one-time start-up costs (first passes, allocations)
            parts = ("total", "train", "rest", "eval", "eval_per_set")
            first = {part: mean(r[part][1:w + 1]) for part in parts}
            last = {part: mean(r[part][-w:]) for part in parts}
            print(f"\n{name}, --eval-every {k}: {r['seconds']:.1f} s in all, ACC {100 * r['acc']:.2f}%, "
                  f"max logit change {r['max_logit_change']:g}, {r['cells_measured']} cells of the matrix measured, "
                  f"capacity in use {r['capacity']}")
            print(f"  seconds per task    {'total':>8} {'train':>8} {'rest':>8} {'eval':>8} {'eval/set':>8}")
            for label, values in ((f"tasks 1..{w}", first), (f"last {w} tasks", last)):
                print(f"  {label:<18} " + " ".join(f"{values[part]:8.3f}" for part in parts))
            print("  last/first         " + " ".join(
                f"{last[part] / first[part]:8.2f}" if first[part] > 0 else "     n/a"  # NaN > 0 is False
                for part in parts))
            plain = [t for t in range(1, args.tasks - 1) if r["sets"][t] == 1]  # no re-evaluation of earlier tasks
            if plain and len(plain) < args.tasks - 2:
                print(f"  tasks evaluating only themselves: {r['total'][plain[0]]:.3f} s "
                      f"(task {plain[0]}) ... {r['total'][plain[-1]]:.3f} s (task {plain[-1]}), mean "
                      f"{mean([r['total'][t] for t in plain]):.3f} s over {len(plain)}")
            print(f"  the last task alone: {r['total'][-1]:.3f} s (eval {r['eval'][-1]:.3f} s: {r['sets'][-1]} test sets "
                  "and the probe check)")
    print(f"\nload average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
