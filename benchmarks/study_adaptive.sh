#!/usr/bin/env bash
# Issue 16's cells of the study: settings adamw and finetune, every method under the old default rule
# (`optimizer`, i.e. `update` under AdamW) and the preconditioned rule, 5 seeds, both paths, 2 jobs on 2 cores.
# Seeds 0-2 of everything first, then 3-4, so that a stopped matrix leaves balanced cells. Resumable: runs
# already in the CSV are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
study() { python benchmarks/generalization.py --jobs 2 --models test_vit,test_convnext "$@"; }
for seeds in 0,1,2 3,4; do
  for setting in adamw finetune; do
    [ "$setting" = finetune ] && python benchmarks/pretrain_backbone.py --models test_convnext,test_vit
    extra=(); [ "$setting" = finetune ] && extra=(--train-samples 250)
    study --setting "$setting" --seeds "$seeds" --methods none,sam,fo,full --alpha-rule optimizer "${extra[@]}"
    study --setting "$setting" --seeds "$seeds" --methods fo,full --alpha-rule preconditioned "${extra[@]}"
  done
done
python benchmarks/generalization.py --report
