#!/bin/bash
# A SLURM job of the recipe that survives its time limit: SLURM sends SIGUSR1 to this script 120 s before the
# end, the launcher passes it to every worker, each saves last.pth.tar after the step in progress and exits 75,
# and the job requeues itself; the requeued job resumes from last.pth.tar. Submit with `sbatch
# examples/slurm_train.sh`; set MODEL, VARIANT, NPROC, EXPERIMENT or TRAIN_ARGS to change the run.
#SBATCH --job-name=mltp
#SBATCH --nodes=1
#SBATCH --gres=gpu:8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
OUT=${OUTPUT:-output/train}/${EXPERIMENT:-mltp}
RESUME=()
[ -f "$OUT/last.pth.tar" ] && RESUME=(--resume "$OUT/last.pth.tar")
python -m timm_mltp.launch --nproc_per_node "${NPROC:-8}" recipes/train.py --model "${MODEL:-resnet50}" \
    --variant "${VARIANT:-conv}" --output "${OUTPUT:-output/train}" --experiment "${EXPERIMENT:-mltp}" \
    ${TRAIN_ARGS:-} "${RESUME[@]}" &
LAUNCHER=$!
trap 'kill -USR1 $LAUNCHER' USR1   # --signal=B: reaches this script only; the launcher forwards it
wait $LAUNCHER
CODE=$?
if [ $CODE -gt 128 ]; then         # wait returned for the trap: now wait for the launcher itself
    wait $LAUNCHER
    CODE=$?
fi
if [ $CODE -eq 75 ]; then          # saved: run again from last.pth.tar
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $CODE
