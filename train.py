"""Fine-tune an ImageNet-pretrained ResNet in two phases: the report's Algorithm 1.

Phase I trains only a new head on the frozen backbone; Phase II fine-tunes every layer with
NAdam, a linear warmup then cosine learning rate, fp16 autocast and gradient clipping. main reads
as the method: the options (Table 1), the data, the model, then each phase's optimizer,
schedule, loss and epochs (train_epoch, whose steps are optimizer_steps), and the result.

    python train.py --demo              # the whole pipeline on a small bundled dataset, CPU
    python train.py                     # both phases on data/
    python train.py --resume checkpoints/last.pt
"""

import copy
import itertools
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
    decode_seconds,
    plan_time_budget,
    replan_time_budget,
    save_seconds,
    synchronized,
)
from twophase.checkpoint import LAST_PT, Checkpointer, best_acc, epoch_record
from twophase.divergence import check_epoch, check_position
from twophase.features import FeatureStream, timed_pass
from twophase.loader import data_loaders
from twophase.loss import check_class_weights, loss_of
from twophase.resolve import resolve
from twophase.result import select_result
from twophase.run import (
    Preempted,
    Run,
    demo_next_steps,
    distributed,
    epoch_line,
    model_on_device,
    out_of_memory_advice,
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
from utils import (
    EXIT_INTERRUPTED,
    Problem,
    StopRequest,
    amp_dtype,
    compile_support,
    exits_on_problems,
    gather_from_processes,
    init_distributed,
    is_main_process,
    local_main_first,
    log,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
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
    folder = RunFolder(args.out, writer=procs.rank == 0)
    try:
        # The first process holds --out for the run: no other run writes there meanwhile.
        with folder.claimed(start, args):
            with local_main_first(procs.local_rank):
                splits = load_data(args, dataset)  # a stop here is Python's: no position yet
            with (
                StopRequest() as stop,
                closing(set_up(args, start, splits, model, folder, device, procs, stop)) as run,
            ):
                if budget_to_plan(resolved):  # the epochs that fit, chosen once as the run starts
                    kept = budget_kept(resolved)
                    run.args = plan_time_budget(run, kept, started, time_steps(run))
                # Algorithm 1. Phase I fits the new head on the frozen backbone; Phase II
                # fine-tunes every layer, warmup then cosine, its gradients clipped.
                for number in phases(run.args):
                    phase = phase_setup(
                        number, run.args, run.model, device, run.criterion, run.dtype
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


def load_data(args, dataset):
    """The training and validation images, decoded once into the cache (train/val: the one rule
    for which images validate)."""
    return cache_splits(
        dataset,
        args.img_size,
        resize=args.resize,
        cache_dir=args.cache_dir,
        threads=args.cache_workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


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
        board=Board.of(args, folder.path, step) if procs.rank == 0 else None,
        features=FeatureStream.of(args, stream, model, procs),
    )
    log(start_line(run))
    if uneven:
        log(uneven)
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
    weights, images_seen = 0.0, 0  # a weighted step's sums, for its mean
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(batches, start=tally.batches):
        step_now = (i + 1) % accum == 0 or i + 1 == total
        group = min(accum, total - i // accum * accum)  # the last group of an epoch: shorter
        targets = labels
        if phase.mix is not None:
            images, targets = phase.mix(images, labels)
        # Under DDP, gradients are all-reduced once per optimizer step, not once per batch.
        sync = net.no_sync() if not step_now and hasattr(net, "no_sync") else nullcontext()
        with sync:
            dtype = phase.dtype
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
                logits = net(images)
                if weighted:  # by the images here; by the weights once the step's are summed
                    loss_sum, weight_sum = phase.criterion.sums(logits, targets)
                    loss, to_step = loss_sum / weight_sum, loss_sum / len(labels)
                    weights, images_seen = weights + weight_sum, images_seen + len(labels)
                else:
                    loss = to_step = phase.criterion(logits, targets)
            scaler.scale(to_step / group if group > 1 else to_step).backward()
        if step_now:
            if weighted:
                divide_by_weights(params, images_seen, weights)
                weights, images_seen = 0.0, 0
            if phase.clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                nn.utils.clip_grad_norm_(params, phase.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
        tally.add(loss, logits, labels)
        if step_now:
            yield i + 1


def divide_by_weights(params, images, weights):
    """A step with class weights, as one batch of all its images would take it: each batch's
    backward divided its weighted loss by its images, where PyTorch's weighted mean divides by
    the sum of their classes' weights; here the gradients take images / weights, summed over
    every batch of the step (--accum-steps) and every process (DDP). No host sync."""
    totals = torch.stack([torch.full_like(weights, float(images)), weights])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, totals[0] / totals[1])


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


# ----------------------------------------------------------------------------- timing


def time_steps(run, steps=3):
    """Seconds an optimizer step of each phase takes here (step1, step2; with --phase1-features,
    the head's on features, and a batch of a feature pass: pass), a validation pass
    (validation), an epoch's checkpoints (save) and an image decoded (decode): `steps` steps of a
    copy of the model in each phase after one to warm up, the copy thrown away and the global
    random state put back, so that the run trains as it would have. Under torchrun every process
    times its share, through DDP, and the slowest counts."""
    args, device = run.args, run.device
    state = rng_state()
    run.stream.draw(0, args.img_size)
    with closing(run.stream.batches(device)) as batches:
        batches = list(itertools.islice(batches, (steps + 1) * args.accum_steps))
    timed = {}
    for number in (1, 2):
        model = copy.deepcopy(run.model)
        phase = phase_setup(number, args, model, device, run.criterion, run.dtype)
        phase.set_rates(0)
        net, inputs = distributed(model, device, run.world_size), batches
        if number == 1 and run.features is not None:  # a feature pass, then the head's steps
            inputs, timed["pass"] = timed_pass(model, batches, phase)
            net = distributed(model.fc, device, run.world_size)
        done = optimizer_steps(net, iter(inputs), len(inputs), phase, None, EpochTally())
        times = [synchronized(device)] + [synchronized(device) for _ in done]  # before, after each
        timed_steps = times[1:] if len(times) > 2 else times  # the first step warms up
        timed[f"step{number}"] = (timed_steps[-1] - timed_steps[0]) / (len(timed_steps) - 1)
        del net, model, phase
    model = run.model.eval()
    with torch.no_grad(), torch.autocast(device.type, run.dtype, enabled=run.dtype is not None):
        t0 = synchronized(device)
        for images, _ in batches:
            model(images)
        per_image = (synchronized(device) - t0) / sum(len(labels) for _, labels in batches)
    timed["validation"] = per_image * len(run.splits.val) / run.world_size  # each its share
    timed |= {"per_image": per_image, "save": save_seconds(run), "decode": decode_seconds(run)}
    set_rng_state(state)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    every = gather_from_processes(timed)
    return {key: max(t[key] for t in every) for key in timed}


if __name__ == "__main__":
    main()
