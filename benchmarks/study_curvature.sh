#!/usr/bin/env bash
# The study's second-order cells at curvature_fraction rho = 1/4 against rho = 1: settings adamw and finetune
# (250 images), path engine, test_convnext, methods full and conv under the default alpha rule, seeds 0-7,
# 2 jobs on 2 cores. Seeds 0-3 first for every cell, then 4-7, so that a stopped matrix leaves balanced cells.
# Resumable: runs already in the CSV are skipped. The report's section "Curvature from a sample (rho)" pairs
# the two rho per seed.
#   STUDY_CSV, STUDY_DOC: the results file and the report (default: the repo's), e.g. to run from a frozen
#   snapshot of the code (git worktree) while writing into the main checkout's CSV.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this tree's timm_mltp: the one whose commit rows record
export OMP_NUM_THREADS=1
[ -f .venv/bin/activate ] && . .venv/bin/activate
CSV=${STUDY_CSV:-benchmarks/results/generalization.csv}
DOC=${STUDY_DOC:-docs/generalization.md}
study() { python benchmarks/generalization.py --jobs 2 --csv "$CSV" --paths engine --models test_convnext \
  --methods full,conv "$@"; }
python benchmarks/pretrain_backbone.py --models test_convnext
for seeds in 0,1,2,3 4,5,6,7; do
  for rho in 1 0.25; do
    study --setting adamw --seeds "$seeds" --curvature-fraction "$rho"
    study --setting finetune --seeds "$seeds" --train-samples 250 --curvature-fraction "$rho"
  done
done
python benchmarks/generalization.py --report --csv "$CSV" --doc "$DOC"
