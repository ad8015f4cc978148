"""Every task-agnostic routing mode on one trained run, side by side: routed accuracy against the
oracle (task id given), routing accuracy and mean per-class drop, after the run's last task.

The routers are fitted post hoc on the saved network, from the run's own training data (rebuilt
from its spec). For a neuron-level method (EideticNets, CLNP) this equals what the run itself
computes after its last task: the feature statistics of task ``k`` read only units frozen since
task ``k`` (bitwise the same outputs now), and the task classifier is refitted from scratch after
every task with generators seeded by ``(seed, number of tasks)``.

    python benchmarks/routing_compare.py runs/smnist-lda
    python benchmarks/routing_compare.py runs/smnist-lda --modes lda,lda-head --shrinkage 0.05

Modes: ``entropy``; ``lda`` (every unit layer's frozen units, the default of ``--routing lda``);
``lda-head`` (the penultimate features only, as statistics saved before); ``classifier``
(``--router-buffer`` samples kept per task) and ``classifier-all`` (every training sample).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsecl import metrics
from sparsecl.checkpoint import load_checkpoint
from sparsecl.routing import ExemplarBuffer, evaluate_routing, fit_router, free_units_of, update_statistics
from sparsecl.runs import build_stream, restore, spec_of

MODES = ("entropy", "lda", "lda-head", "classifier", "classifier-all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder or checkpoint")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--shrinkage", type=float, default=None, help="lda: covariance shrinkage in [0, 1]")
    parser.add_argument("--router-buffer", type=int, default=500)
    parser.add_argument("--router-epochs", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {', '.join(bad)}; choose from {', '.join(MODES)}")

    ckpt = load_checkpoint(args.run)
    net, method, state = restore(ckpt)
    net.to(args.device).eval()
    bench = build_stream(spec_of(ckpt))
    tasks = bench.tasks[: net.num_tasks]
    seed = int(spec_of(ckpt).train.get("seed", 0))
    results = {}
    for mode in modes:
        start = time.perf_counter()
        router, routing_net, route_mode = None, net, mode
        if mode in ("lda", "lda-head"):
            router = update_statistics(net, tasks, None, method, 1024, args.device, args.shrinkage,
                                       all_layers=mode == "lda")
            route_mode = "lda"
        elif mode.startswith("classifier"):
            size = args.router_buffer if mode == "classifier" else None
            router = fit_router(net, tasks, ExemplarBuffer(size, seed), args.router_epochs, 1e-3, 64, seed,
                                args.device, 0, free_units_of(method), 1024)
            routing_net = router.install(net)
        r = evaluate_routing(routing_net, tasks, route_mode, router, 1024, args.device)
        seconds = time.perf_counter() - start
        drop = metrics.mean_class_drop([c["oracle"] for c in r.per_class], [c["routed"] for c in r.per_class])
        T = len(tasks)
        results[mode] = {"routed": sum(r.routed) / T, "oracle": sum(r.oracle) / T, "routing": r.routing,
                         "mean_class_drop": drop, "seconds": seconds,
                         "features": None if router is None or not hasattr(router, "num_features")
                         else router.num_features}
        res = results[mode]
        print(f"{mode:15s} routed {100 * res['routed']:6.2f}%  oracle {100 * res['oracle']:6.2f}%  "
              f"ratio {100 * res['routed'] / res['oracle']:6.2f}%  drop {100 * drop:6.2f} pts  routing per task "
              f"{' '.join(f'{v:.3f}' for v in r.routing)}  ({seconds:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
