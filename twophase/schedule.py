"""Each phase's optimizer and schedule, as Table 1 sets them: the optimizers Phase II may take,
Phase II's warmup and cosine (the released code's SequentialLR, in closed form), the side each
epoch trains at (--progressive), and Phase, which carries one phase's settings to the training
step. train.py's phase_setup puts a phase together from the options."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from model import count_parameters
from twophase.augment import MixUpCutMix
from twophase.regularise import L2SP, SAM

OPTIMIZERS = {  # name: (class, options beyond lr and weight decay)
    "nadam": (torch.optim.NAdam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, {}),
}
FUSED = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
)  # PyTorch has fused CUDA steps for these


def make_optimizer(name, params, lr, weight_decay, device):
    cls, options = OPTIMIZERS[name]
    return cls(params, lr=lr, weight_decay=weight_decay, **options, **step_on_device(cls, device))


def step_on_device(cls, device):
    """Options for an optimizer of class `cls`: on CUDA, fused where PyTorch has a fused kernel
    (a few launches, and GradScaler's overflow check needs no host sync); PyTorch's defaults
    otherwise."""
    return {"fused": device.type == "cuda"} if issubclass(cls, FUSED) else {}


@dataclass
class Phase:
    """One phase of the method as Table 1 sets it, and everything a training step of it needs:
    how long, the optimizer (over the parameters it trains), each parameter group's peak
    learning rate and the schedule that scales them epoch by epoch, the weight decay, the
    gradient clip, whether batch norm statistics adapt, MixUp/CutMix, the loss, the autocast
    dtype with its grad scaler, how many batches an optimizer step takes, and the regularisers
    beyond the report (regularise.py: L2-SP, SAM)."""

    number: int
    epochs: int
    optimizer: torch.optim.Optimizer
    peak_lrs: list
    schedule: object  # epoch (0-based) -> the share of peak_lrs it trains at
    image_size: object  # epoch (0-based) -> the side its training images have
    weight_decay: float
    clip: float
    freeze_bn: bool
    mix: MixUpCutMix | None
    criterion: nn.Module
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    accum_steps: int = 1
    l2sp: L2SP | None = None
    sam: SAM | None = None

    def set_rates(self, epoch):
        """The optimizer's learning rates and weight decay for `epoch`, from the options alone:
        they replace whatever a checkpoint's optimizer state brought along, so that a run
        continued with other options trains as they say."""
        share = self.schedule(epoch)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * share
            group["weight_decay"] = self.weight_decay
            if self.l2sp is not None and self.l2sp.pulls(group):
                group["weight_decay"] = 0.0  # L2-SP's pull towards w0 replaces it

    def lrs(self):
        """The learning rate of the first parameter group at each of the phase's epochs."""
        return [self.peak_lrs[0] * self.schedule(epoch) for epoch in range(self.epochs)]


def constant(epoch):
    return 1.0


def size_step(img_size):
    """The steps of a progressive schedule, and of the test sizes tried: a seventh of the side,
    in multiples of 8 (32 px at 224, 8 at 64): few shapes for cuDNN and torch.compile."""
    return max(8, round(img_size / 7 / 8) * 8)


@dataclass(frozen=True)
class ProgressiveSize:
    """The side a phase's epoch trains at (--progressive): from `start` px rising linearly to
    `full` over its first `ramp` epochs, rounded to multiples of `step`, then `full`. Fewer
    pixels early cost less time when the weights change most (fast.ai's and FFCV's records
    train so); the batches are resampled from the full-size cache on the device. A function of
    the epoch alone: a resumed run, and every process, trains each epoch at its size."""

    start: int
    full: int
    ramp: int
    step: int

    @classmethod
    def of(cls, args, epochs):
        start = round(args.progressive * args.img_size)
        ramp = max(1, round(args.progressive_until * epochs))
        return cls(start, args.img_size, ramp, size_step(args.img_size))

    def __call__(self, epoch):
        if epoch >= self.ramp or self.start >= self.full:
            return self.full
        side = self.start + (self.full - self.start) * epoch / self.ramp
        return min(self.full, max(self.step, round(side / self.step) * self.step))


@dataclass(frozen=True)
class WarmupCosine:
    """Phase II's schedule, stepped per epoch, as a share of each group's peak rate: the released
    code's SequentialLR(LinearLR(warmup_start, warmup epochs), CosineAnnealingLR(T_max=cosine
    epochs, eta_min=min_lr)) in closed form. Past --cosine-epochs the cosine climbs back up, as
    PyTorch's CosineAnnealingLR does. With --lr-decay the groups learn at different rates: the
    same shares scale each group's own rate (its floor too), so the ratios between the stages
    hold throughout. A function of the options and the epoch alone: nothing of it is saved that
    could disagree with the options a run continues with."""

    warmup_epochs: int
    warmup_start: float
    cosine_epochs: int
    floor: float  # --min-lr as a share of --lr2

    @classmethod
    def of(cls, args):
        floor = args.min_lr / args.lr2 if args.lr2 else 0.0
        return cls(args.warmup_epochs, args.warmup_start, args.cosine_epochs, floor)

    def __call__(self, epoch):
        if epoch < self.warmup_epochs:
            return self.warmup_start + (1 - self.warmup_start) * epoch / self.warmup_epochs
        cosine = (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / self.cosine_epochs)) / 2
        return self.floor + (1 - self.floor) * cosine


def describe_phase(phase, args, model):
    """The line that opens a phase, with what the arguments leave unsaid: a cosine that climbs
    back before the phase ends."""
    trainable = count_parameters(p for p in model.parameters() if p.requires_grad)
    total = count_parameters(model.parameters())
    line = (
        f"Phase {phase.number}: {phase.epochs} epochs, {type(phase.optimizer).__name__} "
        f"lr {phase.peak_lrs[0]:.1e} weight decay {phase.weight_decay:.0e}, "
        f"{trainable:,} of {total:,} parameters learn"
    )
    if phase.number == 1:
        return line + (", batch norm frozen" if phase.freeze_bn else ", batch norm adapts")
    line += f", {args.warmup_epochs} warmup epochs then cosine to {args.min_lr:.0e}"
    line += f", gradients clipped to {phase.clip}" if phase.clip else ""
    line += phase.l2sp.words(phase.weight_decay) if phase.l2sp else ""
    line += phase.sam.words() if phase.sam else ""
    trough = args.warmup_epochs + args.cosine_epochs
    if trough < phase.epochs:
        line += (
            f"\nnote: the learning rate reaches --min-lr after {trough} epochs and then climbs "
            f"back towards --lr2 for the phase's last {phase.epochs - trough}; "
            f"--cosine-epochs {phase.epochs - args.warmup_epochs} gives one monotone decay"
        )
    return line
