"""CLNP's θ scan: the cached evaluation against the plain one, side by side on one trained model.

Trains CLNP's first Permuted-MNIST task once (MLP 784-2000-2000, the paper's α, Adam, batch 256;
``--epochs`` and ``--max-train-per-task`` bound the cost), then runs the θ scan of that model in
every mode — one θ or one per layer, ``first-fail`` or ``full`` — with ``--theta-eval plain``
(prune the weights, measure the validation split, roll back) and ``cached`` (masked reads, the
layers a threshold cannot change computed once), alternating, and prints the seconds of each,
their ratio and the θ each found (they must be equal; the script stops if not). Both include the
scan's activation-score pass over the training set, the same in both, also timed on its own.

    python benchmarks/clnp_scan_time.py [--data-root DIR] [--epochs 3] [--max-train-per-task 10000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sparsecl.data.benchmarks import permuted_mnist
from sparsecl.methods import CLNP, CLNPConfig
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.scoring import activation_scores
from sparsecl.trainer import TaskSession, TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=os.environ.get("SPARSECL_DATA"))
    p.add_argument("--hidden", default="2000,2000")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-per-task", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--alpha", default="1e-7,1e-5,1e-6")
    p.add_argument("--margin", type=float, default=0.0005)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    bench = permuted_mnist(args.data_root, num_tasks=1, seed=args.seed, permute_first=True,
                           max_train_per_task=args.max_train_per_task)
    torch.manual_seed(args.seed)
    net = ContinualNetwork(mlp((1, 28, 28), tuple(int(h) for h in args.hidden.split(",")), 10), single_head=True)
    method = CLNP(CLNPConfig(alpha=args.alpha, margin=args.margin))
    method.setup(net)
    net.add_head(10)
    method.begin_task(net, 0, bench.tasks[0])
    session = TaskSession(net, method, 0, bench.tasks, TrainConfig(epochs=args.epochs, batch_size=256, lr=args.lr,
                                                                   seed=args.seed), None)
    start = time.perf_counter()
    method.train_task(session)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.1f}")
    unpruned = method._runs[0]["val_accuracy"]
    floor = unpruned - args.margin
    start = time.perf_counter()
    activation_scores(net, (x for x, _, _ in session.batches(shuffle=False, batch_size=1024)))
    scoring = time.perf_counter() - start
    print(f"validation accuracy {unpruned:.4f}, floor {floor:.4f}; activation scores of the training set: "
          f"{scoring:.1f} s (in every scan below)")
    print("| scan | plain s | cached s | plain / cached | θ | units kept |")
    print("|---|---|---|---|---|---|")
    for per_layer in (False, True):
        for scan in ("first-fail", "full"):
            seconds, found = {"plain": [], "cached": []}, {}
            for _ in range(args.repeats):
                for kind in ("plain", "cached"):
                    method.config.theta_per_layer, method.config.theta_scan = per_layer, scan
                    method.config.theta_eval = kind
                    start = time.perf_counter()
                    theta, units, acc = method._scan(session, floor, unpruned)
                    seconds[kind].append(time.perf_counter() - start)
                    found[kind] = (theta, {n: int((method.candidates(n) & ~u).sum()) for n, u in units.items()}, acc)
            if found["plain"] != found["cached"]:
                raise SystemExit(f"the scans disagree: plain {found['plain']}, cached {found['cached']}")
            plain, cached = min(seconds["plain"]), min(seconds["cached"])
            ratio = plain / cached
            theta, kept, _ = found["plain"]
            print(f"| {'per layer' if per_layer else 'one θ'}, {scan} | {plain:.1f} | {cached:.1f} | "
                  f"{ratio:.1f} | {theta} | {kept} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
