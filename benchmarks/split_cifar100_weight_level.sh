#!/usr/bin/env bash
# Split CIFAR-100 (10 tasks x 10 classes, iCaRL class order), AlexNet-like net: the weight-level
# methods at the budget of the README's Split CIFAR-100 table (2 epochs per task, Adam lr 1e-3,
# batch 64, crop+flip augmentation, per-channel normalization, seed 0). PackNet: 1 epoch, prune,
# 1 retraining epoch. DST: a mask update every 20 steps (a task has about 140 steps at this
# budget; the reference code's 400 would never update). Writes runs/cifar100-weight-TAG/.
# Usage: benchmarks/split_cifar100_weight_level.sh [TAG ...]   (default: every run below)
#   TAGs: packnet, packnet-shares (equal shares among the 10 tasks), wsn-C (C = 0.03, 0.1, 0.5),
#   tsn-C (TinySubNets), dst-INIT-GROWTH-SPARSITY with INIT erk|uniform,
#   GROWTH random|unfired|gradient|momentum, SPARSITY 0.8|0.9|0.95.
#   SEED=N (default 0) sets the seed; runs of another seed than 0 write runs/cifar100-weight-TAG-seedN/.
#   Needs SPARSECL_DATA (or --data-root).
set -euo pipefail
seed=${SEED:-0}
suffix=$([ "$seed" = 0 ] || echo "-seed$seed")
common=(--benchmark split-cifar100 --model alexnet-like --epochs 2 --batch-size 64 --optimizer adam
        --lr 1e-3 --seed "$seed" --no-progress)
run() { local tag=$1; shift; sparsecl run "${common[@]}" --out "runs/cifar100-weight-$tag$suffix" "$@"; }
tags=("$@")
if [ ${#tags[@]} -eq 0 ]; then
  tags=(packnet packnet-shares wsn-0.03 wsn-0.1 wsn-0.5 tsn-0.5)
  for s in 0.8 0.9 0.95; do for i in erk uniform; do for g in random unfired gradient momentum; do
    tags+=("dst-$i-$g-$s"); done; done; done
fi
for tag in "${tags[@]}"; do
  case "$tag" in
    packnet) run "$tag" --method packnet --epochs 1 --prune 0.75 --retrain-epochs 1 ;;
    packnet-shares) run "$tag" --method packnet --epochs 1 --shares 10 --retrain-epochs 1 ;;
    wsn-*) run "$tag" --method wsn --density "${tag#wsn-}" ;;
    tsn-*) run "$tag" --method tinysubnets --density "${tag#tsn-}" ;;
    dst-*-*-*) IFS=- read -r _ init growth sparsity <<< "$tag"
               run "$tag" --method dst --init "$init" --growth "$growth" --sparsity "$sparsity" --update-interval 20 ;;
    *) echo "unknown run tag '$tag'" >&2; exit 2 ;;
  esac
done
