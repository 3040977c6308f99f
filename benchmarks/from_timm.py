"""A ResNet trained by timm's train.py, as a checkpoint of this project: evaluate.py and
predict.py then score it exactly as they score ours (RESULTS.md compares the two this way).

    python benchmarks/from_timm.py TIMM_OUTPUT --data DATA --out checkpoints/timm/best.pt \\
        --command "python train.py ..." --wall-seconds 1234

TIMM_OUTPUT is the folder timm's train.py wrote: summary.csv (one row per epoch; with
--model-ema, the moving average's validation) and the best epoch's checkpoint-N.pth.tar (else
model_best.pth.tar), with torchvision's key names for a ResNet (with --model-ema, its moving
average as well, which evaluate.py and predict.py then use). DATA is the dataset it trained on:
its train/ folder gives the class order. timm orders class folders by a natural sort; the head's
rows are put into this project's order (numeric when every name is an integer, else
lexicographic).
"""

import argparse
import csv
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import find_classes  # noqa: E402
from twophase.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from twophase.checkpoint import make_checkpoint, save_checkpoint, write_history_csv  # noqa: E402
from utils import exits_on_problems  # noqa: E402


def natural_key(name):
    """timm's ImageFolder order: runs of digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def summary_rows(timm_output):
    """An epoch's row, the last of its rows where a resumed run trained it again."""
    with open(Path(timm_output) / "summary.csv", newline="") as f:  # a resumed run repeats
        rows = {r["epoch"]: r for r in csv.DictReader(f) if r["epoch"] != "epoch"}  # the header
    return sorted(rows.values(), key=lambda r: int(r["epoch"]))


def history_of(timm_output, wall_seconds):
    """timm's summary.csv as this project's per-epoch records (accuracies as fractions)."""
    rows = summary_rows(timm_output)
    return [
        {
            "phase": 2,
            "epoch": i + 1,
            "lr": float(r["lr"]),
            "train_loss": float(r["train_loss"]),
            "train_acc": math.nan,  # timm does not record it
            "val_loss": float(r["eval_loss"]),
            "val_acc": float(r["eval_top1"]) / 100,
            "val_top5": float(r["eval_top5"]) / 100,
            "images_per_s": math.nan,
            "seconds": wall_seconds / len(rows),
            "val_seconds": 0.0,
        }
        for i, r in enumerate(rows)
    ]


def convert(timm_output, data, command, wall_seconds):
    timm_output = Path(timm_output)
    history = history_of(timm_output, wall_seconds)
    best = max(range(len(history)), key=lambda i: history[i]["val_acc"])
    # The best epoch's own checkpoint: a resumed timm run's model_best.pth.tar is the best of the
    # epochs after the resume only.
    best_path = timm_output / f"checkpoint-{best}.pth.tar"
    if not best_path.is_file():
        best_path = timm_output / "model_best.pth.tar"
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm saves its arguments so
        saved = torch.load(best_path, map_location="cpu", weights_only=True)
    if saved["epoch"] != best:
        raise SystemExit(f"{best_path} holds epoch {saved['epoch']}; summary.csv's best is {best}")
    timm_args = vars(saved["args"])
    classes = find_classes(Path(data) / "train")
    timm_order = sorted(classes, key=natural_key)
    rows = torch.tensor([timm_order.index(c) for c in classes])  # our class i is timm's rows[i]

    def ours(weights):  # the head's rows in this project's class order
        weights = dict(weights)
        weights["fc.weight"], weights["fc.bias"] = (
            weights["fc.weight"][rows],
            weights["fc.bias"][rows],
        )
        return weights

    # With --model-ema, timm validates the moving average and picks its best epoch by it: the
    # checkpoint holds both, as ours do, marked to be evaluated with the average.
    ema = {"model": ours(saved["state_dict_ema"])} if saved.get("state_dict_ema") else None
    size = timm_args.get("img_size") or (timm_args.get("input_size") or [3, 224, 224])[-1]
    about = dict(arch=saved["arch"], classes=classes, img_size=size, data=str(data))
    about |= dict(
        mean=list(timm_args.get("mean") or IMAGENET_MEAN),
        std=list(timm_args.get("std") or IMAGENET_STD),
    )
    args = {"optimizer2": f"timm {timm_args['opt']}", "amp": "off", "seed": timm_args["seed"]}
    device = "cpu" if timm_args.get("device") == "cpu" else "cuda"
    state = make_checkpoint(
        ours(saved["state_dict"]),
        about,
        args,
        history[: best + 1],  # history.csv beside it holds every epoch
        (2, best + 1),
        ema=ema,
        training={"device": device, "eval_weights": "ema" if ema else "model"},
        command=command,
        wall_seconds=wall_seconds,
    )
    return state, history


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("timm_output", help="the folder timm's train.py wrote")
    p.add_argument("--data", required=True, help="the dataset root it trained on")
    p.add_argument("--out", required=True, help="the checkpoint to write (e.g. .../best.pt)")
    p.add_argument("--command", default="", help="the timm command line, for the report")
    p.add_argument("--wall-seconds", type=float, default=math.nan, help="how long the run took")
    args = p.parse_args(argv)
    state, history = convert(args.timm_output, args.data, args.command, args.wall_seconds)
    save_checkpoint(state, args.out)
    write_history_csv(history, Path(args.out).parent / "history.csv")
    print(
        f"wrote {args.out}: {state['arch']}, {len(state['classes'])} classes, best epoch "
        f"{state['epoch']} (val acc {state['history'][-1]['val_acc']:.4f})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
