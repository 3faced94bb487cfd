#!/usr/bin/env bash
# GPU numbers for the README (issue 9, item 4; issue 17), in one run of under 9 minutes on one GPU:
#   1. step cost and peak memory (torch.cuda.max_memory_allocated) per variant, standard training on 2B (the
#      memory baseline), and exact and fd with H_i v on a sample (full: curvature_fraction 1/2, 1/4, 1/8;
#      conv exact: 1/4): resnet50, 224 px, B=64, bf16 and fp16 (benchmarks/step_cost.py; on the CPU rho = 1/4
#      pays only where a pass costs in proportion to its batch, README "Cost per training sample")
#   2. the default recipe for one epoch, in bf16 and in fp16 (recipes/train.py)
#   3. MLTPTrainer for a few steps in bf16 (examples/trainer_finetune.py)
# Tables and logs go to benchmarks/results/device/ (and to $OUT/ where the device tool sets it).
#
# On the lent machine (device tool), its image has torch, timm, transformers and accelerate but not
# `datasets`, which parts 2 and 3 need. Prepare its wheels here once (see the device README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl datasets dill multiprocess
# then run with carry [".whl"] and the command `bash benchmarks/device_check.sh`.
# Without `datasets` parts 2 and 3 are reported as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results/device
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

part() {   # part NAME SECONDS COMMAND...: run with a time limit, keep its output, never stop the script
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$RESULTS/$name.md" 2>&1
    echo "exit $? after ${SECONDS}s in all" | tee -a "$RESULTS/$name.md"
    grep -E '^\||top1|Best|accuracy|train_runtime' "$RESULTS/$name.md" | head -20
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
    "import torch, timm, transformers, accelerate; print(torch.__version__, timm.__version__, transformers.__version__, accelerate.__version__)"; } \
    > "$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"

for amp in bf16 fp16; do
    part "step_cost_resnet50_$amp" 130 python3 benchmarks/step_cost.py --models resnet50 --img-size 224 \
        --batch-size 64 --repeats 6 --warmup 2 --amp "$amp" --device cuda
done
if python3 -c "import datasets" 2>/dev/null; then
    for amp in bf16 fp16; do
        part "recipe_default_$amp" 90 python3 recipes/train.py --epochs 1 --mixed-precision "$amp" --workers 4 \
            --output /tmp/device_runs --experiment "default-$amp" --no-progress
    done
    part trainer_bf16 60 python3 examples/trainer_finetune.py --epochs 0.5 --train-samples 2000 --bf16 \
        --output-dir /tmp/device_runs/trainer
else
    echo "datasets is not installed: recipe and MLTPTrainer parts skipped (carry its wheels, see above)" \
        | tee "$RESULTS/skipped.md"
fi
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.md "$RESULTS"/*.txt "$OUT"/ 2>/dev/null; fi
echo "done in ${SECONDS}s"
