"""The LR range test (Smith 2015; fastai's `lr_find`, Lightning's tuner), on the run's own data and
steps: a copy of the model trained --find-lr-steps optimizer steps at rates rising exponentially
from 1e-7 to 10, stopped early where the smoothed loss diverges, and a rate suggested from the
curve by fastai's "valley" rule. `--find-lr` runs it for each phase the command would train and
exits; `--lr1 auto` / `--lr2 auto` run it as their phase starts and train at the suggestion,
which the checkpoints save as the option's value (a continued run never runs it again).

The steps are train.py's own (its phase_setup and optimizer_steps, handed over as Training), so
every option of the run applies: the batch, --accum-steps, --optimizer2, --lr-decay's groups
(scaled together, the head's rate swept), the augmentation, MixUp/CutMix, class weights,
--sampler, AMP, the clip. The copy is thrown away and the global random state put back, as
timing.time_steps does: the run trains as it would have. Under torchrun every process sweeps
its share through DDP and the losses are averaged over the processes, so each draws the same
curve; the first process's suggestion is taken by all."""

import copy
import csv
import itertools
import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from twophase.checkpoint import PHASE1_PT, load_checkpoint
from twophase.options import BY_DEST
from twophase.run import distributed
from twophase.run_folder import run_figures
from twophase.tally import EpochTally
from twophase.written import HIDDEN, Written
from utils import (
    Problem,
    atomic_file,
    gather_from_processes,
    log,
    rng_state,
    set_rng_state,
    sum_over_processes,
)

START, END = 1e-7, 10.0  # the rates swept: fastai's
BETA = 0.98  # the loss's smoothing: fastai's and Lightning's moving average, debiased
DIVERGES = 4.0  # the sweep stops once the smoothed loss is this many times its lowest (fastai's)
SKIP, TAIL = 10, 5  # the suggestion leaves out a SKIP-th of the steps at the start and TAIL at
# the end, as fastai's does: the average is still settling there, and diverging
FLAT = 0.02  # a smoothed loss that falls by less than this share has no valley to speak of
MIN_POINTS = 5  # the fewest points of the curve a valley is looked for in
RULE = "valley"


class Training(NamedTuple):
    """train.py's phase_setup and optimizer_steps: the run's own phases and steps."""

    phase_setup: Callable
    optimizer_steps: Callable


@dataclass(frozen=True)
class Curve:
    """A sweep as it went: the rate of each step taken, its loss (averaged over the processes)
    and the smoothed loss; `planned`: the steps it would have taken had it not diverged."""

    lrs: list
    losses: list
    smoothed: list
    planned: int

    @property
    def diverged(self):
        return len(self.losses) < self.planned


@dataclass(frozen=True)
class Suggestion:
    """The rate the curve suggests (None where it has none) and its index in the curve, or why
    there is none."""

    lr: float | None
    index: int | None = None
    why: str = ""


# ----------------------------------------------------------------------------- the curve


def rates(steps, start=START, end=END):
    """The sweep's rates: from `start` to `end` in `steps` steps, each the one before times the
    same factor."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smoothed(losses, beta=BETA):
    """The losses' exponential moving average, debiased (its first values are not pulled towards
    0): fastai's AvgSmoothLoss. A loss that is not finite makes the rest nan."""
    out, average = [], 0.0
    for n, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**n))
    return out


def diverging(smooth):
    """Whether the sweep stops here: the smoothed loss not finite, or DIVERGES times its lowest."""
    return not math.isfinite(smooth[-1]) or smooth[-1] > DIVERGES * min(smooth)


def valley(losses):
    """fastai's valley (its default since fastai 2.4): the index of the rate about half way
    along the longest valley of the curve, the longest run of ever lower losses (a subsequence
    of steps whose losses each fall), from its start to its end. fastai's own index can be -1 (a
    valley from the first point, two or three long), which Python reads as the last rate, the
    diverging end: here it is the first."""
    longest = [1] * len(losses)
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
    end = longest.index(max(longest))
    start = end - longest[end]
    sections = (end - start) / 3
    return max(0, start + int(sections) + int(sections / 2))


def suggestion(curve):
    """The rate the curve suggests by the valley rule, or None with why not: the sweep diverged
    before the curve had points to judge, or its smoothed loss hardly falls (flat, or rising from
    the start). The valley, rather than fastai's older suggestions, the steepest fall (one noisy
    point's slope) or a tenth of the minimum (a guess of a margin below where the loss blows up):
    it takes the longest falling stretch of the whole curve, so one bump does not move it (and
    fastai made it its default over them for that)."""
    skip = curve.planned // SKIP
    points = curve.smoothed[skip : len(curve.smoothed) - TAIL]
    tried = f"from {START:g} to {curve.lrs[-1]:.2g}"
    if len(points) < MIN_POINTS:
        return Suggestion(
            None,
            why=f"the loss diverged after {len(curve.losses)} of {curve.planned} steps (at lr "
            f"{curve.lrs[-1]:.2g}), too soon for a curve to judge: the model is unstable at "
            "small rates already (try --amp bf16 or off, or a smaller --clip)",
        )
    fall = (points[0] - min(points)) / max(abs(points[0]), 1e-12)
    if not fall >= FLAT:
        return Suggestion(
            None,
            why=f"the smoothed loss fell by {max(fall, 0):.1%} at most over the rates tried "
            f"({tried}), less than {FLAT:.0%}: the curve is flat, or rises from the start, with "
            "no valley to suggest a rate from (do the labels fit the images?)",
        )
    index = skip + valley(points)
    return Suggestion(curve.lrs[index], index)


# ----------------------------------------------------------------------------- the sweep


def cycled(stream, device, first_epoch, side, mix):
    """The training stream's batches, epoch after epoch from the run's `first_epoch` (each drawn
    as the run draws it), for as long as they are asked for: a sweep longer than an epoch."""
    if len(stream) == 0:
        raise Problem("the range test has no training batches to take")
    for epoch in itertools.count(first_epoch):
        stream.draw(epoch, side, mix)
        with closing(stream.batches(device)) as batches:
            yield from batches


def set_rate(phase, lr):
    """Every parameter group at `lr` times its share (--lr-decay's: the groups scaled together;
    the phase is set up with a rate of 1, so its peak rates are the shares)."""
    for group, share in zip(phase.optimizer.param_groups, phase.peak_lrs, strict=True):
        group["lr"] = lr * share


def phase_of(run, number, model, training, lr):
    """Phase `number` set up on `model` as the run sets it up, at `lr` (the option's value)."""
    args = run.args.replaced(**{f"lr{number}": lr})
    return training.phase_setup(number, args, model, run.device, run.criterion, run.dtype)


def steps_of(run, phase, model, training):
    """--find-lr-steps optimizer steps of `phase` on `model`, on the run's data; yields each
    step's mean loss over its batches and every process (one host sync a step: the sweep reads
    every loss as it goes)."""
    net = distributed(model, run.device, run.world_size)
    total = run.args.find_lr_steps * phase.accum_steps
    batches = cycled(run.stream, run.device, run.epochs_trained, phase.image_size(0), phase.mix)
    tally = EpochTally()
    steps = training.optimizer_steps(
        net, itertools.islice(batches, total), total, phase, None, tally
    )
    with closing(batches), closing(steps):
        for _ in steps:
            loss = torch.stack(tally.losses[-phase.accum_steps :]).float().mean()
            yield sum_over_processes(loss)[0] / run.world_size


def sweep(run, number, model, training):
    """The range test of Phase `number` on `model` (a copy: it trains): --find-lr-steps steps at
    rising rates, until the smoothed loss diverges."""
    planned = rates(run.args.find_lr_steps)
    phase = phase_of(run, number, model, training, 1.0)  # its peak rates: the groups' shares
    phase.set_rates(0)  # the weight decay training has: none on a backbone L2-SP pulls
    set_rate(phase, planned[0])
    losses, smooth = [], []
    for step, loss in enumerate(steps_of(run, phase, model, training)):
        losses.append(loss)
        smooth = smoothed(losses)
        if diverging(smooth) or step + 1 == len(planned):
            break
        set_rate(phase, planned[step + 1])
    return Curve(planned[: len(losses)], losses, smooth, len(planned))


def range_test(run, number, training, head_rate=None):
    """The range test of Phase `number` on a copy of the run's model, thrown away after, the
    global random state put back: the run trains as it would have. Phase II's starts from a
    trained head (start_of_phase2). Returns (the curve, its suggestion, what Phase II's started
    from in words, or None)."""
    state = rng_state()
    model = copy.deepcopy(run.model)
    try:
        start = start_of_phase2(run, model, training, head_rate) if number == 2 else None
        curve = sweep(run, number, model, training)
    finally:
        del model
        set_rng_state(state)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    found = suggestion(curve)
    lr = gather_from_processes(found.lr)[0]  # the first process's, should any differ
    return curve, Suggestion(lr, found.index, found.why), start


def start_of_phase2(run, model, training, head_rate):
    """Phase II's sweep starts from a trained head: the one the run's Phase I trained (in this
    command, or in the run it continues, such as --phase 2 from <out>/phase1.pt), else that of
    <out>/phase1.pt where the folder holds one of this model and these classes (loaded into
    `model`). A run with neither fits a head on `model` first, --find-lr-steps steps at
    `head_rate` (the Phase I suggestion, --lr1, or Table 1's): from a random head the curve
    would measure how fast the new head learns, not the backbone. Returns what it started from,
    in words, where it is not the run's own."""
    if any(record["phase"] == 1 for record in run.history):
        return None
    phase1 = Path(run.args.out) / PHASE1_PT
    state = load_checkpoint(phase1) if phase1.is_file() else {}
    if state.get("arch") == run.args.arch and state.get("classes") == list(run.splits.classes):
        model.load_state_dict(state["model"])
        return f"Phase II's range test starts from the head of {phase1}"
    steps = run.args.find_lr_steps
    phase = phase_of(run, 1, model, training, head_rate)
    for _ in steps_of(run, phase, model, training):
        pass
    return (
        f"the run has no trained head (no Phase I epochs, no {phase1}), so Phase II's range test "
        f"starts from a head fitted {steps} steps at --lr1 {head_rate:.2e} first: from a random "
        "head it would measure the new head's rates, not the backbone's"
    )


def head_rate(args, found=None):
    """The rate a head is fitted at before Phase II's range test: Phase I's suggestion, else
    --lr1, else (auto, not yet found) Table 1's."""
    if found:
        return found
    return args.lr1 if args.lr1 != "auto" else BY_DEST["lr1"].default


def phase_trains(run, number):
    """Whether Phase `number` has epochs to train in this command."""
    epochs = run.args.epochs1 if number == 1 else run.args.epochs2
    first = run.start.position(number, run.rank, run.world_size, run.args.batch_size)[0]
    return first < epochs


# ----------------------------------------------------------------------------- what it says


PHASE_NAMES = {1: "Phase I (the new head alone)", 2: "Phase II (every layer)"}


def curve_files(run, number):
    """The curve's figure and CSV, in the run's figures folder (evaluate.py's)."""
    folder = run_figures(run.args.out)
    return folder / f"lr_find_phase{number}.png", folder / f"lr_find_phase{number}.csv"


def write_curve(run, number, curve, found):
    """The curve as a CSV (step, lr, loss, smoothed loss) and a figure (loss against rate, log x,
    the suggestion marked), by the first process; a file there that the product did not write is
    moved aside first, said (written.py)."""
    if run.rank != 0:
        return
    figure, table = curve_files(run, number)
    written = Written(figure.parent, "train.py --find-lr", HIDDEN)
    with atomic_file(written.to_write(table.name), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "lr", "loss", "smoothed_loss"])
        for step, row in enumerate(zip(curve.lrs, curve.losses, curve.smoothed), start=1):
            out.writerow([step, *(f"{v:.6g}" for v in row)])
    from twophase.figures import plot_range_test  # matplotlib: imported where a figure is drawn

    plot_range_test(
        curve, found, f"LR range test, {PHASE_NAMES[number]}", written.to_write(figure.name)
    )
    written.save()


def curve_line(run, number, curve, found):
    """What a range test found, in a line: its steps and rates, where it stopped, the rule and
    its suggestion (or why there is none), and its files."""
    stop = f", stopped at {curve.lrs[-1]:.2g} as the loss diverged" if curve.diverged else ""
    rate = f"{RULE} rule: --lr{number} {found.lr:.2e}" if found.lr else found.why
    figure, table = curve_files(run, number)
    return (
        f"{PHASE_NAMES[number]} LR range test: {len(curve.losses)} steps from {START:g} to "
        f"{END:g}{stop}; {rate} ({figure}, {table.name})"
    )


# ----------------------------------------------------------------------------- train.py's


def found_rate(run, number, training):
    """The run's options as Phase `number` starts: with `--lr{number} auto`, the range test's
    suggestion in its place (saved so: a continued run trains on at it, and Table 1 says it was
    found so). A curve with no suggestion leaves the rate the run would have had without `auto`
    (its recipe's, or Table 1's), said in a warning: a run left to train by itself is not stopped
    by a curve too noisy to read."""
    key = f"lr{number}"
    if getattr(run.args, key) != "auto" or not phase_trains(run, number):
        return run.args
    rate = head_rate(run.args) if number == 2 else None
    curve, found, start = range_test(run, number, training, rate)
    if start:
        log(start)
    write_curve(run, number, curve, found)
    log(f"--{key} auto: {curve_line(run, number, curve, found)}")
    kept = dict(vars(run.args).get("lr_found") or {})
    if found.lr is None:
        value, whose = unfound_rate(run.args, key)
        log(
            f"warning: --{key} auto: no rate suggested, so Phase {'I' * number} trains at --{key} "
            f"{value:g}, {whose}; the curve is in {curve_files(run, number)[0]} (another rate: "
            f"stop the run and resume it with --{key} N)"
        )
        unfound = sorted({*vars(run.args).get("lr_unfound", ()), key})
        return run.args.replaced(
            **{key: value, "lr_found": kept | {key: value}}, lr_unfound=unfound
        )
    return run.args.replaced(**{key: found.lr, "lr_found": kept | {key: found.lr}})


def unfound_rate(args, key):
    """The rate `--{key}` would have without `auto`, and whose it is: --recipe's, --demo's or
    Table 1's."""
    option = BY_DEST[key]
    preset = "demo" if args.demo else args.recipe
    if preset in option.presets:
        return option.presets[preset], f"--{'demo' if args.demo else 'recipe ' + preset}'s"
    return option.default, "Table 1's"


def find_lrs(run, training, numbers):
    """--find-lr: the range test of each of the phases `numbers` that this command would train,
    each curve written and said, and the suggested --lr1 and --lr2 printed on standard output;
    nothing is trained, nothing written into --out."""
    found = {}
    for number in numbers:
        if not phase_trains(run, number):
            continue
        rate = head_rate(run.args, found.get(1)) if number == 2 else None
        curve, suggested, start = range_test(run, number, training, rate)
        if start:
            log(start)
        write_curve(run, number, curve, suggested)
        log(curve_line(run, number, curve, suggested))
        if suggested.lr is not None:
            found[number] = suggested.lr
    if not numbers or not any(phase_trains(run, n) for n in numbers):
        log("--find-lr: no phase of this command has epochs to train, so no range test ran")
    if found and run.rank == 0:
        print(" ".join(f"--lr{n} {lr:.2e}" for n, lr in found.items()), flush=True)
        auto = " ".join(f"--lr{n} auto" for n in found)
        log(f"train with these rates, or with {auto}: the range test as each phase starts")
    return run


def numeric_rates(args):
    """The options with a number (Table 1's) for a rate still `auto`, to set a phase up with that
    never steps at it: one time_steps times (a step takes as long at any rate), or one with no
    epochs to train (found_rate finds a rate for every phase that trains). The run's options keep
    `auto`, so that a phase to come finds its rate when it comes."""
    numbers = {k: BY_DEST[k].default for k in ("lr1", "lr2") if getattr(args, k) == "auto"}
    return args.replaced(**numbers) if numbers else args
