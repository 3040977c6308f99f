"""Where a run continues from, and everything it restores: one checkpoint (--resume's, or
<out>/phase1.pt for `--phase 2` alone), read once. train.py asks it where each phase begins and
never itself whether the run resumed."""

import math
from pathlib import Path

import torch

from model import Weights, load_weights
from utils import load_checkpoint, log, set_rng_state


class Resume:
    """A run's starting point: a checkpoint, or none for a fresh run."""

    def __init__(self, state=None, path=None, batching=None):
        self.state, self.path, self.batching = state, path, batching

    @classmethod
    def find(cls, args, checkpoint=None):
        batching = (args.batch_size, args.accum_steps)
        if checkpoint is not None or args.phase != "2":
            return cls(checkpoint, args.resume, batching)
        path = Path(args.out) / "phase1.pt"
        if path.is_file():
            return cls(load_checkpoint(path), path, batching)
        log(
            f"warning: no {path}, so Phase II starts from --weights {args.weights} "
            f"(train Phase I first with --phase 1, or use --phase all)"
        )
        return cls(None)

    def weights(self, arch, requested):
        """The weights to build the model with: the --weights asked for, unless a checkpoint's
        are about to replace them (then there is nothing to fetch)."""
        if self.state is None:
            return load_weights(arch, requested)
        where = f"phase {self.state['phase']} epoch {self.state['epoch']}"
        normalisation = {k: tuple(self.state[k]) for k in ("mean", "std") if k in self.state}
        if self.state.get("step"):
            where = f"phase {self.state['phase']}, {self.state['step']} batches into epoch "
            where += f"{self.state['epoch'] + 1}"
        return Weights(about=f"{self.path} ({where}), to continue from", **normalisation)

    def history(self):
        return list(self.state["history"]) if self.state else []

    def restore(self, model, ema, classes, rank, world_size):
        """The saved weights, their moving average and each process's global random state."""
        if self.state is None:
            return
        if list(self.state["classes"]) != list(classes):
            raise SystemExit(
                f"the checkpoint was trained on other classes than the {len(classes)} found in the "
                f"data (checkpoint: {self.state['classes'][:5]}..., data: {classes[:5]}...)"
            )
        model.load_state_dict(self.state["model"])
        if ema is not None and self.state.get("ema"):
            ema.load_state_dict(self.state["ema"])
        elif ema is not None:  # --ema added to a run that had none: it starts from here
            ema.module.load_state_dict(self.state["model"])
        # The data order and the augmentation need no saved state: they are seeded from (seed,
        # epoch, rank). The global generators (initialisation, dropout) go on where they stopped.
        states = self.state["rng"] if isinstance(self.state["rng"], list) else [self.state["rng"]]
        if len(states) == world_size:
            set_rng_state(states[rank])
        else:
            log(
                f"warning: the checkpoint holds the random state of {len(states)} process(es), "
                f"this run has {world_size}: its global random generators start from --seed"
            )

    def position(self, phase, rank, world_size):
        """Where `phase` goes on: (its epochs done, batches done of the next one, their record).
        All of a phase the run has passed is done; a run stopped mid-epoch (a signal, or
        --save-every-steps) goes on at its next batch."""
        if self.state is None or phase > self.state["phase"]:
            return 0, 0, None
        if phase < self.state["phase"]:
            return math.inf, 0, None
        step, progress = self.state.get("step", 0), self.state.get("progress")
        if step and len(progress) != world_size:
            raise SystemExit(
                f"{self.path} stopped mid-epoch with {len(progress)} process(es): resume it with "
                f"as many (this run has {world_size})"
            )
        saved = self.state["args"]
        if step and (saved["batch_size"], saved["accum_steps"]) != self.batching:
            raise SystemExit(
                f"{self.path} stopped mid-epoch with --batch-size {saved['batch_size']} "
                f"--accum-steps {saved['accum_steps']}: resume it with the same"
            )
        return self.state["epoch"], step, progress[rank] if step else None

    def restore_phase(self, phase, scaler):
        """The optimizer, schedule and grad scaler of a run stopped inside `phase`."""
        if self.state is None or self.state["phase"] != phase.number or not self.state["optimizer"]:
            return
        load_optimizer_state(phase.optimizer, self.state["optimizer"])
        if phase.scheduler is not None:
            phase.scheduler.load_state_dict(self.state["scheduler"])
        if self.state["scaler"]:  # empty when the run was saved without fp16 (CPU, bf16, off)
            scaler.load_state_dict(self.state["scaler"])


def load_optimizer_state(optimizer, state):
    """A checkpoint's optimizer state, made right for this optimizer (built by make_optimizer for
    this device) whichever device saved it. load_state_dict would bring the saving run's fused and
    capturable settings along, and would move NAdam's step counts and momentum products to the
    device, where PyTorch reads them back at every step (a host sync each): they belong there
    only for a fused or capturable step."""
    built = {
        key: optimizer.defaults[key] for key in ("fused", "capturable") if key in optimizer.defaults
    }
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(built)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            for key in ("step", "mu_product"):
                if torch.is_tensor(param_state.get(key)):
                    value = param_state[key]
                    param_state[key] = (
                        value.to(param.device, torch.float32) if on_device else value.cpu()
                    )
