"""Whether the loss has ruined the model, checked before each save: an fp16 overflow now and
then is normal (GradScaler skips that step and lowers its scale); a loss that stays non-finite,
or any in float32 or bf16, a non-finite validation loss (batch norm statistics spoilt by an
overflow) or non-finite weights stop the run before it saves them, with the way on: the last good
checkpoint and a lower learning rate for the phase it was in."""

import math

import torch

from utils import Problem, log, sum_over_processes


def check_epoch(run, phase, epoch, train, val):
    """An epoch's training (its `train` summary) and validation (`val`): a Problem where the
    model is ruined; a warning where fp16 batches overflowed now and then."""
    bad, batches = train["nonfinite"], train["batches"]
    if bad and (run.dtype != torch.float16 or bad == batches):
        raise diverged(run, phase, epoch, f"the loss was not finite in {bad} of {batches} batches")
    if len(run.splits.val) and not math.isfinite(val["val_loss"]):
        raise diverged(run, phase, epoch, "the validation loss is not finite")
    if not all_finite(run.model):
        raise diverged(run, phase, epoch, "the weights are not finite")
    if bad:
        log(
            f"warning: {bad} of {batches} fp16 batches overflowed; the grad scaler skipped their "
            "steps"
        )


def check_position(run, phase, epoch, tally):
    """check_epoch for a save in the middle of an epoch: the batches so far, the weights."""
    losses = torch.stack(tally.losses)
    bad = int(sum_over_processes((~torch.isfinite(losses)).sum())[0])
    if bad and (run.dtype != torch.float16 or bad == tally.batches):
        raise diverged(run, phase, epoch, f"the loss was not finite in {bad} batches")
    if not all_finite(run.model):
        raise diverged(run, phase, epoch, "the weights are not finite")


def diverged(run, phase, epoch, what):
    """The Problem of a run whose model the loss has ruined, with the way on: the last good
    position and a lower learning rate for the phase it was in."""
    option = "--lr1" if phase == 1 else "--lr2"
    lower = (run.args.lr1 if phase == 1 else run.args.lr2) / 4
    saver = run.saver
    last = saver.folder.path / "last.pt"
    if saver.saved_at is None and not saver.folder.holds_last_of(run.start):
        way = f"start again with a lower learning rate ({option} {lower:.1e}) or --amp bf16"
    else:
        where = f" ({saver.saved_at})" if saver.saved_at else ""
        way = (
            f"the last good checkpoint is {last}{where}; go on from it with a lower learning "
            f"rate: python train.py --resume {last} {option} {lower:.1e} (or --amp bf16)"
        )
    return Problem(
        f"phase {phase} epoch {epoch + 1}: {what}, so training stopped before saving. {way}"
    )


def all_finite(module):
    """Whether every weight and floating-point buffer (batch norm statistics) is finite: one
    reduction on the device, read once (a host sync, at save time only)."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
