#!/usr/bin/env bash
# 300 tasks of Permuted MNIST in one model: WSN (c = 0.5) on the MLP 784-100-100, 1,000 training
# images (10% held out for validation) and 500 test images per task, 1 epoch, batch 10, Adam lr
# 1e-3, seed 0. The earlier tasks' test sets are re-evaluated after every 50th task (and all
# after the last); every task's probe logits are checked bit for bit after every task. The run
# checkpoints after every task: run the script again to continue an interrupted run.
# Usage: benchmarks/pmnist_300_tasks.sh [extra sparsecl run options]
#   Needs SPARSECL_DATA (or --data-root). Writes runs/pmnist-300-wsn/.
set -euo pipefail
out=runs/pmnist-300-wsn
if [ -f "$out/checkpoint.safetensors" ] && [ ! -f "$out/metrics.json" ]; then
  exec sparsecl run --resume "$out" --no-progress "$@"
fi
exec sparsecl run --method wsn --benchmark permuted-mnist --tasks 300 --hidden 100,100 --density 0.5 \
  --epochs 1 --batch-size 10 --max-train-per-task 1000 --max-test-per-task 500 --eval-every 50 --seed 0 \
  --no-progress --out "$out" "$@"
