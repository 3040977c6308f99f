"""The time a run takes: --time-budget's plan (the largest --epochs that fits, from a few timed
steps) and its re-plan where epochs run slower, the forecast every progress line ends with (the
run's time left and its end), and what an epoch shows as it trains. timing.py times the steps
(with train.py's own loop); this file turns seconds into epochs and words."""

import dataclasses
import statistics
import time

import torch

from twophase.image_cache import load_image
from twophase.options import PHASE_EPOCHS
from twophase.resolve import split_budget
from twophase.schedule import ProgressiveSize, WarmupCosine, size_step
from utils import Problem, gather_from_processes, log


def budget_to_plan(resolved):
    """Whether this command plans a --time-budget: one given to a fresh run, or to Phase II of a
    run continued from its phase1.pt; never to a run that resumes (it keeps the epochs its
    budget chose, even when the same budget is given again)."""
    start = resolved.start
    return (start.fresh or start.from_phase1) and "time_budget" in resolved.given


def budget_kept(resolved):
    """The parts of the --epochs split a --time-budget leaves as they are: those given, and the
    Phase I epochs of a run Phase II continues."""
    kept = {key: resolved.given[key] for key in PHASE_EPOCHS if key in resolved.given}
    if not resolved.start.fresh:
        kept["epochs1"] = resolved.start.state["args"]["epochs1"]
    return kept


def plan_time_budget(run, kept, started, speed):
    """--time-budget: the run's options with the largest --epochs N whose epochs fit in what is
    left of the budget at `speed`, the steps timed here (timing.time_steps), as their split (saved:
    a resume keeps it)."""
    args = run.args
    epoch = {p: run.forecast.epoch_seconds(p, speed) for p in (1, 2)}
    end = run.forecast.end_seconds(speed)
    # Every process plans alike: the slowest's speed (time_steps), the longest time spent.
    spent = max(gather_from_processes(time.monotonic() - started))
    left = (args.time_budget - spent) * 0.97  # a margin for an epoch slower than its steps
    # Phase I trains no more with --phase 2, or where the run continues from its phase1.pt.
    phase1_over = args.phase == "2" or run.start.phase1_end(args.phase, kept.get("epochs1", 0))

    def phase_seconds(phase, split):  # a smaller side costs less (--progressive): by pixels
        epochs = split[f"epochs{phase}"]
        if phase == 1 and phase1_over:
            return 0.0
        if phase == 1:  # and its feature passes, with --phase1-features
            return epochs * epoch[1] + run.forecast.passes_seconds(epochs, speed)
        if args.progressive >= 1:
            return epochs * epoch[phase]
        side = ProgressiveSize.of(args, epochs)
        return sum(run.forecast.epoch_seconds(2, speed, side(e)) for e in range(epochs))

    sweeps = range_test_seconds(run, speed, phase1_over)
    chosen = epochs_within(left - sweeps, phase_seconds, end, kept)
    timing = (
        f"here {phase1_words(speed, args.phase1_features)}, a Phase II step "
        f"{speed['step2']:.3g} s, a validation {clock(speed['validation'])}: an epoch "
        f"{clock(epoch[1])} in Phase I{passes_words(speed, args.phase1_features, run.forecast)}, "
        f"{clock(epoch[2])} in Phase II; {clock(spent)} spent before training"
        + (f", {clock(sweeps)} for the LR range tests to come" if sweeps else "")
    )
    if chosen is None:
        raise Problem(
            f"--time-budget {clock(args.time_budget)}: {timing}. Not even --epochs 2 fits in "
            "it: give more time, or a smaller --arch, --img-size or training set"
        )
    total, split, cost = chosen
    run.forecast.speed = speed
    run.forecast.deadline = started + args.time_budget
    log(
        f"--time-budget {clock(args.time_budget)}: {timing}. So --epochs {total} "
        f"({split['epochs1']} + {split['epochs2']}, {split['warmup_epochs']} warmup), about "
        f"{clock(cost)} from now: the run should end near {wall_clock(started + spent + cost)}"
    )
    return args.replaced(epochs=total, **split)


def range_test_seconds(run, speed, phase1_over):
    """The LR range tests an auto --lr1 or --lr2 runs as its phase starts (lr_find.py), at the
    phases' step times: --find-lr-steps steps each, and as many Phase I steps before Phase II's
    where the run has no trained head to start it from (no Phase I epochs)."""
    args, steps = run.args, run.args.find_lr_steps
    # The sweeps step on images, also with --phase1-features: a feature pass's batches and the
    # head's step on them.
    step1 = speed["step1"] + speed.get("pass", 0.0) * args.accum_steps
    phase1 = not phase1_over and args.epochs1 > 0
    seconds = steps * step1 if args.lr1 == "auto" and phase1 else 0.0
    if args.lr2 == "auto":
        seconds += steps * speed["step2"]
        head = any(r["phase"] == 1 for r in run.history) or phase1
        seconds += 0.0 if head else steps * step1
    return seconds


def phase1_words(speed, passes):
    """What a Phase I step costs: on the images, or with --phase1-features a batch of a feature
    pass and the head's step on the features."""
    if not passes or "pass" not in speed:
        return f"a Phase I step takes {speed['step1']:.3g} s"
    return (
        f"a Phase I feature pass {speed['pass']:.3g} s a batch, a head step {speed['step1']:.3g} s"
    )


def passes_words(speed, passes, forecast):
    """Phase I's feature passes beside its epochs' cost, where it has them."""
    if not passes or "pass" not in speed:
        return ""
    return f" (+{clock(forecast.passes_seconds(1, speed))} for each of its {passes} feature passes)"


def replan_time_budget(run, phase, done):
    """--time-budget, after each Phase II epoch of the command that planned it, from its second on
    (the first pays for warming up: cuDNN's autotuning, --compile): where the epochs as they ran
    would end the run past its budget (a machine busier than when the steps were timed, a slow
    disk), Phase II is shortened to the most epochs that end within it, its cosine and its sizes
    (--progressive) fitted to them as the --epochs split fits them; said in a line, and saved
    with the run's options. Returns the run's options and the phase, new where re-planned (the
    epoch loop goes on with them), else as they were. Every process takes the first's
    decision."""
    forecast, unchanged = run.forecast, (run.args, phase)
    timed = sum(record["phase"] == 2 for record in run.history)
    if forecast.deadline is None or phase.number != 2 or done >= phase.epochs or timed < 2:
        return unchanged
    now, epoch = time.monotonic(), forecast.epoch_seconds(2)
    fits = (forecast.deadline - now - forecast.end_seconds()) // epoch
    epochs2 = done + int(min(max(fits, 0), phase.epochs - done))
    epochs2 = gather_from_processes(epochs2)[0]
    if epochs2 >= phase.epochs:
        return unchanged
    args, planned = run.args, phase.epochs
    kept = dict(epochs1=args.epochs1, epochs2=epochs2)
    kept["warmup_epochs"] = min(args.warmup_epochs, epochs2)
    split = split_budget(args.epochs1 + epochs2, kept)
    options = args.replaced(epochs=args.epochs1 + epochs2, **split)
    shorter = dataclasses.replace(
        phase,
        epochs=epochs2,
        schedule=WarmupCosine.of(options),
        image_size=ProgressiveSize.of(options, epochs2),
    )
    end = wall_clock(now + (epochs2 - done) * epoch + forecast.end_seconds())
    log(
        f"--time-budget {clock(args.time_budget)}: at {clock(epoch)} a Phase II epoch as they "
        f"ran, the run would end past its budget; so {epochs2} Phase II epochs, not {planned}, "
        f"the cosine over the last {split['cosine_epochs']}, to end near {end}"
    )
    return options, shorter


def save_seconds(run):
    """An epoch's checkpoints, written here: the weights written once into the run's folder and
    timed, for a checkpoint of about three times their size (the optimizer's two moments; four
    with --ema) written once and copied once (best.pt, now and then)."""
    if run.rank != 0:
        return 0.0
    probe = run.saver.folder.path / ".time-budget.tmp"
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


def synchronized(device):
    """The clock once the device has done what it was given (CUDA and Apple's queue work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def clock(seconds):
    """Seconds as 1:02:03, 2:03 or 4.5 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def wall_clock(monotonic_time):
    """A time.monotonic() moment as the wall clock's HH:MM (and the date, if not today)."""
    moment = time.time() + (monotonic_time - time.monotonic())
    when, today = time.localtime(moment), time.localtime()
    day = "" if when[:3] == today[:3] else time.strftime(" on %a %d %b", when)
    return time.strftime("%H:%M", when) + day


class Forecast:
    """The run's time left and its end, from the speed of each phase: the epochs this run has
    timed (their training and validation), else the steps --time-budget timed; a phase neither
    has timed is said to be so."""

    def __init__(self, run):
        self.run = run
        self.speed = None  # time_steps', with --time-budget
        self.deadline = None  # time.monotonic()'s when the budget ends, in the planning command

    def epoch_seconds(self, phase, speed=None, side=None):
        """An epoch of `phase`: its steps, its validation and checkpoints; None if untimed. Its
        steps at `side` px (--progressive) cost by their pixels."""
        timed = [
            r["seconds"] + r.get("val_seconds", 0) for r in self.run.history if r["phase"] == phase
        ]
        if timed and speed is None:
            return statistics.median(timed[-3:])
        speed = speed or self.speed
        if speed is None:
            return None
        args = self.run.args
        pixels = ((side or args.img_size) / args.img_size) ** 2
        steps = len(self.run.stream) / args.accum_steps * pixels
        validations = 2 if self.run.ema is not None else 1
        step = speed[f"step{phase}"]
        return steps * step + validations * speed["validation"] + speed.get("save", 0)

    def passes_seconds(self, epochs, speed=None):
        """The feature passes of `epochs` Phase I epochs (--phase1-features N: the first N each
        compute theirs), a pass's batches at the speed timed; 0 without the option."""
        speed = speed or self.speed or {}
        passes = min(epochs, self.run.args.phase1_features)
        return passes * len(self.run.stream) * speed.get("pass", 0.0)

    def end_seconds(self, speed=None):
        """After the last epoch: the average's batch norm pass and validation (--average-last);
        --test-size auto's validation images cached at two larger sizes and validated there,
        with and without its batch norm measured there on the training images (by pixels); the
        flipped and plain validations of --tta auto."""
        speed = speed or self.speed
        if speed is None:
            return 0.0
        args, validation = self.run.args, speed["validation"]
        per_image = speed.get("per_image", validation / max(len(self.run.splits.val), 1))
        train = len(self.run.splits.train) * per_image / self.run.world_size

        seconds = (train + validation) if args.average_last else 0.0
        if args.test_size == "auto":
            step = size_step(args.img_size)
            decode = speed.get("decode", 0.0) / max(args.cache_workers, 1)
            for k in (1, 2):
                pixels = ((args.img_size + k * step) / args.img_size) ** 2
                seconds += pixels * (2 * validation + train)
                seconds += len(self.run.splits.val) * decode  # their images cached at that size
            seconds += validation
        return seconds + (3 * validation if args.tta == "auto" else 0)

    def left(self, phase, epoch, share_done=0.0, estimate=None):
        """Seconds left of the run from `share_done` of `phase`'s epoch `epoch` (0-based), or
        None where a phase to come is not timed yet. `estimate`: the seconds the epoch in
        flight takes at its rate so far, which times its phase where nothing else has."""
        args, total = self.run.args, 0.0
        for p, epochs in ((1, args.epochs1), (2, args.epochs2)):
            if p < phase or (p == 1 and args.phase == "2") or (p == 2 and args.phase == "1"):
                continue
            remaining = epochs - epoch - share_done if p == phase else epochs
            if remaining <= 0:
                continue
            seconds = self.epoch_seconds(p)
            if seconds is None and p == phase and estimate:
                seconds = estimate
            if seconds is None:
                return None
            total += remaining * seconds
        return total + (self.end_seconds() if args.phase != "1" else 0)

    def words(self, phase, epoch, share_done=0.0, estimate=None):
        """'run left 1:02:03, ends 14:52', or what is not timed yet."""
        seconds = self.left(phase, epoch, share_done, estimate)

        if seconds is None:
            return "Phase II not timed yet"
        return f"run left {clock(seconds)}, ends {wall_clock(time.monotonic() + seconds)}"


# Seconds between the progress lines of an epoch where standard error is not a terminal (a
# notebook, a cluster's log), and between updates of the bar's time left where it is.
PROGRESS_EVERY, BAR_EVERY = 60.0, 2.0


class EpochDisplay:
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


def epochs_within(seconds, phase_seconds, end_seconds, kept=None, most=100_000):
    """The largest budget of epochs N, with its split (split_budget(N, kept)) and its expected
    seconds, that trains within `seconds`: phase_seconds(p, split) the seconds of phase p's
    epochs in that split (their steps, validations and checkpoints), and `end_seconds` after
    the last (--average-last, --tta auto). None if not even the smallest budget fits. An extra
    epoch never costs less than nothing, so the first N that does not fit ends the search."""
    best = None
    for total in range(2, most):
        try:
            split = split_budget(total, kept)
        except Problem:  # the epochs given make up more than `total`
            continue
        cost = sum(phase_seconds(p, split) for p in (1, 2)) + end_seconds
        if cost > seconds:
            break
        best = (total, split, cost)
        if kept and "epochs1" in kept and "epochs2" in kept:
            break  # nothing left to choose
    return best
