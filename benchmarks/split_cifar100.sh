#!/usr/bin/env bash
# Split CIFAR-100 (10 tasks x 10 classes, iCaRL class order), one model and one method at the
# budget of the README's table: 2 epochs per task, Adam lr 1e-3, batch 64, crop+flip augmentation,
# per-channel normalization. EideticNets and CLNP may reuse a full layer's frozen units
# (--reuse-full); EideticNets walks step by step with the stop rule on 2,000 training images, as
# the table was measured. Extra options go to `sparsecl run` (e.g. --routing classifier --router-epochs 5).
# Usage: benchmarks/split_cifar100.sh MODEL METHOD [options]
#   MODEL: alexnet-like or reduced-resnet18; METHOD: finetune, joint, clnp or eidetic.
#   Needs SPARSECL_DATA (or --data-root). Writes runs/cifar100-MODEL-METHOD/.
set -euo pipefail
model=$1 method=$2; shift 2
common=(--benchmark split-cifar100 --model "$model" --epochs 2 --batch-size 64 --optimizer adam
        --lr 1e-3 --seed 0 --no-progress --out "runs/cifar100-$model-$method")
case "$method" in
  clnp) extra=(--alpha 1e-5 --margin 0.02 --theta-per-layer --theta-steps 10 --finetune-epochs 1
               --finetune-lr 1e-4 --reuse-full) ;;
  eidetic) extra=(--score taylor --score-batches 20 --prune-step 0.25 --max-pruned-ratio 0.75
                  --recovery-epochs 1 --tolerance 0.02 --prune-search walk --stop-on train
                  --accuracy-samples 2000 --reuse-full) ;;
  *) extra=() ;;
esac
sparsecl run --method "$method" "${common[@]}" "${extra[@]}" "$@"
