#!/usr/bin/env bash
# Issue 24's converged matrix on one GPU, several runs at once, within a time budget:
#   resnet18, convnext_atto, vit_tiny_patch16_224 (4-pixel patches) at 32 px, Fashion-MNIST (setting `converged`:
#   SGD + momentum; `converged-adamw`: AdamW, ConvNeXt and ViT), methods none, fo, full and SAM, seeds 0-4, and
#   standard training given the measured compute of fo, full and SAM (benchmarks/generalization.py
#   --equal-compute). Runs start seed by seed; none starts that would not end before the budget, so a stopped
#   matrix keeps whole seeds, and calling the script again continues it (the CSV is the state).
#
#   bash benchmarks/device_study.sh BUDGET_SECONDS [generalization.py options...]
#
# BUDGET_SECONDS: the whole script's wall time (setup included); give the device tool a little more. JOBS (env,
# default 12) runs share the GPU. Rows go to output/device_study/generalization.csv (kept on a warm machine; to
# continue on a fresh one, carry that file) and are copied to $OUT/ with the log. STUDY_SETTINGS (env) overrides
# the settings; STUDY_COMMIT and STUDY_TREE_CLEAN (env) are recorded with each row where the copy has no .git.
#
# Carry (device tool): "data/fashion-mnist-full" (python benchmarks/generalization.py converts it once, 36 MB) and
# ".whl" with the wheels of `datasets` where the machine lacks it (see benchmarks/device_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:?usage: bash benchmarks/device_study.sh BUDGET_SECONDS [generalization.py options...]}
shift
JOBS=${JOBS:-12}
SETTINGS=${STUDY_SETTINGS:-converged,converged-adamw}
RESULTS=output/device_study
CSV=$RESULTS/generalization.csv
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

save() {   # the rows and the log to $OUT, whatever happened
    if [ -n "${OUT:-}" ]; then cp "$CSV" "$RESULTS"/*.log "$RESULTS"/machine.txt "$OUT"/ 2>/dev/null; fi
}
trap save EXIT

if ! python3 -c "import datasets" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import datasets, timm, accelerate, transformers, timm_mltp" 2>"$RESULTS/import.log"; then
    echo "missing packages (carry .whl, see benchmarks/device_check.sh):"; tail -3 "$RESULTS/import.log"; exit 2
fi
if [ ! -f data/fashion-mnist-full/dataset_dict.json ]; then
    echo "data/fashion-mnist-full is missing: carry it (converted here by python benchmarks/generalization.py)"; exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; python3 -c \
    "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.is_available())"; } > "$RESULTS/machine.txt"
cat "$RESULTS/machine.txt"

# the matrix gets what is left, less a margin for the last rows and the copy; its own --budget starts no run
# that would not end 20 s before that, and `timeout` stops it at the latest then
LEFT=$((BUDGET - SECONDS - 15))
if [ "$LEFT" -lt 60 ]; then echo "budget too small: ${LEFT}s left after setup"; exit 2; fi
echo "== matrix: $SETTINGS, $JOBS runs at once, ${LEFT}s"
timeout --signal=TERM --kill-after=5 "$LEFT" python3 benchmarks/generalization.py --setting "$SETTINGS" \
    --methods none,fo,full,sam --equal-compute fo,full,sam --jobs "$JOBS" --budget $((LEFT - 20)) --csv "$CSV" \
    "$@" 2>&1 | tee -a "$RESULTS/matrix.log" | grep -E "^(done|FAILED|[0-9]+ runs|stopped|[0-9]+ run)" 
status=${PIPESTATUS[0]}
rows=0; [ -f "$CSV" ] && rows=$(($(wc -l < "$CSV") - 1))
echo "exit $status after ${SECONDS}s; $rows rows in $CSV"
