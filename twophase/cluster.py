"""What a cluster does to a run, and how the run takes it: torchrun starting a job's processes
again after one of them died (the run goes on from the position that job saved, whatever the
command says), --resume auto (a job script's: the run in --out goes on where there is one, a
fresh one starts where there is none), and another number of processes than the run had. The
process group's own defences (a timeout on every collective, a namespace of torchrun's store for
each start) are utils.init_distributed's; a full disk's, run_folder.RunFolder.save's.
"""

import os
from pathlib import Path

from twophase.checkpoint import LAST_PT, PHASE1_PT, peek, resolve_checkpoint
from twophase.continuing import shown
from twophase.run_folder import place
from utils import Done, Problem, log


def restarts():
    """How many times torchrun has started this job's processes again (0: the first time, or no
    torchrun). Each machine's agent counts its own, so it names no start of the whole job."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def processes():
    """The job's processes, before the process group exists: torchrun's WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", 1))


def checkpoint_to_continue(options, given):
    """What --resume means for this command, and the line that says so (None: nothing to say).
    A path, as given; auto: the position of the run in --out, or None for a fresh run. Under
    torchrun's restarts, the position this job saved in its folder (its TORCHELASTIC_RUN_ID in
    the checkpoint), whatever the command says: not one another job left there, which the command
    as given would have refused or replaced."""
    resume, restart = options["resume"], restarts()
    if not restart and resume != "auto":
        return resume, None
    folder = run_folder(options, given)
    path, summary = furthest_position(folder)
    if restart and path and summary.get("launch") == os.environ.get("TORCHELASTIC_RUN_ID"):
        return path, (
            f"torchrun restart {restart}: the run goes on from {path} ({where(summary)}), "
            "whatever the command says"
        )
    if restart and resume != "auto":
        what = f"--resume {resume}" if resume else "a fresh run"
        return resume, (
            f"torchrun restart {restart}: {folder} holds no position this job saved, so the "
            f"command goes as given ({what})"
        )
    if path:
        return (
            path,
            f"--resume auto: the run in {folder} goes on from {path.name} ({where(summary)})",
        )
    return None, (
        f"--resume auto: {folder} holds no run (no {LAST_PT}, no {PHASE1_PT}), so a fresh run "
        "starts there"
    )


def run_folder(options, given):
    """The folder a command's run writes in: --out as given, else the folder of the checkpoint
    --resume names, else --out's default."""
    resume = options["resume"]
    if "out" in given or resume in (None, "auto"):
        return Path(options["out"])
    return resolve_checkpoint(resume).parent


def furthest_position(folder):
    """The folder's last.pt or phase1.pt, whichever is further along (phase1.pt is, where a run
    stopped between writing the two), and its summary (checkpoint.peek); (None, None) where
    neither loads."""
    found = [(folder / name, peek(folder / name)) for name in (LAST_PT, PHASE1_PT)]
    found = [(path, summary) for path, summary in found if summary]
    return max(found, key=lambda pair: place(pair[1]), default=(None, None))


def where(state):
    """A checkpoint's position in words."""
    if state.get("step"):
        return f"phase {state['phase']}, {state['step']} batches into epoch {state['epoch'] + 1}"
    return f"after phase {state['phase']} epoch {state['epoch']}"


def ended(state, options):
    """Whether a run at `state` has trained every epoch `options` ask for: none is left."""
    if state.get("step"):
        return False
    done = {1: state["epoch"] if state["phase"] == 1 else float("inf")}
    done[2] = state["epoch"] if state["phase"] == 2 else 0
    phases = {"1": (1,), "2": (2,), "all": (1, 2)}[options["phase"]]
    return all(done[number] >= options[f"epochs{number}"] for number in phases)


def continuing(start, options, words):
    """A continued run's first lines: how it continues (`words`, checkpoint_to_continue's), or,
    for a run --resume auto finds finished, Done: it is left as it is (under torchrun's restarts
    it goes on: its processes died as it chose its result). Then the number of processes where
    it is another than the run had (other_processes)."""
    if options["resume"] == "auto" and not restarts() and ended(start.state, options):
        raise Done(
            f"--resume auto: the run in {start.path.parent} is finished ({where(start.state)}, "
            "every epoch its options ask for), so it is left as it is"
        )
    if words:
        log(words)
    saved = start.state.get("world_size", 1)
    if saved != processes():
        log(other_processes(start, options, saved, processes()))


def other_processes(start, options, saved, world):
    """A run saved by `saved` processes, continued by `world`: refused in the middle of an epoch,
    whose batches were shared out `saved` ways; at an epoch's end, the line saying how the next
    epochs are shared out, the global batch and the learning rates."""
    if start.mid_epoch:
        launch = f"torchrun --nproc-per-node {saved}" if saved > 1 else "python"
        raise Problem(
            f"{start.path} stopped {where(start.state)} with {saved} process(es), among which "
            f"that epoch's batches are shared out, and this run has {world}: finish that epoch "
            f"with {saved} ({launch} train.py --resume {start.path}), after which any number of "
            "processes goes on from an epoch's end"
        )
    return global_batch_line(start.state["args"], options, saved, world)


def global_batch_line(saved_args, options, saved, world):
    """How a run saved by `saved` processes goes on with `world`: each epoch shared out anew, the
    global batch (batch x accumulated steps x processes) then and now, the learning rates as the
    options give them, and the --batch-size that keeps the global batch, where one does."""
    accum = options["accum_steps"]
    was = saved_args["batch_size"] * saved_args.get("accum_steps", 1) * saved
    now = options["batch_size"] * accum * world
    line = (
        f"the run had {saved} process(es), this one has {world}: each epoch from here is shared "
        f"out {world} way(s), a global batch of {now} (it was {was}), at the learning rates the "
        f"options give, not rescaled (--lr1 {shown(options['lr1'])}, --lr2 "
        f"{shown(options['lr2'])})"
    )
    if now != was and was % (world * accum) == 0:
        line += f"; --batch-size {was // (world * accum)} keeps the global batch of {was}"
    return line
