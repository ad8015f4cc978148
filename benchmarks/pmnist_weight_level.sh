#!/usr/bin/env bash
# Permuted MNIST, 10 tasks, MLP 784-100-100 (WSN's setting): the weight-level methods at one
# budget, WSN's: 5 epochs per task (PackNet: 4 + 1 retraining epoch after pruning), batch 10,
# Adam lr 1e-3, seed 0. Writes runs/pmnist-weight-TAG/ for each run; summarize with
#   python benchmarks/summarize.py runs/pmnist-weight-*     (or: sparsecl summarize runs/pmnist-weight-*)
#   SEED=N (default 0) sets the seed; runs of another seed than 0 write runs/pmnist-weight-TAG-seedN/.
# Usage: benchmarks/pmnist_weight_level.sh [TAG ...]   (default: every run below)
#   TAGs: packnet, packnet-shares (equal shares among the 10 tasks), wsn-0.03, wsn-0.1, wsn-0.5,
#   tsn-0.5 (TinySubNets, c = 0.5), dst-erk-random, dst-uniform-random
#   Needs SPARSECL_DATA (or --data-root in the environment's sparsecl config).
set -euo pipefail
seed=${SEED:-0}
suffix=$([ "$seed" = 0 ] || echo "-seed$seed")
common=(--benchmark permuted-mnist --model mlp --hidden 100,100 --epochs 5 --batch-size 10
        --optimizer adam --lr 1e-3 --seed "$seed" --no-progress)
run() { local tag=$1; shift; sparsecl run "${common[@]}" --out "runs/pmnist-weight-$tag$suffix" "$@"; }
tags=("$@")
[ ${#tags[@]} -eq 0 ] && tags=(packnet packnet-shares wsn-0.03 wsn-0.1 wsn-0.5 tsn-0.5 dst-erk-random dst-uniform-random)
for tag in "${tags[@]}"; do
  case "$tag" in
    packnet) run "$tag" --method packnet --epochs 4 --prune 0.75 --retrain-epochs 1 ;;
    packnet-shares) run "$tag" --method packnet --epochs 4 --shares 10 --retrain-epochs 1 ;;
    wsn-*) run "$tag" --method wsn --density "${tag#wsn-}" ;;
    tsn-*) run "$tag" --method tinysubnets --density "${tag#tsn-}" ;;
    dst-*-*) IFS=- read -r _ init growth <<< "$tag"
             run "$tag" --method dst --sparsity 0.8 --init "$init" --growth "$growth" --update-interval 400 ;;
    *) echo "unknown run tag '$tag'" >&2; exit 2 ;;
  esac
done
