"""Predict the class of every test image: a CSV on standard output, in the layout a grader asks.

    python predict.py > prediction.csv            # <data>/test with checkpoints/best.pt
    python predict.py --test-dir photos/ --out prediction.csv
    python predict.py cat.jpg dog.png              # a few images, none cached, said in words
    python predict.py --columns id,breed --keep-ext --topk 3 --probs probs.csv > submission.csv
    python predict.py --check prediction.csv      # is a CSV complete and well-formed?
    python predict.py --check prediction.csv --answers answers.csv   # ... and how accurate?

By default the header is image_name,pred_label, image_name the file name without its extension
and pred_label the class name; one row per image, sorted by name. Progress and messages go to
standard error.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from data import trained_data_root
from twophase.checkpoint import load_checkpoint
from twophase.checks import at_least, checked
from twophase.data_check import test_copies_line
from twophase.image_cache import why_unreadable
from twophase.inference import (
    add_inference_args,
    load_trained,
    predict_folder,
    predict_images,
    print_confused,
    test_images,
)
from twophase.submission import (
    Layout,
    Names,
    describe,
    missing,
    read_answers,
    read_predictions,
    score,
    write,
)
from utils import exits_on_problems, log


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "images", nargs="*", metavar="IMAGE", help="image files to predict instead of a folder"
    )
    add_inference_args(p)
    p.add_argument(
        "--test-dir", default=None, help="folder of images to predict (default: <data>/test)"
    )
    p.add_argument(
        "--out", default=None, help="write the CSV to this file instead of standard output"
    )
    p.add_argument(
        "--columns",
        type=Layout.parse_columns,
        default=Layout.columns,
        metavar="IMAGE,LABEL",
        help="the CSV's two column names (default: image_name,pred_label)",
    )
    p.add_argument(
        "--keep-ext", action="store_true", help="name each image with its extension (x.jpg, not x)"
    )
    p.add_argument(
        "--topk",
        type=checked(int, at_least(1)),
        default=1,
        metavar="K",
        help="the label column holds the K likeliest classes, best first, space-separated",
    )
    p.add_argument(
        "--probs",
        metavar="FILE",
        default=None,
        help="also write FILE: a row per image, a column per class (named by the class), the "
        "probabilities, which sum to 1 (Kaggle's layout for a log-loss)",
    )
    p.add_argument(
        "--words",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="for image files given as arguments: each one's likeliest classes with their "
        "probabilities, in words, on standard error (standard output stays the CSV); by "
        "default where standard error is a terminal",
    )
    p.add_argument("--cache-dir", default=None, help="default: .cache beside the test folder")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable images out of the CSV instead of stopping",
    )
    p.add_argument(
        "--check",
        metavar="CSV",
        default=None,
        help="validate a prediction CSV (any of the layouts above) against the test folder and "
        "the checkpoint's classes: one row per readable image",
    )
    p.add_argument(
        "--answers",
        metavar="CSV",
        default=None,
        help="with --check: the true labels (image and label columns; names with or without "
        "their extension); prints the exact accuracy, the balanced accuracy and the most "
        "confused pairs",
    )
    return p


def check(args, test_dir, files, classes):
    """--check: the CSV against the test folder and the classes, and with --answers its score.
    An image the CSV leaves out is a problem unless it is unreadable (as --skip-bad leaves it)."""
    names = Names(files, test_dir)
    predictions = read_predictions(args.check, names, classes)
    unreadable = {f for f in set(files) - set(predictions.labels) if why_unreadable(test_dir / f)}
    expected = set(files) - unreadable
    answers = read_answers(args.answers, names, classes) if args.answers else None
    problems = predictions.problems + missing(predictions.labels, expected)
    if answers is not None:
        problems += missing(predictions.labels, set(answers) - unreadable)
    for problem in problems:
        log(f"{args.check}: {problem}")
    if problems:
        raise SystemExit(1)
    skipped = f", {len(unreadable)} unreadable left out" if unreadable else ""
    kind = "probabilities" if predictions.probabilities else "labels"
    log(f"{args.check}: {len(predictions.labels)} rows of {kind}, one per readable image{skipped}")
    if answers is not None:
        scored = {f: answers[f] for f in answers if f not in unreadable}
        result = score(predictions.labels, scored, classes)
        partial = len(scored) < len(expected)
        print(
            f"{args.check}: {describe(result)} against {args.answers}"
            + (f" (the {len(unreadable)} unreadable images not counted)" if unreadable else "")
            + (f" ({len(scored)} of the {len(expected)} images have answers)" if partial else "")
        )

        print_confused(result.confused)


@exits_on_problems
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = load_checkpoint(args.ckpt)
    classes = len(state["classes"])
    if args.topk > classes:
        log(f"--topk {args.topk}: the model has {classes} classes, so each row holds all {classes}")
    layout = Layout(args.columns, args.keep_ext, min(args.topk, classes))
    if args.images:
        if args.check or args.test_dir:
            raise SystemExit("give image files, or --test-dir / --check, not both")
        trained = load_trained(args, state)
        rows = predict_images(trained, args.images, args.batch_size, args.keep_ext)
        if args.words is not False and (args.words or sys.stderr.isatty()):
            rows = in_words(rows, trained.classes, max(3, layout.topk))
        return predict_to(args, layout, trained, rows)
    test_dir = Path(args.test_dir or trained_data_root(args.data, state) / "test")
    files = test_images(test_dir, keep_ext=args.keep_ext or bool(args.check))
    if args.check:
        return check(args, test_dir, files, state["classes"])
    trained = load_trained(args, state)
    if copies := test_copies_line(
        state, test_dir, files, args.cache_dir, args.cache_workers, args.data
    ):
        log(copies)
    rows, skipped = predict_folder(
        trained, test_dir, files, args.cache_dir, args.cache_workers, args.batch_size, args.skip_bad
    )
    predict_to(args, layout, trained, rows, skipped)


def in_words(rows, classes, k):
    """The rows as they go by, each image's k likeliest classes said on standard error with their
    probabilities: `leopard 86.2 % · jaguar 5.1 % · cheetah 2.0 %`."""
    for file, p in rows:
        best = np.argsort(-p, kind="stable")[: min(k, len(classes))]
        log(f"{file}: " + " · ".join(f"{classes[i]} {100 * p[i]:.1f} %" for i in best))
        yield file, p


def predict_to(args, layout, trained, rows, skipped=0):
    """The predictions written as --out, --probs and the layout say, and a line on how fast."""
    try:
        count, seconds = write(rows, trained.classes, layout, args.out, args.probs)
    except BrokenPipeError:  # `predict.py | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    log(
        f"predicted {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s) "
        f"with {args.ckpt}"
        + (f"; {skipped} unreadable images left out" if skipped else "")
        + (f" -> {args.out}" if args.out else "")
        + (f", probabilities -> {args.probs}" if args.probs else "")
    )


if __name__ == "__main__":
    main()
