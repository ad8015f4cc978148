#!/usr/bin/env bash
# Split MNIST (5 x 2 classes), MLP 784-400-400, EideticNets as in split_mnist_baselines.sh:
# task-incremental (oracle) accuracy beside task-agnostic accuracy with the task classifier
# (500 kept training samples per task) and with entropy routing (no data kept).
# Needs SPARSECL_DATA (or pass --data-root); writes runs/smnist-routing/ and runs/smnist-routing/entropy.json.
set -euo pipefail
sparsecl run --method eidetic --benchmark split-mnist --hidden 400,400 --epochs 5 --batch-size 64 \
  --lr 1e-3 --seed 0 --routing classifier --router-buffer 500 --no-progress --out runs/smnist-routing "$@"
sparsecl eval runs/smnist-routing --routing entropy --json runs/smnist-routing/entropy.json
