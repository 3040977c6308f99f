"""A run that continues: where it starts (--resume's checkpoint, or phase1.pt for --phase 2),
the options it saved, and the rule each option obeys when it is given another value there.
recipe.py's resolve_options applies these; tests/test_continue.py walks every option through
them.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from data import validation_is_drawn
from twophase.augment import DeviceAugment
from twophase.checkpoint import PHASE1, Resume, load_checkpoint, resolve_checkpoint
from utils import Problem, log

# ------------------------------------------------------------------------ continuing a run
#
# When a run continues (--resume, or --phase 2 from <out>/phase1.pt), each option that differs
# from the run's own value obeys one rule. Applied: the remaining epochs train exactly as a fresh
# run given that option would train them (a phase's learning rates and weight decay are a
# function of the options and the epoch alone, set after the optimizer's state is loaded). The
# other rules refuse the option where they say, with a sentence naming it and the way on.
# tests/test_continue.py walks the parser: an option without a rule here fails it.


@dataclass(frozen=True)
class Continuing:
    """What the rules look at: the checkpoint the run continues from, and its options now."""

    state: dict
    path: Path
    options: dict

    @property
    def phase1_end(self):
        return phase1_end(self.state, self.options["phase"], self.options["epochs1"])

    @property
    def phase2_begun(self):
        return self.state["phase"] == 2 and bool(self.state.get("optimizer"))

    @property
    def mid_epoch(self):
        return bool(self.state.get("step"))


def phase1_end(state, phase, epochs1):
    """Why Phase I trains no more in a run continuing from `state` with --phase `phase` and
    --epochs1 `epochs1`, as the end of a sentence on Phase I, or None where it trains on."""
    if state["phase"] == 2:
        return "is over"
    if phase == "2":
        return "does not train again (--phase 2)"
    if not state.get("step") and state["epoch"] >= epochs1:
        return "is over"  # its last epoch saved: phase1.pt, or last.pt at Phase I's end
    return None


def from_phase1(path, state):
    """Whether a run continues from its phase1.pt, where Phase II has not begun: its budget is
    still to plan, as a fresh run's."""
    return path.name == PHASE1 and state["phase"] == 1


def applied(run, value):
    return None


def fixed(run, value):
    return (
        "the run's weights were made with the value it has; another needs a fresh run "
        "(--out ANOTHER_FOLDER, or --overwrite there)"
    )


def starting_weights(run, value):
    return (
        "a run that continues starts from its checkpoint's weights, not from --weights; to start "
        "from these, train a fresh run (--out ANOTHER_FOLDER)"
    )


def phase1_only(run, value):
    """--lr1, --wd1, --freeze-bn: applied where Phase I trains on (--epochs1 may open it again)."""
    return run.phase1_end and trains_no_more(run.phase1_end)


def phase1_length(run, value):
    """--epochs1: applied in Phase I, not below what it has trained; refused where Phase I is
    over whatever its length."""
    end = phase1_end(run.state, run.options["phase"], epochs1=math.inf)
    return trains_no_more(end) if end else epoch_in_flight(run, 1, value)


def trains_no_more(end):
    return (
        f"Phase I of this run {end}, so it would change nothing; to train Phase I with it, start "
        "the run over (--overwrite, or --out ANOTHER_FOLDER)"
    )


def phase_length(run, value):
    """--epochs2: applied, but not below what the run has trained of Phase II."""
    return epoch_in_flight(run, 2, run.options["epochs2"])


def epoch_in_flight(run, phase, epochs):
    """Why `epochs` epochs of `phase` cannot be: the run has trained more, or has one in flight
    (stopped mid-epoch) that it would drop."""
    if run.state["phase"] != phase:
        return None
    done = run.state["epoch"] + (1 if run.mid_epoch else 0)
    if epochs < done:
        what = "epochs, the last in flight" if run.mid_epoch else "epochs"
        return f"Phase {'I' * phase} has {done} {what}; give {done} or more"
    return None


def phase2_optimizer(run, value):
    if run.phase2_begun:
        saved = run.state["args"]["optimizer2"]
        return (
            f"Phase II's {saved} state is saved in {run.path} and would not fit another "
            f"optimizer; to train Phase II with {value}, start it again from phase1.pt: "
            f"python train.py --phase 2 --out {run.path.parent} --optimizer2 {value} --overwrite"
        )
    return None


def smaller_pieces(run, value):
    """--batch-size, --accum-steps: applied at an epoch's end; in the middle of one, as the same
    effective batch in smaller pieces (what the out-of-memory advice gives): a batch that divides
    the run's, with as many times the accumulated steps."""
    if not run.mid_epoch:
        return None
    saved = run.state["args"]
    batch, accum = saved["batch_size"], saved.get("accum_steps", 1)
    new_batch, new_accum = run.options["batch_size"], run.options["accum_steps"]
    if batch % new_batch == 0 and new_batch * new_accum == batch * accum:
        return None
    return (
        f"{run.path} stopped {run.state['step']} batches into an epoch at --batch-size {batch} "
        f"--accum-steps {accum}; in the middle of an epoch only the same effective batch in "
        f"smaller pieces goes on (a --batch-size that divides {batch}, with --accum-steps as "
        "many times more), or resume without them to finish that epoch first"
    )


def whole_epochs(run, value):
    if run.mid_epoch:
        return (
            f"{run.path} stopped {run.state['step']} batches into an epoch, whose remaining "
            "batches are those it began with; resume without it to finish that epoch first"
        )
    return None


def held_out_split(run, value):
    saved = run.state["args"]
    before = {**run.options, "labels": saved.get("labels"), "val_labels": saved.get("val_labels")}
    if validation_is_drawn(before) or validation_is_drawn(run.options):
        return (
            "the validation images are drawn from the training images by --seed and "
            "--val-fraction, so another value would move images the run trained on into "
            "validation; keep the run's value, or give the data a validation set of its own "
            "(a val/ folder, or --val-labels)"
        )
    return None


def budget_rule(run, value):
    if not from_phase1(run.path, run.state):
        return (
            "a time budget chooses a run's epochs when it starts, and the run saved them; to "
            "train longer or shorter, give --epochs2 (or --epochs N)"
        )
    return None


def seed_rule(run, value):
    return held_out_split(run, value) or whole_epochs(run, value)


COMMAND = None  # an order for this command alone, never a saved option

CONTINUING = {
    # the data
    "data": applied,
    "labels": held_out_split,  # the images validation is drawn from, where it is drawn
    "image_col": held_out_split,
    "label_col": held_out_split,
    "val_labels": held_out_split,
    "img_size": applied,
    "resize": applied,  # its own cache; the checkpoints say which
    "val_fraction": held_out_split,
    "cache_dir": applied,
    "batch_size": smaller_pieces,
    "cache_workers": applied,
    # the model
    "arch": fixed,
    "mean": fixed,
    "std": fixed,
    "weights": starting_weights,
    # the budget, Phase I, Phase II
    "epochs": applied,  # through the split, each of whose parts has its rule
    "time_budget": budget_rule,
    "epochs1": phase1_length,
    "lr1": phase1_only,
    "wd1": phase1_only,
    "freeze_bn": phase1_only,
    "epochs2": phase_length,
    "optimizer2": phase2_optimizer,
    "lr2": applied,
    "wd2": applied,
    "warmup_epochs": applied,
    "warmup_start": applied,
    "cosine_epochs": applied,
    "min_lr": applied,
    "clip": applied,
    "save_every": applied,
    "save_min_acc": applied,
    # both phases
    "label_smoothing": applied,
    "class_weights": applied,
    "sampler": whole_epochs,
    "amp": applied,
    "accum_steps": smaller_pieces,
    "sync_bn": applied,
    "compile": applied,
    # the levers (--lr-decay regroups Phase II's saved optimizer state by parameter)
    "recipe": applied,  # through its levers, each of which has its rule
    "ema": applied,
    "mixup": applied,
    "cutmix": applied,
    "lr_decay": applied,
    "keep_last": applied,
    "average_last": applied,
    "tta": applied,
    "progressive": applied,  # the schedule of sizes is a function of the options and the epoch
    "progressive_until": applied,
    "test_size": applied,
    "max_params": applied,
    # the augmentation: drawn anew each epoch from the options
    **dict.fromkeys(DeviceAugment.option_names(), applied),
    # the run
    "phase": applied,
    "out": applied,
    "save_every_steps": applied,
    "tensorboard": applied,  # a resumed run's curves go on from its step, not twice
    "tensorboard_every": applied,
    "seed": seed_rule,
    "device": applied,
    "demo": fixed,
    "resume": COMMAND,
    "overwrite": COMMAND,
}


PHASE1_ONLY = tuple(key for key, rule in CONTINUING.items() if rule is phase1_only)


def refuse_changes(options, saved, resume, parser):
    """A Problem naming every option that differs from the run's and that its rule refuses."""
    run = Continuing(resume.state, resume.path, options)
    flags = {a.dest: a.option_strings[0] for a in parser._actions}
    refused = []
    for key, rule in CONTINUING.items():
        if rule is COMMAND or options[key] == saved.get(key):
            continue
        if key in FILE_OPTIONS and same_file(options[key], saved.get(key)):
            continue  # the same file, moved with the dataset
        why = rule(run, options[key])
        if why:
            was = shown(saved.get(key))
            refused.append(f"{flags[key]} {shown(options[key])} (the run has {was}): {why}")
    if refused:
        raise Problem(
            f"these options cannot change in the run {resume.path} continues:\n  "
            + "\n  ".join(refused)
        )


FILE_OPTIONS = ("labels", "val_labels", "class_weights")


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


def continued_run(args):
    """Where the run starts: --resume's checkpoint, <out>/phase1.pt for --phase 2 alone, or
    nothing (a fresh run)."""
    if args.resume:
        path = resolve_checkpoint(args.resume)
        state = load_checkpoint(path)
        if state.get("averaged"):
            raise Problem(
                f"{path} is an average of checkpoints, not a position in a run: resume from the "
                "run's last.pt, or start a run from it with --weights"
            )
        return Resume(state, path)
    path = Path(args.out) / PHASE1
    if args.phase != "2":
        return Resume()
    if path.is_file():
        return Resume(load_checkpoint(path), path)
    log(
        f"warning: no {path}, so Phase II starts from --weights {args.weights} "
        f"(train Phase I first with --phase 1, or use --phase all)"
    )
    return Resume()


def saved_options(state):
    """A checkpoint's resolved options, in today's names and forms."""
    saved = dict(state["args"])
    if "workers" in saved:  # the name --cache-workers had before
        saved.setdefault("cache_workers", saved.pop("workers"))
    if isinstance(saved.get("compile"), bool):  # saved when --compile took no mode
        saved["compile"] = "default" if saved["compile"] else None
    return saved
