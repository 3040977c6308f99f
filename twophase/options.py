"""train.py's options, each declared once, in OPTIONS: its name, type, default (together the
report's Table 1), group, help, the value each preset gives it (--demo, --recipe best, --recipe
fast), the rule it obeys when a run continues (continuing.py), another value for the tests, and
what is checked of its value (checks.py's checks). From the table come the parser (`--help`
prints Table 1), the checks, the presets, the continued-run rules and the options' tables in
docs/options.md and docs/checkpoints.md (`python -m twophase.options --docs` writes them; a test
fails if they drift). Adding an option is a row here plus the code that uses it. resolve.py makes
a run's options of the table, the command line and the checkpoint it continues.

    python train.py --help              # every option with its default: Table 1
    python -m twophase.options --docs   # docs/options.md's and docs/checkpoints.md's tables
"""

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from twophase import continuing as rules
from twophase.augment import Augmentation
from twophase.checks import (
    MIN_SIDE,
    PROBABILITY,
    above,
    alpha,
    at_least,
    between,
    decay,
    duration,
    each_positive,
    epochs_to_average,
    factor,
    finite,
    half_open,
    held_out,
    learning_rate,
    low_high,
    parameter_count,
    rate,
    share,
    timeout,
)
from twophase.image_cache import RESIZE_MODES
from twophase.schedule import OPTIMIZERS
from utils import DIST_TIMEOUT, LONG_WAIT, typed_duration

USAGE = """Fine-tune an ImageNet-pretrained ResNet in two phases (the report's Algorithm 1).

Phase I trains only a new head on the frozen backbone; Phase II fine-tunes every layer with
NAdam, a linear warmup then cosine learning rate, fp16 autocast and gradient clipping. The
defaults below are the report's Table 1.

    python train.py --demo              # the whole pipeline on a small bundled dataset, CPU
    python train.py                     # both phases on data/
    python train.py --resume checkpoints/last.pt
"""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's
PRESETS = ("demo", "best", "fast")  # --demo; --recipe's (its "report" is the defaults)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One option of train.py."""

    flags: tuple  # its names, the first its own: ("--cache-workers", "--workers")
    default: object = None
    help: str = ""
    type: object = None
    choices: tuple | None = None
    nargs: object = None
    const: object = None
    metavar: str | None = None
    switch: bool = False  # an on/off flag, off by default
    presets: dict = field(default_factory=dict)  # demo, best, fast: the value each sets
    rule: object = rules.applied  # on a continued run given another value
    resume: str = ""  # docs/checkpoints.md: how the rule plays out for it
    other: tuple | None = ()  # another value, the words after the flag (None: a test's own)
    check: object = None  # a value (never None: unset is no value) -> what is wrong with it
    file: bool = False  # a path: saved absolute, found again by its name where the data moved
    folder: bool = False  # a folder the run writes in, made where absent: never a file
    unchecked: str = ""  # why a value it takes needs no check here, where it has none
    group: str = ""

    @property
    def flag(self):
        return self.flags[0]

    @property
    def dest(self):
        return self.flag[2:].replace("-", "_")

    def argument(self):
        """add_argument's keywords."""
        if self.switch:
            return {"action": "store_true", "help": self.help, "dest": self.dest}
        keywords = {"default": self.default, "help": self.help, "dest": self.dest}
        for key in ("type", "choices", "nargs", "const", "metavar"):
            if getattr(self, key) is not None:
                keywords[key] = getattr(self, key)
        return keywords


def group(title, *options):
    return [replace(option, group=title) for option in options]


AS_LABELS = "as `--labels`"
AS_BATCH = "as `--batch-size`"
AUGMENTATION = "augmentation (training only, per sample, on the device)"
AUGMENT = Augmentation()  # the augmentation's defaults (Table 1's), declared once: there

OPTIONS = (
    *group(
        "data",
        Option(
            ("--data",),
            "data",
            "dataset root: train/<class>/<image> (val/, test/ beside it), <class>/<image>, or a "
            "flat train/ with --labels",
            presets={"demo": "data/demo"},
            resume="the run goes on with the images there (its classes must be the same); a "
            "checkpoint records its dataset's absolute path, so evaluate.py and predict.py find "
            "it from any folder",
            other=None,
            unchecked="read before anything is written: find_data says what is, or is not, there",
        ),
        Option(
            ("--labels",),
            help="the labels of a flat <data>/train/: a CSV of image names (with or without their "
            "extension) and labels, as Kaggle's train.csv",
            metavar="CSV",
            rule=rules.held_out_split,
            resume="held out of another set of images, validation would take images the run "
            "trained on",
            other=None,
            file=True,
        ),
        Option(
            ("--image-col",),
            help="--labels' image column; unset: its first (or the first --label-col is not)",
            metavar="NAME",
            rule=rules.held_out_split,
            resume=AS_LABELS,
            other=("image",),
            unchecked="a column of --labels, looked up in its header as it is read",
        ),
        Option(
            ("--label-col",),
            help="--labels' label column; unset: its second (or the first --image-col is not)",
            metavar="NAME",
            rule=rules.held_out_split,
            resume=AS_LABELS,
            other=("label",),
            unchecked="a column of --labels, looked up in its header as it is read",
        ),
        Option(
            ("--val-labels",),
            help="with --labels: the validation images (in <data>/val/, or train/ if there is "
            "none) and their labels; unset: --val-fraction of --labels' images held out",
            metavar="CSV",
            rule=rules.held_out_split,
            resume=AS_LABELS,
            other=None,
            file=True,
        ),
        Option(
            ("--img-size",),
            224,
            "the square side images become",
            type=int,
            presets={"demo": 32},
            resume="the remaining epochs at that size (its own cache)",
            other=("24",),
            check=at_least(MIN_SIDE, "the side must be {low} px or more"),
        ),
        Option(
            ("--resize",),
            "crop",
            "how a photo becomes a square: crop its centre (the report's), squish it whole, or "
            "pad it whole onto black; evaluate.py and predict.py follow the run's",
            choices=RESIZE_MODES,
            resume="the remaining epochs with that preprocessing (its own cache); evaluate.py and "
            "predict.py follow the checkpoint's",
            other=("squish",),
        ),
        Option(
            ("--val-fraction",),
            0.1,
            "held out for validation, if no val/",
            type=float,
            rule=rules.held_out_split,
            resume="another fraction would move images the run trained on into validation",
            other=("0.2",),
            check=held_out,
        ),
        Option(
            ("--cache-dir",),
            help="preprocessed-image cache; unset: <data>/.cache, or the user's cache folder where "
            "the data cannot be written (said in a line)",
            other=None,
            folder=True,
        ),
        Option(
            ("--batch-size",),
            72,
            "images per step",
            type=int,
            presets={"demo": 64},
            rule=rules.smaller_pieces,
            resume="an epoch stopped in the middle goes on with its images in the same order: a "
            "batch that divides the run's, with `--accum-steps` as many times more (what the "
            "out-of-memory advice gives)",
            other=("3",),
            check=at_least(1),
        ),
        Option(
            ("--cache-workers", "--workers"),
            4,
            "threads that decode images into the cache (a batch is one read of it)",
            type=int,
            other=("2",),
            check=at_least(0, "must be 0 or more (0 and 1: one thread)"),
        ),
        Option(
            ("--drop-copies",),
            False,
            "leave out of validation the images that are copies of training images (exact, or "
            "near: the same photo resized, re-encoded, slightly cropped or recoloured), saying "
            "how many; without it they are only said, and listed in <out>/data_check.csv",
            switch=True,
            rule=rules.validated_alike,
            resume="the best epoch is chosen among epochs validated on the same images",
        ),
    ),
    *group(
        "model",
        Option(
            ("--arch",),
            "wide_resnet50_2",
            "any torchvision ResNet-family model",
            presets={"demo": "resnet18"},
            rule=rules.refused_always,
            resume="the weights are that architecture's",
            other=("resnet34",),
            unchecked="looked up in torchvision's models as the model is built, which lists them",
        ),
        Option(
            ("--mean",),
            help="input normalisation; unset: the weights' own (ImageNet's, or a checkpoint's)",
            type=float,
            nargs=3,
            rule=rules.refused_always,
            resume="the weights were trained on inputs normalised so",
            other=("0.5", "0.5", "0.5"),
            unchecked="any three (finite) numbers normalise; --std divides, and is checked",
        ),
        Option(
            ("--std",),
            help="... and its std",
            type=float,
            nargs=3,
            rule=rules.refused_always,
            resume="as `--mean`",
            other=("0.2", "0.2", "0.2"),
            check=each_positive,
        ),
        Option(
            ("--weights",),
            "imagenet",
            "imagenet | none | a torchvision weights name (IMAGENET1K_V1) | PATH",
            presets={"demo": "none"},
            rule=rules.starting_weights,
            resume="a continued run starts from its checkpoint's weights; to start from others, "
            "train a fresh run",
            other=("imagenet",),
            unchecked="looked up before anything is written (model.py), which lists the names",
        ),
        Option(
            ("--epochs",),
            help="a budget of N epochs in all, split as the report splits its 135: sets "
            "--epochs1, --epochs2, --warmup-epochs and --cosine-epochs, dividing what is left of "
            "N around those given (--epochs 8: 1 + 7, no warmup; --epochs 8 --epochs1 2: 2 + 6)",
            type=int,
            metavar="N",
            resume="a new budget, split again: `--epochs 50` on a run of `--epochs 8` in Phase II "
            "keeps its 1 Phase I epoch and gives Phase II the other 49",
            other=("9",),
            check=at_least(2, "the budget needs at least 2 epochs, one for each phase"),
        ),
        Option(
            ("--time-budget",),
            help="a budget of time (90m, 2h, 1h30m, 600s): the run times a few steps of each "
            "phase on this machine and takes the largest --epochs N whose epochs, validations, "
            "saves and end fit in it, counting from its start",
            type=duration,
            metavar="DURATION",
            rule=rules.budget_rule,
            resume="a run's budget chose its epochs when it started, and they are saved; give "
            "`--epochs2` or `--epochs N` to train longer or shorter",
            other=("10m",),
            check=above(0),
        ),
    ),
    *group(
        "Phase I: the new head alone, backbone frozen",
        Option(
            ("--epochs1",),
            10,
            "0 skips Phase I",
            type=int,
            presets={"demo": 2},
            rule=rules.phase1_length,
            resume="a Phase I whose last epoch is saved (`phase1.pt`) trains on with a larger "
            "value; Phase I cannot train again once Phase II has begun",
            other=("3",),
            check=at_least(0),
        ),
        Option(
            ("--lr1",),
            5e-4,
            "AdamW, constant; auto: the LR range test's suggestion, found as Phase I starts "
            "(docs/options.md)",
            type=rate,
            metavar="LR|auto",
            presets={"fast": 1e-2},
            rule=rules.phase1_rate,
            resume="it would change nothing; `auto` is refused once Phase I has begun (the range "
            "test runs as a phase starts), but where the run's rate was found so: it keeps that",
            other=("1e-3",),
            check=learning_rate,
        ),
        Option(
            ("--wd1",),
            1e-4,
            "AdamW weight decay",
            type=float,
            rule=rules.phase1_only,
            resume="it would change nothing",
            other=("2e-4",),
            check=at_least(0, "weight decay must be 0 or more"),
        ),
        Option(
            ("--freeze-bn",),
            False,
            "keep batch norm statistics fixed",
            switch=True,
            rule=rules.phase1_only,
            resume="it would change nothing",
        ),
        Option(
            ("--phase1-features",),
            0,
            "train the head on the frozen backbone's pooled features of N augmented passes over "
            "the training images, computed once on the device (images x feature width x N x 4 "
            "bytes; refused where they do not fit), epoch e on pass e mod N: the same head with "
            "N = --epochs1, in a fraction of the time with fewer; 0: the images as they come",
            type=int,
            metavar="N",
            rule=rules.phase1_whole_epochs,
            resume="the passes are computed again from the seed; a pass's own epoch updates the "
            "batch norm statistics as it begins, so another value takes effect from an epoch's "
            "start",
            other=("2",),
            check=at_least(0),
        ),
    ),
    *group(
        "Phase II: every layer",
        Option(
            ("--epochs2",),
            125,
            "0 skips Phase II",
            type=int,
            presets={"demo": 10},
            rule=rules.phase_length,
            resume="train longer (or shorter) on the same schedule",
            other=("5",),
            check=at_least(0),
        ),
        Option(
            ("--optimizer2",),
            "nadam",
            "its optimizer",
            choices=tuple(sorted(OPTIMIZERS)),
            rule=rules.phase2_optimizer,
            resume="Phase II's saved moments are its optimizer's; start Phase II again from "
            "`phase1.pt` for another (`--phase 2 --overwrite`)",
            other=("adamw",),
        ),
        Option(
            ("--lr2",),
            5e-4,
            "peak learning rate; auto: the LR range test's suggestion, found as Phase II starts "
            "from the trained head (docs/options.md)",
            type=rate,
            metavar="LR|auto",
            presets={"demo": 1e-3, "fast": 1e-3},
            rule=rules.phase2_rate,
            resume="the rate from the next epoch (or step) on is the schedule's under the new "
            "value: a diverged run continues at a lower rate; `auto` is refused once Phase II has "
            "begun, but where the run's rate was found so: it keeps that",
            other=("2e-3",),
            check=learning_rate,
        ),
        Option(
            ("--wd2",),
            1e-4,
            "weight decay (L2, as released)",
            type=float,
            other=("3e-4",),
            check=at_least(0, "weight decay must be 0 or more"),
        ),
        Option(
            ("--warmup-epochs",),
            5,
            "linear, from --warmup-start x lr2",
            type=int,
            presets={"demo": 1},
            resume="the schedule is a function of the options and the epoch alone",
            other=("2",),
            check=at_least(0),
        ),
        Option(
            ("--warmup-start",),
            0.1,
            "first warmup epoch's share",
            type=float,
            other=("0.3",),
            check=share,
        ),
        Option(
            ("--cosine-epochs",),
            45,
            "cosine half-period after warmup; it climbs back past it",
            type=int,
            presets={"demo": 9},
            other=("5",),
            check=at_least(1),
        ),
        Option(
            ("--min-lr",),
            5e-6,
            "the cosine's floor",
            type=float,
            other=("1e-5",),
            check=at_least(0, "the floor must be 0 or more"),
        ),
        Option(
            ("--clip",),
            0.8,
            "gradient L2 norm limit; 0: none",
            type=float,
            other=("0.5",),
            check=at_least(0, "must be 0 or more (0: none)"),
        ),
        Option(
            ("--save-every",),
            15,
            "keep a checkpoint every N epochs; 0: none",
            type=int,
            other=("0",),
            check=at_least(0, "must be 0 or more (0: none)"),
        ),
        Option(
            ("--save-min-acc",),
            0.82,
            "... if val acc is this or more",
            type=float,
            other=("0.5",),
            check=between(0, 1, "an accuracy, between 0 and 1"),
        ),
    ),
    *group(
        "both phases",
        Option(
            ("--label-smoothing",),
            0.1,
            "of the cross-entropy",
            type=float,
            other=("0.2",),
            check=half_open(0, 1),
        ),
        Option(
            ("--class-weights",),
            "none",
            "weigh each class's loss: auto by inverse frequency in the training images (mean "
            "1), FILE a CSV of class,weight (unlisted classes 1); none",
            metavar="auto|FILE",
            resume="the loss of the remaining steps",
            other=("auto",),
            file=True,
        ),
        Option(
            ("--sampler",),
            "shuffle",
            "each epoch's images: every training image once, shuffled; or balanced, as many "
            "drawn with replacement, each class equally likely",
            choices=("shuffle", "balanced"),
            rule=rules.whole_epochs,
            resume=AS_BATCH,
            other=("balanced",),
        ),
        Option(
            ("--amp",),
            "fp16",
            "on CUDA",
            choices=("fp16", "bf16", "off"),
            resume="`--amp bf16` after an fp16 overflow, say",
            other=("bf16",),
        ),
        Option(
            ("--accum-steps",),
            1,
            "an optimizer step every N batches: the same effective batch in less memory, with "
            "a smaller --batch-size",
            type=int,
            rule=rules.smaller_pieces,
            resume=AS_BATCH,
            other=("2",),
            check=at_least(1, "must be at least 1"),
        ),
        Option(("--sync-bn",), False, "under torchrun on CUDA: global BN stats", switch=True),
        Option(
            ("--compile",),
            help=f"torch.compile each phase's model in MODE ({', '.join(COMPILE_MODES)}; the "
            "first if none is given); off: resume a compiled run without it",
            nargs="?",
            const="default",
            metavar="MODE",
            choices=(*COMPILE_MODES, "off"),
            resume="`--compile off` resumes a compiled run without it",
            other=("default",),
        ),
    ),
    *group(
        "accuracy levers beyond the report (off by default)",
        Option(
            ("--recipe",),
            "report",
            "a preset of the options below: report, the report's Table 1 (these at their "
            "defaults); {recipes}. Options given explicitly win",
            choices=("report", "best", "fast"),
            resume="its levers are set again, each under its own rule, as on a fresh run given "
            "the run's options and it: the levers of the run's own recipe that it does not set "
            "go back to their defaults, and an option the run was given a value of its own "
            "(`--lr2 2e-3`) keeps it; a Phase I lever (`--recipe fast`'s `--lr1`) keeps the "
            "run's value once Phase I is over, and the log says so",
            other=("best",),
        ),
        Option(
            ("--ema",),
            help="keep an exponential moving average of the weights (e.g. 0.999), validated "
            "beside them; best.pt takes the better",
            type=float,
            metavar="DECAY",
            presets={"best": 0.99, "fast": 0.99},
            resume="added: the average starts from the weights at hand; another decay: from the "
            "next step",
            other=("0.5",),
            check=decay,
        ),
        Option(
            ("--mixup",),
            0.0,
            "Phase II MixUp",
            type=float,
            metavar="ALPHA",
            other=("0.3",),
            check=alpha,
        ),
        Option(
            ("--cutmix",),
            0.0,
            "Phase II CutMix",
            type=float,
            metavar="ALPHA",
            other=("0.5",),
            check=alpha,
        ),
        Option(
            ("--lr-decay",),
            1.0,
            "Phase II: each ResNet stage learns FACTOR times as fast as the one above",
            type=float,
            metavar="FACTOR",
            presets={"best": 0.7, "fast": 0.7},
            resume="each parameter keeps its saved optimizer state in its new group",
            other=("0.7",),
            check=factor,
        ),
        Option(
            ("--keep-last",),
            0,
            "keep the last K epochs' checkpoints (for python -m twophase.average)",
            type=int,
            metavar="K",
            other=("2",),
            check=at_least(0),
        ),
        Option(
            ("--average-last",),
            0,
            "at the end, average the weights of the last K Phase II epochs into averaged.pt "
            "(batch norm measured again); it becomes best.pt if it validates better",
            type=int,
            metavar="K",
            presets={"best": 3, "fast": 3},
            other=("2",),
            check=epochs_to_average,
        ),
        Option(
            ("--tta",),
            "off",
            "auto: at the end, validate best.pt with and without horizontal-flip test-time "
            "augmentation and mark it with the better (evaluate.py and predict.py follow the "
            "mark)",
            choices=("off", "auto"),
            presets={"best": "auto", "fast": "auto"},
            other=("auto",),
        ),
        Option(
            ("--progressive",),
            1.0,
            "Phase II starts at FRACTION of --img-size and rises to it by --progressive-until of "
            "its epochs, in steps of --img-size / 7 (32 px at 224, 8 at 64); 1: off",
            type=float,
            metavar="FRACTION",
            resume="each epoch's image size is a function of the options and the epoch",
            other=("0.5",),
            check=share,
        ),
        Option(
            ("--progressive-until",),
            0.75,
            "the share of Phase II's epochs after which it trains at --img-size",
            type=float,
            metavar="SHARE",
            other=("0.5",),
            check=share,
        ),
        Option(
            ("--test-size",),
            "train",
            "auto: at the end, validate best.pt at --img-size and two steps larger, its batch "
            "norm as trained and measured again at each size, and mark it with the best "
            "(FixRes; evaluate.py and predict.py follow the mark)",
            choices=("train", "auto"),
            other=("auto",),
        ),
        Option(
            ("--max-params",),
            help="warn when the model has more parameters (e.g. 100M)",
            type=parameter_count,
            metavar="N",
            other=("1M",),
            check=at_least(1),
        ),
        Option(
            ("--l2sp",),
            0.0,
            "Phase II: L2-SP (Li et al., ICML 2018): the backbone pulled towards the weights the "
            "run started from, w0 (--weights, read again; none: 0), by the penalty "
            "(ALPHA/2)||w - w0||^2, in place of its --wd2, which the new head alone keeps; "
            "typically 0.01, the paper's for the backbone; 0: off",
            type=float,
            metavar="ALPHA",
            resume="added, changed or dropped: from the next step, towards the run's --weights "
            "read again (a Phase II checkpoint records which weights, and a file changed since is "
            "refused)",
            other=("0.01",),
            check=at_least(0, "must be 0 or more (0: off)"),
        ),
        Option(
            ("--sam",),
            0.0,
            "Phase II: sharpness-aware minimisation (Foret et al., ICLR 2021): each step takes "
            "its gradient again, on the same images, at the weights moved RHO along the first "
            "one, and steps with that; a second forward and backward a step, about twice the "
            "time; typically 0.05; 0: off",
            type=float,
            metavar="RHO",
            resume="added, changed or dropped: from the next step",
            other=("0.05",),
            check=at_least(0, "must be 0 or more (0: off)"),
        ),
    ),
    *group(
        AUGMENTATION,
        Option(
            ("--degrees",),
            AUGMENT.degrees,
            "affine rotation +-, always",
            type=float,
            resume="the augmentation is drawn anew each epoch from the options (all of its "
            "options alike)",
            other=("5",),
            check=at_least(0, "degrees +-: 0 or more"),
        ),
        Option(
            ("--translate",),
            AUGMENT.translate,
            "affine shift, share of the side",
            type=float,
            other=("0.05",),
            check=between(0, 1, "a share of the side, between 0 and 1"),
        ),
        Option(
            ("--scale",),
            list(AUGMENT.scale),
            "affine scale range",
            type=float,
            nargs=2,
            other=("0.8", "1.2"),
            check=low_high,
        ),
        Option(
            ("--shear",),
            AUGMENT.shear,
            "affine shear +-, degrees",
            type=float,
            other=("5",),
            check=half_open(0, 90, "degrees +-: {low} or more and less than {high}"),
        ),
        Option(
            ("--jitter",),
            AUGMENT.jitter,
            "brightness, contrast, saturation",
            type=float,
            other=("0.3",),
            check=between(0, 1, "a factor of 1 +- it: between 0 and 1"),
        ),
        Option(
            ("--hue",),
            AUGMENT.hue,
            "hue jitter",
            type=float,
            other=("0.05",),
            check=between(0, 0.5, "a share of the colour circle +-: between 0 and 0.5"),
        ),
        Option(
            ("--p-jitter",),
            AUGMENT.p_jitter,
            "probability of colour jitter",
            type=float,
            other=("0.2",),
            check=PROBABILITY,
        ),
        Option(
            ("--blur-sigma",),
            list(AUGMENT.blur_sigma),
            "3x3 blur sigma",
            type=float,
            nargs=2,
            other=("0.2", "1.0"),
            check=low_high,
        ),
        Option(
            ("--p-blur",),
            AUGMENT.p_blur,
            "probability of blur",
            type=float,
            other=("0.1",),
            check=PROBABILITY,
        ),
        Option(
            ("--p-hflip",),
            AUGMENT.p_hflip,
            "probability of a horizontal flip",
            type=float,
            other=("0.5",),
            check=PROBABILITY,
        ),
        Option(
            ("--p-vflip",),
            AUGMENT.p_vflip,
            "probability of a vertical flip",
            type=float,
            presets={"best": 0.0, "fast": 0.0},
            other=("0.1",),
            check=PROBABILITY,
        ),
    ),
    *group(
        "run",
        Option(
            ("--phase",),
            "all",
            "2 alone continues the run of <out>/phase1.pt, with its options",
            choices=("1", "2", "all"),
            resume="`--phase all` carries a Phase I run on into Phase II",
            other=("2",),
        ),
        Option(
            ("--out",),
            "checkpoints",
            "checkpoints and history.csv go here",
            resume="the run goes on in that folder",
            other=None,
            folder=True,
        ),
        Option(
            ("--save-every-steps",),
            0,
            "also save last.pt every N optimizer steps, mid-epoch (0: at epoch ends)",
            type=int,
            metavar="N",
            other=("3",),
            check=at_least(0, "must be 0 or more (0: none)"),
        ),
        Option(
            ("--find-lr",),
            False,
            "the LR range test alone: for each phase the command would train, --find-lr-steps "
            "optimizer steps of a copy of the model at rates rising from 1e-7 to 10, on the "
            "data with every option of the run; writes each loss curve (PNG and CSV) into the "
            "run's figures folder, prints the suggested --lr1 and --lr2 and exits without "
            "training (docs/options.md)",
            switch=True,
            rule=rules.this_command_only,
        ),
        Option(  # 100: fastai's, 12 rates a decade, and fewer steps than an epoch of most data
            ("--find-lr-steps",),
            100,
            "the range test's optimizer steps (--find-lr, and an auto --lr1 or --lr2), the data "
            "cycled where an epoch has fewer; it stops early where the loss diverges",
            type=int,
            metavar="N",
            resume="a range test still to run (an `auto` rate whose phase has not begun) takes "
            "that many steps",
            other=("20",),
            check=at_least(20, "the range test needs {low} steps or more to find a valley"),
        ),
        Option(
            ("--dist-timeout",),
            DIST_TIMEOUT,
            "under torchrun, how long a process waits for the others at each collective of "
            "training and validation (seconds, or 90s, 10m, 1h): one that stopped answering ends "
            "the run, saying so, rather than stalling every process (waiting for a machine's "
            "first process to build the cache has a budget of its own, "
            f"{typed_duration(LONG_WAIT)})",
            type=timeout,
            metavar="DURATION",
            resume="the processes of the continued run wait that long",
            other=("20m",),
            check=above(0),
        ),
        Option(
            ("--tensorboard",),
            help="write TensorBoard curves (losses, accuracies, lr, images/s each epoch; the "
            "training loss every --tensorboard-every steps) into DIR, or the run's folder; "
            "needs pip install tensorboard",
            nargs="?",
            const="",
            metavar="DIR",
            resume="a resumed run's curves go on from its step, not twice",
            other=None,
            folder=True,
        ),
        Option(
            ("--tensorboard-every",),
            50,
            "steps between losses",
            type=int,
            metavar="N",
            other=("10",),
            check=at_least(1),
        ),
        Option(
            ("--seed",),
            0,
            "init, data order, augmentation, val split",
            type=int,
            rule=rules.seed_rule,
            resume="it draws the held-out images and each epoch's order",
            other=("5",),
            check=between(0, 2**31 - 1),
        ),
        Option(
            ("--device",),
            "auto",
            choices=("auto", "cpu", "cuda", "mps"),
            other=("auto",),
        ),
        Option(
            ("--resume",),
            help="continue a run from its last.pt, in that checkpoint's folder: its saved options "
            "hold, and each option given here is applied to the rest of the run or refused "
            "(docs/checkpoints.md); auto: the run in --out goes on from its last.pt (or "
            "phase1.pt) where it has one, a fresh run starts where it has none, and a finished "
            "run is left as it is. Under torchrun's restarts a run goes on by itself",
            metavar="PATH|auto",
            rule=rules.this_command_only,
            unchecked="read before anything else, which says where no checkpoint is",
        ),
        Option(
            ("--overwrite",),
            False,
            "start over in an --out that holds a run: its checkpoints are deleted when the new "
            "run saves its first file (with --phase 2, all but phase1.pt, where Phase II starts "
            "again)",
            switch=True,
            rule=rules.this_command_only,
        ),
        Option(
            ("--demo",),
            False,
            "train a CPU-sized model on data/demo (scikit-learn digits): {demo}",
            switch=True,
            rule=rules.refused_always,
            resume="the demo's run is a throwaway",
        ),
    ),
)

BY_DEST = {option.dest: option for option in OPTIONS}


def preset(name):
    """The values a preset gives: --demo's ("demo") or a --recipe's ("best", "fast")."""
    return {o.dest: o.presets[name] for o in OPTIONS if name in o.presets}


DEMO = preset("demo")  # a CPU-sized run on scikit-learn's digits: no download
RECIPES = {name: preset(name) for name in PRESETS[1:]}
PHASE_EPOCHS = ("epochs1", "epochs2", "warmup_epochs", "cosine_epochs")


def get_args_parser(defaults=True):
    """train.py's parser, made from OPTIONS; its --help prints each option's default (Table 1).
    Without `defaults` it leaves out what was not given (resolve's: the help is the same)."""
    recipes = "; ".join(f"{name}: {flags(values)}" for name, values in RECIPES.items())
    demo = flags({k: v for k, v in DEMO.items() if k != "data"}, ", ")
    parser = argparse.ArgumentParser(
        description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups = {}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        keywords = option.argument()
        words = keywords["help"].format(recipes=recipes, demo=demo)
        keywords["help"] = with_default(words, option).replace("%", "%%")  # argparse's % format
        if not defaults:
            keywords["default"] = argparse.SUPPRESS
        groups[option.group].add_argument(*option.flags, **keywords)
    return parser


def with_default(words, option):
    """An option's help with its default beside it, as it is typed: the table's own value, so
    that the parser resolve reads what was given with prints it too."""
    if option.default is None or option.switch:
        return words
    return f"{words} (default: {rules.shown(option.default)})".lstrip()


def flags(values, between=" "):
    return between.join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())


def defaults():
    return {option.dest: option.default for option in OPTIONS}


def bad_values(options):
    """What is wrong with the options, as sentences for the parser's error."""
    for option in OPTIONS:
        value = options[option.dest]
        why = not finite(value) and "not a finite number"
        why = why or (option.check and value is not None and option.check(value))
        if why:
            yield f"{option.flag} {rules.shown(options[option.dest])}: {why}"
    if options["time_budget"] is not None and options["epochs"] is not None:
        yield "--time-budget chooses --epochs from the time: give one or the other"
    if options["time_budget"] is not None and options["phase"] == "1":
        yield "--time-budget plans both phases: with --phase 1, give --epochs1"


# ----------------------------------------------------------------------------- the docs' tables


def options_table():
    """docs/options.md's table of every option: its group, default and help."""
    lines = ["| option | default | what it does |", "| --- | --- | --- |"]
    for option in OPTIONS:
        unset = option.default is None or option.switch  # 0 is a default, False a switch's
        default = "" if unset else f"`{rules.shown(option.default)}`"
        words = option.help.format(recipes="see `--recipe best`, `--recipe fast`", demo="see above")
        names = ", ".join(f"`{f}`" for f in option.flags)
        words = words.replace("|", "\\|")  # a cell of the table
        lines.append(f"| {names} | {default} | {words} |")
    return lines


def continuing_table():
    """docs/checkpoints.md's table: each option's rule on a continued run, and how it plays out."""
    lines = ["| option | on a continued run | how |", "| --- | --- | --- |"]
    for option in OPTIONS:
        if not option.rule.saved:
            continue
        lines.append(f"| `{option.flag}` | {option.rule.words} | {option.resume} |")
    return lines


def docs_with_tables(folder):
    """{page path: its text with its generated table put in, between its markers}."""
    pages = {}
    for name, what, table in (
        ("options.md", "every option", options_table()),
        ("checkpoints.md", "every option on a continued run", continuing_table()),
    ):
        path = Path(folder) / name
        begin, end = f"<!-- {what}: made by python -m twophase.options --docs -->", "<!-- end -->"
        text = path.read_text()
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        pages[path] = head + begin + "\n" + "\n".join(table) + "\n" + end + tail
    return pages


if __name__ == "__main__":
    if sys.argv[1:] != ["--docs"]:
        raise SystemExit("python -m twophase.options --docs: writes the docs' tables of options")
    for path, text in docs_with_tables(Path(__file__).resolve().parents[1] / "docs").items():
        path.write_text(text)
        print(f"wrote {path}")
