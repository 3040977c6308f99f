"""Variants of tiny-transfer's target half, made for RESULTS.md, and the section they give:

    python benchmarks/variants.py make data/tiny-transfer/target  # target-lt, -wide, -small

    python benchmarks/variants.py results checkpoints/tiny-transfer \\
        --data data/tiny-transfer --results RESULTS.md

- target-lt: a long-tailed cut of train/: the classes, in an order drawn once, keep 200 down to
  20 of their images (an exponential decay: 10 times between the largest and the smallest),
  with val/ and test/ as they are, balanced, so that a model that neglects the small classes
  shows it. The images are links to the originals.
- target-wide: every photo on a 3:2 canvas (96 x 64), at an offset drawn for it and its edge
  pixels stretched over the rest, in train/, val/ and test/: photos that are not square, their
  subject off centre. A centre crop loses up to a quarter of the photo; squish keeps all of it,
  narrowed.
- target-small: the first 60 training and 20 validation images of each class, test/ as it is:
  the time-to-accuracy runs (benchmarks/time_to_accuracy.py), at a CPU's pace.
- target-few: the small data a student brings: 20 classes (the first by folder name) of 30
  training photos each (600), their 50 validation and 50 test photos (test/ flat, answers.csv
  of those alone): the levers and the learning rates on small data (benchmarks/small_data.py).
- target-two: two classes of 120 training and 40 validation photos each (240 and 80, the size of
  the PyTorch transfer-learning tutorial's ants and bees), their test photos likewise.

The runs are benchmarks/tiny_transfer.sh's `long-tail` and `aspect` steps; each is scored as its
user would submit it (best.pt through predict.py's path): test accuracy and balanced accuracy.
"""

import argparse
import hashlib
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import list_images, list_labelled_images, ordered_classes  # noqa: E402
from levers import test_accuracy  # noqa: E402
from twophase.checkpoint import load_checkpoint  # noqa: E402
from twophase.options import get_args_parser  # noqa: E402
from twophase.report import write_section  # noqa: E402
from twophase.table1 import command_of  # noqa: E402
from utils import exits_on_problems  # noqa: E402

LARGEST, SMALLEST = 200, 20
LONG_TAIL = [  # (row, run folder)
    ("the method", "lt-none-s{seed}"),
    ("--class-weights auto", "lt-weights-s{seed}"),
    ("--sampler balanced", "lt-balanced-s{seed}"),
]
ASPECT = [
    ("--resize crop (the report's)", "wide-crop-s{seed}"),
    ("--resize squish", "wide-squish-s{seed}"),
    ("--resize pad", "wide-pad-s{seed}"),
]


def long_tail_counts(classes, seed=0):
    """Each class's share of the cut: LARGEST down to SMALLEST, exponentially, in an order of the
    classes drawn from `seed`."""
    order = np.random.default_rng(seed).permutation(len(classes))
    ratio = SMALLEST / LARGEST
    steps = [ratio ** (rank / (len(classes) - 1)) for rank in range(len(classes))]
    return {classes[i]: round(LARGEST * steps[rank]) for rank, i in enumerate(order)}


def make_long_tail(target, out, seed=0):
    """target-lt: train/ cut to long_tail_counts (links), the rest linked as it is."""
    classes = ordered_classes([d.name for d in (target / "train").iterdir() if d.is_dir()])
    counts = long_tail_counts(classes, seed)
    files = list_labelled_images(target / "train", classes)
    kept = {c: 0 for c in classes}
    for f in files:  # sorted: a class keeps its first images
        c = f.split("/", 1)[0]
        if kept[c] < counts[c]:
            link(target / "train" / f, out / "train" / f)
            kept[c] += 1
    for name in ("val", "test", "answers.csv", "class_names.csv"):
        if (target / name).exists() and not (out / name).exists():
            os.symlink((target / name).resolve(), out / name)
    return sum(kept.values())


def make_small(target, out, per_class=60, val_per_class=20):
    """target-small: the first `per_class` training and `val_per_class` validation images of each
    class (by name; links), test/ as it is: the runs that compare recipes against the clock on
    a CPU, a quarter of an epoch's minutes, a fifth of a validation's. Returns the training
    images."""
    kept = 0
    for split, keep in (("train", per_class), ("val", val_per_class)):
        for c in sorted(d.name for d in (target / split).iterdir() if d.is_dir()):
            for f in sorted(p.name for p in (target / split / c).iterdir())[:keep]:
                link(target / split / c / f, out / split / c / f)
                kept += split == "train"
    for name in ("test", "answers.csv", "class_names.csv"):
        if (target / name).exists() and not (out / name).exists():
            os.symlink((target / name).resolve(), out / name)
    return kept


def make_few(target, out, classes, per_class, val_per_class):
    """A cut of the first `classes` classes (by folder name, as sorted): the first `per_class`
    training and `val_per_class` validation images of each (links), their test images (test/
    flat, links) and answers.csv of those alone. Returns the training images."""
    kept = sorted(d.name for d in (target / "train").iterdir() if d.is_dir())[:classes]
    for split, keep in (("train", per_class), ("val", val_per_class)):
        for c in kept:
            for f in sorted(p.name for p in (target / split / c).iterdir())[:keep]:
                link(target / split / c / f, out / split / c / f)
    lines = (target / "answers.csv").read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[1] in kept]
    for row in rows:
        name = row.split(",")[0] + ".jpg"
        link(target / "test" / name, out / "test" / name)
    (out / "answers.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    return classes * per_class


def link(source, destination):
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not destination.exists():
        os.symlink(source.resolve(), destination)


def widened(image, name):
    """The photo on a 3:2 canvas, at an offset drawn from its name, its edges stretched."""
    pixels = np.asarray(image.convert("RGB"))
    h, w, _ = pixels.shape
    spare = w // 2
    left = int(hashlib.sha256(name.encode()).hexdigest(), 16) % (spare + 1)
    return Image.fromarray(np.pad(pixels, ((0, 0), (left, spare - left), (0, 0)), mode="edge"))


def make_wide(target, out):
    """target-wide: every image of train/, val/ and test/ widened (PNG, the names kept)."""
    made = 0
    for split in ("train", "val"):
        for f in list_labelled_images(target / split, sorted(os.listdir(target / split))):
            made += save_widened(target / split / f, out / split / f)
    for f in list_images(target / "test"):
        made += save_widened(target / "test" / f, out / "test" / f)
    for name in ("answers.csv", "class_names.csv"):
        if (target / name).exists() and not (out / name).exists():
            os.symlink((target / name).resolve(), out / name)
    return made


def save_widened(source, destination):
    destination = destination.with_suffix(".png")
    if destination.exists():
        return 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        widened(image, source.name).save(destination)
    return 1


# ----------------------------------------------------------------------------- the section


def section(runs_dir, rows, answers_of, seeds=(0, 1)):
    """A table of test and balanced accuracy by seed for the finished runs of `rows`, with each
    row's mean and its gain over the first row; and the commands."""
    defaults = vars(get_args_parser().parse_args([]))
    head = " | ".join(f"seed {s}: test | balanced" for s in seeds)
    lines = [
        f"| run | {head} | mean test | mean balanced | gain (test, balanced) |",
        "| --- |" + " ---: | ---: |" * len(seeds) + " ---: | ---: | ---: |",
    ]
    base, commands = None, []
    for label, pattern in rows:
        folders = [runs_dir / pattern.format(seed=s) for s in seeds]
        done = [f for f in folders if (f / "done").is_file()]
        if not done:
            continue
        scores = [test_accuracy(f / "best.pt", answers_of(f), use="auto", tta=None) for f in done]
        cells = []
        for f in folders:
            if f in done:
                correct, total, _, balanced = scores[done.index(f)]
                cells.append(f"{correct / total:.4f} ({correct}/{total}) | {balanced:.4f}")
            else:
                cells.append("not run | ")
        plain = statistics.mean(c / t for c, t, *_ in scores)
        balanced = statistics.mean(s[3] for s in scores)
        base = base or (plain, balanced)
        gain = (
            f"{100 * (plain - base[0]):+.2f}, {100 * (balanced - base[1]):+.2f} points"
            if (plain, balanced) != base
            else ""
        )
        lines.append(f"| {label} | {' | '.join(cells)} | {plain:.4f} | {balanced:.4f} | {gain} |")
        state = load_checkpoint(done[0] / "best.pt")
        commands.append(f"- {label}: `{command_of(state, defaults)}`")
    return lines, commands


def backbone_of(runs_dir, rows, seeds=(0, 1)):
    """What the finished runs of `rows` were fine-tuned from: a sentence naming the checkpoint,
    with its epochs and best validation accuracy where it is a train.py run (None if no run)."""
    folders = (runs_dir / pattern.format(seed=s) for _, pattern in rows for s in seeds)
    finished = next((f for f in folders if (f / "done").is_file()), None)
    if finished is None:
        return None
    weights = load_checkpoint(finished / "best.pt")["args"].get("weights")

    history = None
    if weights and Path(weights).is_file():  # a train.py run, or a plain state dict
        history = load_checkpoint(weights).get("history")
    if not history:
        return f"Fine-tuned from `{weights}`."
    best = max(r["val_acc"] for r in history)

    return (
        f"Fine-tuned from `{weights}`: {len(history)} epochs of pretraining, best validation "
        f"accuracy {best:.4f} on its own classes."
    )


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    make = sub.add_parser(
        "make", help="write target-lt, -wide, -small, -few and -two beside TARGET"
    )
    make.add_argument("target", type=Path)
    results = sub.add_parser("results", help="the section of the finished runs")
    results.add_argument("runs", type=Path, help="the runs' folder (tiny_transfer.sh's)")
    results.add_argument("--data", type=Path, required=True, help="holds target-lt, target-wide")
    results.add_argument("--results", default=None, help="write the section into this report")
    args = p.parse_args(argv)
    if args.what == "make":
        lt = make_long_tail(args.target, args.target.with_name("target-lt"))
        wide = make_wide(args.target, args.target.with_name("target-wide"))
        small = make_small(args.target, args.target.with_name("target-small"))
        few = make_few(args.target, args.target.with_name("target-few"), 20, 30, 50)
        two = make_few(args.target, args.target.with_name("target-two"), 2, 120, 40)
        print(
            f"target-lt: {lt} training images; target-wide: {wide} images written; "
            f"target-small: {small}, target-few: {few}, target-two: {two} training images"
        )
        return
    parts = []
    for title, rows, variant in (
        ("A long-tailed cut (200 to 20 training images a class)", LONG_TAIL, "target-lt"),
        ("Photos that are not square (3:2, subject off centre)", ASPECT, "target-wide"),
    ):
        answers = args.data / variant / "answers.csv"
        lines, commands = section(args.runs, rows, lambda folder, a=answers: a)
        if len(lines) > 2:
            parts += [
                f"**{title}**",
                "",
                backbone_of(args.runs, rows),
                "",
                *lines,
                "",
                "Commands (seed 0; seed 1 adds `--seed 1`):",
                "",
                *commands,
                "",
            ]
    text = "\n".join(parts)
    if args.results and parts:
        write_section(
            args.results, "variants", "Uneven classes and photos that are not square", text
        )
    print(text)


if __name__ == "__main__":
    main()
