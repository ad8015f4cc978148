#!/usr/bin/env bash
# Split MNIST (5 x 2 classes), MLP 784-400-400, Adam lr 1e-3, batch 64, at most 5 epochs per task:
# EideticNets beside the fine-tuning (lower) and joint (upper) baselines, on the same trainer.
# Needs SPARSECL_DATA (or pass --data-root); writes runs/smnist-<method>/metrics.json.
set -euo pipefail
for method in eidetic finetune joint; do
  sparsecl run --method "$method" --benchmark split-mnist --hidden 400,400 --epochs 5 \
    --batch-size 64 --lr 1e-3 --seed 0 --no-progress --out "runs/smnist-$method" "$@"
done
