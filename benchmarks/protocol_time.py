"""Whole EideticNets runs side by side: the paper's walk, the bisect search and plain training.

The setting in which the EideticNets reference implementation
(amazon-science/eideticnet-training) was timed on this machine kind: Permuted MNIST, 3 tasks
(task 0 permuted too), MLP 784-2000-2000, 10,000 training images per task (of which
``--val-fraction`` is held out), Adam lr 1e-3, batch 256, at most 5 epochs before pruning with
patience 1, 5% steps, tolerance 0.1%, at most 2 recovery epochs per step. Each configuration is
one whole run in this process, one after another (``--only`` picks some); the
script prints per task the wall time, the epochs trained (before pruning + recovery) and the
units kept, then per run ACC and the ratios: over plain training (``finetune``, same epochs per
task before pruning; also as epochs trained, which the machine's load cannot distort) and over
the walk with the same score and stop rule.

    python benchmarks/protocol_time.py [--data-root DIR] [--scores l2,taylor] [--stop-on val]
        [--searches walk,bisect] [--extra bisect:train-running,...] [--json OUT.json]

``--extra SEARCH:STOP_ON[:FIELD=VALUE...]`` adds runs with another stop rule or EideticConfig
fields (both scores), e.g. ``walk:train-running`` for the reference implementation's rule,
``bisect:val:prune_tasks=2`` pruning only the first 2 tasks (the reference leaves its last task
unpruned) or ``bisect:val:raise_best=0``. The machine's load average is
printed before and after: these ratios are only comparable within one window.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sparsecl.data.benchmarks import permuted_mnist
from sparsecl.methods import EideticConfig, EideticNets, Finetune
from sparsecl.models import mlp
from sparsecl.trainer import TrainConfig, Trainer


def _option(text: str) -> tuple[str, object]:
    """``key=value`` of an EideticConfig field: an int, a bool (0/1) or a string."""
    key, _, value = text.partition("=")
    kind = str(EideticConfig.__dataclass_fields__[key].type)
    if kind == "bool":
        return key, value not in ("0", "false", "False")
    return key, int(value) if "int" in kind else float(value) if "float" in kind else value


def run(name, method, bench, config, hidden):
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    result = Trainer(method, config).fit(mlp((1, 28, 28), hidden, 10), bench)
    seconds = time.perf_counter() - start
    log = getattr(method, "log", [])
    tasks = []
    for t, secs in enumerate(result.seconds_per_task):
        entry = log[t] if t < len(log) else {}
        tasks.append({"seconds": secs, "accuracy": result.accuracy_matrix[t][t],
                      "epochs": entry.get("epochs", config.epochs), "recovery_epochs": entry.get("recovery_epochs", 0),
                      "rounds": entry.get("rounds"), "kept": entry.get("kept"),
                      "select_seconds": entry.get("select_seconds")})
    return {"name": name, "acc": result.acc, "seconds": seconds, "tasks": tasks,
            "final_row": result.accuracy_matrix[-1], "max_logit_change": result.max_logit_change,
            "capacity": result.capacity, "method_log": log}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=os.environ.get("SPARSECL_DATA"))
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--max-train-per-task", type=int, default=10000)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--hidden", default="2000,2000")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--recovery-epochs", type=int, default=2)
    p.add_argument("--prune-step", type=float, default=0.05)
    p.add_argument("--tolerance", type=float, default=0.001)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scores", default="l2,taylor")
    p.add_argument("--searches", default="walk,bisect")
    p.add_argument("--stop-on", default=EideticConfig.stop_on)
    p.add_argument("--extra", default="", help="more runs, SEARCH:STOP_ON[:FIELD=VALUE...] comma-separated")
    p.add_argument("--only", default="", help="run only these names (comma-separated), e.g. finetune,bisect-l2-val")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    hidden = tuple(int(h) for h in args.hidden.split(","))
    bench = permuted_mnist(args.data_root, num_tasks=args.tasks, seed=args.seed, permute_first=True,
                           val_fraction=args.val_fraction, max_train_per_task=args.max_train_per_task)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    plan = [("finetune", None)]
    variants = [(s, args.stop_on, {}) for s in args.searches.split(",") if s]
    for v in args.extra.split(","):
        if v:
            search, stop_on, *rest = v.split(":")
            variants.append((search, stop_on, dict(_option(kv) for kv in rest)))
    for search, stop_on, options in variants:
        for score in args.scores.split(","):
            suffix = "".join(f"-{k}={int(v) if isinstance(v, bool) else v}" for k, v in options.items())
            plan.append((f"{search}-{score}-{stop_on}{suffix}", EideticConfig(**{
                **dict(score=score, prune_search=search, stop_on=stop_on, patience=args.patience,
                       recovery_epochs=args.recovery_epochs, prune_step=args.prune_step, tolerance=args.tolerance),
                **options})))
    if args.only:
        keep = set(args.only.split(","))
        plan = [item for item in plan if item[0] in keep]

    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}", flush=True)
    results = []
    for name, cfg in plan:
        method = Finetune() if cfg is None else EideticNets(cfg)
        results.append(run(name, method, bench, config, hidden))
        r = results[-1]
        print(f"{name}: ACC {100 * r['acc']:.2f}%, {r['seconds']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        for t, task in enumerate(r["tasks"]):
            print(f"  task {t}: {task['seconds']:.0f} s, epochs {task['epochs']}+{task['recovery_epochs']}, "
                  f"rounds {task['rounds']}, kept {task['kept']}, accuracy {100 * task['accuracy']:.2f}%", flush=True)
        if args.json:  # after every run: a long session keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"load average after: {os.getloadavg()}")

    by_name = {r["name"]: r for r in results}
    plain = by_name.get("finetune")
    print("\n| run | ACC | s | s/task | epochs (train+recovery) | epochs × plain | units kept per task | × plain "
          "| × walk, same rule | × walk, train-running |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        epochs = sum(t["epochs"] for t in r["tasks"])
        recovery = sum(t["recovery_epochs"] for t in r["tasks"])
        kept = "; ".join("/".join(str(v) for v in t["kept"].values()) for t in r["tasks"] if t["kept"])
        vs_plain = ""
        if plain is not None:  # plain training of the epochs this run trained before pruning
            per_epoch = plain["seconds"] / sum(t["epochs"] for t in plain["tasks"])
            vs_plain = f"{r['seconds'] / (per_epoch * epochs):.2f}"
        search, _, rest = r["name"].partition("-")
        score = rest.split("-")[0]
        same = by_name.get(f"walk-{rest}") if search == "bisect" else None
        running = by_name.get(f"walk-{score}-train-running") if search == "bisect" else None
        ratios = [f"{r['seconds'] / w['seconds']:.2f}" if w else "" for w in (same, running)]
        per_task = " / ".join(f"{t['seconds']:.0f}" for t in r["tasks"])
        print(f"| {r['name']} | {100 * r['acc']:.2f}% | {r['seconds']:.0f} | {per_task} | {epochs}+{recovery} | "
              f"{(epochs + recovery) / epochs:.2f} | {kept} | {vs_plain} | {ratios[0]} | {ratios[1]} |")


if __name__ == "__main__":
    main()
