#!/usr/bin/env bash
# Issue 16's cells of the study: settings adamw and finetune on test_vit and test_convnext, 2 jobs on 2 cores.
#   every method (none, SAM, fo, full) under the preconditioned rule, 5 seeds, both paths;
#   fo and full under the old default rule under AdamW (`optimizer`, which was `update` there), seeds 0-2;
#   fo and full under the online rule, adamw through MLTPTrainer, seeds 0-2.
# Seeds 0-2 first, then 3-4, so that a stopped matrix leaves balanced cells. Resumable: runs already in the
# CSV are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this tree's timm_mltp: the one whose commit rows record
export OMP_NUM_THREADS=1
[ -f .venv/bin/activate ] && . .venv/bin/activate
study() { python benchmarks/generalization.py --jobs 2 --models test_vit,test_convnext "$@"; }
python benchmarks/pretrain_backbone.py --models test_convnext,test_vit
for seeds in 0,1,2 3,4; do
  for path in hf-trainer engine; do
    study --setting adamw --paths "$path" --seeds "$seeds" --methods none,sam,fo,full --alpha-rule preconditioned
    if [ "$seeds" = 0,1,2 ]; then
      study --setting adamw --paths "$path" --seeds "$seeds" --methods fo,full --alpha-rule update
    fi
    study --setting finetune --paths "$path" --seeds "$seeds" --train-samples 250 --methods none,sam,fo,full \
      --alpha-rule preconditioned
    if [ "$seeds" = 0,1,2 ]; then
      study --setting finetune --paths "$path" --seeds "$seeds" --train-samples 250 --methods fo,full --alpha-rule update
    fi
  done
done
study --setting adamw --paths hf-trainer --seeds 0,1,2 --methods fo,full --alpha-rule online
python benchmarks/generalization.py --report
