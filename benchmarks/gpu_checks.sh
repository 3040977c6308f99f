#!/usr/bin/env bash
# A CUDA machine end to end, in one go: checks of the CUDA input path, the benchmark of the
# report's model (WRN-50-2, 224 px, batch 72), a profile of its steps, then the demo, resume,
# evaluation, prediction and bf16 on the GPU. The most telling steps come first, in case time
# runs out. The compiled benchmark compiles the model for each phase, minutes on a fresh machine:
# it is capped at 4 minutes, so that the whole stays under 10 on an H100 (BENCHMARKS.md).
#
#   bash benchmarks/gpu_checks.sh                 # everything prints; failures say FAILED, and
#                                                 # the script exits 1 if any check failed
#   DEVICE=cpu BENCH="--n 64 --steps 2 --repeats 1" bash benchmarks/gpu_checks.sh   # a dry run
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
bench=${BENCH:---arch wide_resnet50_2 --img-size 224 --n 2048 --steps 40 --repeats 5}
work=$(mktemp -d)
step() { echo; echo "== $* ($SECONDS s)"; }
failed=0
check() { "$@" || { echo "FAILED ($?): $*"; failed=$((failed + 1)); }; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

step "the CUDA input path: background thread = training thread, CPU = CUDA, no host sync"
[ "$device" = cuda ] && check $py benchmarks/check_cuda_pipeline.py

step "training benchmark, eager, fp16; host syncs per step"
check $py benchmarks/bench.py --device "$device" $bench --workdir "$work/bench" --sections train,sync

step "the training benchmark, compiled with CUDA graphs (capped at 240 s)"
check timeout 240 $py benchmarks/bench.py --device "$device" $bench --workdir "$work/bench" --sections train \
    --compile reduce-overhead

step "where a step's time goes"
check $py benchmarks/profile_train.py --device "$device" $bench --workdir "$work/bench" --steps 20

step "input pipeline and prediction"
check $py benchmarks/bench.py --device "$device" $bench --workdir "$work/bench" --sections pipeline,predict

step "demo: both phases, fp16"
check $py train.py --demo --data "$work/demo" --out "$work/ck" --device "$device"

step "resume from last.pt for one more epoch"
check $py train.py --resume "$work/ck/last.pt" --epochs2 11

step "evaluate (with --tta) and predict, then check the CSV"
check $py evaluate.py --ckpt "$work/ck/best.pt" --figures "$work/fig" --device "$device" --tta
check $py predict.py --ckpt "$work/ck/best.pt" --device "$device" --out "$work/prediction.csv"
check $py predict.py --ckpt "$work/ck/best.pt" --check "$work/prediction.csv"

step "bf16: a short run"
check $py train.py --demo --data "$work/demo" --out "$work/ck-bf16" --device "$device" --amp bf16 --epochs1 1 --epochs2 1

rm -rf "$work"
echo "== done ($SECONDS s): $failed check(s) failed"
[ "$failed" -eq 0 ]
