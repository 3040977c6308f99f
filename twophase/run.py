"""A run as train.py puts it together: what both phases share, the model on the device as every
process holds it, its DDP wrap (the one place), and its lines. Its parts live where their
concepts do: the training stream in loader.py, the checkpoints in checkpoint.py, where it
started in start.py, its time in budget.py, its curves in board.py."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Splits, uneven
from model import EMA, count_parameters
from twophase.augment import BatchPreprocess
from twophase.budget import Forecast, clock
from twophase.checkpoint import (
    BEST_PT,
    LAST_PT,
    Checkpointer,
    best_acc,
    epoch_name,
    epochs_name,
    weights_name,
)
from twophase.inference import validation_metrics
from twophase.loader import TrainingStream
from twophase.resolve import Options
from twophase.start import Start
from utils import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    Processes,
    StopRequest,
    broadcast_buffers,
    broadcast_module,
    log,
)


@dataclass
class Run:
    """The options (final: a time budget's plan replaces them whole), the model and its moving
    average, the loss and autocast dtype (training's and validation's alike), the device and the
    processes, the data (the training stream, the validation loader and its preprocessing),
    where the run started, its checkpointer, its stop request, its history (an epoch's record
    each), its optimizer steps so far, and the moving average of the best.pt it continues."""

    args: Options
    model: nn.Module
    ema: object  # model.EMA, or None
    criterion: nn.Module
    dtype: torch.dtype | None
    device: torch.device
    procs: Processes
    splits: Splits
    stream: TrainingStream
    val_loader: object
    eval_preprocess: BatchPreprocess
    start: Start
    saver: Checkpointer
    stop: StopRequest
    history: list = field(default_factory=list)
    step: int = 0  # optimizer steps: TensorBoard's clock, which a resumed run goes on
    averaged_acc: float = -1.0  # best.pt's where an average the run continues made it
    averaged: tuple | None = None  # (the epochs' records, val acc) where their average is best.pt
    classes_uneven: bool = False  # the largest class has data.UNEVEN times the smallest's images
    board: object = None  # board.Board with --tensorboard
    features: object = None  # features.FeatureStream with --phase1-features: Phase I's batches
    forecast: Forecast = field(init=False)  # the run's time left, for its lines
    net: nn.Module | None = None  # what runs the steps: the model, wrapped for DDP, compiled

    def __post_init__(self):
        self.forecast = Forecast(self)

    @property
    def rank(self):
        return self.procs.rank

    @property
    def world_size(self):
        return self.procs.world_size

    @property
    def epochs_trained(self):
        """The run's epoch count, both phases: the clock that seeds each epoch's data order and
        augmentation, so that a resumed run draws what an uninterrupted one would."""
        return len(self.history)

    def best_so_far(self):
        """The validation accuracy best.pt holds: the best epoch's, or, where the run it continues
        ended with an average of its last epochs that validated better, the average's."""
        return max([*map(best_acc, self.history), self.averaged_acc], default=-1.0)

    def wrap(self):
        """The model as the phase's steps run it: under DDP with several processes, compiled with
        --compile. Wrapped anew for each phase: which parameters need gradients has changed, and
        DDP all-reduces only the gradients of the parameters that needed them when it was made."""
        net = distributed(self.model, self.device, self.world_size)
        if self.args.compile:
            torch.compiler.reset()
            net = torch.compile(net, mode=self.args.compile)
        self.net = net
        return net

    def inputs(self, phase):
        """What `phase`'s steps train on, and the net that trains: the training stream and the
        model; in a Phase I from cached features, the backbone's features and the head alone."""
        if phase.number == 1 and self.features is not None:
            return self.features.of_phase(phase, self.device), self.features.head
        return self.stream, self.net

    def validate(self):
        """Validation of the weights, and of their moving average with --ema."""
        # Outside DDP: a process with no validation images would otherwise miss its collectives.
        broadcast_buffers(self.model)
        if self.ema is not None:
            broadcast_buffers(self.ema.module)  # copied from each process's own statistics
        net = self.net if self.world_size == 1 and self.net is not None else self.model
        on = (self.val_loader, self.eval_preprocess, self.criterion, self.device, self.dtype)
        on += (len(self.splits.classes),)
        val = validation_metrics(net, *on)
        if self.ema is not None:
            val |= {f"ema_{k}": v for k, v in validation_metrics(self.ema.module, *on).items()}
        return val

    def close(self):
        """What the run keeps open beyond its files: its TensorBoard writer."""
        if self.board is not None:
            self.board.close()


# ----------------------------------------------------------------------------- a run's lines


def start_line(run):
    args, procs, splits = run.args, run.procs, run.splits
    params = count_parameters(run.model.parameters())
    per_process = f" per process x {procs.world_size} processes = "
    per_process += str(args.batch_size * procs.world_size)
    return (
        f"{args.arch} ({params / 1e6:.1f}M parameters) on {run.device} "
        f"({run.dtype or torch.float32}), {len(splits.classes)} classes, "
        f"{len(splits.train)} train / {len(splits.val)} val images ({splits.layout}), "
        f"batch {args.batch_size}"
        + (per_process if procs.world_size > 1 else "")
        + (f", {splits.skipped} unreadable images skipped" if splits.skipped else "")
    )


def uneven_classes(counts, args):
    """What train.py says as it starts where the training classes are uneven (the largest
    data.UNEVEN times the smallest, or more), and the two options that weigh the small ones up; None
    where they are even enough."""
    if not uneven(counts):
        return None
    low, high = int(min(counts)), int(max(counts))
    on = [
        f"--{k} {v}" for k, v in (("class-weights", args.class_weights), ("sampler", args.sampler))
    ]
    on = [o for o in on if o not in ("--class-weights none", "--sampler shuffle")]
    levers = f"on here: {', '.join(on)}" if on else "off here"
    return (
        f"the classes are uneven: {low} to {high} training images a class, the largest "
        f"{high / max(low, 1):.0f} times the smallest. Top-1 accuracy favours the large classes, "
        "so the epoch lines give balanced accuracy (bal) beside it; --class-weights auto or "
        f"--sampler balanced weigh the small ones up ({levers}; docs/data.md)"
    )


SMALL_EPOCH = 20  # optimizer steps an epoch below which the data is small for its batch
SMALLEST_BATCH = 8  # batch norm's statistics grow noisy below it


def small_data(images, args, world_size):
    """What train.py says as it starts where an epoch is a handful of optimizer steps (fewer
    than SMALL_EPOCH): the batch that makes SMALL_EPOCH or more (a power of two, SMALLEST_BATCH
    at the least) and the range test for its rates, since the defaults' rates are tuned for
    batch 72. None where the data is not small for its batch, or the batch is already the
    smallest suggested. Nothing is changed: the user decides."""
    per_step = args.batch_size * args.accum_steps * world_size
    steps = -(-images // per_step)
    if steps >= SMALL_EPOCH:
        return None
    batch = SMALLEST_BATCH
    while -(-images // ((batch * 2) * world_size)) >= SMALL_EPOCH:
        batch *= 2
    if batch >= per_step // world_size:  # the suggestion steps every batch
        return None
    head_steps = steps * args.epochs1
    rates = " ".join(f"--{name} auto" for name in ("lr1", "lr2") if getattr(args, name) != "auto")
    suggestion = f"--batch-size {batch}" + (" --accum-steps 1" if args.accum_steps > 1 else "")
    suggestion += f" {rates}" if rates else ""
    return (
        f"small data: {images} training images make {steps} optimizer steps an epoch at batch "
        f"{per_step}, and Phase I gives the new head {head_steps} steps in all. For data this "
        f"small try {suggestion}: {-(-images // (batch * world_size))} steps an epoch, the "
        "learning rates found for that batch by the range test (the defaults' are tuned for "
        "batch 72; on two small cuts of real photos the smaller batch did as well at either "
        "rates, and an optimizer other than the defaults' wants the range test: RESULTS.md, "
        "small data)"
    )


def model_on_device(args, start, classes, model, device, procs):
    """The model on the device, as every process holds it (the first's new head, or the
    weights of the checkpoint the run continues), and its moving average with --ema."""
    # A fixed input size: cuDNN times its kernels once and keeps the fastest.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if args.sync_bn and procs.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    broadcast_module(model)  # one new head for every process, before the average copies it
    ema = EMA(model, args.ema) if args.ema else None
    start.restore(model, ema, classes, procs.rank, procs.world_size)
    return model, ema


def distributed(model, device, world_size):
    """`model` as several processes train it: under DDP, whose backward all-reduces the
    gradients; itself in one process."""
    if world_size == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def epoch_line(r, epochs, is_best, uneven=False, classes=None):
    """An epoch's record as its log line: balanced accuracy where the classes are uneven, top-5
    where there are more than 5 classes (of 5 or fewer it is 1 by definition), the moving
    average's accuracy with --ema, and which of them made the epoch the best so far."""
    balanced = f" bal {r['val_balanced']:.4f}" if uneven and "val_balanced" in r else ""
    top5 = f" top5 {r['val_top5']:.4f}" if classes is None or classes > 5 else ""
    ema = "ema_val_acc" in r
    best = " | best" + (" (moving average)" if ema and r["ema_val_acc"] > r["val_acc"] else "")
    return (
        f"phase {r['phase']} epoch {r['epoch']:>3}/{epochs} | lr {r['lr']:.2e} | "
        f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
        f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.4f}{balanced}{top5} | "
        + (f"moving average acc {r['ema_val_acc']:.4f} | " if ema else "")
        + f"{r['images_per_s']:.0f} img/s {r['seconds']:.1f} s"
        + (best if is_best else "")
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
    what = f"stopped by {stop.by} {stop.where}: {folder.path / LAST_PT} holds the position"
    if not stop.interrupted:
        folder.mark_preempted(what)
    status = EXIT_INTERRUPTED if stop.interrupted else EXIT_PREEMPTED
    resume = f"python train.py --resume {folder.path / LAST_PT}"
    log(f"{what}. Resume with: {resume} (exit status {status})")
    return status


def out_of_memory_advice(args, folder, start):
    """The same effective batch in smaller pieces, which a run stopped mid-epoch goes on with."""
    b = args.batch_size
    smaller = max((d for d in range(1, b // 2 + 1) if b % d == 0), default=None)
    if smaller is None:
        return "the GPU ran out of memory at --batch-size 1; try a smaller --img-size or --arch."
    last = folder.path / LAST_PT
    resume = f" The last good checkpoint is {last} (--resume it with those options)."
    return (
        f"the GPU ran out of memory at --batch-size {b}. The same effective batch in smaller "
        f"pieces: --batch-size {smaller} --accum-steps {args.accum_steps * b // smaller}."
        + (resume if folder.holds_last_of(start) else "")
    )


def summarize(run, started):
    """The run's last lines: what best.pt holds (which epoch, which weights, validated how well)
    and what the run cost."""
    if not run.history:
        log("nothing to train: every requested epoch is done")
        return
    total = sum(r["seconds"] for r in run.history)
    skipped = run.splits.skipped
    log(
        f"{result_words(run)}; {len(run.history)} epochs in {total / 60:.1f} min of training"
        + (f"; {skipped} unreadable images were skipped" if skipped else "")
    )
    if run.args.time_budget:
        log(budget_line(run, time.monotonic() - started))


def result_words(run):
    """What best.pt holds, in words: the best epoch (its weights or their moving average), or
    the average of the last epochs where that validated better; each accuracy named by whose it
    is, on the validation split that chose it."""
    best = max(run.history, key=best_acc)
    balanced = best.get("val_balanced")  # not in a record made before it was counted
    balanced = f", balanced {balanced:.4f}" if run.classes_uneven and balanced is not None else ""
    path = run.saver.folder.path / BEST_PT
    epoch = f"{epoch_name(best)}, {weights_name(best)}"
    if run.averaged is not None:
        averaged, acc = run.averaged
        return (
            f"best val acc {acc:.4f}, the average of {epochs_name(averaged)} -> {path} (the best "
            f"epoch: {epoch}, {best_acc(best):.4f})"
        )
    if "ema_val_acc" in best:
        other = (
            "the weights themselves"
            if best["ema_val_acc"] > best["val_acc"]
            else "their moving average"
        )
        epoch += f"; {other} {min(best['val_acc'], best['ema_val_acc']):.4f}"
    return f"best val acc {best_acc(best):.4f}{balanced} ({epoch}) -> {path}"


def budget_line(run, took):
    """How close the whole run came to its --time-budget: this command's time, and where it
    continues a run whose budget an earlier command planned, the epochs of the commands before
    it (their training and validation). A budget planned here (Phase II from phase1.pt) is this
    command's alone."""
    budget = run.args.time_budget
    planned_here = run.forecast.deadline is not None
    before = (
        0
        if planned_here
        else sum(r["seconds"] + r.get("val_seconds", 0) for r in run.start.history())
    )
    spent = took + before
    what = f"this command took {clock(took)}"
    if before:
        what = f"the run took {clock(spent)} (this command {clock(took)}, the epochs before it "
        what += f"{clock(before)})"
    within = "within" if spent <= budget else "over"
    return (
        f"--time-budget {clock(budget)}: {what}, {clock(abs(budget - spent))} {within} its budget"
    )


def demo_next_steps(args):
    """The rest of the pipeline on the demo's run: the commands that make its figures, its report
    and its submission file, and score that file against the demo's true labels."""
    best, answers = Path(args.out) / BEST_PT, Path(args.data) / "answers.csv"
    return (
        "the rest of the pipeline, a few seconds each:\n"
        f"  python evaluate.py --ckpt {best} --report --answers {answers}\n"
        f"  python predict.py --ckpt {best} > prediction.csv\n"
        f"  python predict.py --ckpt {best} --check prediction.csv --answers {answers}"
    )
