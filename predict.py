"""Predict the class of every test image: a CSV `image_name,pred_label` on standard output.

    python predict.py > prediction.csv            # <data>/test with checkpoints/best.pt
    python predict.py --test-dir photos/ --out prediction.csv
    python predict.py --check prediction.csv      # is a CSV complete and well-formed?
    python predict.py --check prediction.csv --answers answers.csv   # ... and how accurate?

image_name is the file name without its extension and pred_label the class folder name; one row
per image, sorted by name. Progress and messages go to standard error.
"""

import argparse
import csv
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from checkpoint import load_checkpoint
from data import trained_data_root, why_unreadable
from inference import (
    add_inference_args,
    check_predictions,
    load_trained,
    predicted_rows,
    print_confused,
    read_answers,
    read_rows,
    score,
    test_images,
)
from utils import atomic_file, log


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_inference_args(p)
    p.add_argument(
        "--test-dir", default=None, help="folder of images to predict (default: <data>/test)"
    )
    p.add_argument(
        "--out", default=None, help="write the CSV to this file instead of standard output"
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
        help="validate a prediction CSV against the test folder and the checkpoint's classes "
        "(one row per readable image)",
    )
    p.add_argument(
        "--answers",
        metavar="CSV",
        default=None,
        help="with --check: the true labels, in the same format; prints the exact accuracy and "
        "the most confused pairs",
    )
    return p


def check(args, test_dir, files, classes):
    """--check: the CSV against the test folder and the classes, and with --answers its score.
    An image the CSV leaves out is a problem unless it is unreadable (as --skip-bad leaves it)."""
    rows = read_rows(args.check)
    stems = {Path(f).stem: f for f in files}
    left_out = set(stems) - {row[0] for row in rows if row}
    unreadable = {stem for stem in left_out if why_unreadable(test_dir / stems[stem])}
    expected = set(stems) - unreadable
    problems = check_predictions(rows, expected, classes, "test images")
    if args.answers and not problems:
        answers = read_answers(args.answers, classes)
        scored = {r[0] for r in answers} - unreadable
        problems = check_predictions(rows, scored, classes, "answers")
    for problem in problems:
        log(f"{args.check}: {problem}")
    if problems:
        raise SystemExit(1)
    skipped = f", {len(unreadable)} unreadable left out" if unreadable else ""
    log(f"{args.check}: {len(rows)} rows, one per readable test image{skipped}, all labels known")
    if args.answers:
        correct, total, confused = score(rows, answers, classes)
        print(
            f"{args.check}: accuracy {correct / total:.4f} ({correct}/{total}) against "
            f"{args.answers}"
            + (f" (the {len(unreadable)} unreadable images not counted)" if unreadable else "")
        )
        print_confused(confused)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = load_checkpoint(args.ckpt)
    test_dir = Path(args.test_dir or trained_data_root(args.data, state) / "test")
    files = test_images(test_dir)
    if args.check:
        return check(args, test_dir, files, state["classes"])
    trained = load_trained(args, state)
    rows, skipped = predicted_rows(
        trained,
        test_dir,
        files,
        args.cache_dir,
        args.cache_workers,
        args.batch_size,
        args.skip_bad,
    )
    try:
        count, seconds = write_predictions(args.out, rows)
    except BrokenPipeError:  # `predict.py | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    log(
        f"predicted {count} images in {seconds:.1f} s ({count / seconds:.0f} images/s) "
        f"with {args.ckpt}"
        + (f"; {skipped} unreadable images left out" if skipped else "")
        + (f" -> {args.out}" if args.out else "")
    )


def write_predictions(path, rows):
    """Rows streamed as they come: memory stays flat in the number of images. A file appears
    under `path` only once complete. Returns (rows, seconds)."""
    with atomic_file(path, "w", newline="") if path else nullcontext(sys.stdout) as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image_name", "pred_label"])
        start, count = time.perf_counter(), 0
        for row in rows:
            writer.writerow(row)
            count += 1
        seconds = time.perf_counter() - start
        out.flush()
    return count, seconds


if __name__ == "__main__":
    main()
