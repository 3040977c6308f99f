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
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from data import CachedImages, build_cache, default_cache_dir, list_images, make_loader
from inference import (
    add_inference_args,
    confusion_matrix,
    load_trained,
    most_confused,
    print_confused,
)
from utils import atomic_file, load_checkpoint, log


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


def test_images(test_dir):
    """The images of a flat test folder, refusing names that would give two rows the same id."""
    if not test_dir.is_dir():
        raise SystemExit(f"no test folder {test_dir} (use --test-dir or --data)")
    files = list_images(test_dir)
    if not files:
        raise SystemExit(f"{test_dir} holds no images")
    subfolders = sorted(
        p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if subfolders:
        log(
            f"warning: {test_dir} is read flat; its sub-folders are ignored: "
            f"{', '.join(subfolders[:5])}"
        )
    files.sort(key=lambda f: Path(f).stem)  # the order of the CSV's image_name column
    stems = Counter(Path(f).stem for f in files)
    clashes = sorted(f for f in files if stems[Path(f).stem] > 1)
    if clashes:
        raise SystemExit(
            f"{test_dir}: these files share a name once the extension is dropped, so their rows "
            f"would clash: {', '.join(clashes[:10])}"
        )
    return files


def read_rows(path):
    """The rows of a CSV in the submission format, header checked; SystemExit if unreadable."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise SystemExit(f"cannot read {path}: {e}") from None
    if not rows or rows[0] != ["image_name", "pred_label"]:
        found = ",".join(rows[0]) if rows else "nothing"
        raise SystemExit(f"{path}: the header must be image_name,pred_label (found {found})")
    return [row for row in rows[1:] if row]  # a blank line is no row


def read_answers(path, classes):
    """The true labels of a held-out set (the submission format), checked: one row per image,
    labels among `classes`; SystemExit naming every problem."""
    answers = read_rows(path)
    names = {row[0] for row in answers}
    problems = check_predictions(answers, names, classes, "answers")
    if problems:
        raise SystemExit(f"{path}: " + "; ".join(problems[:20]))
    return answers


def check_predictions(rows, expected, classes, missing_is="missing"):
    """Problems of a prediction CSV's rows, as sentences: each name of `expected` once, no other
    name, two fields a row, labels among `classes`. None means it is complete and well-formed."""
    problems = []
    known = set(classes)
    for n, row in enumerate(rows, start=2):
        if len(row) != 2:
            problems.append(f"line {n}: expected 2 fields, found {len(row)}")
        elif row[1] not in known:
            problems.append(f"line {n}: {row[1]!r} is not one of the checkpoint's classes")
    seen = Counter(row[0] for row in rows if row)
    problems += [f"{name}: {count} rows" for name, count in sorted(seen.items()) if count > 1]
    problems += [f"{name}: not among the {missing_is}" for name in sorted(set(seen) - expected)]
    problems += [f"{name}: missing" for name in sorted(expected - set(seen))]
    return problems


def score(rows, answers, classes, top=10):
    """Accuracy of well-formed prediction rows against the true labels: (correct, images, the
    `top` most confused class pairs)."""
    truth = dict(answers)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[truth[name]] for name, _ in rows]
    predicted = [index[label] for _, label in rows]
    correct = sum(t == p for t, p in zip(labels, predicted))
    counts = confusion_matrix(labels, predicted, len(classes), normalize=False)
    return correct, len(rows), most_confused(counts, classes, top)


def check(args, files, classes):
    """--check: the CSV against the test folder and the classes, and with --answers its score."""
    rows = read_rows(args.check)
    problems = check_predictions(rows, {Path(f).stem for f in files}, classes, "test images")
    if args.answers and not problems:
        answers = read_answers(args.answers, classes)
        problems = check_predictions(rows, {r[0] for r in answers}, classes, "answers")
    for problem in problems:
        log(f"{args.check}: {problem}")
    if problems:
        raise SystemExit(1)
    log(f"{args.check}: {len(rows)} rows, one per test image, all labels known")
    if args.answers:
        correct, total, confused = score(rows, answers, classes)
        print(
            f"{args.check}: accuracy {correct / total:.4f} ({correct}/{total}) against "
            f"{args.answers}"
        )
        print_confused(confused)


def predicted_rows(trained, test_dir, files, cache_dir, threads, batch_size, skip_bad=False):
    """(image name, predicted class) of each readable image of the test folder, as a generator
    that predicts batch by batch, and how many images were unreadable (an error unless
    skip_bad). The images go through the checkpoint's preprocessing, cached."""
    cache_dir = cache_dir or default_cache_dir(test_dir.parent)
    cache = build_cache(test_dir, files, trained.img_size, cache_dir, threads)
    if cache.skipped and not skip_bad:
        raise SystemExit(
            f"{len(cache.skipped)} unreadable test image(s), nothing written: "
            + "; ".join(f"{test_dir / f} ({why})" for f, why in list(cache.skipped.items())[:10])
            + "\n(--skip-bad leaves them out of the CSV)"
        )
    dataset = CachedImages(cache, np.zeros(len(cache), dtype=np.int64))  # unlabelled
    loader = make_loader(dataset, batch_size, False, pin_memory=trained.device.type == "cuda")
    names = iter(Path(f).stem for f in cache.files)

    def rows():
        for log_p, _ in trained.log_probs(loader):
            for label in log_p.argmax(1).tolist():
                yield next(names), trained.classes[label]

    return rows(), len(cache.skipped)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = load_checkpoint(args.ckpt)
    data_dir = Path(args.data or state["data"])
    test_dir = Path(args.test_dir) if args.test_dir else data_dir / "test"
    files = test_images(test_dir)
    if args.check:
        return check(args, files, state["classes"])
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
