"""Training throughput (samples/second) of one process against data-parallel processes launched
by torchrun, measured side by side in one run.

The script launches itself once per configuration and round, alternating the configurations so
that machine noise hits all alike: ``torchrun --nproc_per_node=P`` with T threads per process.
Each launch trains task 0 of the benchmark with plain fine-tuning through the trainer's own
``TaskSession`` (DDP when P > 1): one warm-up epoch, then ``--epochs`` timed epochs at the same
global batch. It prints the median samples/second of each configuration and the ratio to one
process with one thread.

    python benchmarks/ddp_throughput.py [--benchmark split-mnist --model mlp --hidden 400,400]
        [--configs 1x1,1x2,2x1] [--rounds 3] [--epochs 2] [--batch-size 64] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    from sparsecl import distributed
    from sparsecl.data import load_benchmark
    from sparsecl.methods import Finetune
    from sparsecl.models import build
    from sparsecl.network import ContinualNetwork
    from sparsecl.trainer import TaskSession, TrainConfig

    torch.set_num_threads(args.threads)
    world, device = distributed.init_from_env("cpu", "gloo")
    options = {"max_train_per_task": args.max_train} if args.max_train else {}
    bench = load_benchmark(args.benchmark, data_root=args.data_root, num_tasks=1, seed=0, **options)
    task = bench.tasks[0]
    model_options = {"hidden": tuple(int(w) for w in args.hidden.split(","))} if args.model == "mlp" else {}
    torch.manual_seed(0)
    net = ContinualNetwork(build(args.model, bench.input_shape, task.num_classes, **model_options))
    net.add_head(task.num_classes)
    method = Finetune()
    method.setup(net)
    session = TaskSession(net, method, 0, [task], TrainConfig(epochs=1, batch_size=args.batch_size), None, world)
    session.train_epoch()  # warm-up
    start = time.perf_counter()
    for _ in range(args.epochs):
        session.train_epoch()
    seconds = time.perf_counter() - start
    if world is None or world.is_main:
        print(json.dumps({"samples_per_second": args.epochs * len(task.train_y) / seconds,
                          "train_samples": len(task.train_y)}))
    distributed.shutdown(world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="split-mnist")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--hidden", default="400,400", help="--model mlp: hidden widths")
    parser.add_argument("--max-train", type=int, default=0, help="training samples of the task (0: all)")
    parser.add_argument("--configs", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--data-root", default=os.environ.get("SPARSECL_DATA"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    results: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for procs, threads in configs:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   __file__, *sys.argv[1:], "--worker", "--threads", str(threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
            results[(procs, threads)].append(json.loads(line)["samples_per_second"])
            print(f"round {r + 1}: {procs} process(es) x {threads} thread(s): "
                  f"{results[(procs, threads)][-1]:.0f} samples/s", file=sys.stderr)
    base = statistics.median(results[configs[0]])
    print(f"{args.benchmark}, {args.model}, global batch {args.batch_size}, {args.epochs} epochs, "
          f"median of {args.rounds} rounds")
    print("| processes | threads each | samples/s | vs first row |")
    print("|---:|---:|---:|---:|")
    for c in configs:
        med = statistics.median(results[c])
        print(f"| {c[0]} | {c[1]} | {med:.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
