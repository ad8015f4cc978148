#!/usr/bin/env bash
# Any nn.Module on Split CIFAR-100 at a small budget: the ViT (LayerNorm, multi-head attention,
# class token; --model vit --width 64: 209k parameters) with every weight-level method, and the
# MobileNetV2 (depthwise convolutions; --model mobilenetv2 --width 8, multiplier 0.25: 251k
# parameters) with every method that supports it (the weight-level ones, EideticNets and CLNP).
# Budget: the first 5 tasks (10 classes each), 500 training and 200 test images per task, 2 epochs,
# batch 32, Adam lr 2e-3, seed 0 (crop+flip and per-channel normalization: the benchmark's
# defaults). CLNP: one L1 coefficient for all 53 weight layers (--alpha 1e-5), and a layer left
# without free units is reused frozen (--reuse-full: the MobileNet's 8-channel stem fills up).
# Every run checks zero forgetting bitwise after every task (the trainer's probe check: a change
# stops the run). Writes runs/any-module-TAG/; prints the wall time of each run and one summary
# row per run.
# Usage: benchmarks/any_module.sh [TAG ...]  (default: every run below)
#   TAGs: vit-packnet vit-wsn vit-dst vit-tinysubnets mobilenet-packnet mobilenet-wsn mobilenet-dst
#         mobilenet-tinysubnets mobilenet-eidetic mobilenet-clnp
#   Needs SPARSECL_DATA (or --data-root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sparsecl=${SPARSECL:-sparsecl}
common=(--benchmark split-cifar100 --tasks 5 --max-train-per-task 500 --max-test-per-task 200 --epochs 2
        --batch-size 32 --optimizer adam --lr 2e-3 --seed 0 --no-progress --overwrite)
tags=("$@")
if [ ${#tags[@]} -eq 0 ]; then
  tags=(vit-packnet vit-wsn vit-dst vit-tinysubnets mobilenet-packnet mobilenet-wsn mobilenet-dst
        mobilenet-tinysubnets mobilenet-eidetic mobilenet-clnp)
fi
for tag in "${tags[@]}"; do
  case "${tag%%-*}" in
    vit) model=(--model vit --width 64) ;;
    mobilenet) model=(--model mobilenetv2 --width 8) ;;
    *) echo "unknown run tag '$tag'" >&2; exit 2 ;;
  esac
  case "${tag#*-}" in
    packnet) method=(--method packnet --epochs 1 --prune 0.5 --retrain-epochs 1) ;;
    wsn) method=(--method wsn --density 0.5) ;;
    dst) method=(--method dst --sparsity 0.8 --update-interval 8) ;;
    tinysubnets) method=(--method tinysubnets --density 0.5 --prune-rounds 3 --max-levels 16) ;;
    eidetic) method=(--method eidetic --score l2 --recovery-epochs 1 --tolerance 0.05) ;;
    clnp) method=(--method clnp --alpha 1e-5 --theta-steps 8 --reuse-full) ;;
    *) echo "unknown run tag '$tag'" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  "$sparsecl" run "${common[@]}" "${model[@]}" "${method[@]}" --out "runs/any-module-$tag" > "runs/any-module-$tag.log" 2>&1 \
    || { echo "$tag failed: see runs/any-module-$tag.log" >&2; continue; }
  echo "$tag: $(( $(date +%s) - start )) s"
done
python "$here/summarize.py" runs/any-module-*/
