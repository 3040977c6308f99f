"""Fine-tune an ImageNet-pretrained ResNet in two phases (the report's Algorithm 1).

Phase I trains only a new head on the frozen backbone; Phase II fine-tunes every layer with
NAdam, a linear warmup then cosine learning rate, fp16 autocast and gradient clipping. The
argument defaults below are the report's Table 1; `python train.py --help` prints them.

    python train.py --demo              # the whole pipeline on a small bundled dataset, CPU
    python train.py                     # both phases on data/
    python train.py --resume checkpoints/last.pt
"""

import argparse
import math
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from augment import BatchPreprocess, DeviceAugment, MixUpCutMix
from checkpoint import averaged_checkpoint
from data import load_splits, make_loader, set_epoch, write_demo_dataset
from inference import count_correct, predict_log_probs, topk_hits, update_bn
from model import (
    EMA,
    average_weights,
    build_model,
    count_parameters,
    model_from_checkpoint,
    set_trainable,
    stage_groups,
    strip_prefixes,
    train_mode,
)
from prefetch import on_device
from resume import Resume
from utils import (
    EXIT_PREEMPTED,
    StopRequest,
    amp_dtype,
    broadcast_buffers,
    exclusive,
    gather_from_processes,
    init_distributed,
    is_main_process,
    load_checkpoint,
    local_main_first,
    log,
    pick_device,
    rng_state,
    save_checkpoints,
    seed_everything,
    sum_over_processes,
    totals_dtype,
    write_history_csv,
)

# A CPU-sized run on scikit-learn's digits: about a minute on two cores, no download.
DEMO = dict(
    data="data/demo",
    arch="resnet18",
    weights="none",
    img_size=32,
    batch_size=64,
    epochs1=2,
    epochs2=10,
    warmup_epochs=1,
    cosine_epochs=9,
    lr2=1e-3,
)

# --recipe: "report" is Table 1 (the argument defaults); "best" adds the levers that measured
# better on real photos (RESULTS.md), and picks the run's result among its best epoch, the
# average of its last epochs and either with flipped copies at test time.
RECIPES = {
    "report": {},
    "best": dict(ema=0.99, lr_decay=0.7, p_vflip=0.0, average_last=3, tta="auto"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every default that is set: together they are the method's Table 1."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return f"{action.help or ''} (default: %(default)s)"


OPTIMIZERS = {  # name: (class, options beyond lr and weight decay)
    "nadam": (torch.optim.NAdam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, {}),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's
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


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default="data", help="dataset root: train/<class>/<image>, val/, test/"
    )
    g.add_argument("--img-size", type=int, default=224, help="side after centre crop and resize")
    g.add_argument("--val-fraction", type=float, default=0.1, help="of train/, if there is no val/")
    g.add_argument(
        "--cache-dir", default=None, help="preprocessed-image cache; unset: <data>/.cache"
    )
    g.add_argument("--batch-size", type=int, default=72, help="images per step")
    g.add_argument(
        "--cache-workers",
        "--workers",
        dest="cache_workers",
        type=int,
        default=4,
        help="threads that decode images into the cache (a batch is one read of it)",
    )

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="wide_resnet50_2", help="any torchvision ResNet-family model")
    g.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        help="input normalisation; unset: the weights' own (ImageNet's, or a checkpoint's)",
    )
    g.add_argument("--std", type=float, nargs=3, default=None, help="... and its std")
    g.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet | none | a torchvision weights name (IMAGENET1K_V1) | PATH",
    )

    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help="a budget of N epochs in all, split as the report splits its 135 (see README); "
        "sets --epochs1, --epochs2, --warmup-epochs and --cosine-epochs unless they are given",
    )

    g = p.add_argument_group("Phase I: the new head alone, backbone frozen")
    g.add_argument("--epochs1", type=int, default=10, help="0 skips Phase I")
    g.add_argument("--lr1", type=float, default=5e-4, help="AdamW, constant")
    g.add_argument("--wd1", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--freeze-bn", action="store_true", help="keep batch norm statistics fixed")

    g = p.add_argument_group("Phase II: every layer")
    g.add_argument("--epochs2", type=int, default=125, help="0 skips Phase II")
    g.add_argument(
        "--optimizer2", default="nadam", choices=sorted(OPTIMIZERS), help="its optimizer"
    )
    g.add_argument("--lr2", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--wd2", type=float, default=1e-4, help="weight decay (L2, as released)")
    g.add_argument("--warmup-epochs", type=int, default=5, help="linear, from --warmup-start x lr2")
    g.add_argument("--warmup-start", type=float, default=0.1, help="first warmup epoch's share")
    g.add_argument(
        "--cosine-epochs",
        type=int,
        default=45,
        help="cosine half-period after warmup; it climbs back past it",
    )
    g.add_argument("--min-lr", type=float, default=5e-6, help="the cosine's floor")
    g.add_argument("--clip", type=float, default=0.8, help="gradient L2 norm limit; 0: none")
    g.add_argument("--save-every", type=int, default=15, help="keep a checkpoint every N epochs")
    g.add_argument(
        "--save-min-acc", type=float, default=0.82, help="... if val acc is this or more"
    )

    g = p.add_argument_group("both phases")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy")
    g.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "off"], help="on CUDA")
    g.add_argument(
        "--accum-steps",
        type=int,
        default=1,
        help="an optimizer step every N batches: the same effective batch in less memory, with "
        "a smaller --batch-size",
    )
    g.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: global BN stats")
    g.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        choices=COMPILE_MODES + ("off",),
        help=f"torch.compile each phase's model in MODE ({', '.join(COMPILE_MODES)}; "
        "the first if none is given); off: resume a compiled run without it",
    )

    g = p.add_argument_group("accuracy levers beyond the report (off by default)")
    recipes = "; ".join(
        f"{name}: "
        + (
            " ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items())
            or "the report's Table 1, these levers off"
        )
        for name, preset in RECIPES.items()
    )
    g.add_argument(
        "--recipe",
        default="report",
        choices=sorted(RECIPES),
        help=f"a preset of the options below ({recipes}); options given explicitly win",
    )
    g.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an exponential moving average of the weights (e.g. 0.999), "
        "validated beside them; best.pt takes the better",
    )
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="Phase II MixUp")
    g.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="Phase II CutMix")
    g.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="Phase II: each ResNet stage learns FACTOR times as fast as the one above",
    )
    g.add_argument(
        "--keep-last",
        type=int,
        default=0,
        metavar="K",
        help="keep the last K epochs' checkpoints (for avg_checkpoints.py)",
    )
    g.add_argument(
        "--average-last",
        type=int,
        default=0,
        metavar="K",
        help="at the end, average the weights of the last K Phase II epochs into averaged.pt "
        "(batch norm measured again); it becomes best.pt if it validates better",
    )
    g.add_argument(
        "--tta",
        default="off",
        choices=["off", "auto"],
        help="auto: at the end, validate best.pt with and without horizontal-flip test-time "
        "augmentation and mark it with the better (evaluate.py and predict.py follow the mark)",
    )
    g.add_argument(
        "--max-params",
        type=parameter_count,
        default=None,
        metavar="N",
        help="warn when the model has more parameters (e.g. 100M)",
    )

    g = p.add_argument_group("augmentation (training only, per sample, on the device)")
    g.add_argument("--degrees", type=float, default=10.0, help="affine rotation +-, always")
    g.add_argument("--translate", type=float, default=0.1, help="affine shift, share of the side")
    g.add_argument("--scale", type=float, nargs=2, default=[0.9, 1.1], help="affine scale range")
    g.add_argument("--shear", type=float, default=10.0, help="affine shear +-, degrees")
    g.add_argument("--jitter", type=float, default=0.25, help="brightness, contrast, saturation")
    g.add_argument("--hue", type=float, default=0.1, help="hue jitter")
    g.add_argument("--p-jitter", type=float, default=0.5, help="probability of colour jitter")
    g.add_argument("--blur-sigma", type=float, nargs=2, default=[0.1, 2.0], help="3x3 blur sigma")
    g.add_argument("--p-blur", type=float, default=0.5, help="probability of blur")
    g.add_argument("--p-hflip", type=float, default=0.3, help="probability of a horizontal flip")
    g.add_argument("--p-vflip", type=float, default=0.3, help="probability of a vertical flip")

    g = p.add_argument_group("run")
    g.add_argument(
        "--phase",
        default="all",
        choices=["1", "2", "all"],
        help="2 alone starts from <out>/phase1.pt",
    )
    g.add_argument("--out", default="checkpoints", help="checkpoints and history.csv go here")
    g.add_argument(
        "--save-every-steps",
        type=int,
        default=0,
        metavar="N",
        help="also save last.pt every N optimizer steps, mid-epoch (0: at epoch ends)",
    )
    g.add_argument("--seed", type=int, default=0, help="init, data order, augmentation, val split")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue a run from its last.pt; options given here override its own",
    )
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
    g.add_argument(
        "--demo",
        action="store_true",
        help=f"train a CPU-sized model on data/demo (scikit-learn digits): {demo}",
    )
    return p


def parameter_count(text):
    """100M, 25.6M, 1.5B or a plain number."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 100M)") from None


def split_budget(total):
    """The report's 10 + 125 epochs (5 of them warmup) scaled to `total`: Phase I's share rounded
    (at least one epoch), the warmup's share of Phase II rounded, then one cosine decay over the
    rest. Rounding each share keeps the phases in the report's proportions; a short budget that
    took 2 + 6 with a warmup epoch (its minimums) spent a quarter of itself on the head alone."""
    epochs1 = max(1, round(total * 10 / 135))
    warmup = round((total - epochs1) * 5 / 125)
    return dict(
        epochs1=epochs1,
        epochs2=total - epochs1,
        warmup_epochs=warmup,
        cosine_epochs=max(1, total - epochs1 - warmup),
    )


def bad_values(args):
    """What is wrong with the options, as sentences for the parser's error."""
    if args.epochs is not None and args.epochs < 2:
        yield f"--epochs {args.epochs}: the budget needs at least 2 epochs, one for each phase"
    if args.accum_steps < 1:
        yield "--accum-steps must be at least 1"
    if args.ema is not None and not 0 < args.ema < 1:
        yield f"--ema {args.ema}: the decay must be between 0 and 1, e.g. 0.999"
    for name in ("mixup", "cutmix"):
        if getattr(args, name) < 0:
            yield f"--{name} {getattr(args, name)}: alpha must be positive (0 turns it off)"
    if not 0 < args.lr_decay <= 1:
        yield f"--lr-decay {args.lr_decay}: the factor must be in (0, 1] (1 turns it off)"
    if args.keep_last < 0:
        yield "--keep-last must be 0 or more"
    if args.average_last < 0:
        yield "--average-last must be 0 or more"
    if args.save_every_steps < 0:
        yield "--save-every-steps must be 0 or more"


def parse_args(argv=None):
    """Arguments, with --demo's preset or a resumed run's saved arguments under the ones given."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for problem in bad_values(args):
        parser.error(problem)
    unset = object()
    parser.set_defaults(**{k: unset for k in vars(args)})
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not unset}
    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        saved = dict(resume["args"])
        if "workers" in saved:  # the name --cache-workers had before
            saved.setdefault("cache_workers", saved.pop("workers"))
        # Under the saved arguments, the defaults: for options newer than the checkpoint.
        args = argparse.Namespace(**{**vars(args), **saved, **given})
        if "lr_decay" in given and given["lr_decay"] != saved.get("lr_decay", 1.0):
            parser.error("--lr-decay cannot change on --resume: the optimizer's groups are saved")
        if isinstance(args.compile, bool):  # saved when --compile took no mode
            args.compile = "default" if args.compile else None
    else:  # a fresh run: defaults < --demo < the recipe < the --epochs split < given
        demo = DEMO if args.demo else {}
        args = argparse.Namespace(**{**vars(args), **demo, **RECIPES[args.recipe], **given})
    if args.epochs:
        args = argparse.Namespace(**{**vars(args), **split_budget(args.epochs), **given})
    if args.compile == "off":
        args.compile = None
    return args, resume


@dataclass
class Phase:
    """One phase of the method as Table 1 sets it: how long, which optimizer (over the parameters
    it trains), which schedule, which gradient clip, and whether batch norm statistics adapt."""

    number: int
    epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    clip: float
    freeze_bn: bool
    mix: MixUpCutMix | None = None


def phase_setup(number, args, model, device):
    """Table 1 from the arguments: the only place a phase's recipe is put together (train.py and
    the benchmarks use it). It also sets which of `model`'s parameters learn."""
    if number == 1:
        # The new head alone, at a constant learning rate, the backbone frozen.
        optimizer = make_optimizer("adamw", set_trainable(model, 1), args.lr1, args.wd1, device)
        return Phase(1, args.epochs1, optimizer, None, 0.0, args.freeze_bn)
    # Every layer: warmup then cosine, gradients clipped.
    set_trainable(model, 2)
    groups = stage_groups(model, args.lr2, args.lr_decay)
    optimizer = make_optimizer(args.optimizer2, groups, args.lr2, args.wd2, device)
    mix = None
    if args.mixup or args.cutmix:
        mix = MixUpCutMix(args.mixup, args.cutmix, model.fc.out_features)
    return Phase(2, args.epochs2, optimizer, warmup_cosine(optimizer, args), args.clip, False, mix)


def warmup_cosine(optimizer, args):
    """Per-epoch schedule of the released code: SequentialLR(LinearLR, CosineAnnealingLR). Past
    --cosine-epochs the cosine climbs back up, as PyTorch's CosineAnnealingLR does. With
    --lr-decay the groups learn at different rates: the same schedule then scales each group's
    own rate (its floor too), so that the ratios between the stages hold throughout."""
    if args.lr_decay != 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(schedule_factor, args=args))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.cosine_epochs, eta_min=args.min_lr
    )
    if args.warmup_epochs == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=args.warmup_start, total_iters=args.warmup_epochs
    )
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, [warmup, cosine], milestones=[args.warmup_epochs]
    )


def schedule_factor(epoch, args):
    """warmup_cosine's learning rate before `epoch` (0-based), as a fraction of --lr2."""
    if epoch < args.warmup_epochs:
        return args.warmup_start + (1 - args.warmup_start) * epoch / args.warmup_epochs
    floor = args.min_lr / args.lr2
    cosine = (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.cosine_epochs)) / 2
    return floor + (1 - floor) * cosine


def describe_phase(phase, args, model):
    """The line that opens a phase, with what the arguments leave unsaid: a cosine that climbs
    back before the phase ends."""
    trainable = count_parameters(p for p in model.parameters() if p.requires_grad)
    total = count_parameters(model.parameters())
    group = phase.optimizer.param_groups[0]
    line = (
        f"Phase {phase.number}: {phase.epochs} epochs, {type(phase.optimizer).__name__} "
        f"lr {group.get('initial_lr', group['lr']):.1e} weight decay {group['weight_decay']:.0e}, "
        f"{trainable:,} of {total:,} parameters learn"
    )
    if phase.number == 1:
        return line + (", batch norm frozen" if phase.freeze_bn else ", batch norm adapts")
    line += f", {args.warmup_epochs} warmup epochs then cosine to {args.min_lr:.0e}"
    line += f", gradients clipped to {phase.clip}" if phase.clip else ""
    trough = args.warmup_epochs + args.cosine_epochs
    if trough < phase.epochs:
        line += (
            f"\nnote: the learning rate reaches --min-lr after {trough} epochs and then climbs "
            f"back towards --lr2 for the phase's last {phase.epochs - trough}; "
            f"--cosine-epochs {phase.epochs - args.warmup_epochs} gives one monotone decay"
        )
    return line


def train_one_epoch(
    model,
    loader,
    preprocess,
    criterion,
    optimizer,
    scaler,
    device,
    dtype,
    clip=0.0,
    freeze_bn=False,
    accum_steps=1,
    desc="",
    background=None,
    mix=None,
    ema=None,
    start=0,
    done=None,
    on_step=None,
):
    """One pass over the training data, an optimizer step every `accum_steps` batches. Each
    batch's loss and correct predictions stay on the device and are summed once, at the end, so
    the host never waits for the device for them. Batches whose loss is not finite are counted
    apart. `background`: how batches are prepared (see prefetch.on_device). `mix` (MixUpCutMix)
    mixes each batch and its targets; `ema` (model.EMA) follows every optimizer step.
    An epoch stopped after `start` batches goes on from the loader's next (see data.set_epoch),
    with `done`, the (losses, hits, sizes) of those. on_step(batches done, (losses, hits, sizes))
    is called after every optimizer step (it may save them, or stop the run)."""
    train_mode(model, freeze_bn)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Per batch: mean loss, correct predictions (both on the device), images.
    losses, hits, sizes = (list(kept) for kept in done) if done else ([], [], [])
    total = start + len(loader)
    optimizer.zero_grad(set_to_none=True)
    with closing(on_device(loader, preprocess, device, background)) as batches:
        bar = tqdm(
            batches,
            desc=desc,
            total=total,
            initial=start,
            leave=False,
            disable=None if is_main_process() else True,
            unit="batch",
        )
        for i, (images, labels) in enumerate(bar, start=start):
            step_now = (i + 1) % accum_steps == 0 or i + 1 == total
            group = min(accum_steps, total - i // accum_steps * accum_steps)  # the last: shorter
            targets = labels
            if mix is not None:
                images, targets = mix(images, labels)
            # Under DDP, gradients are all-reduced once per optimizer step, not once per batch.
            sync = model.no_sync() if not step_now and hasattr(model, "no_sync") else nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = model(images)
                    loss = criterion(logits, targets)
                scaler.scale(loss / group if group > 1 else loss).backward()
            if step_now:
                if clip:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                    nn.utils.clip_grad_norm_(params, clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
            losses.append(loss.detach())
            hits.append((logits.argmax(1) == labels).sum())
            sizes.append(len(labels))
            if step_now and on_step is not None:
                on_step(i + 1, (losses, hits, sizes))
    loss_sum, counted, correct, nonfinite = epoch_totals(losses, hits, sizes, device)
    loss_sum, counted, correct, nonfinite, seen, total = sum_over_processes(
        loss_sum, counted, correct, nonfinite, sum(sizes), total
    )
    return {
        "train_loss": loss_sum / counted if counted else float("nan"),
        "train_acc": correct / seen,
        "images": seen,
        "nonfinite": int(nonfinite),
        "batches": int(total),
    }


def epoch_totals(losses, hits, sizes, device):
    """(loss summed over the images of batches with a finite loss, those images, correct
    predictions, batches with a non-finite loss), as device tensors."""
    dtype = totals_dtype(device)
    if not sizes:
        return (torch.zeros((), device=device, dtype=dtype),) * 4
    losses = torch.stack(losses).to(dtype)
    sizes = torch.tensor(sizes, dtype=dtype).to(device, non_blocking=True)
    finite = torch.isfinite(losses)
    return (
        (torch.where(finite, losses, 0.0) * sizes).sum(),
        (finite * sizes).sum(),
        torch.stack(hits).sum(),
        (~finite).sum(),
    )


def evaluate(model, loader, preprocess, criterion, device, dtype):
    """Loss, top-1 and top-5 accuracy over the whole split (every process's share), from exact
    counts."""
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for log_p, labels in predict_log_probs(model, loader, preprocess, device, dtype):
        loss_sum += criterion(log_p, labels) * len(labels)
        hits1, hits5 = topk_hits(log_p, labels)
        top1 += hits1
        top5 += hits5
        seen += len(labels)
    loss_sum, top1, top5, seen = sum_over_processes(loss_sum, top1, top5, seen)
    if seen == 0:
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_top5": 0.0}
    return {"val_loss": loss_sum / seen, "val_acc": top1 / seen, "val_top5": top5 / seen}


def best_acc(record):
    """An epoch's validation accuracy: of the weights or of their moving average, the better."""
    return max(record["val_acc"], record.get("ema_val_acc", -1.0))


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
    }


class Preempted(Exception):
    """A stop request was met: the position is saved, the run exits with EXIT_PREEMPTED."""


class Run:
    """What both phases share: the data, the model and its moving average, the device, the
    history and the checkpoints."""

    def __init__(self, args, splits, model, ema, device, resume, rank=0, world_size=1):
        self.args, self.splits, self.model, self.ema, self.device = args, splits, model, ema, device
        self.resume, self.history = resume, resume.history()
        self.rank, self.world_size = rank, world_size
        self.net = model  # what runs the steps: the same module, wrapped for DDP and --compile
        self.out = Path(args.out)
        self.stop = StopRequest()
        self.unwritten = {}  # file name: why its last write failed
        self.dtype = amp_dtype(args.amp, device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        augment = DeviceAugment.from_args(args)
        self.train_preprocess = BatchPreprocess(args.mean, args.std, augment).to(device)
        self.eval_preprocess = BatchPreprocess(args.mean, args.std).to(device)
        cuda = device.type == "cuda"
        # Dropping the last partial batch keeps batch norm from ever seeing a batch of one.
        shard = dict(num_replicas=world_size, rank=rank)
        self.train_loader = make_loader(
            splits.train,
            args.batch_size,
            True,
            args.seed,
            cuda,
            drop_last=len(splits.train) > args.batch_size * world_size,
            **shard,
        )
        self.val_loader = make_loader(
            splits.val, 2 * args.batch_size, False, pin_memory=cuda, **shard
        )

    def train_phase(self, phase):
        """The phase's remaining epochs, each followed by validation, logging and checkpoints."""
        first, start, done = self.resume.position(phase.number, self.rank, self.world_size)
        if first >= phase.epochs:
            return
        args = self.args
        self.net = self.wrap()
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.resume.restore_phase(phase, scaler)
        log(describe_phase(phase, args, self.model))
        for epoch in range(first, phase.epochs):
            lr = phase.optimizer.param_groups[0]["lr"]
            seed = (args.seed, len(self.history), self.rank)  # the augmentation's, per epoch
            set_epoch(self.train_loader, len(self.history), start)
            self.train_preprocess.augment.reseed(*seed)
            if phase.mix is not None:
                phase.mix.reseed(*seed, 1)
            kept = self.replay(phase, done) if done else None
            t0 = time.perf_counter() - (done["seconds"] if done else 0.0)
            last = start + len(self.train_loader)  # the epoch's batches

            def after_step(batches, so_far, epoch=epoch, t0=t0, last=last):
                seconds = time.perf_counter() - t0
                self.after_step(phase, epoch, scaler, batches, last, so_far, seconds)

            train = train_one_epoch(
                self.net,
                self.train_loader,
                self.train_preprocess,
                self.criterion,
                phase.optimizer,
                scaler,
                self.device,
                self.dtype,
                phase.clip,
                freeze_bn=phase.freeze_bn,
                accum_steps=args.accum_steps,
                desc=f"phase {phase.number} epoch {epoch + 1}/{phase.epochs}",
                mix=phase.mix,
                ema=self.ema,
                start=start,
                done=kept,
                on_step=after_step,
            )
            start, done = 0, None
            seconds = time.perf_counter() - t0
            val = self.validate()
            self.check_finite(train, val, phase.number, epoch)
            if phase.scheduler is not None:
                phase.scheduler.step()  # per epoch, as the method specifies
            val_seconds = time.perf_counter() - t0 - seconds
            record = epoch_record(phase.number, epoch, lr, train, val, seconds, val_seconds)
            is_best = best_acc(record) > max(map(best_acc, self.history), default=-1.0)
            self.history.append(record)
            self.log_epoch(record, phase.epochs, is_best)
            self.save(phase, epoch + 1, scaler, is_best)
            # A stop asked for during the validation or the save: here, unless all is done.
            phase2_follows = phase.number == 1 and args.phase == "all" and args.epochs2 > 0
            if (epoch + 1 < phase.epochs or phase2_follows) and self.stop.requested():
                raise Preempted(f"after phase {phase.number} epoch {epoch + 1}")

    def wrap(self):
        """The model as the phase's steps run it: under DDP with several processes, compiled with
        --compile. Wrapped anew for each phase: which parameters need gradients has changed, and
        DDP all-reduces only the gradients of the parameters that needed them when it was made."""
        net = self.model
        if self.world_size > 1:
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.args.compile:
            torch.compiler.reset()
            net = torch.compile(net, mode=self.args.compile)
        return net

    def replay(self, phase, done):
        """The batches an epoch stopped after, back on the device, and the random draws their
        augmentation made, drawn again so that the rest of the epoch draws what it would have."""
        size = self.args.img_size
        for n in done["sizes"]:
            self.train_preprocess.augment.sample(n)
            if phase.mix is not None:
                phase.mix.sample(n, size, size)
        losses = list(done["losses"].to(self.device).unbind())
        hits = list(done["hits"].to(self.device).unbind())
        return losses, hits, list(done["sizes"])

    def after_step(self, phase, epoch, scaler, batches, last, so_far, seconds):
        """After each optimizer step: stop if asked to, save the position every
        --save-every-steps steps. Either way the checkpoint holds the epoch's record so far. (At
        the epoch's last batch, a stop waits for its validation and its checkpoint.)"""
        stop = batches < last and self.stop.requested()
        steps = self.args.save_every_steps * self.args.accum_steps
        if stop or (steps and batches % steps == 0 and batches < last):
            losses, hits, sizes = so_far
            progress = {
                "losses": torch.stack(losses).cpu(),
                "hits": torch.stack(hits).cpu(),
                "sizes": list(sizes),
                "seconds": seconds,
            }
            state = self.checkpoint(phase, epoch, scaler)  # every process: gathers
            state |= {"step": batches, "progress": gather_from_processes(progress)}
            if self.rank == 0:
                self.write(state, ["last.pt"], must=stop)
        if stop:
            self.stop.barrier()  # no process exits before the first has written last.pt
            raise Preempted(f"{batches} batches into phase {phase.number} epoch {epoch + 1}")

    def validate(self):
        """Validation of the weights, and of their moving average with --ema."""
        # Outside DDP: a process with no validation images would otherwise miss its collectives.
        broadcast_buffers(self.model)
        if self.ema is not None:
            broadcast_buffers(self.ema.module)  # copied from each process's own statistics
        net = self.net if self.world_size == 1 else self.model
        run = (self.val_loader, self.eval_preprocess, self.criterion, self.device, self.dtype)
        val = evaluate(net, *run)
        if self.ema is not None:
            val |= {f"ema_{k}": v for k, v in evaluate(self.ema.module, *run).items()}
        return val

    def check_finite(self, train, val, phase, epoch):
        """An fp16 overflow now and then is normal (GradScaler skips that step and lowers its
        scale); a loss that stays non-finite, or any in float32 or bf16, or a non-finite
        validation loss (batch norm statistics spoilt by an overflow), has ruined the model: stop
        before saving it."""
        bad, batches = train["nonfinite"], train["batches"]
        ruined = bad and (self.dtype != torch.float16 or bad == batches)
        if ruined or (len(self.splits.val) and not math.isfinite(val["val_loss"])):
            what = (
                f"the loss was not finite in {bad} of {batches} batches"
                if ruined
                else "the validation loss is not finite"
            )
            raise SystemExit(
                f"phase {phase} epoch {epoch + 1}: {what}, so training stopped. The last good "
                f"checkpoint is {self.out / 'last.pt'}; resume from it with a lower learning rate "
                f"(--lr1/--lr2), or try --amp bf16."
            )
        if bad:
            log(
                f"warning: {bad} of {batches} fp16 batches overflowed; the grad scaler skipped "
                "their steps"
            )

    def checkpoint(self, phase, epoch, scaler=None):
        """A plain dict: loads with torch.load(weights_only=True)."""
        last = self.history[-1] if self.history else {"val_acc": 0.0}
        ema_was_better = best_acc(last) > last["val_acc"]
        return {
            "model": {strip_prefixes(k): v for k, v in self.model.state_dict().items()},
            "arch": self.args.arch,
            "classes": self.splits.classes,
            "img_size": self.args.img_size,
            "mean": list(self.args.mean),
            "std": list(self.args.std),
            "data": self.args.data,
            "args": vars(self.args),
            "phase": phase.number,
            "epoch": epoch,
            "history": self.history,
            "optimizer": phase.optimizer.state_dict(),
            "scheduler": phase.scheduler.state_dict() if phase.scheduler else None,
            "scaler": scaler.state_dict() if scaler else None,
            "rng": gather_from_processes(rng_state()),  # one state per process
            "world_size": self.world_size,
            "device": self.device.type,
            "ema": self.ema.state_dict() if self.ema else None,
            # The weights evaluate.py and predict.py use: the moving average where it was better.
            "eval_weights": "ema" if ema_was_better else "model",
        }

    def save(self, phase, epoch, scaler, is_best):
        state = self.checkpoint(phase, epoch, scaler)  # every process: gathers
        if self.rank != 0:
            return
        names = ["last.pt"]
        # phase1.pt before last.pt: a resume never needs to redo it.
        if phase.number == 1 and epoch == phase.epochs:
            names.insert(0, "phase1.pt")
        if is_best:
            names.append("best.pt")
        if phase.number == 2 and epoch % self.args.save_every == 0:
            acc = self.history[-1]["val_acc"]
            if acc >= self.args.save_min_acc:
                names.append(f"phase2_epoch{epoch:03d}.pt")
            else:
                log(
                    f"phase2_epoch{epoch:03d}.pt not kept: val acc {acc:.4f} is below "
                    f"--save-min-acc {self.args.save_min_acc}"
                )
        # Named by the run's epoch count: epoch001.pt, ...; --average-last averages them.
        keep = max(self.args.keep_last, self.args.average_last)
        if keep:
            names.append(f"epoch{len(self.history):03d}.pt")
        if self.write(state, names) and keep:
            (self.out / f"epoch{len(self.history) - keep:03d}.pt").unlink(missing_ok=True)

    def write(self, state, names, must=False):
        """Checkpoints and history.csv, each file atomically: one that cannot be written (a full
        disk, an unwritable folder) stays as it was, and the message names it and the error.
        Training goes on and writes it again at its next save; the run ends with an error if a
        file is still unwritten then, at once if the write `must` succeed. Returns whether every
        file was written."""
        failed = save_checkpoints(state, [self.out / name for name in names])
        try:
            write_history_csv(self.history, self.out / "history.csv")
        except OSError as error:
            failed[self.out / "history.csv"] = error
        for path in map(Path, (self.out / name for name in [*names, "history.csv"])):
            if path in failed:
                error = failed[path]
                self.unwritten[path.name] = f"{path}: {error.strerror or error}"
            else:
                self.unwritten.pop(path.name, None)
        for path, error in failed.items():
            message = f"could not write {path}: {error.strerror or error}; the file is as it was"
            if must:
                raise SystemExit(message)
            log(f"warning: {message}. Training goes on and tries again at its next save.")
        return not failed

    def log_epoch(self, r, epochs, is_best):
        log(
            f"phase {r['phase']} epoch {r['epoch']:>3}/{epochs} | lr {r['lr']:.2e} | "
            f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
            f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.4f} top5 {r['val_top5']:.4f} | "
            + (f"ema acc {r['ema_val_acc']:.4f} | " if "ema_val_acc" in r else "")
            + f"{r['images_per_s']:.0f} img/s {r['seconds']:.1f} s"
            + (" | best" if is_best else "")
        )


def load_data(args):
    root = Path(args.data)
    if not (root / "train").is_dir():
        raise SystemExit(
            f"no training data at {root / 'train'}.\n"
            f"Point --data at a dataset root laid out as <root>/train/<class>/<image> (val/ and "
            f"test/ beside it are optional), or try the whole pipeline with: python train.py --demo"
        )
    return load_splits(
        root, args.img_size, args.cache_dir, args.cache_workers, args.val_fraction, args.seed
    )


def main(argv=None):
    args, checkpoint = parse_args(argv)
    rank, local_rank, world_size = init_distributed(args.device)
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        # A fixed input size: let cuDNN time its kernels and keep the fastest.
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed + rank)  # initialisation, and anything random a model adds (dropout)
    with local_main_first(local_rank):
        if args.demo:
            write_demo_dataset(args.data)
        splits = load_data(args)
    resume = Resume.find(args, checkpoint)
    weights = resume.weights(args.arch, args.weights)
    model = build_model(args.arch, len(splits.classes), weights)
    # Unless given, the normalisation the weights were trained with (saved: a resume keeps it).
    args.mean = args.mean or list(weights.mean)
    args.std = args.std or list(weights.std)
    if args.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise SystemExit(
                "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    ema = EMA(model, args.ema) if args.ema else None
    resume.restore(model, ema, splits.classes, rank, world_size)
    run = Run(args, splits, model, ema, device, resume, rank, world_size)
    params = count_parameters(model.parameters())
    log(
        f"{args.arch} ({params / 1e6:.1f}M parameters) on {device} "
        f"({run.dtype or torch.float32}), {len(splits.classes)} classes, "
        f"{len(splits.train)} train / {len(splits.val)} val images, batch {args.batch_size}"
        + (
            f" per process x {world_size} processes = {args.batch_size * world_size}"
            if world_size > 1
            else ""
        )
        + (f", {splits.skipped} unreadable images skipped" if splits.skipped else "")
    )
    mean, std = (", ".join(f"{v:.3f}" for v in values) for values in (args.mean, args.std))
    log(f"weights: {weights.about}; inputs normalised with mean ({mean}), std ({std})")
    warn_if_too_large(args.arch, params, args.max_params)
    # The first process writes --out; no other run may write there meanwhile.
    lock = exclusive(run.out / ".lock", f"--out {run.out}") if rank == 0 else nullcontext()
    try:
        with lock:
            # Algorithm 1. Phase I: fit the new head on the frozen backbone.
            if args.phase in ("1", "all"):
                run.train_phase(phase_setup(1, args, model, device))
            # Phase II: fine-tune every layer, warmup then cosine, gradients clipped.
            if args.phase in ("2", "all"):
                run.train_phase(phase_setup(2, args, model, device))
                # Return the best checkpoint: of the epochs, or of their average.
                select_result(run)
    except torch.OutOfMemoryError:
        raise SystemExit(out_of_memory_advice(args, run.out / "last.pt")) from None
    except Preempted as where:
        last = run.out / "last.pt"
        log(
            f"stopped by {run.stop.name()} {where}: {last} holds the position. Resume with: "
            f"python train.py --resume {last} (exit status {EXIT_PREEMPTED})"
        )
        raise SystemExit(EXIT_PREEMPTED) from None
    finally:
        run.stop.close()
    summarize(run)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if run.unwritten:
        raise SystemExit(
            "the run ended, but these files could not be written: "
            + "; ".join(run.unwritten.values())
        )
    return run


def select_result(run):
    """Which model best.pt holds, once the last epoch is done: with --average-last, the average
    of the last K Phase II epochs (written as averaged.pt) replaces the best epoch if it validates
    better; with --tta auto, best.pt is marked with whether horizontal-flip test-time augmentation
    validates better. The first process alone (the epoch files are its), on the whole validation
    split; the others wait. A run stopped here does it again when resumed, with the same result."""
    args = run.args
    if run.rank == 0 and run.history and len(run.splits.val):
        cuda = run.device.type == "cuda"
        val = make_loader(run.splits.val, 2 * args.batch_size, False, pin_memory=cuda)
        if args.average_last:
            average_last_epochs(run, val)
        if args.tta == "auto":
            mark_tta(run, val)
    run.stop.barrier()


def average_last_epochs(run, val):
    args, device = run.args, run.device
    epochs = [n for n, r in enumerate(run.history, 1) if r["phase"] == 2][-args.average_last :]
    paths = [run.out / f"epoch{n:03d}.pt" for n in epochs]
    if len(paths) < 2 or not all(p.is_file() for p in paths):
        log(f"--average-last {args.average_last}: fewer than 2 Phase II epochs kept, no average")
        return
    states = [load_checkpoint(p) for p in paths]
    net = build_model(args.arch, len(run.splits.classes), weights="none")
    net.load_state_dict(average_weights(states))
    net = net.to(device, memory_format=torch.channels_last)
    train = make_loader(run.splits.train, args.batch_size, True, args.seed, device.type == "cuda")
    update_bn(net, train, run.eval_preprocess, device)
    correct, seen = count_correct(net, val, run.eval_preprocess, device, run.dtype)
    acc, best = correct / seen, max(map(best_acc, run.history))
    names = ["averaged.pt"] + (["best.pt"] if acc > best else [])
    run.write(averaged_checkpoint(states[-1], net.state_dict(), paths, acc), names, must=True)
    log(
        f"the average of epochs {epochs[0]}-{epochs[-1]}: val acc {acc:.4f} ({correct}/{seen}), "
        f"the best epoch's {best:.4f} -> {' and '.join(str(run.out / n) for n in names)}"
    )


def mark_tta(run, val):
    state = load_checkpoint(run.out / "best.pt")
    net = model_from_checkpoint(state, run.device)
    plain, seen = count_correct(net, val, run.eval_preprocess, run.device, run.dtype)
    flipped, _ = count_correct(net, val, run.eval_preprocess, run.device, run.dtype, tta=True)
    state["tta"] = flipped > plain
    run.write(state, ["best.pt"], must=True)
    log(
        f"best.pt with horizontal-flip test-time augmentation: val acc {flipped / seen:.4f}, "
        f"without: {plain / seen:.4f} -> evaluate.py and predict.py use it "
        + ("by default" if state["tta"] else "only with --tta")
    )


def warn_if_too_large(arch, params, limit):
    if limit and params > limit:
        log(f"warning: {arch} has {params:,} parameters, more than --max-params {limit:,}")


def out_of_memory_advice(args, last):
    b = args.batch_size
    smaller = max((d for d in range(1, b // 2 + 1) if b % d == 0), default=None)
    if smaller is None:
        return "the GPU ran out of memory at --batch-size 1; try a smaller --img-size or --arch."
    return (
        f"the GPU ran out of memory at --batch-size {b}. The same effective batch in smaller "
        "pieces: "
        f"--batch-size {smaller} --accum-steps {args.accum_steps * b // smaller}. "
        f"The last good checkpoint is {last} (--resume it with those options)."
    )


def summarize(run):
    if not run.history:
        log("nothing to train: every requested epoch is done")
        return
    best = max(run.history, key=best_acc)
    total = sum(r["seconds"] for r in run.history)
    log(
        f"best val acc {best_acc(best):.4f} (phase {best['phase']} epoch {best['epoch']}) -> "
        f"{run.out / 'best.pt'}; {len(run.history)} epochs in {total / 60:.1f} min of training"
        + (f"; {run.splits.skipped} unreadable images were skipped" if run.splits.skipped else "")
    )


if __name__ == "__main__":
    main()
