#!/usr/bin/env bash
# The real-photo experiments of RESULTS.md, on a CPU: a resnet18 backbone pretrained from scratch
# on tiny-transfer's source/ half (the stand-in for ImageNet weights), then fine-tuned on its
# target/ half in the ways RESULTS.md compares, then the report. A finished run is skipped and a
# stopped one resumed from its last epoch, so the script can be stopped and run again.
#
#   mkdir -p data && tar -xzf tiny-transfer.tar.gz -C data     # the dataset (see its README)
#   bash benchmarks/tiny_transfer.sh                           # 8 to 16 hours on 2 cores
#   STEPS="pretrain method" bash benchmarks/tiny_transfer.sh   # some of it
#
# The timm row needs timm (pip install timm, not a requirement of this project) and timm's own
# train.py from github.com/huggingface/pytorch-image-models at TIMM_TRAIN (default
# benchmarks/.work/timm/train.py); it is skipped without them.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
src=${SOURCE:-data/tiny-transfer/source}
tgt=${TARGET:-data/tiny-transfer/target}
ck=${CHECKPOINTS:-checkpoints/tiny-transfer}
steps=${STEPS:-pretrain method phase2-only probe scratch method-1+7 timm optimizers levers recipe-8 fast-8 pixels-8 fast-4 timm-recipe budget-16 long-tail aspect report}
timm_train=${TIMM_TRAIN:-benchmarks/.work/timm/train.py}

# The budget: 8 epochs a run, the method's 10 + 125 scaled down to 2 + 6, its warmup to one
# epoch and its cosine to one monotone decay over the rest (as --cosine-epochs 120 does for the
# full 125 epochs).
common=(--data "$tgt" --arch resnet18 --img-size 64)
pretrained=(--weights "$ck/source/best.pt")
schedule=(--warmup-epochs 1 --cosine-epochs 5)

wanted() { [[ " $steps " == *" $1 "* ]]; }
run() {  # run OUT ARGS...: train.py into OUT, unless an earlier call finished it (OUT/done, which
          # holds the call's wall seconds); a call that was stopped goes on from its last.pt
    local out=$1; shift
    if [ -f "$out/done" ]; then echo "== $out: done"; return; fi
    local resume=() start
    [ -f "$out/last.pt" ] && resume=(--resume "$out/last.pt")
    echo "== $out: python train.py $* --out $out ${resume[*]}"
    start=$(date +%s)
    $py train.py "$@" --out "$out" "${resume[@]}" 2>&1 | tee -a "$out.log"
    echo $(( $(date +%s) - start )) > "$out/done"
}
mkdir -p "$ck"

# The stand-in for ImageNet weights: resnet18 from scratch on source/ (30,000 photos, 100
# classes), Phase II alone, 24 epochs, a higher learning rate and batch than fine-tuning's.
wanted pretrain && run "$ck/source" --data "$src" --arch resnet18 --img-size 64 --weights none \
    --batch-size 128 --epochs1 0 --epochs2 24 --lr2 2e-3 --warmup-epochs 2 --cosine-epochs 22

wanted method && run "$ck/method" "${common[@]}" "${pretrained[@]}" --epochs1 2 --epochs2 6 \
    "${schedule[@]}"
wanted phase2-only && run "$ck/phase2-only" "${common[@]}" "${pretrained[@]}" --epochs1 0 \
    --epochs2 8 --warmup-epochs 1 --cosine-epochs 7
wanted probe && run "$ck/probe" "${common[@]}" "${pretrained[@]}" --epochs1 8 --epochs2 0
wanted scratch && run "$ck/scratch" "${common[@]}" --weights none --epochs1 0 --epochs2 8 \
    --warmup-epochs 1 --cosine-epochs 7

# The method with its budget split as the report's (Phase I 10 of 135 epochs, warmup 5 of 125):
# at 8 epochs that is 1 + 7 and no warmup, where the rows above round both up (the split
# `--epochs 8` makes, written out so that RESULTS.md's command shows it). Two seeds, to show the
# noise between runs; each keeps its last 3 epochs, which python -m twophase.average averages for the
# weight-averaging lever.
if wanted method-1+7; then
    for seed in ${SEEDS:-0 1}; do
        out="$ck/method-1+7-s$seed"
        run "$out" "${common[@]}" "${pretrained[@]}" --epochs1 1 --epochs2 7 --warmup-epochs 0 \
            --cosine-epochs 7 --keep-last 3 --seed "$seed"
        [ -f "$out/averaged.pt" ] || $py -m twophase.average "$out"/epoch*.pt \
            --out "$out/averaged.pt"  # the 3 that --keep-last left
    done
fi

timm_run() {  # timm_run NAME ARGS...: timm's train.py fine-tuning the source backbone for 8
              # epochs at the same batch and size, into $ck/timm-output/NAME, then converted into
              # $ck/NAME/best.pt (scored by this project's predict path); a stopped run resumes
    local name=$1; shift
    if [ -f "$ck/$name/best.pt" ]; then echo "== $name: done"; return; fi
    if [ ! -f "$timm_train" ] || ! $py -c "import timm" 2>/dev/null; then
        echo "== $name: skipped (no timm, or no $timm_train)"; return
    fi
    [ -f "$ck/source/backbone.pth" ] || $py -c "import torch; \
s = torch.load('$ck/source/best.pt', weights_only=True); torch.save(s['model'], '$ck/source/backbone.pth')"
    local cmd=("$timm_train" --model resnet18 --pretrained
               --model-kwargs "pretrained_cfg_overlay={'file':'$ck/source/backbone.pth'}"
               --num-classes 100 --data-dir "$tgt" --train-split train --val-split val
               --img-size 64 --crop-pct 1.0 --batch-size 72 --epochs 8 --workers 1 --device cpu
               --output "$ck/timm-output" --experiment "$name" "$@")
    local out="$ck/timm-output/$name" resume=()
    [ -f "$out/last.pth.tar" ] && resume=(--resume "$out/last.pth.tar")
    epochs() {  # that timm's summary.csv records (a resumed run writes its header again)
        if [ -f "$out/summary.csv" ]; then grep -c '^[0-9]' "$out/summary.csv" || true; else echo 0; fi
    }
    local before after start
    before=$(epochs) start=$(date +%s)
    echo "== $name: python ${cmd[*]} ${resume[*]}"
    $py "${cmd[@]}" "${resume[@]}" 2>&1 | tee -a "$ck/$name.log"
    after=$(epochs)  # a resumed run's time: this call's, scaled to all of its epochs
    $py benchmarks/from_timm.py "$out" --data "$tgt" --out "$ck/$name/best.pt" \
        --command "python ${cmd[*]}" \
        --wall-seconds $(( ( $(date +%s) - start ) * after / (after - before) ))
}

# timm's train.py with its own recipe (SGD with Nesterov momentum, lr 0.1 x batch / 256, cosine
# after 1 warmup epoch, weight decay 2e-5, RandomResizedCrop, horizontal flips, colour jitter 0.4,
# label smoothing 0.1).
wanted timm && timm_run timm --warmup-epochs 1 --seed 0

# Figure 4: the Phase II optimizers from one Phase I (the method's), one epoch each at the
# method's peak learning rate. The levers below share this start and budget.
short=(--phase 2 --epochs1 2 --epochs2 1 --warmup-epochs 0 --cosine-epochs 1)
if wanted optimizers; then
    for opt in nadam adamw adam sgd rmsprop; do
        mkdir -p "$ck/opt-$opt" && cp -n "$ck/method/phase1.pt" "$ck/opt-$opt/"
        run "$ck/opt-$opt" "${common[@]}" "${pretrained[@]}" "${short[@]}" --optimizer2 "$opt"
    done
fi

# Figure 3 on a GPU (not in the default steps: hours on a CPU): each architecture pretrained on
# source/ as resnet18 was, then fine-tuned by the method at the same budget.
#   STEPS="architectures report" bash benchmarks/tiny_transfer.sh
if wanted architectures; then
    for arch in ${ARCHS:-resnet34 resnet50 resnet101 resnext50_32x4d wide_resnet50_2}; do
        run "$ck/source-$arch" --data "$src" --arch "$arch" --img-size 64 --weights none \
            --batch-size 128 --epochs1 0 --epochs2 24 --lr2 2e-3 --warmup-epochs 2 --cosine-epochs 22
        run "$ck/arch-$arch" "${common[@]/resnet18/$arch}" --weights "$ck/source-$arch/best.pt" \
            --epochs1 2 --epochs2 6 "${schedule[@]}"
    done
fi

# The accuracy levers, each a Phase II epoch from the method's Phase I, as the optimizers above,
# two seeds each (the seed draws Phase II's batches and augmentation). The base run keeps a
# moving average, so that --ema, --tta and the test size are measured on the very run they would
# change nothing of in training.
if wanted levers; then
    L="$ck/levers"
    for seed in ${SEEDS:-0 1}; do  # SEEDS=0 and SEEDS=1 can run side by side, a core each
        for lever in base mixup cutmix lr-decay no-vflip recipe; do
            mkdir -p "$L/$lever-s$seed" && cp -n "$ck/method/phase1.pt" "$L/$lever-s$seed/"
        done
        base=("${common[@]}" "${pretrained[@]}" "${short[@]}" --seed "$seed")
        run "$L/base-s$seed" "${base[@]}" --ema 0.99
        run "$L/mixup-s$seed" "${base[@]}" --mixup 0.2
        run "$L/cutmix-s$seed" "${base[@]}" --cutmix 1.0
        run "$L/lr-decay-s$seed" "${base[@]}" --lr-decay 0.7
        run "$L/no-vflip-s$seed" "${base[@]}" --p-vflip 0
        # The levers that measured better on validation, together: README's leaderboard recipe.
        run "$L/recipe-s$seed" "${base[@]}" --ema 0.99 --lr-decay 0.7 --p-vflip 0
    done
fi

# --recipe best at the full budget, against the method (method-1+7 above) and against timm's
# train.py given the recipe's levers in its own terms: the same optimizer, peak rate and weight
# decay (NAdam, 5e-4, 1e-4; timm leaves biases and batch norm undecayed), no warmup and one cosine
# over the 8 epochs as `--epochs 8` makes, --model-ema at 0.99 (timm then validates and keeps
# the moving average), --layer-decay 0.7 (timm decays per block, ours per stage), no vertical
# flips; otherwise its defaults (RandomResizedCrop, horizontal flips, colour jitter 0.4).
# Two seeds each; SEEDS=0 then SEEDS=1 runs the rows seed by seed.
if wanted recipe-8; then
    for seed in ${SEEDS:-0 1}; do
        run "$ck/recipe-8-s$seed" "${common[@]}" "${pretrained[@]}" --recipe best --epochs 8 \
            --seed "$seed"
    done
fi
# The levers that spend fewer pixels, on top of --recipe best (benchmarks/time_to_accuracy.py's
# fourth row): Phase II's first epochs at 48 of 64 px rising to 64 by three quarters of it, and
# the test size chosen on validation (FixRes).
if wanted pixels-8; then
    for seed in ${SEEDS:-0 1}; do
        run "$ck/pixels-8-s$seed" "${common[@]}" "${pretrained[@]}" --recipe best --epochs 8 \
            --progressive 0.75 --test-size auto --seed "$seed"
    done
fi
# --recipe fast, the deadline's recipe, at the same budget.
if wanted fast-8; then
    for seed in ${SEEDS:-0 1}; do
        run "$ck/fast-8-s$seed" "${common[@]}" "${pretrained[@]}" --recipe fast --epochs 8 \
            --seed "$seed"
    done
fi
# Half the budget, --recipe fast: does a schedule that ends sooner (its cosine done by its
# fourth epoch) reach a given accuracy sooner than the 8-epoch one does on its way?
if wanted fast-4; then
    for seed in ${SEEDS:-0 1}; do
        run "$ck/fast-4-s$seed" "${common[@]}" "${pretrained[@]}" --recipe fast --epochs 4 \
            --seed "$seed"
    done
fi
if wanted timm-recipe; then
    for seed in ${SEEDS:-0 1}; do
        timm_run "timm-recipe-s$seed" --opt nadam --lr 5e-4 --weight-decay 1e-4 --warmup-epochs 0 \
            --model-ema --model-ema-decay 0.99 --layer-decay 0.7 --vflip 0 --seed "$seed"
    done
fi
# 16 epochs, one seed: does the two phases' gain over Phase II alone appear at a longer budget,
# and do MixUp and CutMix, a loss at one epoch, turn into a gain?
if wanted budget-16; then
    run "$ck/method-16" "${common[@]}" "${pretrained[@]}" --epochs 16
    run "$ck/recipe-16" "${common[@]}" "${pretrained[@]}" --recipe best --epochs 16
    run "$ck/phase2-only-16" "${common[@]}" "${pretrained[@]}" --epochs1 0 --epochs2 16 \
        --warmup-epochs 1 --cosine-epochs 15  # the Phase II schedule --epochs 16 makes
    run "$ck/mixup-16" "${common[@]}" "${pretrained[@]}" --epochs 16 --mixup 0.2
    run "$ck/cutmix-16" "${common[@]}" "${pretrained[@]}" --epochs 16 --cutmix 1.0
fi

# Uneven classes and photos that are not square: two variants of target/ (benchmarks/variants.py
# make: a long-tailed cut of train/, 200 down to 20 images a class; every photo on a 3:2 canvas,
# off centre), the method on each at the full budget: none, --class-weights auto and --sampler
# balanced (two seeds); --resize crop, squish and pad (SEEDS of its own, default 0).
if (wanted long-tail || wanted aspect) && ! [ -d "$tgt-lt" -a -d "$tgt-wide" ]; then
    $py benchmarks/variants.py make "$tgt"
fi
if wanted long-tail; then
    for seed in ${SEEDS:-0 1}; do
        lt=(--data "$tgt-lt" --arch resnet18 --img-size 64 "${pretrained[@]}" --epochs 8 --seed "$seed")
        run "$ck/lt-none-s$seed" "${lt[@]}"
        run "$ck/lt-weights-s$seed" "${lt[@]}" --class-weights auto
        run "$ck/lt-balanced-s$seed" "${lt[@]}" --sampler balanced
    done
fi
if wanted aspect; then
    for seed in ${ASPECT_SEEDS:-0}; do
        for mode in crop squish pad; do
            run "$ck/wide-$mode-s$seed" --data "$tgt-wide" --arch resnet18 --img-size 64 \
                "${pretrained[@]}" --epochs 8 --resize "$mode" --seed "$seed"
        done
    done
fi

# --time-budget on this machine: the method given 10 and 30 minutes (BENCHMARKS.md: how close
# each ended to its budget, and the accuracy each reached).
if wanted time-budget; then
    for minutes in ${BUDGETS:-10 30}; do
        run "$ck/budget-${minutes}m" "${common[@]}" "${pretrained[@]}" --time-budget "${minutes}m"
    done
fi

if wanted report; then  # of the runs that have finished

    finished() { for f in "$@"; do [ -f "$(dirname "$f")/done" ] && echo "$f"; done; }
    mapfile -t runs < <(finished "$ck"/{scratch,probe,phase2-only,method,method-1+7-s{0,1}}/best.pt)
    [ -f "$ck/timm/best.pt" ] && runs+=("$ck/timm/best.pt")
    mapfile -t optimizers < <(finished "$ck"/opt-{nadam,adamw,adam,sgd,rmsprop}/best.pt)
    mapfile -t archs < <(finished "$ck"/arch-*/best.pt)
    compare=(--compare "${runs[@]}")
    [ ${#optimizers[@]} -gt 0 ] && compare+=(--compare "${optimizers[@]}")
    [ ${#archs[@]} -gt 0 ] && compare+=(--compare "$ck/method/best.pt" "${archs[@]}")
    if [ -f "$ck/method/best.pt" ]; then
        $py evaluate.py --ckpt "$ck/method/best.pt" --report RESULTS.md --figures results \
            --answers "$tgt/answers.csv" "${compare[@]}"
    fi
    $py benchmarks/full_budget.py "$ck" --answers "$tgt/answers.csv" --results RESULTS.md \
        --figures results/recipe  # the runs of recipe-8, timm-recipe and budget-16 that finished
    $py benchmarks/variants.py results "$ck" --data "$(dirname "$tgt")" --results RESULTS.md
    if [ -d "$ck/levers" ]; then
        $py benchmarks/levers.py "$ck/levers" --answers "$tgt/answers.csv" --results RESULTS.md \
            --averaging "$ck"/method-1+7-s*
    fi
fi
