"""Fine-tune an ImageNet-pretrained ResNet in two phases: the report's Algorithm 1.

Phase I trains only a new head on the frozen backbone; Phase II fine-tunes every layer with
NAdam, a linear warmup then cosine learning rate, fp16 autocast and gradient clipping. main reads
as the method: the options (Table 1), the data, the model, then each phase's optimizer,
schedule, loss and epochs (train_epoch, whose steps are optimizer_steps), and the result.

    python train.py --demo              # the whole pipeline on a small bundled dataset, CPU
    python train.py                     # both phases on data/
    python train.py --resume checkpoints/last.pt
"""

import math
import time
from contextlib import closing, nullcontext

import torch
from torch import nn
from tqdm import tqdm

from data import cache_splits, dataset_of, write_demo_dataset
from model import (
    build_model,
    count_parameters,
    set_trainable,
    stage_groups,
    train_mode,
    warn_if_too_large,
)
from twophase.augment import BatchPreprocess, MixUpCutMix
from twophase.board import Board, require_tensorboard
from twophase.budget import (
    EpochDisplay,
    budget_kept,
    budget_to_plan,
    plan_time_budget,
    replan_time_budget,
)
from twophase.checkpoint import LAST_PT, Checkpointer, best_acc, epoch_record
from twophase.data_check import check_copies
from twophase.divergence import check_epoch, check_position
from twophase.features import FeatureStream
from twophase.loader import data_loaders
from twophase.loss import check_class_weights, divide_by_weights, loss_of
from twophase.lr_find import Training, find_lrs, found_rate, numeric_rates
from twophase.regularise import L2SP, SAM, head_apart
from twophase.resolve import resolve
from twophase.result import select_result
from twophase.run import (
    Preempted,
    Run,
    demo_next_steps,
    epoch_line,
    model_on_device,
    out_of_memory_advice,
    small_data,
    start_line,
    stopped,
    summarize,
    uneven_classes,
)
from twophase.run_folder import RunFolder
from twophase.schedule import (
    Phase,
    ProgressiveSize,
    WarmupCosine,
    constant,
    describe_phase,
    make_optimizer,
    size_step,
)
from twophase.tally import EpochTally
from twophase.timing import time_steps
from utils import (
    EXIT_INTERRUPTED,
    Problem,
    StopRequest,
    amp_dtype,
    compile_support,
    exits_on_problems,
    init_distributed,
    is_main_process,
    local_main_first,
    log,
    pick_device,
    seed_everything,
)


@exits_on_problems
def main(argv=None):
    started = time.monotonic()  # a --time-budget counts from here
    resolved = resolve(argv)  # final: Table 1, the presets, a continued run's rules
    args, start = resolved.options, resolved.start
    procs = init_distributed(args.device, args.dist_timeout)
    device = pick_device(args.device, procs.local_rank)
    refuse_what_cannot_run(args, device, procs)
    # Checked before a folder is claimed or an image decoded (layout, CSVs, weights): seconds.
    with local_main_first(procs.local_rank):
        dataset = find_data(args)
    seed_everything(args.seed + procs.rank)  # initialisation, and anything random a model adds
    weights = start.weights(args.arch, args.weights)
    model = build_model(args.arch, len(dataset.classes), weights)
    log(f"weights: {weights.about}; inputs normalised with {normalisation(args)}")
    folder = RunFolder(args.out, writer=procs.rank == 0 and not args.find_lr)  # writes no run
    training = Training(phase_setup, optimizer_steps)  # for the range tests and the timing
    try:
        # The first process holds --out for the run: no other run writes there meanwhile.
        with folder.claimed(start, args):
            with local_main_first(procs.local_rank):
                splits = load_data(args, dataset, folder)  # a stop here: no position yet
            with (
                StopRequest() as stop,
                closing(set_up(args, start, splits, model, folder, device, procs, stop)) as run,
            ):
                if args.find_lr:  # the LR range test alone: its curves and rates, no training
                    return find_lrs(run, training, phases(args))
                if budget_to_plan(resolved):  # the epochs that fit, chosen once as the run starts
                    kept = budget_kept(resolved)
                    run.args = plan_time_budget(run, kept, started, time_steps(run, training))
                # Algorithm 1. Phase I fits the new head on the frozen backbone; Phase II
                # fine-tunes every layer, warmup then cosine, its gradients clipped.
                for number in phases(run.args):
                    run.args = found_rate(run, number, training)
                    phase = phase_setup(  # numeric_rates: `auto` stays where no epoch trains
                        number, numeric_rates(run.args), run.model, device, run.criterion, run.dtype
                    )
                    train_phase(run, phase)
                if run.args.phase != "1":
                    select_result(run)  # best.pt: the best epoch's, or their average's
    except torch.OutOfMemoryError:
        raise SystemExit(out_of_memory_advice(args, folder, start)) from None
    except Preempted as preempted:
        raise SystemExit(stopped(folder, preempted)) from None
    except KeyboardInterrupt:
        saved = f"{folder.path / LAST_PT} holds the last position saved" if folder.written else ""
        log(f"interrupted at once: {saved or 'nothing of this run was saved'}")
        raise SystemExit(EXIT_INTERRUPTED) from None
    summarize(run, started)
    if args.demo:
        log(demo_next_steps(args))
    if procs.world_size > 1:
        torch.distributed.destroy_process_group()
    return run


def refuse_what_cannot_run(args, device, procs):
    if args.compile and (why := compile_support(device)):
        raise Problem(f"--compile: {why}; train without it")
    if args.sync_bn and procs.world_size > 1 and device.type != "cuda":
        raise Problem("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation")
    if args.tensorboard is not None and procs.rank == 0:
        require_tensorboard()


def find_data(args):
    """The data the options name (the demo's written first), listed and checked, its CSVs too:
    nothing decoded yet."""
    if args.demo:
        write_demo_dataset(args.data)
    dataset = dataset_of(vars(args))
    check_class_weights(args.class_weights, dataset.classes)
    return dataset


def load_data(args, dataset, folder):
    """The training and validation images, decoded once into the cache (train/val: the one rule
    for which images validate), then checked for copies (data_check.py)."""
    splits = cache_splits(
        dataset,
        args.img_size,
        resize=args.resize,
        cache_dir=args.cache_dir,
        threads=args.cache_workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    return check_copies(args, dataset, splits, folder)


def normalisation(args):
    mean, std = (", ".join(f"{v:.3f}" for v in values) for values in (args.mean, args.std))
    return f"mean ({mean}), std ({std})"


def set_up(args, start, splits, model, folder, device, procs, stop):
    """The run at its start: the model on the device with its moving average (the weights of
    the checkpoint it continues, where it does), the loss, the data's stream and loaders, the
    checkpoints; and its first lines."""
    model, ema = model_on_device(args, start, splits.classes, model, device, procs)
    start.refuse_other_held_out(splits, args)
    counts = splits.train.class_counts(len(splits.classes))
    stream, val_loader = data_loaders(args, splits, device, procs)
    step = start.steps_done(len(stream), args.accum_steps)
    uneven = uneven_classes(counts, args)
    run = Run(
        args=args,
        model=model,
        ema=ema,
        # Both phases' loss, and validation's.
        criterion=loss_of(args, splits.classes, counts).to(device),
        dtype=amp_dtype(args.amp, device),
        device=device,
        procs=procs,
        splits=splits,
        stream=stream,
        val_loader=val_loader,
        eval_preprocess=BatchPreprocess(args.mean, args.std).to(device),
        start=start,
        saver=Checkpointer(folder, model, ema, splits, procs, start),
        stop=stop,
        history=start.history(),
        step=step,
        averaged_acc=folder.averaged_acc(start),
        classes_uneven=uneven is not None,
        board=Board.of(args, folder.path, step) if folder.writer else None,
        features=FeatureStream.of(args, stream, model, procs),
    )
    log(start_line(run))
    if uneven:
        log(uneven)
    if small := small_data(len(splits.train), args, procs.world_size):
        log(small)
    warn_if_too_large(args.arch, count_parameters(model.parameters()), args.max_params)
    return run


# ----------------------------------------------------------------------------- the phases


def phases(args):
    """The phases this command trains: --phase 1, 2, or all (both, in order)."""
    return {"1": (1,), "2": (2,), "all": (1, 2)}[args.phase]


def phase_setup(number, args, model, device, criterion, dtype):
    """Table 1 from the options: the only place a phase is put together (the benchmarks use it
    too). It sets which of `model`'s parameters learn. `criterion` and `dtype` are the run's loss
    and autocast dtype, which validation shares."""
    # fp16 losses are scaled on CUDA, against gradients too small for float16; Apple's GPUs
    # train fp16 autocast without a scaler (torch's GradScaler is CUDA's).
    scaled = dtype == torch.float16 and device.type == "cuda"
    step = dict(
        criterion=criterion,
        dtype=dtype,
        scaler=torch.amp.GradScaler("cuda" if scaled else device.type, enabled=scaled),
        accum_steps=args.accum_steps,
    )
    if number == 1:
        # The new head alone, at a constant learning rate, the backbone frozen.
        optimizer = make_optimizer("adamw", set_trainable(model, 1), args.lr1, args.wd1, device)
        return Phase(
            number=1,
            epochs=args.epochs1,
            optimizer=optimizer,
            peak_lrs=[args.lr1],
            schedule=constant,
            image_size=ProgressiveSize(args.img_size, args.img_size, 1, size_step(args.img_size)),
            weight_decay=args.wd1,
            clip=0.0,
            freeze_bn=args.freeze_bn,
            mix=None,
            **step,
        )
    # Every layer: warmup then cosine, gradients clipped.
    set_trainable(model, 2)
    groups = stage_groups(model, args.lr2, args.lr_decay)
    groups = head_apart(model, groups) if args.l2sp else groups  # the head keeps its decay
    optimizer = make_optimizer(args.optimizer2, groups, args.lr2, args.wd2, device)
    mix = None
    if args.mixup or args.cutmix:
        mix = MixUpCutMix(args.mixup, args.cutmix, model.fc.out_features)
    return Phase(
        number=2,
        epochs=args.epochs2,
        optimizer=optimizer,
        peak_lrs=[group["lr"] for group in optimizer.param_groups],
        schedule=WarmupCosine.of(args),
        image_size=ProgressiveSize.of(args, args.epochs2),
        weight_decay=args.wd2,
        clip=args.clip,
        freeze_bn=False,
        mix=mix,
        l2sp=L2SP.of(args, model),
        sam=SAM.of(args),
        **step,
    )


def train_phase(run, phase):
    """The phase's epochs still to train, each trained, validated and saved. After a Phase II
    epoch a --time-budget may re-plan the run: shorter, with its new options and phase (epochs,
    cosine, sizes), which the loop goes on with from there."""
    epoch, resumed = begin_phase(run, phase)
    while epoch < phase.epochs:
        phase.set_rates(epoch)  # per epoch, as the method specifies
        train = train_epoch(run, phase, epoch, resumed)
        record, is_best = validate_epoch(run, phase, epoch, train)
        run.args, phase = replan_time_budget(run, phase, epoch + 1)
        end_epoch(run, phase, epoch, record, is_best)
        epoch, resumed = epoch + 1, (0, None)


def begin_phase(run, phase):
    """Where the phase begins: (its first epoch to train, the batches a stopped run trained of
    it and their record). Where it has epochs to train, the optimizer's state of a run stopped
    in it is restored, the model wrapped for its steps and the phase described."""
    first, done, partial = run.start.position(
        phase.number, run.rank, run.world_size, run.args.batch_size
    )
    if first < phase.epochs:
        run.start.restore_phase(phase, run.model)
        run.wrap()
        log(describe_phase(phase, run.args, run.model))
    return first, (done, partial)


# ----------------------------------------------------------------------------- the loop


def train_epoch(run, phase, epoch, resumed=(0, None)):
    """One epoch of `phase`: its draws, then its batches from the first not
    trained (`resumed`: those a stopped run trained of it, and their record) by optimizer_steps.
    After each optimizer step, and there alone, the run stops if asked to or saves its position
    every --save-every-steps steps; at the epoch's last batch a stop waits for its validation and
    checkpoint. Returns the epoch's training record: loss, accuracy, rate, seconds, size."""
    args, (first_batch, partial) = run.args, resumed
    lr = phase.optimizer.param_groups[0]["lr"]
    stream, net = run.inputs(phase)  # images and the model, or Phase I's cached features
    stream.draw(run.epochs_trained, phase.image_size(epoch), phase.mix, first_batch)
    tally = EpochTally()
    if partial:
        tally = EpochTally.restored(partial, run.device)
        stream.replay(partial["sizes"], phase.mix)
    t0 = time.perf_counter() - (partial["seconds"] if partial else 0.0)
    total = first_batch + len(stream)  # the epoch's batches
    every = args.save_every_steps * args.accum_steps
    with closing(stream.batches(run.device)) as batches:
        bar = tqdm(
            batches,
            desc=f"phase {phase.number} epoch {epoch + 1}/{phase.epochs}",
            total=total,
            initial=first_batch,
            leave=False,
            disable=None if is_main_process() else True,
            unit="batch",
        )
        shown = EpochDisplay(run, phase, epoch, bar, first_batch, total)
        for done in optimizer_steps(net, bar, total, phase, run.ema, tally):
            run.step += 1
            shown.step(done)
            if run.board is not None and run.step % args.tensorboard_every == 0:
                run.board.step_loss(run.step, tally.losses[-1])
            stop = done < total and run.stop.requested()  # agreed by every process
            if stop or (done < total and every and done % every == 0):
                check_position(run, phase.number, epoch, tally)
                position = tally.saved(time.perf_counter() - t0)
                run.saver.save_position(args, run.history, phase, epoch, position)
            if stop:
                run.stop.barrier()  # no process exits before the first has written last.pt
                where = f"{done} batches into phase {phase.number} epoch {epoch + 1}"
                raise Preempted(where, run.stop)
    summary = tally.summary(run.device) | {"steps": math.ceil(total / args.accum_steps)}
    seconds = time.perf_counter() - t0
    return summary | {"lr": lr, "seconds": seconds, "img_size": stream.preprocess.size}


def optimizer_steps(net, batches, total, phase, ema, tally):
    """The training steps: trains on `batches`, the rest of an epoch of `total` batches from
    batch `tally.batches` on, an optimizer step every `phase.accum_steps` batches, and yields the
    number of batches done after each optimizer step, where the caller may save the position or
    stop. Each batch's loss and correct predictions stay on the device in `tally`, so the host
    never waits for the device for them. `ema` (model.EMA) follows every optimizer step."""
    train_mode(net, phase.freeze_bn)
    optimizer, scaler, accum = phase.optimizer, phase.scaler, phase.accum_steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weighted = getattr(phase.criterion, "weight", None) is not None
    weights, images_seen, kept = 0.0, 0, []  # a weighted step's sums, for its mean; its batches
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(batches, start=tally.batches):
        step_now = (i + 1) % accum == 0 or i + 1 == total
        group = min(accum, total - i // accum * accum)  # the last group of an epoch: shorter
        targets = labels
        if phase.mix is not None:
            images, targets = phase.mix(images, labels)
        loss, logits, weight_sum = backward(net, phase, images, targets, group, sync=step_now)
        if weighted:  # by the images here; by the weights once the step's are summed
            weights, images_seen = weights + weight_sum, images_seen + len(labels)
        kept += [(images, targets)] if phase.sam is not None else []
        if step_now:
            if phase.sam is not None:  # the step's gradient again, where the loss rises most
                with phase.sam.ascended(net, params):
                    for j, (again, same) in enumerate(kept, start=1):
                        backward(net, phase, again, same, group, sync=j == len(kept))
                kept = []
            if weighted:
                divide_by_weights(params, images_seen, weights)
                weights, images_seen = 0.0, 0
            if phase.clip or phase.l2sp is not None:
                scaler.unscale_(optimizer)  # the true gradients, not the loss-scaled ones
            if phase.l2sp is not None:
                phase.l2sp.pull()
            if phase.clip:
                nn.utils.clip_grad_norm_(params, phase.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
        tally.add(loss, logits, labels)
        if step_now:
            yield i + 1


def backward(net, phase, images, targets, group, sync):
    """One batch's forward and backward, its loss divided among the `group` batches of its step;
    under DDP the gradients are all-reduced where `sync` (once a step, not once a batch).
    Returns its loss, logits and, with class weights, the sum its weighted mean divides by."""
    wait = net.no_sync() if not sync and hasattr(net, "no_sync") else nullcontext()
    with wait:
        dtype, weight_sum = phase.dtype, None
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(images)
            if getattr(phase.criterion, "weight", None) is not None:
                loss_sum, weight_sum = phase.criterion.sums(logits, targets)
                loss, to_step = loss_sum / weight_sum, loss_sum / len(targets)
            else:
                loss = to_step = phase.criterion(logits, targets)
        phase.scaler.scale(to_step / group if group > 1 else to_step).backward()
    return loss, logits, weight_sum


def validate_epoch(run, phase, epoch, train):
    """An epoch's validation and its record, added to the run's history; and whether it is the
    best so far."""
    t0 = time.perf_counter()
    val = run.validate()
    check_epoch(run, phase.number, epoch, train, val)
    seconds = time.perf_counter() - t0
    record = epoch_record(phase.number, epoch, train["lr"], train, val, train["seconds"], seconds)
    is_best = best_acc(record) > run.best_so_far()
    run.history.append(record)
    return record, is_best


def end_epoch(run, phase, epoch, record, is_best):
    """An epoch's log line and checkpoints; then a stop asked for during them, unless all is
    done."""
    left = run.forecast.words(phase.number, epoch + 1)
    line = epoch_line(record, phase.epochs, is_best, run.classes_uneven, len(run.splits.classes))
    log(f"{line} | {left}")
    if run.board is not None:
        run.board.epoch(record, run.step)
    run.saver.save_epoch(run.args, run.history, phase, epoch + 1, is_best)
    phase2_follows = phase.number == 1 and run.args.phase == "all" and run.args.epochs2 > 0
    if (epoch + 1 < phase.epochs or phase2_follows) and run.stop.requested():
        raise Preempted(f"after phase {phase.number} epoch {epoch + 1}", run.stop)


if __name__ == "__main__":
    main()
