"""The method's recipe, the report's Table 1: the options (their defaults are its values), the
presets (--demo, --recipe), the --epochs budget split, the order in which all of these resolve
(with continuing.py's rules where a run continues), and each phase's optimizer, schedule and
settings. train.py runs it; evaluate.py, report.py and the benchmarks read it from here.

    python train.py --help              # every option with its default: Table 1
"""

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data import labels_path
from model import count_parameters, set_trainable, stage_groups
from twophase.augment import MixUpCutMix
from twophase.continuing import (
    PHASE1_ONLY,
    continued_run,
    phase1_end,
    refuse_changes,
    saved_options,
)
from twophase.image_cache import RESIZE_MODES
from twophase.tables import read_class_weights
from utils import Problem, log

USAGE = """Fine-tune an ImageNet-pretrained ResNet in two phases (the report's Algorithm 1).

Phase I trains only a new head on the frozen backbone; Phase II fine-tunes every layer with
NAdam, a linear warmup then cosine learning rate, fp16 autocast and gradient clipping. The
defaults below are the report's Table 1.

    python train.py --demo              # the whole pipeline on a small bundled dataset, CPU
    python train.py                     # both phases on data/
    python train.py --resume checkpoints/last.pt
"""

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
# average of its last epochs and either with flipped copies at test time. "fast" is the levers
# that reached a given accuracy soonest against the clock (RESULTS.md, "Time to accuracy"),
# each kept only where it did: best's, with the head at twenty times the report's Phase I rate
# and Phase II at twice its peak (its moving average passed timm's 8-epoch accuracy two and three
# epochs sooner at two seeds: 0.27 of timm's time). Progressive resizing and a larger test size
# measured worse there, and without the moving average (its second validation an epoch) 4 epochs
# did not reach the accuracy.
# (--recipe report, the default, sets the options of all of them to their defaults: Table 1.)
BEST = dict(ema=0.99, lr_decay=0.7, p_vflip=0.0, average_last=3, tta="auto")
RECIPES = {"best": BEST, "fast": BEST | dict(lr1=1e-2, lr2=1e-3)}


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
    p = argparse.ArgumentParser(description=USAGE, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="data",
        help="dataset root: train/<class>/<image> (val/, test/ beside it), <class>/<image>, or "
        "a flat train/ with --labels",
    )
    g.add_argument(
        "--labels",
        default=None,
        metavar="CSV",
        help="the labels of a flat <data>/train/: a CSV with a header, image names (with or "
        "without their extension) and labels, as Kaggle's train.csv",
    )
    g.add_argument(
        "--image-col", default=None, metavar="NAME", help="--labels' image column; unset: its first"
    )
    g.add_argument(
        "--label-col",
        default=None,
        metavar="NAME",
        help="--labels' label column; unset: its second",
    )
    g.add_argument(
        "--val-labels",
        default=None,
        metavar="CSV",
        help="with --labels: the validation images (in <data>/val/, or train/ if there is none) "
        "and their labels; unset: --val-fraction of --labels' images held out",
    )
    g.add_argument("--img-size", type=int, default=224, help="the square side images become")
    g.add_argument(
        "--resize",
        default="crop",
        choices=RESIZE_MODES,
        help="how a photo becomes a square: crop its centre (the report's), squish it whole, or "
        "pad it whole onto black; evaluate.py and predict.py follow the run's",
    )
    g.add_argument(
        "--val-fraction", type=float, default=0.1, help="held out for validation, if no val/"
    )
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
        help="a budget of N epochs in all, split as the report splits its 135: sets --epochs1, "
        "--epochs2, --warmup-epochs and --cosine-epochs, dividing what is left of N around "
        "those given (--epochs 8: 1 + 7, no warmup; --epochs 8 --epochs1 2: 2 + 6)",
    )
    g.add_argument(
        "--time-budget",
        type=duration,
        default=None,
        metavar="DURATION",
        help="a budget of time (90m, 2h, 1h30m, 600s): the run times a few steps of each phase "
        "on this machine and takes the largest --epochs N whose epochs, validations, saves "
        "and end fit in it, counting from its start",
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
    g.add_argument(
        "--save-every", type=int, default=15, help="keep a checkpoint every N epochs; 0: none"
    )
    g.add_argument(
        "--save-min-acc", type=float, default=0.82, help="... if val acc is this or more"
    )

    g = p.add_argument_group("both phases")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy")
    g.add_argument(
        "--class-weights",
        default="none",
        metavar="auto|FILE",
        help="weigh each class's loss: auto by inverse frequency in the training images (mean "
        "1), FILE a CSV of class,weight (unlisted classes 1); none",
    )
    g.add_argument(
        "--sampler",
        default="shuffle",
        choices=["shuffle", "balanced"],
        help="each epoch's images: every training image once, shuffled; or balanced, as many "
        "drawn with replacement, each class equally likely",
    )
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
        f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items())
        for name, preset in RECIPES.items()
    )
    g.add_argument(
        "--recipe",
        default="report",
        choices=["report", *RECIPES],
        help=f"a preset of the options below: report, the report's Table 1 (these at their "
        f"defaults); "
        f"{recipes}. Options given explicitly win",
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
        help="keep the last K epochs' checkpoints (for python -m twophase.average)",
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
        "--progressive",
        type=float,
        default=1.0,
        metavar="FRACTION",
        help="Phase II starts at FRACTION of --img-size and rises to it by --progressive-until "
        "of its epochs, in steps of --img-size / 7 (32 px at 224, 8 at 64); 1: off",
    )
    g.add_argument(
        "--progressive-until",
        type=float,
        default=0.75,
        metavar="SHARE",
        help="the share of Phase II's epochs after which it trains at --img-size",
    )
    g.add_argument(
        "--test-size",
        default="train",
        choices=["train", "auto"],
        help="auto: at the end, validate best.pt at --img-size and two steps larger, its batch "
        "norm as trained and measured again at each size, and mark it with the best (FixRes; "
        "evaluate.py and predict.py follow the mark)",
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
        help="2 alone continues the run of <out>/phase1.pt, with its options",
    )
    g.add_argument("--out", default="checkpoints", help="checkpoints and history.csv go here")
    g.add_argument(
        "--save-every-steps",
        type=int,
        default=0,
        metavar="N",
        help="also save last.pt every N optimizer steps, mid-epoch (0: at epoch ends)",
    )
    g.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="write TensorBoard curves (losses, accuracies, lr, images/s each epoch; the "
        "training loss every --tensorboard-every steps) into DIR, or the run's folder; needs "
        "pip install tensorboard",
    )
    g.add_argument(
        "--tensorboard-every", type=int, default=50, metavar="N", help="steps between losses"
    )
    g.add_argument("--seed", type=int, default=0, help="init, data order, augmentation, val split")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue a run from its last.pt, in that checkpoint's folder: its saved options "
        "hold, and each option given here is applied to the rest of the run or refused "
        "(docs/checkpoints.md)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds a run: its checkpoints are deleted when the new "
        "run saves its first file (with --phase 2, all but phase1.pt, where Phase II starts "
        "again)",
    )
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
    g.add_argument(
        "--demo",
        action="store_true",
        help=f"train a CPU-sized model on data/demo (scikit-learn digits): {demo}",
    )
    return p


def duration(text):
    """Seconds of 90m, 2h, 1h30m, 600s, 1.5h."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90m, 2h, 1h30m, 600s)")
    return sum(float(n) * units[u] for n, u in parts)


def parameter_count(text):
    """100M, 25.6M, 1.5B or a plain number."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 100M)") from None


PHASE_EPOCHS = ("epochs1", "epochs2", "warmup_epochs", "cosine_epochs")


def epochs_within(seconds, phase_seconds, end_seconds, fixed=None, most=100_000):
    """The largest budget of epochs N, with its split (split_budget(N, fixed)) and its expected
    seconds, that trains within `seconds`: phase_seconds(p, split) the seconds of phase p's
    epochs in that split (their steps, validations and checkpoints), and `end_seconds` after
    the last (--average-last, --tta auto). None if not even the smallest budget fits. An extra
    epoch never costs less than nothing, so the first N that does not fit ends the search."""
    best = None
    for total in range(2, most):
        try:
            split = split_budget(total, fixed)
        except Problem:  # the epochs given make up more than `total`
            continue
        cost = sum(phase_seconds(p, split) for p in (1, 2)) + end_seconds

        if cost > seconds:
            break
        best = (total, split, cost)
        if fixed and "epochs1" in fixed and "epochs2" in fixed:
            break  # nothing left to choose
    return best


def split_budget(total, fixed=None):
    """The report's 10 + 125 epochs (5 of them warmup) scaled to a budget of `total`: Phase I's
    share rounded (at least one epoch), the warmup's share of Phase II rounded, then one cosine
    decay over the rest. `fixed`: the ones given explicitly, which hold; the rest of the budget is
    divided around them (`--epochs 8 --epochs1 2` is 2 + 6). Rounding each share keeps the phases
    in the report's proportions; a short budget that took 2 + 6 with a warmup epoch (its minimums)
    spent a quarter of itself on the head alone."""
    fixed = fixed or {}
    epochs1 = fixed.get("epochs1")
    if epochs1 is None:
        given2 = fixed.get("epochs2")
        epochs1 = total - given2 if given2 is not None else max(1, round(total * 10 / 135))
    epochs2 = fixed.get("epochs2", total - epochs1)
    if epochs1 + epochs2 != total or min(epochs1, epochs2) < 0:
        raise Problem(
            f"--epochs {total}: --epochs1 {epochs1} and --epochs2 {epochs2} do not make it up"
        )
    warmup = fixed.get("warmup_epochs", round(epochs2 * 5 / 125))
    cosine = fixed.get("cosine_epochs", max(1, epochs2 - warmup))
    return dict(epochs1=epochs1, epochs2=epochs2, warmup_epochs=warmup, cosine_epochs=cosine)


def bad_values(args):
    """What is wrong with the options, as sentences for the parser's error."""
    if args.epochs is not None and args.epochs < 2:
        yield f"--epochs {args.epochs}: the budget needs at least 2 epochs, one for each phase"
    if args.time_budget is not None and args.epochs is not None:
        yield "--time-budget chooses --epochs from the time: give one or the other"
    if args.time_budget is not None and args.phase == "1":
        yield "--time-budget plans both phases: with --phase 1, give --epochs1"
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
    for name in ("save_every_steps", "save_every"):
        if getattr(args, name) < 0:
            yield f"--{name.replace('_', '-')} must be 0 or more (0: none)"
    if args.tensorboard_every < 1:
        yield "--tensorboard-every must be 1 or more"
    for name in ("progressive", "progressive_until"):
        if not 0 < getattr(args, name) <= 1:
            yield f"--{name.replace('_', '-')} {getattr(args, name)}: a share in (0, 1]"


def resolve_options(argv=None):
    """The run's options, resolved once and in one order, and where it starts (a Resume: the
    checkpoint it continues, read once, or none). A checkpoint saves exactly this result.

    - a fresh run: defaults < --demo < --recipe < the --epochs split < given;
    - --resume PATH: PATH's saved options < given, in PATH's folder unless --out is given;
    - --phase 2 with <out>/phase1.pt: phase1.pt's saved options < given: Phase II of that run.

    On a run that continues, --recipe and the --epochs split apply again only if given again,
    and each option that differs from the run's obeys its rule in continuing.CONTINUING: applied,
    or refused here, before anything is read or written."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for problem in bad_values(args):
        parser.error(problem)
    given = given_options(argv)
    resume = continued_run(args)
    if resume.state is None:
        recipe = RECIPES.get(args.recipe, {})  # its own levers: the rest are the defaults
        options = {**vars(args), **(DEMO if args.demo else {}), **recipe}
        if args.epochs:
            options |= split_budget(args.epochs, {k: given[k] for k in PHASE_EPOCHS if k in given})
    else:
        saved = {**vars(parser.parse_args([])), **saved_options(resume.state)}
        options = continued_options(parser, saved, given, resume)
    options |= given
    options["overwrite"] = args.overwrite  # an order for this command, never a saved option
    options |= resolved_paths(options)
    if resume.state is not None:
        refuse_changes(options, saved, resume, parser)

    if options["compile"] == "off":
        options["compile"] = None
    return argparse.Namespace(**options), resume


def resolved_paths(options):
    """The files a fresh run reads its labels and class weights from, as absolute paths (they
    are saved; evaluate.py and predict.py read them again from anywhere), checked to exist."""
    found = {}
    for key in ("labels", "val_labels"):
        if options[key]:
            found[key] = str(labels_path(options[key], options["data"]).resolve())
    weights = options["class_weights"]
    if weights not in ("auto", "none"):
        try:
            found["class_weights"] = str(labels_path(weights, options["data"]).resolve())
        except Problem:
            raise Problem(f"--class-weights {weights}: not auto, none, nor a file") from None

    return found


def continued_options(parser, saved, given, resume):
    """A continued run's options before those given: the saved ones, in the checkpoint's folder,
    on its dataset (where it was, if --data was relative and the command runs elsewhere), with
    --recipe's preset and the --epochs split done again where given. A new budget keeps the
    Phase I epochs a run has done once it is past Phase I."""
    options = {**saved, "resume": given.get("resume"), "out": str(resume.path.parent)}
    where = resume.state.get("data")
    if where and not Path(saved["data"]).is_dir() and Path(where).is_dir():
        options["data"] = where
    phase = given.get("phase", saved["phase"])
    if "epochs" in given:
        fixed = {k: given[k] for k in PHASE_EPOCHS if k in given}
        if phase1_end(resume.state, phase, given.get("epochs1", saved["epochs1"])):
            fixed.setdefault("epochs1", saved["epochs1"])
        options |= split_budget(given["epochs"], fixed)
    if "recipe" in given:
        levers = switched_recipe(parser, saved, given["recipe"])
        ended = phase1_end(resume.state, phase, given.get("epochs1", options["epochs1"]))
        if ended:
            levers = keep_phase1(levers, saved, given["recipe"], ended)
        options |= levers
    return options


def switched_recipe(parser, saved, recipe):
    """--recipe given to a continued run, as on a fresh run given the run's options and it: its
    levers, and the levers of the run's own recipe that it does not set back at what a fresh run
    has without them (the demo's values, or the defaults). An option whose value is not what the
    run's recipe made it was given when the run started, and stays, as given options win."""
    levers, before = RECIPES.get(recipe, {}), RECIPES.get(saved.get("recipe", "report"), {})
    base = {**vars(parser.parse_args([])), **(DEMO if saved.get("demo") else {})}
    values = {}
    for key in before.keys() | levers.keys():
        if saved.get(key) == before.get(key, base[key]):  # the recipe's (or no one's) value
            values[key] = levers.get(key, base[key])
    return values


def keep_phase1(reset, saved, recipe, ended):
    """A recipe's values less its Phase I levers (fast's --lr1), which keep the run's once its
    Phase I is over (`ended`, phase1_end's words): they would change nothing, and given alone
    they are refused there."""
    kept = {k: v for k, v in reset.items() if k in PHASE1_ONLY and v != saved.get(k)}
    for key, value in kept.items():
        log(
            f"--recipe {recipe}: its --{key.replace('_', '-')} {value} is for Phase I, and Phase I "
            f"of this run {ended}; it keeps {saved.get(key)}"
        )
    return {k: v for k, v in reset.items() if k not in kept}


def given_options(argv):
    """The options written on the command line, with their values."""
    parser, unset = get_args_parser(), object()
    parser.set_defaults(**{action.dest: unset for action in parser._actions})
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not unset}


@dataclass
class Phase:
    """One phase of the method as Table 1 sets it, and everything a training step of it needs:
    how long, the optimizer (over the parameters it trains), each parameter group's peak
    learning rate and the schedule that scales them epoch by epoch, the weight decay, the
    gradient clip, whether batch norm statistics adapt, MixUp/CutMix, the loss, the autocast
    dtype with its grad scaler, and how many batches an optimizer step takes."""

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

    def set_epoch(self, epoch):
        """The optimizer's learning rates and weight decay for `epoch`, from the options alone:
        they replace whatever a checkpoint's optimizer state brought along, so that a run
        continued with other options trains as they say."""
        share = self.schedule(epoch)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * share
            group["weight_decay"] = self.weight_decay

    def lrs(self):
        """The learning rate of the first parameter group at each of the phase's epochs."""
        return [self.peak_lrs[0] * self.schedule(epoch) for epoch in range(self.epochs)]


def phase_setup(number, args, model, device, criterion, dtype):
    """Table 1 from the options: the only place a phase's recipe is put together (train.py and
    the benchmarks use it). It also sets which of `model`'s parameters learn. `criterion` and
    `dtype` are the run's loss and autocast dtype, which validation shares."""
    # fp16 losses are scaled on CUDA, against gradients too small for float16; Apple's GPUs
    # train fp16 autocast without a scaler (torch's GradScaler is CUDA's).
    scaled = dtype == torch.float16 and device.type == "cuda"
    step = dict(
        criterion=criterion,
        dtype=dtype,
        scaler=torch.amp.GradScaler("cuda" if scaled else device.type, enabled=scaled),
        accum_steps=args.accum_steps,
    )

    if number == 1:
        # The new head alone, at a constant learning rate, the backbone frozen.
        optimizer = make_optimizer("adamw", set_trainable(model, 1), args.lr1, args.wd1, device)
        return Phase(
            number=1,
            epochs=args.epochs1,
            optimizer=optimizer,
            peak_lrs=[args.lr1],
            schedule=constant,
            image_size=ProgressiveSize(args.img_size, args.img_size, 1, size_step(args.img_size)),
            weight_decay=args.wd1,
            clip=0.0,
            freeze_bn=args.freeze_bn,
            mix=None,
            **step,
        )
    # Every layer: warmup then cosine, gradients clipped.
    set_trainable(model, 2)
    groups = stage_groups(model, args.lr2, args.lr_decay)
    optimizer = make_optimizer(args.optimizer2, groups, args.lr2, args.wd2, device)
    mix = None
    if args.mixup or args.cutmix:
        mix = MixUpCutMix(args.mixup, args.cutmix, model.fc.out_features)
    return Phase(
        number=2,
        epochs=args.epochs2,
        optimizer=optimizer,
        peak_lrs=[group["lr"] for group in optimizer.param_groups],
        schedule=WarmupCosine.of(args),
        image_size=ProgressiveSize.of(args, args.epochs2),
        weight_decay=args.wd2,
        clip=args.clip,
        freeze_bn=False,
        mix=mix,
        **step,
    )


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


def loss_of(args, classes=None, counts=None):
    """Both phases' loss, validation's too: cross-entropy with label smoothing, each class
    weighed by --class-weights (`counts`: each class's training images, for auto)."""
    weight = class_weights(args.class_weights, classes, counts)
    return Loss(weight=weight, label_smoothing=args.label_smoothing)


class Loss(nn.CrossEntropyLoss):
    """PyTorch's cross-entropy, whose mean over a batch with class weights divides by the sum of
    the weights of the images' classes, not by their number. A batch split over processes or
    accumulated steps would divide each part by its own sum; `sums` gives the two sums, which the
    training step and validation add up over the whole batch and split before dividing."""

    def sums(self, logits, targets):
        """(the loss summed over the images, what its mean divides that by)."""
        total = nn.functional.cross_entropy(
            logits,
            targets,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        if self.weight is None or targets.is_floating_point():  # mixed targets: by the images
            return total, torch.tensor(float(len(targets)), device=logits.device)
        return total, self.weight[targets].sum()


def check_class_weights(spec, classes):
    """A --class-weights FILE read and checked against the classes (a Problem naming each bad
    row), as a run starts: before it writes anything."""
    if spec not in (None, "none", "auto"):
        read_class_weights(spec, classes)


def class_weights(spec, classes, counts):
    """--class-weights as a tensor of one weight a class, or None: "auto", each class's inverse
    frequency among the training images, scaled so that the weights' mean is 1 (a class with no
    training image gets 0); a CSV of class,weight rows (tables.read_class_weights)."""
    if spec in (None, "none"):
        return None
    if spec == "auto":
        counts = torch.as_tensor(counts, dtype=torch.float64)
        inverse = torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0)
        return (inverse / inverse[counts > 0].mean()).float()
    return torch.tensor(read_class_weights(spec, classes), dtype=torch.float32)


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
    trough = args.warmup_epochs + args.cosine_epochs
    if trough < phase.epochs:
        line += (
            f"\nnote: the learning rate reaches --min-lr after {trough} epochs and then climbs "
            f"back towards --lr2 for the phase's last {phase.epochs - trough}; "
            f"--cosine-epochs {phase.epochs - args.warmup_epochs} gives one monotone decay"
        )
    return line
