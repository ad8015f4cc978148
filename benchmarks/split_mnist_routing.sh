#!/usr/bin/env bash
# Split MNIST (5 x 2 classes), MLP 784-400-400, EideticNets: task-incremental (oracle) accuracy beside
# task-agnostic accuracy of every routing mode on the SAME trained network: entropy, lda (feature
# statistics of every unit layer; lda-head: the penultimate features only), the task classifier on
# 500 kept training samples per task and on every training sample (classifier-all).
# The run routes with lda as it trains; benchmarks/routing_compare.py fits every router post hoc on the
# saved network (for EideticNets equal to what a run with that --routing computes after its last task).
# Needs SPARSECL_DATA (or pass --data-root). Extra options go to `sparsecl run`, e.g. the reduced budget
# of docs: --epochs 3 --max-train-per-task 2000 --max-test-per-task 1000.
# Writes runs/smnist-routing/ and runs/smnist-routing/compare.json.
set -euo pipefail
here=$(dirname "$0")
sparsecl run --method eidetic --benchmark split-mnist --hidden 400,400 --epochs 5 --batch-size 64 \
  --lr 1e-3 --seed 0 --routing lda --no-progress --out runs/smnist-routing "$@"
python "$here/routing_compare.py" runs/smnist-routing --router-buffer 500 --json runs/smnist-routing/compare.json
