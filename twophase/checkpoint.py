"""The checkpoint: what one holds (a plain dict, built in one place), the files a run writes and
in which order, writing them atomically into a folder no other run is using, reading them back,
and where a run continues from one.

A checkpoint loads with torch.load(path, weights_only=True): tensors, numbers, strings, lists and
dicts only. Its keys: `model` (the state dict), `arch`, `classes`, `img_size`, `mean`, `std`,
`data` (what the weights are and how to feed them; `data` is the dataset's absolute path),
`args` (the run's resolved options), `phase` and `epoch` (the epochs of that phase done),
`history` (one record per epoch), `optimizer` (no scheduler: the learning rate is a
function of the options and the epoch), `scaler`, `rng` (one per process), `world_size`,
`device` (what resuming needs), `class_counts` (the training images of each class), `ema` (the
weights' moving average, or None) and `eval_weights` (`model` or `ema`: the one that validated
better); `step` and `progress` when saved mid-epoch; `averaged` and `val_acc` for an average of
checkpoints; `tta` (whether test-time flips validated better) once --tta auto has chosen,
`test_size` (the side to test at) once --test-size auto has; `launch` (the torchrun job that saved
it, whose restarts go on from it: cluster.py); `l2sp_reference` (the digest of the weights
--l2sp pulls towards, which a continued run reads again and checks).
"""

import csv
import math
import os
from pathlib import Path

import torch

from model import strip_prefixes
from utils import (
    MissingFile,
    Problem,
    WriteErrors,
    atomic_file,
    gather_from_processes,
    log,
    rng_state,
)

CHECKPOINT_DIR = "checkpoints"  # where a bare name such as best.pt is looked up
LAST_PT, BEST_PT, PHASE1_PT, AVERAGED_PT = "last.pt", "best.pt", "phase1.pt", "averaged.pt"
HISTORY_CSV, LOCK_FILE = "history.csv", ".lock"
DATA_CHECK_CSV = "data_check.csv"  # the data check's copies (twophase/data_check.py)
# Left by a run stopped by a signal (the job scripts' sign that it was preempted, not broken:
# under torchrun the exit status does not say so), removed when the next run takes the folder.
PREEMPTED = "preempted"
# Everything a run writes into its folder (RunFolder.claimed deletes these with --overwrite).
RUN_FILES = (
    LAST_PT,
    BEST_PT,
    PHASE1_PT,
    AVERAGED_PT,
    HISTORY_CSV,
    DATA_CHECK_CSV,
    PREEMPTED,
    "epoch[0-9][0-9][0-9]*.pt",
)
RUN_FILES += ("phase2_epoch*.pt",)
ABOUT = ("arch", "classes", "img_size", "mean", "std", "data")  # what the weights are
EXTRA = {"step", "progress", "averaged", "val_acc", "tta", "command", "wall_seconds"}
EXTRA |= {"class_counts"}  # the training images of each class, for the report's per-class table
EXTRA |= {"test_size", "test_bn", "test_bn_of"}  # --test-size auto's size, batch norm there
EXTRA |= {"val_digest"}  # which images were held out for validation
EXTRA |= {"val_left_out"}  # the copies of training images left out of validation (--drop-copies)
EXTRA |= {"run_id"}  # which run the checkpoint is of (made as it starts; a resume keeps it)
EXTRA |= {"launch"}  # the torchrun job that saved it (TORCHELASTIC_RUN_ID): its restarts go on
EXTRA |= {"l2sp_reference"}  # the digest of the weights --l2sp pulls towards
# What an average of a run's checkpoints keeps of its last: which run, on which images.
RUN_RECORD = ("command", "class_counts", "val_digest", "val_left_out", "run_id", "l2sp_reference")


def epoch_file(n):
    """The run's n-th epoch (--keep-last): epoch001.pt, ..."""
    return f"epoch{n:03d}.pt"


def periodic_file(epoch):
    """Phase II's periodic checkpoint (--save-every)."""
    return f"phase2_epoch{epoch:03d}.pt"


# ----------------------------------------------------------------------------- the dict


def make_checkpoint(model, about, args, history, position, ema=None, training=None, **extra):
    """The one place a checkpoint dict is made. `model`: the weights' state dict; `about`: the
    ABOUT keys; `args`: the resolved options; `position`: (phase, its epochs done); `ema`: the
    moving average's state; `training`: what resuming needs (optimizer, scaler, rng,
    world_size, device) and `eval_weights`; `extra`: the optional keys of EXTRA."""
    phase, epoch = position
    if set(extra) - EXTRA:
        raise ValueError(f"not a checkpoint key: {sorted(set(extra) - EXTRA)}")
    training = training or {}
    return {
        "model": model,
        **{key: about[key] for key in ABOUT},
        "args": args,
        "phase": phase,
        "epoch": epoch,
        "history": history,
        "optimizer": training.get("optimizer"),
        "scaler": training.get("scaler"),
        "rng": training.get("rng"),
        "world_size": training.get("world_size", 1),
        "device": training.get("device", "cpu"),
        "ema": ema,
        "eval_weights": training.get("eval_weights", "model"),
        **extra,
    }


def averaged_checkpoint(last, weights, sources, val_acc=None):
    """The checkpoint of an average of `sources` (paths): the last one's run record with the
    averaged `weights` (on the CPU), no moving average and nothing to resume from."""
    weights = {k: v.detach().cpu() for k, v in weights.items()}
    about = {key: last[key] for key in ABOUT}
    return make_checkpoint(
        weights,
        about,
        last["args"],
        last["history"],
        (last["phase"], last["epoch"]),
        training={"device": last.get("device", "cpu")},
        averaged=[str(p) for p in sources],
        val_acc=val_acc,
        **{key: last[key] for key in RUN_RECORD if last.get(key) is not None},
    )


def best_acc(record):
    """An epoch's validation accuracy: of the weights or of their moving average, the better."""
    return max(record["val_acc"], record.get("ema_val_acc", -1.0))


def epoch_name(record):
    """An epoch as every line, figure and report names it: its phase and its number there."""
    return f"phase {record['phase']} epoch {record['epoch']}"


def epochs_name(records):
    """Consecutive epochs of one phase, as epoch_name names one: "phase 2 epochs 6-8"."""
    first, last = records[0], records[-1]
    return f"phase {first['phase']} epochs {first['epoch']}-{last['epoch']}"


def held_name(state):
    """The weights a checkpoint holds, named as every line and figure names them: "the average
    of phase 2 epochs 4-6", "phase 2 epoch 6, moving average" or "phase 2 epoch 6", and how it
    is tested where that is not plain (a test size, flips)."""
    if state.get("averaged"):
        records = [r for r in state.get("history") or [] if r["phase"] == 2]
        records = records[-len(state["averaged"]) :]
        name = f"the average of {epochs_name(records)}" if records else "an average"
    else:
        name = epoch_name(state) + (
            ", moving average" if state.get("eval_weights") == "ema" else ""
        )
        name += f" and {state['step']} batches" if state.get("step") else ""
    if state.get("test_size") and state["test_size"] != state.get("img_size"):
        name += f", tested at {state['test_size']} px"
    return name + (", with flips" if state.get("tta") else "")


def weights_name(record):
    """Which weights an epoch's best_acc is of: the weights, or their moving average (--ema)."""
    ema = record.get("ema_val_acc", -1.0) > record["val_acc"]
    return "the weights' moving average" if ema else "the weights"


def epoch_record(phase, epoch, lr, train, val, seconds, val_seconds):
    """An epoch's row of history.csv."""
    return {
        "phase": phase,
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train["train_loss"],
        "train_acc": train["train_acc"],
        **val,
        "images_per_s": train["images"] / seconds,
        "seconds": seconds,
        "val_seconds": val_seconds,
        "steps": train["steps"],  # its optimizer steps: TensorBoard's clock
        "img_size": train["img_size"],  # the side it trained at (--progressive)
        "train_loss_curve": train.get("train_loss_curve", []),  # as it went: Figure 1
    }


def files_for_epoch(history, phase, epoch, phase_epochs, is_best, args):
    """The files that hold the checkpoint of `phase`'s epoch `epoch` (1-based) of `phase_epochs`,
    in the order they are written, and the kept epoch file that has just fallen out of
    --keep-last's window (or None). phase1.pt comes first: a resume never needs to redo Phase I;
    last.pt last: a run stopped before its epoch's files are all written (a full disk, a kill)
    resumes from the epoch before and writes them all again."""
    names = [PHASE1_PT] if phase == 1 and epoch == phase_epochs else []
    if is_best:
        names.append(BEST_PT)
    if phase == 2 and args.save_every and epoch % args.save_every == 0:  # 0: none
        acc = history[-1]["val_acc"]
        if acc >= args.save_min_acc:
            names.append(periodic_file(epoch))
        else:
            log(
                f"{periodic_file(epoch)} not kept: val acc {acc:.4f} is below "
                f"--save-min-acc {args.save_min_acc}"
            )
    keep = max(args.keep_last, args.average_last)  # --average-last averages the kept ones
    if not keep:
        return names + [LAST_PT], None
    n = len(history)  # numbered by the run's epoch count
    return names + [epoch_file(n), LAST_PT], epoch_file(n - keep) if n > keep else None


# ----------------------------------------------------------------------------- files


def save_checkpoint(state, path):
    """`state` written atomically to `path`. A write that fails raises its OSError (a full disk's
    ENOSPC), which torch.save would have turned into a RuntimeError that no longer says so."""
    with atomic_file(path) as f:
        recorded = WriteErrors(f)
        try:
            torch.save(state, recorded)
        except RuntimeError:
            if recorded.error is None:
                raise
            raise recorded.error from None


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint of this project. weights_only=True: a file that would run code is refused."""
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise Problem(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None


def peek(path):
    """A checkpoint's position and options ({phase, epoch, step, args}), read with its tensors
    mapped, not loaded (cheap for any size), or None if there is none that loads. Nothing of it
    stays mapped: Windows would not let the run replace the file later."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    keys = ("phase", "epoch", "args", "step", "averaged", "launch")
    summary = {key: state.get(key) for key in keys}
    summary["val_acc"] = state.get("val_acc")
    del state
    return summary


def resolve_checkpoint(path):
    """A bare name such as best.pt that is not a file means checkpoints/best.pt."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and (Path(CHECKPOINT_DIR) / path).exists():
        return Path(CHECKPOINT_DIR) / path
    if not path.exists():
        tried = f" (nor {Path(CHECKPOINT_DIR) / path})" if len(path.parts) == 1 else ""
        raise MissingFile(f"no checkpoint {path.resolve()}{tried}")
    return path


def full_history(ckpt_path, state):
    """The whole run's per-epoch records. A checkpoint holds the history up to its own epoch
    (best.pt stops at the best one); history.csv beside it goes on to the run's last epoch."""
    history = state["history"]
    path = Path(ckpt_path).parent / HISTORY_CSV
    if not path.is_file():
        return history
    with open(path, newline="") as f:
        rows = [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    same_run = len(rows) >= len(history) and all(
        (r["phase"], r["epoch"]) == (h["phase"], h["epoch"])
        and math.isclose(r["val_acc"], h["val_acc"])
        for r, h in zip(rows, history)
    )
    return rows if same_run else history


def _value(column, text):
    """A cell of history.csv: a curve (its points, space-separated) as a list, else a number."""
    if column.endswith("_curve"):
        return [float(v) for v in (text or "").split()]
    return _number(text)


def _number(text):
    if text == "":  # a column an earlier epoch did not have (--ema added on --resume, say)
        return math.nan
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def write_history_csv(history, path):
    if not history:
        return
    with atomic_file(path, "w", newline="") as f:
        # Every column any epoch has: a resumed run may add some (--ema).
        columns = list(dict.fromkeys(key for record in history for key in record))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in history:  # a curve (a list) as its points, space-separated
            writer.writerow(
                {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in record.items()}
            )


class Checkpointer:
    """A run's checkpoints as it trains: its state after an epoch, or at a step in the middle of
    one, as the dict make_checkpoint makes from the options and history handed over and the
    model (and moving average) it holds; the files each goes to (files_for_epoch); and where the
    run was last saved, which the advice of a run that diverged names. Saving is a collective
    under torchrun: every process gathers its random state, the first writes."""

    def __init__(self, folder, model, ema, splits, procs, start):  # model: on its device
        self.folder, self.model, self.ema, self.procs = folder, model, ema, procs
        self.device, self.classes = next(model.parameters()).device, splits.classes
        self.extra = {
            "class_counts": splits.train.class_counts(len(splits.classes)).tolist(),
            "val_digest": splits.val.digest(),  # which images were held out for validation
            "val_left_out": list(splits.left_out),  # --drop-copies': evaluate.py leaves them out
            "run_id": start.run_id(),
            "command": start.command(),  # as typed: the report's Command line
            "launch": os.environ.get("TORCHELASTIC_RUN_ID"),  # its restarts go on from here
        }
        self.saved_at = None  # where last.pt was last written by this run, in words

    def state(self, args, history, phase, epoch, **extra):
        """The run's checkpoint after `epoch` epochs of `phase` (and `extra`, mid-epoch)."""
        last = history[-1] if history else {"val_acc": 0.0}
        about = dict(arch=args.arch, classes=self.classes, img_size=args.img_size)
        about |= dict(mean=list(args.mean), std=list(args.std), data=str(Path(args.data).resolve()))
        training = {
            "optimizer": phase.optimizer.state_dict(),
            "scaler": phase.scaler.state_dict(),
            "rng": gather_from_processes(rng_state()),  # one state per process
            "world_size": self.procs.world_size,
            "device": self.device.type,
            # The weights evaluate.py and predict.py use: the moving average where it was better.
            "eval_weights": "ema" if best_acc(last) > last["val_acc"] else "model",
        }
        weights = {strip_prefixes(k): v for k, v in self.model.state_dict().items()}
        ema = self.ema.state_dict() if self.ema else None
        if phase.l2sp is not None:  # which weights it pulls towards: a continued run checks
            extra |= {"l2sp_reference": phase.l2sp.digest}
        return make_checkpoint(
            weights,
            about,
            vars(args),
            history,
            (phase.number, epoch),
            ema,
            training,
            **self.extra,
            **extra,
        )

    def save_epoch(self, args, history, phase, epoch, is_best):
        """The checkpoint of `phase`'s epoch `epoch` (1-based), under each name it goes to."""
        state = self.state(args, history, phase, epoch)  # every process
        if self.procs.rank == 0:
            names, stale = files_for_epoch(
                history, phase.number, epoch, phase.epochs, is_best, args
            )
            self.folder.save(state, names, history)
            if stale:
                self.folder.remove(stale)
        self.saved_at = f"phase {phase.number} epoch {epoch}"

    def save_position(self, args, history, phase, epoch, partial):
        """last.pt in the middle of an epoch: the batches done and their record so far (the
        partial epoch's, kept under the key `progress`)."""
        partial = gather_from_processes(partial)  # every process
        step = len(partial[0]["sizes"])
        state = self.state(args, history, phase, epoch, step=step, progress=partial)
        if self.procs.rank == 0:
            self.folder.save(state, [LAST_PT], history)
        self.saved_at = f"phase {phase.number}, {step} batches into epoch {epoch + 1}"
