#!/usr/bin/env bash
# Split CIFAR-100 (10 tasks x 10 classes, iCaRL class order), one model, four methods at the same
# budget: 2 epochs per task, Adam lr 1e-3, batch 64, crop+flip augmentation, per-channel
# normalization. EideticNets and CLNP may reuse a full layer's frozen units (--reuse-full).
# Usage: benchmarks/split_cifar100.sh MODEL [extra sparsecl run options]
#   MODEL: alexnet-like or reduced-resnet18. Needs SPARSECL_DATA (or --data-root).
# Writes runs/cifar100-MODEL-METHOD/{metrics.json,checkpoint.safetensors}.
set -euo pipefail
model=$1; shift
common=(--benchmark split-cifar100 --model "$model" --epochs 2 --batch-size 64 --optimizer adam
        --lr 1e-3 --seed 0 --no-progress)
sparsecl run --method finetune "${common[@]}" --out "runs/cifar100-$model-finetune" "$@"
sparsecl run --method clnp "${common[@]}" --alpha 1e-5 --margin 0.02 --theta-per-layer \
  --theta-steps 10 --finetune-epochs 1 --finetune-lr 1e-4 --reuse-full \
  --out "runs/cifar100-$model-clnp" "$@"
sparsecl run --method eidetic "${common[@]}" --score taylor --score-batches 20 --prune-step 0.25 \
  --max-pruned-ratio 0.75 --recovery-epochs 1 --tolerance 0.02 --accuracy-samples 2000 --reuse-full \
  --out "runs/cifar100-$model-eidetic" "$@"
sparsecl run --method joint "${common[@]}" --out "runs/cifar100-$model-joint" "$@"
