#!/usr/bin/env bash
# Issue 24 on a 2-core CPU: does MLTP pay for its cost? Two jobs at once, one thread each, nothing else running
# (the equal-compute baselines take their epochs from the wall time of the paired runs).
#   1. an earlier setting with the code as shipped: `adamw` through the engine, test_convnext and test_vit,
#      none / fo / full / SAM at the default rule, new seeds 5-9, and standard training at the compute of each;
#   2. the converged setting sized for this CPU: `converged-small` (resnet10t, SGD + momentum) and
#      `converged-small-adamw` (convnext_atto, mobilenetv3_small_100, AdamW), 2,000 images x 30 epochs, seeds 0-4,
#      the same methods and equal-compute baselines, seed by seed.
# Resumable: runs already in the CSV are skipped, so calling it again in the next session continues the matrix.
#
#   bash benchmarks/study_equal_compute.sh [BUDGET_SECONDS]     # part 2 starts no run that would not end in time
#
# STUDY_CSV (env): the results file (default: the repo's). To run from a frozen copy of a commit while editing the
# checkout, extract it (`git archive HEAD | tar -x -C /tmp/frozen`), link data/fashion-mnist-full into it, set
# STUDY_COMMIT=<that commit> STUDY_TREE_CLEAN=yes (recorded with every row) and run the copy's script (it imports the
# copy's timm_mltp; generalization.py refuses to record a commit for code imported from elsewhere).
# Afterwards: python benchmarks/generalization.py --report && python benchmarks/figures.py
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this tree's timm_mltp: the one whose commit rows record
START=$SECONDS
BUDGET=${1:-}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
[ -f .venv/bin/activate ] && . .venv/bin/activate
CSV=${STUDY_CSV:-benchmarks/results/generalization.csv}
study() { python benchmarks/generalization.py --jobs 2 --csv "$CSV" --methods none,fo,full,sam \
  --equal-compute fo,full,sam "$@" 2>&1 | grep --line-buffered -E "^(done|FAILED|[0-9]+ runs|stopped|[0-9]+ run)"; }
study --setting adamw --paths engine --models test_convnext,test_vit --seeds 5,6,7,8,9
LEFT=${BUDGET:+--budget $((BUDGET - (SECONDS - START)))}
study --setting converged-small,converged-small-adamw $LEFT
