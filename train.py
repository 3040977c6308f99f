"""Fine-tune an ImageNet-pretrained ResNet in two phases (the report's Algorithm 1).

Phase I trains only a new head on the frozen backbone; Phase II fine-tunes every layer with
NAdam, a linear warmup then cosine learning rate, fp16 autocast and gradient clipping. The
recipe (Table 1: every option's default) is recipe.py's; the checkpoint format and the run's
folder are checkpoint.py's; --time-budget's plan and the time-left forecast are budget.py's,
--tensorboard's curves board.py's. This file is the loop.

    python train.py --demo              # the whole pipeline on a small bundled dataset, CPU
    python train.py                     # both phases on data/
    python train.py --resume checkpoints/last.pt
"""

import copy
import itertools
import math
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (
    DatasetFiles,
    Splits,
    cache_splits,
    dataset_of,
    make_loader,
    resized,
    set_epoch,
    validation_is_drawn,
    write_demo_dataset,
)
from model import (
    EMA,
    build_model,
    count_parameters,
    model_from_checkpoint,
    strip_prefixes,
    train_mode,
    warn_if_too_large,
    weights_kind,
)
from twophase.augment import BatchPreprocess, DeviceAugment
from twophase.board import Board, require_tensorboard
from twophase.budget import (
    Forecast,
    budget_fixed,
    budget_to_plan,
    clock,
    plan_time_budget,
    replan_time_budget,
)
from twophase.checkpoint import (
    AVERAGED,
    BEST,
    LAST,
    Resume,
    RunFolder,
    averaged_checkpoint,
    best_acc,
    epoch_file,
    epoch_record,
    files_for_epoch,
    load_checkpoint,
    make_checkpoint,
)
from twophase.image_cache import load_image
from twophase.inference import (
    averaged_model,
    bn_loader,
    count_correct,
    update_bn,
    validation_metrics,
)
from twophase.prefetch import on_device
from twophase.recipe import (
    check_class_weights,
    describe_phase,
    loss_of,
    phase_setup,
    resolve_options,
    size_step,
)
from utils import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    StopRequest,
    amp_dtype,
    broadcast_buffers,
    broadcast_module,
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
    sum_over_processes,
    totals_dtype,
)


@exits_on_problems
def main(argv=None):
    started = time.monotonic()  # a --time-budget counts from here
    args, resume = resolve_options(argv)
    procs = init_distributed(args.device)
    device = pick_device(args.device, procs.local_rank)
    if args.compile and (why := compile_support(device)):
        raise SystemExit(f"--compile: {why}; train without it")
    if args.tensorboard is not None and procs.rank == 0:
        require_tensorboard()
    # What can be checked is, before a folder is claimed or an image decoded: the data's layout,
    # the architecture and the weights (a download too). A typo costs seconds, not a cache build.
    with local_main_first(procs.local_rank):
        if args.demo:
            write_demo_dataset(args.data)
        dataset = dataset_of(vars(args))
        check_class_weights(args.class_weights, dataset.classes)  # a file's, before any write
    seed_everything(args.seed + procs.rank)  # initialisation, and anything random a model adds
    weights = resume.weights(args.arch, args.weights)
    model = build_model(args.arch, len(dataset.classes), weights)
    # Unless given, the normalisation the weights were trained with (saved: a resume keeps it).
    args.mean, args.std = args.mean or list(weights.mean), args.std or list(weights.std)
    mean, std = (", ".join(f"{v:.3f}" for v in values) for values in (args.mean, args.std))
    log(f"weights: {weights.about}; inputs normalised with mean ({mean}), std ({std})")
    folder = RunFolder(args.out, writer=procs.rank == 0)
    try:
        # The first process holds --out for the run: no other run writes there meanwhile.
        with folder.claimed(resume, args):
            with local_main_first(procs.local_rank):
                splits = load_data(args, dataset)
            with StopRequest() as stop:
                run = set_up(args, resume, splits, model, folder, device, procs, stop)
                with closing(run):
                    if budget_to_plan(argv, resume):  # chosen once, as the run starts
                        plan_time_budget(run, budget_fixed(argv, resume), started, time_steps(run))
                    net, loss, dtype = run.model, run.criterion, run.dtype
                    # Algorithm 1. Phase I: fit the new head on the frozen backbone.
                    if args.phase in ("1", "all"):
                        train_phase(run, phase_setup(1, args, net, device, loss, dtype))
                    # Phase II: fine-tune every layer, warmup then cosine, gradients clipped.
                    if args.phase in ("2", "all"):
                        train_phase(run, phase_setup(2, args, net, device, loss, dtype))
                        # Return the best checkpoint: of the epochs, or of their average.
                        select_result(run)

    except torch.OutOfMemoryError:
        raise SystemExit(out_of_memory_advice(args, folder, resume)) from None
    except Preempted as stop:
        raise SystemExit(stopped(folder, stop)) from None
    except KeyboardInterrupt:
        saved = f"{folder.path / LAST} holds the last position saved" if folder.written else ""
        log(f"interrupted at once: {saved or 'nothing of this run was saved'}")
        raise SystemExit(EXIT_INTERRUPTED) from None
    summarize(run, started)
    if args.demo:
        log(demo_next_steps(args))
    if procs.world_size > 1:
        torch.distributed.destroy_process_group()
    if folder.unwritten:
        raise SystemExit(
            "the run ended, but these files could not be written: "
            + "; ".join(folder.unwritten.values())
        )
    return run


def set_up(args, resume, splits, model, folder, device, procs, stop):
    """The model on the device at the run's start (its weights, or the checkpoint it
    continues), its moving average, the data's loaders: a Run."""
    if device.type == "cuda":
        # A fixed input size: let cuDNN time its kernels and keep the fastest.
        torch.backends.cudnn.benchmark = True
    if args.sync_bn and procs.world_size > 1:
        if device.type != "cuda":
            raise SystemExit(
                "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    broadcast_module(model)  # one new head for every process, before the average copies it
    ema = EMA(model, args.ema) if args.ema else None
    resume.restore(model, ema, splits.classes, procs.rank, procs.world_size)
    held_out = resume.state.get("val_digest") if resume.state else None
    if held_out and held_out != splits.val.digest() and validation_is_drawn(vars(args)):
        raise SystemExit(
            f"the validation images held out of the training images are not those the run held "
            f"out ({resume.path}): the training images have changed since, and going on would "
            "validate on images it trained on. Put the data back as it was, or start a fresh "
            "run (a val/ folder of its own keeps validation fixed)"
        )
    run = Run(args, splits, model, ema, device, resume, folder, stop, procs.rank, procs.world_size)
    params = count_parameters(model.parameters())
    per_process = (
        f" per process x {procs.world_size} processes = {args.batch_size * procs.world_size}"
    )
    log(
        f"{args.arch} ({params / 1e6:.1f}M parameters) on {device} "
        f"({run.dtype or torch.float32}), {len(splits.classes)} classes, "
        f"{len(splits.train)} train / {len(splits.val)} val images ({splits.layout}), "
        f"batch {args.batch_size}"
        + (per_process if procs.world_size > 1 else "")
        + (f", {splits.skipped} unreadable images skipped" if splits.skipped else "")
    )
    warn_if_too_large(args.arch, params, args.max_params)
    return run


def load_data(args, dataset: DatasetFiles) -> Splits:
    return cache_splits(
        dataset,
        args.img_size,
        resize=args.resize,
        cache_dir=args.cache_dir,
        threads=args.cache_workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


class Preempted(Exception):
    """A stop request was met: the position is saved, the run exits with EXIT_PREEMPTED (or, for
    a Ctrl-C, EXIT_INTERRUPTED)."""

    def __init__(self, where, stop):
        super().__init__(where)
        self.where, self.by, self.interrupted = where, stop.name(), stop.interrupted()


def stopped(folder, stop):
    """The log line of a run stopped on request, the sign a job script looks for, and the exit
    status: 75 for a scheduler's signal (resubmit it), 130 for a Ctrl-C."""
    what = f"stopped by {stop.by} {stop.where}: {folder.path / LAST} holds the position"
    if not stop.interrupted:
        folder.mark_preempted(what)
    status = EXIT_INTERRUPTED if stop.interrupted else EXIT_PREEMPTED
    log(
        f"{what}. Resume with: python train.py --resume {folder.path / LAST} (exit status {status})"
    )
    return status


# ----------------------------------------------------------------------------- the loop


def train_phase(run, phase):
    """The phase's remaining epochs, each followed by validation, its record and checkpoints."""
    first_epoch, first_batch, progress = run.resume.position(
        phase.number, run.rank, run.world_size, run.args.batch_size
    )
    if first_epoch >= phase.epochs:
        return
    run.resume.restore_phase(phase, run.model)
    run.net = run.wrap()
    log(describe_phase(phase, run.args, run.model))
    epoch = first_epoch - 1
    while (epoch := epoch + 1) < phase.epochs:  # --time-budget may shorten the phase (replan)
        phase.set_epoch(epoch)  # per epoch, as the method specifies
        lr = phase.optimizer.param_groups[0]["lr"]
        train, seconds = train_epoch(run, phase, epoch, first_batch, progress)
        first_batch, progress = 0, None
        t0 = time.perf_counter()
        val = run.validate()
        run.check_finite(phase.number, epoch, train, val)
        record = epoch_record(
            phase.number, epoch, lr, train, val, seconds, time.perf_counter() - t0
        )
        is_best = best_acc(record) > run.best_so_far()
        run.history.append(record)
        replan_time_budget(run, phase, epoch + 1)
        left = run.forecast.words(phase.number, epoch + 1)
        log(f"{epoch_line(record, phase.epochs, is_best)} | {left}")
        if run.board is not None:
            run.board.epoch(record, run.step)

        run.save_epoch(phase, epoch + 1, is_best)
        # A stop asked for during the validation or the save: here, unless all is done.
        phase2_follows = phase.number == 1 and run.args.phase == "all" and run.args.epochs2 > 0
        if (epoch + 1 < phase.epochs or phase2_follows) and run.stop.requested():
            raise Preempted(f"after phase {phase.number} epoch {epoch + 1}", run.stop)


def train_epoch(run, phase, epoch, first_batch=0, progress=None):
    """One epoch of `phase` as the run sees it: its batches from `first_batch` on (a run stopped
    mid-epoch saved the `progress` of those before), trained by optimizer_steps. After each
    optimizer step, and there alone, the run stops if asked to or saves its position every
    --save-every-steps steps; at the epoch's last batch a stop waits for its validation and
    checkpoint. Returns (its training metrics, seconds)."""
    args = run.args
    run.draw_for_epoch(phase, epoch, first_batch)
    tally = EpochTally()
    if progress:
        tally = EpochTally.restored(progress, run.device)
        run.replay_draws(phase, progress["sizes"])
    t0 = time.perf_counter() - (progress["seconds"] if progress else 0.0)
    total = first_batch + len(run.train_loader)  # the epoch's batches
    every = args.save_every_steps * args.accum_steps
    with closing(on_device(run.train_loader, run.train_preprocess, run.device)) as batches:
        bar = tqdm(
            batches,
            desc=f"phase {phase.number} epoch {epoch + 1}/{phase.epochs}",
            total=total,
            initial=first_batch,
            leave=False,
            disable=None if is_main_process() else True,
            unit="batch",
        )
        shown = Progress(run, phase, epoch, bar, first_batch, total)
        for done in optimizer_steps(run.net, bar, total, phase, run.ema, tally):
            run.step += 1
            shown.step(done)
            if run.board is not None and run.step % args.tensorboard_every == 0:
                run.board.step_loss(run.step, tally.losses[-1])
            if done == total:
                continue
            stop = run.stop.requested()  # agreed by every process
            if stop or (every and done % every == 0):
                run.check_position_finite(phase.number, epoch, tally)
                seconds = time.perf_counter() - t0
                run.save_position(phase, epoch, tally.saved(seconds), must=stop)
            if stop:
                run.stop.barrier()  # no process exits before the first has written last.pt
                raise Preempted(
                    f"{done} batches into phase {phase.number} epoch {epoch + 1}", run.stop
                )
    summary = tally.summary(run.device) | {"steps": math.ceil(total / args.accum_steps)}
    summary["img_size"] = run.train_preprocess.size

    return summary, time.perf_counter() - t0


# Seconds between the progress lines of an epoch where standard error is not a terminal (a
# notebook, a cluster's log), and between updates of the bar's time left where it is.
PROGRESS_EVERY, BAR_EVERY = 60.0, 2.0


class Progress:
    """What an epoch shows as it trains: on a terminal, the bar with the whole run's time left
    and its end; elsewhere, where the bar is hidden, a line every PROGRESS_EVERY seconds."""

    def __init__(self, run, phase, epoch, bar, first_batch, total):
        self.run, self.phase, self.epoch, self.bar = run, phase, epoch, bar
        self.first, self.total = first_batch, total
        self.start = self.last = time.monotonic()

    def step(self, done):
        now = time.monotonic()
        if now - self.last < (PROGRESS_EVERY if self.bar.disable else BAR_EVERY):
            return
        self.last = now
        share = done / self.total
        # The epoch at the rate of the batches this process has trained (a resumed epoch's
        # batches before its stop are not in its clock).
        estimate = (now - self.start) / max(done - self.first, 1) * self.total
        words = self.run.forecast.words(self.phase.number, self.epoch, share, estimate)
        if not self.bar.disable:
            self.bar.set_postfix_str(words, refresh=False)
            return
        images = (done - self.first) * self.run.args.batch_size * self.run.world_size
        log(
            f"phase {self.phase.number} epoch {self.epoch + 1}/{self.phase.epochs}: "
            f"{done}/{self.total} batches, {images / (now - self.start):.0f} img/s; {words}"
        )


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
    totals = torch.stack([torch.as_tensor(float(images), device=weights.device), weights])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, totals[0] / totals[1])


@dataclass
class EpochTally:
    """An epoch's running record, kept on the device: each batch's mean loss, its correct
    predictions and its images. A run stopped mid-epoch saves it and goes on from it."""

    losses: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    sizes: list = field(default_factory=list)

    @classmethod
    def restored(cls, progress, device):
        losses = list(progress["losses"].to(device).unbind())
        return cls(losses, list(progress["hits"].to(device).unbind()), list(progress["sizes"]))

    @property
    def batches(self):
        return len(self.sizes)

    def add(self, loss, logits, labels):
        self.losses.append(loss.detach())
        self.hits.append((logits.argmax(1) == labels).sum())
        self.sizes.append(len(labels))

    def saved(self, seconds):
        """As a checkpoint holds it (its `progress`, one per process)."""
        losses, hits = (torch.stack(kept).cpu() for kept in (self.losses, self.hits))
        return {"losses": losses, "hits": hits, "sizes": list(self.sizes), "seconds": seconds}

    def summary(self, device):
        """The epoch's training loss (over batches with a finite loss) and accuracy, summed over
        every process; batches whose loss was not finite are counted apart."""
        totals = epoch_totals(self.losses, self.hits, self.sizes, device)
        loss_sum, counted, correct, nonfinite, seen, batches = sum_over_processes(
            *totals, sum(self.sizes), self.batches
        )
        return {
            "train_loss": loss_sum / counted if counted else float("nan"),
            "train_acc": correct / seen,
            "images": seen,
            "nonfinite": int(nonfinite),
            "batches": int(batches),
        }


def epoch_totals(losses, hits, sizes, device):
    """(loss summed over the images of batches with a finite loss, those images, correct
    predictions, batches with a non-finite loss), as device tensors."""
    dtype = totals_dtype(device)
    if not sizes:
        return (torch.zeros((), device=device, dtype=dtype),) * 4
    losses = torch.stack(losses).to(dtype)
    sizes = torch.tensor(sizes, dtype=dtype).to(device, non_blocking=True)
    finite = torch.isfinite(losses)
    return (
        (torch.where(finite, losses, 0.0) * sizes).sum(),
        (finite * sizes).sum(),
        torch.stack(hits).sum(),
        (~finite).sum(),
    )


def all_finite(module):
    """Whether every weight and floating-point buffer (batch norm statistics) is finite: one
    reduction on the device, read once (a host sync, at save time only)."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


# ----------------------------------------------------------------------------- timing


def time_steps(run, steps=3):
    """Seconds an optimizer step of each phase takes here (step1, step2), a validation pass
    (validation) and an epoch's checkpoints (save): `steps` steps of a copy of the model in each
    phase after one to warm up, the copy thrown away and the global random state put back, so
    that the run trains as it would have. Under torchrun every process times its share, through
    DDP, and the slowest counts."""
    args, device = run.args, run.device
    state = rng_state()
    batches = first_batches(run, (steps + 1) * args.accum_steps)
    timed = {}
    for number in (1, 2):
        model = copy.deepcopy(run.model)
        phase = phase_setup(number, args, model, device, run.criterion, run.dtype)
        phase.set_epoch(0)
        net = model
        if run.world_size > 1:
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        done = optimizer_steps(net, iter(batches), len(batches), phase, None, EpochTally())
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
    timed["per_image"] = per_image
    timed["save"] = save_seconds(run)
    timed["decode"] = decode_seconds(run)
    set_rng_state(state)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    every = gather_from_processes(timed)
    return {key: max(t[key] for t in every) for key in timed}


def save_seconds(run):
    """An epoch's checkpoints, written here: the weights written once into the run's folder and
    timed, for a checkpoint of about three times their size (the optimizer's two moments; four
    with --ema) written once and copied once (best.pt, now and then)."""
    if run.rank != 0:
        return 0.0
    probe = run.folder.path / ".time-budget.tmp"
    start = time.perf_counter()
    torch.save(run.model.state_dict(), probe)
    seconds = time.perf_counter() - start
    probe.unlink(missing_ok=True)
    return seconds * (4 if run.ema is not None else 3) * 2


def decode_seconds(run, n=4):
    """An image decoded into a cache (--test-size auto's at larger sizes), timed on a few of the
    training files at twice the size, in one thread."""
    cache = run.splits.train.cache
    files = [cache.folder / f for f in cache.files[:n]] if cache.folder else []
    start = time.perf_counter()
    for path in files:
        load_image(path, 2 * run.args.img_size, run.args.resize)
    return (time.perf_counter() - start) / max(len(files), 1)


def first_batches(run, n):
    """The first n batches of an epoch as training prepares them (read, on the device,
    augmented), for timing; the loader is set back to its epoch by the training loop."""
    set_epoch(run.train_loader, 0)
    with closing(on_device(run.train_loader, run.train_preprocess, run.device)) as batches:
        return list(itertools.islice(batches, n))


def synchronized(device):
    """The clock once the device has done what it was given (CUDA and Apple's queue work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What both phases share: the options, the data and its loaders, the model and its moving
    average, the loss and autocast dtype (training's and validation's), the device and the
    processes, where the run started, its folder and its history."""

    args: object
    splits: Splits
    model: nn.Module
    ema: EMA | None
    device: torch.device
    resume: Resume
    folder: RunFolder
    stop: StopRequest
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        args, device = self.args, self.device
        self.history = self.resume.history()  # an epoch's record each
        self.net = self.model  # what runs the steps: the same module, wrapped for DDP, --compile
        self.dtype = amp_dtype(args.amp, device)
        self.class_counts = self.splits.train.class_counts(len(self.splits.classes))
        self.criterion = loss_of(args, self.splits.classes, self.class_counts).to(device)
        self.saved_at = None  # where last.pt was last written by this run, in words
        self.forecast = Forecast(self)
        self.val_digest = self.splits.val.digest()
        self.averaged_acc = self.folder.averaged_acc(self.resume)

        augment = DeviceAugment.from_args(args)
        self.train_preprocess = BatchPreprocess(args.mean, args.std, augment).to(device)
        self.eval_preprocess = BatchPreprocess(args.mean, args.std).to(device)
        cuda, shard = device.type == "cuda", dict(num_replicas=self.world_size, rank=self.rank)
        self.train_loader = make_loader(
            self.splits.train,
            args.batch_size,
            shuffle=True,
            seed=args.seed,
            pin_memory=cuda,
            # Dropping the last partial batch keeps batch norm from ever seeing a batch of one.
            drop_last=len(self.splits.train) > args.batch_size * self.world_size,
            balanced=args.sampler == "balanced",
            **shard,
        )
        self.val_loader = make_loader(
            self.splits.val, 2 * args.batch_size, shuffle=False, pin_memory=cuda, **shard
        )
        # The run's optimizer steps so far: TensorBoard's clock, which a resumed run goes on.
        per_epoch = math.ceil(len(self.train_loader) / args.accum_steps)
        self.step = sum(r.get("steps", per_epoch) for r in self.history)
        if self.resume.state and self.resume.state.get("step"):  # stopped mid-epoch
            saved = self.resume.state["args"]
            self.step += math.ceil(self.resume.state["step"] / saved.get("accum_steps", 1))
        self.board = Board.of(args, self.folder.path, self.step) if self.rank == 0 else None

    def best_so_far(self):
        """The validation accuracy best.pt holds: the best epoch's, or, where the run it continues
        ended with an average of its last epochs that validated better, the average's."""
        return max([*map(best_acc, self.history), self.averaged_acc], default=-1.0)

    def close(self):
        """What the run keeps open beyond its files: its TensorBoard writer."""
        if self.board is not None:
            self.board.close()

    @property
    def epochs_trained(self):
        """The run's epoch count, both phases: the clock that seeds each epoch's data order and
        augmentation, so that a resumed run draws what an uninterrupted one would."""
        return len(self.history)

    def draw_for_epoch(self, phase, epoch, first_batch):
        """The epoch's data order (from its batch `first_batch` on), augmentation and image
        size, seeded by (seed, epoch, process)."""
        seed = (self.args.seed, self.epochs_trained, self.rank)
        set_epoch(self.train_loader, self.epochs_trained, first_batch)
        self.train_preprocess.augment.reseed(*seed)
        self.train_preprocess.size = phase.image_size(epoch)
        if phase.mix is not None:
            phase.mix.reseed(*seed, 1)

    def replay_draws(self, phase, sizes):
        """The random draws the augmentation made for the batches an epoch stopped after, drawn
        again, so that the rest of the epoch draws what it would have."""
        side = self.train_preprocess.size
        for n in sizes:
            self.train_preprocess.augment.sample(n)
            if phase.mix is not None:
                phase.mix.sample(n, side, side)

    def wrap(self):
        """The model as the phase's steps run it: under DDP with several processes, compiled with
        --compile. Wrapped anew for each phase: which parameters need gradients has changed, and
        DDP all-reduces only the gradients of the parameters that needed them when it was made."""
        net = self.model
        if self.world_size > 1:
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.args.compile:
            torch.compiler.reset()
            net = torch.compile(net, mode=self.args.compile)
        return net

    def validate(self):
        """Validation of the weights, and of their moving average with --ema."""
        # Outside DDP: a process with no validation images would otherwise miss its collectives.
        broadcast_buffers(self.model)
        if self.ema is not None:
            broadcast_buffers(self.ema.module)  # copied from each process's own statistics
        net = self.net if self.world_size == 1 else self.model
        run = (self.val_loader, self.eval_preprocess, self.criterion, self.device, self.dtype)
        val = validation_metrics(net, *run)
        if self.ema is not None:
            val |= {f"ema_{k}": v for k, v in validation_metrics(self.ema.module, *run).items()}
        return val

    def check_finite(self, phase, epoch, train, val):
        """An fp16 overflow now and then is normal (GradScaler skips that step and lowers its
        scale); a loss that stays non-finite, or any in float32 or bf16, a non-finite validation
        loss (batch norm statistics spoilt by an overflow) or non-finite weights have ruined the
        model: stop before saving it."""
        bad, batches = train["nonfinite"], train["batches"]
        if bad and (self.dtype != torch.float16 or bad == batches):
            raise self.diverged(
                phase, epoch, f"the loss was not finite in {bad} of {batches} batches"
            )
        if len(self.splits.val) and not math.isfinite(val["val_loss"]):
            raise self.diverged(phase, epoch, "the validation loss is not finite")
        if not all_finite(self.model):
            raise self.diverged(phase, epoch, "the weights are not finite")
        if bad:
            log(
                f"warning: {bad} of {batches} fp16 batches overflowed; the grad scaler skipped "
                "their steps"
            )

    def check_position_finite(self, phase, epoch, tally):
        """check_finite for a save in the middle of an epoch: the batches so far, the weights."""
        losses = torch.stack(tally.losses)
        bad = int(sum_over_processes((~torch.isfinite(losses)).sum())[0])
        if bad and (self.dtype != torch.float16 or bad == tally.batches):
            raise self.diverged(phase, epoch, f"the loss was not finite in {bad} batches")
        if not all_finite(self.model):
            raise self.diverged(phase, epoch, "the weights are not finite")

    def diverged(self, phase, epoch, what):
        """The SystemExit of a run whose model the loss has ruined, with the way on: the last
        good position and a lower learning rate for the phase it was in."""
        option = "--lr1" if phase == 1 else "--lr2"
        lower = (self.args.lr1 if phase == 1 else self.args.lr2) / 4
        last = self.folder.path / LAST
        if self.saved_at is None and not self.folder.holds_last_of(self.resume):
            way = f"start again with a lower learning rate ({option} {lower:.1e}) or --amp bf16"
        else:
            where = f" ({self.saved_at})" if self.saved_at else ""
            way = (
                f"the last good checkpoint is {last}{where}; go on from it with a lower "
                f"learning rate: python train.py --resume {last} {option} {lower:.1e} "
                "(or --amp bf16)"
            )
        return SystemExit(
            f"phase {phase} epoch {epoch + 1}: {what}, so training stopped before saving. {way}"
        )

    def checkpoint(self, phase, epoch, **extra):
        """The run's checkpoint after `epoch` epochs of `phase`. A collective under torchrun:
        every process calls it (it gathers each one's random state)."""
        args, last = self.args, self.history[-1] if self.history else {"val_acc": 0.0}
        about = dict(arch=args.arch, classes=self.splits.classes, img_size=args.img_size)
        about |= dict(mean=list(args.mean), std=list(args.std), data=str(Path(args.data).resolve()))
        training = {
            "optimizer": phase.optimizer.state_dict(),
            "scheduler": None,  # the schedule is the options' (recipe.Phase.set_epoch)
            "scaler": phase.scaler.state_dict(),
            "rng": gather_from_processes(rng_state()),  # one state per process
            "world_size": self.world_size,
            "device": self.device.type,
            # The weights evaluate.py and predict.py use: the moving average where it was better.
            "eval_weights": "ema" if best_acc(last) > last["val_acc"] else "model",
        }
        weights = {strip_prefixes(k): v for k, v in self.model.state_dict().items()}
        ema = self.ema.state_dict() if self.ema else None
        counts = self.class_counts.tolist()
        return make_checkpoint(
            weights,
            about,
            vars(args),
            self.history,
            phase.number,
            epoch,
            ema,
            training,
            class_counts=counts,
            val_digest=self.val_digest,
            **extra,
        )

    def save_epoch(self, phase, epoch, is_best):
        state = self.checkpoint(phase, epoch)  # every process
        if self.rank != 0:
            return
        names, stale = files_for_epoch(
            self.history, phase.number, epoch, phase.epochs, is_best, self.args
        )
        if self.folder.save(state, names, self.history) and stale:
            self.folder.remove(stale)
        self.saved_at = f"phase {phase.number} epoch {epoch}"

    def save_position(self, phase, epoch, progress, must):
        """last.pt in the middle of an epoch: the batches done and their record, so far."""
        progress = gather_from_processes(progress)  # every process
        step = len(progress[0]["sizes"])
        state = self.checkpoint(phase, epoch, step=step, progress=progress)
        if self.rank == 0:
            self.folder.save(state, [LAST], self.history, must=must)
        self.saved_at = f"phase {phase.number}, {step} batches into epoch {epoch + 1}"


# ----------------------------------------------------------------------------- the result


def select_result(run):
    """Which model best.pt holds, once the last epoch is done: with --average-last, the average
    of the last K Phase II epochs (written as averaged.pt) replaces the best epoch if it validates
    better; with --test-size auto, best.pt is marked with the test size (and batch norm) that
    validates best; with --tta auto, with whether horizontal-flip test-time augmentation
    validates better. The first process alone (the epoch files are its), on the whole validation
    split; the others wait. A run stopped here does it again when resumed, with the same result."""
    args = run.args
    if run.rank == 0 and run.history and len(run.splits.val):
        if args.average_last:
            average_last_epochs(run, validation_loader(run, args.img_size))
        if args.test_size == "auto":
            choose_test_size(run)
        if args.tta == "auto":
            mark_tta(run)
    run.stop.barrier()


def validation_loader(run, side):
    """The validation images at `side` px: the run's own, or, at another size, from a cache of
    their own made from their files (as predict.py would see the test images at that size)."""
    args, cuda = run.args, run.device.type == "cuda"
    images = run.splits.val
    if side != args.img_size:
        images = resized(images, side, args.resize, args.cache_dir, args.cache_workers)
    return make_loader(images, 2 * args.batch_size, shuffle=False, pin_memory=cuda)


def choose_test_size(run):
    """--test-size auto (FixRes, Touvron et al. 2019): best.pt validated at --img-size and two
    steps larger, with its batch norm statistics as trained and, at the larger sizes, measured
    again there (on the training images, upsampled, not augmented); best.pt is marked with the
    size that validates best (`test_size`, its statistics replaced where measured again wins)
    and evaluate.py and predict.py follow the mark. Ties keep the training size."""
    args, device, best_path = run.args, run.device, run.folder.path / BEST
    if not best_path.is_file():
        log(f"--test-size auto: no {best_path} to mark")
        return
    state = load_checkpoint(best_path)
    step = size_step(args.img_size)
    results, chosen = [], None
    for side in (args.img_size, args.img_size + step, args.img_size + 2 * step):
        val = validation_loader(run, side)
        options = [("as trained", None)]
        if side != args.img_size:
            options.append(("measured again", side))
        for how, measured in options:
            net = model_from_checkpoint(state, device)
            if measured:
                resample = BatchPreprocess(args.mean, args.std).to(device)
                resample.size = side
                train = bn_loader(run.splits.train, args.batch_size, args.seed, device)
                update_bn(net, train, resample, device)
                net.eval()
            correct, seen = count_correct(net, val, run.eval_preprocess, device, run.dtype)
            results.append(f"{side} px, batch norm {how}: {correct / seen:.4f}")
            if chosen is None or correct > chosen[0]:
                chosen = (correct, side, how, net if measured else None)
    correct, side, how, measured_net = chosen
    state["test_size"] = side
    state.pop("test_bn", None)
    if measured_net is not None:  # beside the weights' own: kept for testing at that size
        measured = measured_net.state_dict()
        state["test_bn"] = {k: measured[k].cpu() for k, _ in measured_net.named_buffers()}
        state["test_bn_of"] = weights_kind(state)
    run.folder.save(state, [BEST], run.history, must=True)
    log(
        f"--test-size auto: best.pt validated at {'; '.join(results)} -> {side} px, batch norm "
        f"{how}: evaluate.py and predict.py use it"
    )


def average_last_epochs(run, val):
    args, device, folder = run.args, run.device, run.folder
    epochs = [n for n, r in enumerate(run.history, 1) if r["phase"] == 2][-args.average_last :]
    paths = [folder.path / epoch_file(n) for n in epochs]
    if len(paths) < 2 or not all(p.is_file() for p in paths):
        log(f"--average-last {args.average_last}: fewer than 2 Phase II epochs kept, no average")
        return
    states = [load_checkpoint(p) for p in paths]
    train = bn_loader(run.splits.train, args.batch_size, args.seed, device)
    net = averaged_model(states, device, train, run.eval_preprocess)
    correct, seen = count_correct(net, val, run.eval_preprocess, device, run.dtype)
    acc, best = correct / seen, run.best_so_far()
    names = [AVERAGED] + ([BEST] if acc > best else [])
    state = averaged_checkpoint(states[-1], net.state_dict(), paths, acc)
    folder.save(state, names, run.history, must=True)
    log(
        f"the average of epochs {epochs[0]}-{epochs[-1]}: val acc {acc:.4f} ({correct}/{seen}), "
        f"the best epoch's {best:.4f} -> {' and '.join(str(folder.path / n) for n in names)}"
    )


def mark_tta(run):
    if not (run.folder.path / BEST).is_file():  # resumed into another folder, no epoch better
        log(f"--tta auto: no {run.folder.path / BEST} to mark")
        return
    state = load_checkpoint(run.folder.path / BEST)
    side = state.get("test_size", run.args.img_size)
    net = model_from_checkpoint(state, run.device, side=side)
    val = validation_loader(run, side)
    plain, seen = count_correct(net, val, run.eval_preprocess, run.device, run.dtype)
    flipped, _ = count_correct(net, val, run.eval_preprocess, run.device, run.dtype, tta=True)
    state["tta"] = flipped > plain
    run.folder.save(state, [BEST], run.history, must=True)
    log(
        f"best.pt with horizontal-flip test-time augmentation: val acc {flipped / seen:.4f}, "
        f"without: {plain / seen:.4f} -> evaluate.py and predict.py use it "
        + ("by default" if state["tta"] else "only with --tta")
    )


def epoch_line(r, epochs, is_best):
    """An epoch's record as its log line."""
    return (
        f"phase {r['phase']} epoch {r['epoch']:>3}/{epochs} | lr {r['lr']:.2e} | "
        f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
        f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.4f} top5 {r['val_top5']:.4f} | "
        + (f"ema acc {r['ema_val_acc']:.4f} | " if "ema_val_acc" in r else "")
        + f"{r['images_per_s']:.0f} img/s {r['seconds']:.1f} s"
        + (" | best" if is_best else "")
    )


def demo_next_steps(args):
    """The rest of the pipeline on the demo's run: the commands that make its figures, its report
    and its submission file, and score that file against the demo's true labels."""
    best, answers = Path(args.out) / BEST, Path(args.data) / "answers.csv"
    return (
        "the rest of the pipeline, a few seconds each:\n"
        f"  python evaluate.py --ckpt {best} --report figures/report.md --answers {answers}\n"
        f"  python predict.py --ckpt {best} > prediction.csv\n"
        f"  python predict.py --ckpt {best} --check prediction.csv --answers {answers}"
    )


def out_of_memory_advice(args, folder, resume):
    b = args.batch_size
    smaller = max((d for d in range(1, b // 2 + 1) if b % d == 0), default=None)
    if smaller is None:
        return "the GPU ran out of memory at --batch-size 1; try a smaller --img-size or --arch."
    last = folder.path / LAST
    return (
        f"the GPU ran out of memory at --batch-size {b}. The same effective batch in smaller "
        "pieces: "
        f"--batch-size {smaller} --accum-steps {args.accum_steps * b // smaller}."
        + (
            f" The last good checkpoint is {last} (--resume it with those options)."
            if folder.holds_last_of(resume)
            else ""
        )
    )


def summarize(run, started):
    if not run.history:
        log("nothing to train: every requested epoch is done")
        return
    best = max(run.history, key=best_acc)
    total = sum(r["seconds"] for r in run.history)
    log(
        f"best val acc {best_acc(best):.4f} (phase {best['phase']} epoch {best['epoch']}) -> "
        f"{run.folder.path / BEST}; {len(run.history)} epochs in {total / 60:.1f} min of training"
        + (f"; {run.splits.skipped} unreadable images were skipped" if run.splits.skipped else "")
    )
    if run.args.time_budget:
        took, budget = time.monotonic() - started, run.args.time_budget
        log(
            f"--time-budget {clock(budget)}: this command took {clock(took)}, "
            f"{clock(abs(budget - took))} {'within' if took <= budget else 'over'} its budget"
        )


if __name__ == "__main__":
    main()
