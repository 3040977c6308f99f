"""The rules an option obeys when a run continues (--resume, or --phase 2 from <out>/phase1.pt)
and the option is given another value than the run's own. Applied: the remaining epochs train
exactly as a fresh run given that option would train them (a phase's learning rates and weight
decay are a function of the options and the epoch alone, set after the optimizer's state is
loaded). The other rules refuse the option where they say, with a sentence naming it and the way
on. Each row of options.OPTIONS names its rule; docs/checkpoints.md's table is made from them.

A rule is rule(start, options, value): `start` is where the run starts (start.Start), `options`
its options as they resolve now (a dict), `value` the option's new value; it returns why the
value is refused, or None. Its `words` say when it refuses, for the docs.
"""

import math
from pathlib import Path

from data import validation_is_drawn


def rule(words, saved=True):
    """A rule, with the words docs/checkpoints.md gives it; `saved`: whether the checkpoint keeps
    the option's value (one for this command alone is not, and has no row there)."""

    def named(function):
        function.words, function.saved = words, saved
        return function

    return named


@rule("applied")
def applied(start, options, value):
    return None


@rule("never saved: an order for this command alone", saved=False)
def this_command_only(start, options, value):
    return None


@rule("refused")
def refused_always(start, options, value):
    return (
        "the run's weights were made with the value it has; another needs a fresh run "
        "(--out ANOTHER_FOLDER, or --overwrite there)"
    )


@rule("refused")
def starting_weights(start, options, value):
    return (
        "a run that continues starts from its checkpoint's weights, not from --weights; to start "
        "from these, train a fresh run (--out ANOTHER_FOLDER)"
    )


@rule(
    "refused once Phase I is over: Phase II has begun, its last epoch is saved and `--epochs1` "
    "gives it no more, or `--phase 2`; applied before"
)
def phase1_only(start, options, value):
    end = start.phase1_end(options["phase"], options["epochs1"])
    return end and trains_no_more(end)


@rule(
    "refused once Phase I is over: Phase II has begun, its last epoch is saved and `--epochs1` "
    "gives it no more, or `--phase 2`; `auto` refused once Phase I has begun; applied before"
)
def phase1_rate(start, options, value):
    """--lr1: phase1_only's rule, and `auto` only for a Phase I still to begin."""
    return phase1_only(start, options, value) or auto_begun(start, 1, value)


@rule("applied, but `auto` once Phase II has begun: refused")
def phase2_rate(start, options, value):
    return auto_begun(start, 2, value)


def auto_begun(start, phase, value):
    """Why `--lr{phase} auto` cannot be: the range test runs as its phase starts, and the run has
    begun that phase (a rate the test found is kept before the rules are asked: found_rates)."""
    state = start.state
    begun = state["phase"] > phase or (
        state["phase"] == phase and (state["epoch"] > 0 or start.mid_epoch)
    )
    if value != "auto" or not begun:
        return None
    return (
        f"the range test runs as Phase {'I' * phase} starts, and this run's has begun at "
        f"--lr{phase} {shown(state['args'].get(f'lr{phase}'))}; give a number"
    )


def found_rates(saved, given):
    """`--lr1 auto` or `--lr2 auto` given to a run whose rate the range test found: that rate. A
    range test runs once: a continued run trains on at the rate it found."""
    found = saved.get("lr_found") or {}
    return {
        key: saved[key]
        for key in ("lr1", "lr2")
        if given.get(key) == "auto" and key in found and found[key] == saved.get(key)
    }


@rule(
    "refused once Phase I is over (as `--lr1`), and in the middle of an epoch; applied at a "
    "Phase I epoch's end"
)
def phase1_whole_epochs(start, options, value):
    return phase1_only(start, options, value) or whole_epochs(start, options, value)


@rule(
    "refused once Phase II has begun (or with `--phase 2`); applied before, not below the "
    "Phase I epochs the run has"
)
def phase1_length(start, options, value):
    end = start.phase1_end(options["phase"], epochs1=math.inf)  # over whatever its length
    return trains_no_more(end) if end else epoch_in_flight(start, 1, value)


def trains_no_more(end):
    return (
        f"Phase I of this run {end}, so it would change nothing; to train Phase I with it, start "
        "the run over (--overwrite, or --out ANOTHER_FOLDER)"
    )


@rule("refused below the Phase II epochs the run has (the one in flight too), applied otherwise")
def phase_length(start, options, value):
    return epoch_in_flight(start, 2, options["epochs2"])


def epoch_in_flight(start, phase, epochs):
    """Why `epochs` epochs of `phase` cannot be: the run has trained more, or has one in flight
    (stopped mid-epoch) that it would drop."""
    if start.state["phase"] != phase:
        return None
    done = start.state["epoch"] + (1 if start.mid_epoch else 0)
    if epochs < done:
        what = "epochs, the last in flight" if start.mid_epoch else "epochs"
        return f"Phase {'I' * phase} has {done} {what}; give {done} or more"
    return None


@rule("refused once Phase II's optimizer state is saved, applied before")
def phase2_optimizer(start, options, value):
    if start.phase2_begun:
        saved = start.state["args"]["optimizer2"]
        return (
            f"Phase II's {saved} state is saved in {start.path} and would not fit another "
            f"optimizer; to train Phase II with {value}, start it again from phase1.pt: "
            f"python train.py --phase 2 --out {start.path.parent} --optimizer2 {value} --overwrite"
        )
    return None


@rule(
    "refused in the middle of an epoch but as the same effective batch in smaller pieces; "
    "applied at an epoch's end"
)
def smaller_pieces(start, options, value):
    """--batch-size, --accum-steps: in the middle of an epoch, as the same effective batch in
    smaller pieces (what the out-of-memory advice gives): a batch that divides the run's, with
    as many times the accumulated steps."""
    if not start.mid_epoch:
        return None
    saved = start.state["args"]
    batch, accum = saved["batch_size"], saved.get("accum_steps", 1)
    new_batch, new_accum = options["batch_size"], options["accum_steps"]
    if batch % new_batch == 0 and new_batch * new_accum == batch * accum:
        return None
    return (
        f"{start.path} stopped {start.state['step']} batches into an epoch at --batch-size "
        f"{batch} --accum-steps {accum}; in the middle of an epoch only the same effective batch "
        f"in smaller pieces goes on (a --batch-size that divides {batch}, with --accum-steps as "
        "many times more), or resume without them to finish that epoch first"
    )


@rule("refused in the middle of an epoch, applied at an epoch's end")
def whole_epochs(start, options, value):
    if start.mid_epoch:
        return (
            f"{start.path} stopped {start.state['step']} batches into an epoch, whose remaining "
            "batches are those it began with; resume without it to finish that epoch first"
        )
    return None


@rule(
    "refused where validation is held out of the training images (no val/, or no "
    "`--val-labels`), applied otherwise"
)
def held_out_split(start, options, value):
    saved = start.state["args"]
    before = {**options, "labels": saved.get("labels"), "val_labels": saved.get("val_labels")}
    if validation_is_drawn(before) or validation_is_drawn(options):
        return (
            "the validation images are drawn from the training images by --seed and "
            "--val-fraction, so another value would move images the run trained on into "
            "validation; keep the run's value, or give the data a validation set of its own "
            "(a val/ folder, or --val-labels)"
        )
    return None


@rule("refused once an epoch is validated, applied before")
def validated_alike(start, options, value):
    if start.history():
        return (
            "the run's epochs were validated on the images it had then, and its best is chosen "
            "among them by validation accuracy; keep the run's value, or start a fresh run "
            "(--out ANOTHER_FOLDER) to validate otherwise"
        )
    return None


@rule("refused on `--resume`, applied with `--phase 2` from `phase1.pt`")
def budget_rule(start, options, value):
    if not start.from_phase1:
        return (
            "a time budget chooses a run's epochs when it starts, and the run saved them; to "
            "train longer or shorter, give --epochs2 (or --epochs N)"
        )
    return None


@rule(
    "refused where validation is held out of the training images, and in the middle of an "
    "epoch; applied otherwise"
)
def seed_rule(start, options, value):
    return held_out_split(start, options, value) or whole_epochs(start, options, value)


def refused(table, options, saved, start):
    """Every option of `table` (options.OPTIONS) that differs from the run's and that its rule
    refuses, as lines naming it, its value, the run's and why."""
    lines = []
    for option in table:
        key = option.dest
        if not option.rule.saved or options[key] == saved.get(key):
            continue
        if option.file and same_file(options[key], saved.get(key)):
            continue  # the same file, moved with the dataset
        why = option.rule(start, options, options[key])
        if why:
            was = shown(saved.get(key))
            lines.append(f"{option.flag} {shown(options[key])} (the run has {was}): {why}")
    return lines


def same_file(path, saved):
    """Whether a file option names the run's file: the same bytes, or, the run's being gone
    (its dataset moved), a file of the same name."""
    if not (path and saved) or path in ("auto", "none") or saved in ("auto", "none"):
        return False
    path, saved = Path(path), Path(saved)
    if not saved.is_file():
        return path.name == saved.name
    return path.is_file() and path.read_bytes() == saved.read_bytes()


def shown(value):
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "unset" if value is None else str(value)
