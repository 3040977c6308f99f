"""The seconds a run's steps take on this machine, measured on copies of its model as a
--time-budget run starts: what budget.py turns into epochs."""

import copy
import itertools
from contextlib import closing

import torch

from twophase.budget import decode_seconds, save_seconds, synchronized
from twophase.features import timed_pass
from twophase.lr_find import numeric_rates
from twophase.run import distributed
from twophase.tally import EpochTally
from utils import gather_from_processes, rng_state, set_rng_state


def time_steps(run, training, steps=3):
    """Seconds an optimizer step of each phase takes here (step1, step2; with --phase1-features,
    the head's on features, and a batch of a feature pass: pass), a validation pass
    (validation), an epoch's checkpoints (save) and an image decoded (decode): `steps` steps of a
    copy of the model in each phase after one to warm up (train.py's own phases and steps,
    `training`), the copy thrown away and the global
    random state put back, so that the run trains as it would have. Under torchrun every process
    times its share, through DDP, and the slowest counts."""
    args, device = numeric_rates(run.args), run.device  # as long a step at any rate
    state = rng_state()
    run.stream.draw(0, args.img_size)
    with closing(run.stream.batches(device)) as batches:
        batches = list(itertools.islice(batches, (steps + 1) * args.accum_steps))
    timed = {}
    for number in (1, 2):
        model = copy.deepcopy(run.model)
        phase = training.phase_setup(number, args, model, device, run.criterion, run.dtype)
        phase.set_rates(0)
        net, inputs = distributed(model, device, run.world_size), batches
        if number == 1 and run.features is not None:  # a feature pass, then the head's steps
            inputs, timed["pass"] = timed_pass(model, batches, phase)
            net = distributed(model.fc, device, run.world_size)
        done = training.optimizer_steps(net, iter(inputs), len(inputs), phase, None, EpochTally())
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
