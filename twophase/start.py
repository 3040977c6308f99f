"""Where a run starts: the checkpoint it continues, read once, and what of it a continued run
restores (its weights, moving average, random state, each phase's position, its optimizer's
state). The rules for options given to a continued run are continuing.py's."""

import math
import uuid
from pathlib import Path

import torch

from data import validation_is_drawn
from model import Weights, load_weights, optimizer_order, parameter_names
from twophase.checkpoint import PHASE1_PT, load_checkpoint, resolve_checkpoint
from utils import Problem, gather_from_processes, log, set_rng_state


class Start:
    """Where a run starts: the checkpoint it continues (--resume's, or <out>/phase1.pt for
    `--phase 2` alone), read once, or none for a fresh run. Everything of the run's beginning is
    asked of it: the options it saved, the weights to build, the history so far, where each phase
    begins, the state to restore. train.py never asks itself whether the run resumed."""

    def __init__(self, state=None, path=None, typed=None):
        self.state, self.path = state, Path(path) if path else None
        self.typed = typed  # this command's line, as the user typed it

    @classmethod
    def of(cls, resume, out, phase_option, weights):
        """--resume's checkpoint, <out>/phase1.pt for --phase 2 alone (`phase_option`: --phase's
        "1", "2" or "all"), or nothing (a fresh run)."""
        if resume:
            path = resolve_checkpoint(resume)
            state = load_checkpoint(path)
            if state.get("averaged"):
                raise Problem(
                    f"{path} is an average of checkpoints, not a position in a run: resume from "
                    "the run's last.pt, or start a run from it with --weights"
                )
            return cls(state, path)
        path = Path(out) / PHASE1_PT
        if phase_option != "2":
            return cls()
        if path.is_file():
            return cls(load_checkpoint(path), path)
        log(
            f"warning: no {path}, so Phase II starts from --weights {weights} "
            f"(train Phase I first with --phase 1, or use --phase all)"
        )
        return cls()

    @property
    def fresh(self):
        return self.state is None

    @property
    def from_phase1(self):
        """Whether the run continues from its phase1.pt, where Phase II has not begun: its budget
        is still to plan, as a fresh run's."""
        return not self.fresh and self.path.name == PHASE1_PT and self.state["phase"] == 1

    @property
    def phase2_begun(self):
        return not self.fresh and self.state["phase"] == 2 and bool(self.state.get("optimizer"))

    @property
    def mid_epoch(self):
        return not self.fresh and bool(self.state.get("step"))

    def phase1_end(self, phase_option, epochs1):
        """Why Phase I trains no more in this run continued with --phase `phase_option` and
        --epochs1 `epochs1`, as the end of a sentence on Phase I, or None where it trains on (or
        the run is fresh)."""
        if self.fresh:
            return None
        if self.state["phase"] == 2:
            return "is over"
        if phase_option == "2":
            return "does not train again (--phase 2)"
        if not self.state.get("step") and self.state["epoch"] >= epochs1:
            return "is over"  # its last epoch saved: phase1.pt, or last.pt at Phase I's end
        return None

    def saved_options(self):
        """The run's resolved options, in today's names and forms."""
        saved = dict(self.state["args"])
        if "workers" in saved:  # the name --cache-workers had before
            saved.setdefault("cache_workers", saved.pop("workers"))
        if isinstance(saved.get("compile"), bool):  # saved when --compile took no mode
            saved["compile"] = "default" if saved["compile"] else None
        return saved

    def continues_in(self, folder):
        return self.path is not None and self.path.resolve().parent == Path(folder).resolve()

    def from_phase1_in(self, folder):
        return self.continues_in(folder) and self.path.name == PHASE1_PT

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

    def run_id(self):
        """The run's name for evaluate.py (which run a figures folder is of): a continued run's
        own, a fresh one's new (the first process's, under torchrun)."""
        if self.state and self.state.get("run_id"):
            return self.state["run_id"]
        return gather_from_processes(uuid.uuid4().hex[:12])[0]

    def command(self):
        """The command line that started the run, as the user typed it, for its report: a
        continued run's first command (what reruns it from the start), a fresh run's own."""
        if self.state and self.state.get("command"):
            return self.state["command"]
        return self.typed

    def steps_done(self, batches_per_epoch, accum_steps):
        """The run's optimizer steps so far (TensorBoard's clock): each epoch's, as its record
        says, and those of an epoch it stopped in."""
        per_epoch = math.ceil(batches_per_epoch / accum_steps)
        steps = sum(record.get("steps", per_epoch) for record in self.history())
        if self.mid_epoch:
            steps += math.ceil(self.state["step"] / self.state["args"].get("accum_steps", 1))
        return steps

    def refuse_other_held_out(self, splits, options):
        """A Problem where the images held out for validation are not those the run held out (its
        training images have changed since): going on would validate on images it trained on."""
        held_out = self.state.get("val_digest") if self.state else None
        if held_out and held_out != splits.val.digest() and validation_is_drawn(vars(options)):
            raise Problem(
                f"the validation images held out of the training images are not those the run "
                f"held out ({self.path}): the training images have changed since, and going on "
                "would validate on images it trained on. Put the data back as it was, or start a "
                "fresh run (a val/ folder of its own keeps validation fixed)"
            )

    def restore(self, model, ema, classes, rank, world_size):
        """The saved weights, their moving average and each process's global random state."""
        if self.state is None:
            return
        if list(self.state["classes"]) != list(classes):
            raise Problem(
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

    def position(self, number, rank, world_size, batch_size):
        """Where Phase `number` goes on: (its epochs done, batches of `batch_size` done of the next
        one, the partial epoch's record). All of a phase the run has passed is done; a run
        stopped mid-epoch (a signal, or --save-every-steps) goes on at its next batch, with as
        many processes. Its
        batches are counted in `batch_size`, which divides the run's (continuing.smaller_pieces:
        the same effective batch in smaller pieces, as the out-of-memory advice gives it)."""
        if self.state is None or number > self.state["phase"]:
            return 0, 0, None
        if number < self.state["phase"]:
            return math.inf, 0, None
        step, partial = self.state.get("step", 0), self.state.get("progress")
        if not step:
            return self.state["epoch"], 0, None
        if len(partial) != world_size:
            raise Problem(
                f"{self.path} stopped mid-epoch with {len(partial)} process(es): resume it with "
                f"as many (this run has {world_size})"
            )
        pieces = self.state["args"]["batch_size"] // batch_size
        return self.state["epoch"], step * pieces, in_pieces(partial[rank], pieces)

    def restore_phase(self, phase, model):
        """The optimizer and grad scaler of a run stopped inside `phase`. The optimizer's state
        is each parameter's (its moments, its step count), matched by name, so that another
        --lr-decay (other parameter groups) takes the same state; its learning rates and weight
        decay are the options' (schedule.Phase.set_rates). A scaler is restored only where this
        run scales fp16 losses and the saved run did too."""
        state = self.state
        if state is None or state["phase"] != phase.number or not state["optimizer"]:
            return
        saved_decay = state["args"].get("lr_decay", 1.0)
        saved_order = optimizer_order(model, phase.number, saved_decay)
        load_optimizer_state(
            phase.optimizer,
            state["optimizer"],
            parameter_names(model, phase.optimizer),
            saved_order,
        )
        if state["scaler"] and phase.scaler.is_enabled():  # empty when saved without fp16
            phase.scaler.load_state_dict(state["scaler"])
        if phase.l2sp is not None:  # pulled towards the weights it was pulled towards
            phase.l2sp.check_kept(state.get("l2sp_reference"), self.path)


def in_pieces(partial, pieces):
    """A mid-epoch record of batches as the record of batches `pieces` times smaller: the same
    sums (of losses by images, of correct predictions, of images)."""
    if pieces == 1:
        return partial
    n = len(partial["sizes"])
    hits = torch.zeros(n * pieces, dtype=partial["hits"].dtype)
    hits[::pieces] = partial["hits"]
    return {
        "losses": partial["losses"].repeat_interleave(pieces),
        "hits": hits,
        "sizes": [size // pieces for size in partial["sizes"] for _ in range(pieces)],
        "seconds": partial["seconds"],
    }


def load_optimizer_state(optimizer, state, names=None, saved_names=None):
    """A checkpoint's optimizer state, made right for this optimizer (built by make_optimizer for
    this device) whichever device saved it. `names` and `saved_names`: the parameters' names in
    this optimizer's order and in the saved one's; where they differ, or the groups do (another
    --lr-decay, --l2sp's head apart), each parameter's state is moved to its place here, and the
    groups are this optimizer's.
    load_state_dict would bring the saving run's fused and capturable settings along, and would
    move NAdam's step counts and momentum products to the device, where PyTorch reads them back
    at every step (a host sync each): they belong there only for a fused or capturable step."""
    if names is not None and (names != saved_names or group_sizes(state) != group_sizes(optimizer)):
        state = regrouped(optimizer, state, names, saved_names)
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


def group_sizes(optimizer):
    """How many parameters each group of an optimizer (or of its state dict) holds."""
    groups = optimizer["param_groups"] if isinstance(optimizer, dict) else optimizer.param_groups
    return [len(group["params"]) for group in groups]


def regrouped(optimizer, state, names, saved_names):
    """`state` (saved with its parameters in the order `saved_names`) as this optimizer's state
    dict, whose parameters are `names` in its own groups."""
    if sorted(names) != sorted(saved_names):
        raise Problem("the checkpoint's optimizer holds other parameters than this phase trains")
    saved_index = {name: i for i, name in enumerate(saved_names)}
    template = optimizer.state_dict()
    indices = [i for group in template["param_groups"] for i in group["params"]]
    per_param = {
        index: state["state"][saved_index[name]]
        for index, name in zip(indices, names, strict=True)
        if saved_index[name] in state["state"]
    }
    return {"state": per_param, "param_groups": template["param_groups"]}
