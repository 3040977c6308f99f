#!/bin/bash
# A SLURM job that trains until the run is done. Stopped by its time limit or by a preemption,
# train.py saves its position and exits; the job then requeues itself, and its next start goes on
# from there (--resume auto). Under torchrun (NPROC > 1) a worker that dies is started again
# with the others, MAX_RESTARTS times (default 3). A run that fails otherwise is not requeued.
#
#   sbatch jobs/slurm.sh --data data --out checkpoints/run1                 # one GPU
#   NPROC=4 sbatch --gres=gpu:4 jobs/slurm.sh --data data --out checkpoints/run1   # torchrun
#
# Everything after the script's name goes to train.py (but --resume: the job gives --resume auto);
# give --out, where the run's position is. Run it from the repository (sbatch keeps the directory
# it is called from).
#SBATCH --job-name=finetune
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
# --signal: SIGTERM to the training processes 3 minutes before the time limit, time to save.
# --open-mode=append: a requeued job adds to its log instead of replacing it.
set -u

out=checkpoints
previous=
for arg in "$@"; do
    [ "$previous" = "--out" ] && out=$arg
    case $arg in --out=*) out=${arg#--out=} ;; esac
    previous=$arg
done

if [ "${NPROC:-1}" -gt 1 ]; then
    # torchrun gives its workers 30 s after passing on a signal, then kills them: too little for
    # a validation and a checkpoint. 170 s of the 180 that --signal leaves before the limit.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}
    # A worker that dies (or hangs past --dist-timeout) is started again with the others, which
    # go on from the last position saved: --save-every-steps bounds what a restart trains again.
    launch=(torchrun --standalone --max-restarts "${MAX_RESTARTS:-3}" --nproc_per_node "$NPROC")
else
    launch=(python)
fi

rm -f "$out/preempted"  # only this job's run may leave it
# --resume auto: the run in --out goes on where it has one (last.pt, or phase1.pt), a fresh one
# starts where it has none, and a finished one is left as it is.
srun "${launch[@]}" train.py "$@" --resume auto
status=$?

# Preempted, not broken: train.py exits with 75 when a signal stopped it, and leaves
# <out>/preempted; under torchrun, which reports any worker's non-zero exit as its own 1, only the
# file tells.
if [ "$status" -eq 75 ] || [ -f "$out/preempted" ]; then
    echo "stopped by a signal with its position saved: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
