"""Predict the class of every test image: a CSV `image_name,pred_label` on standard output.

    python predict.py > prediction.csv            # <data>/test with checkpoints/best.pt
    python predict.py --test-dir photos/ --out prediction.csv
    python predict.py --check prediction.csv      # is a CSV complete and well-formed?

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
from inference import add_inference_args, load_trained
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


def check_predictions(csv_path, files, classes):
    """Problems of a prediction CSV, as sentences; none means it is complete and well-formed."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        return [f"cannot read {csv_path}: {e}"]
    if not rows or rows[0] != ["image_name", "pred_label"]:
        return [
            "the header must be image_name,pred_label "
            f"(found {','.join(rows[0]) if rows else 'nothing'})"
        ]
    problems = []
    expected = {Path(f).stem for f in files}
    seen = Counter(row[0] for row in rows[1:] if row)
    known = set(classes)
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            problems.append(f"line {n}: expected 2 fields, found {len(row)}")
        elif row[1] not in known:
            problems.append(f"line {n}: {row[1]!r} is not one of the checkpoint's classes")
    problems += [f"{name}: {count} rows" for name, count in sorted(seen.items()) if count > 1]
    problems += [f"{name}: no such test image" for name in sorted(set(seen) - expected)]
    problems += [f"{name}: missing" for name in sorted(expected - set(seen))]
    return problems


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = load_checkpoint(args.ckpt)
    data_dir = Path(args.data or state["data"])
    test_dir = Path(args.test_dir) if args.test_dir else data_dir / "test"
    files = test_images(test_dir)
    if args.check:
        problems = check_predictions(args.check, files, state["classes"])
        for problem in problems:
            log(f"{args.check}: {problem}")
        if problems:
            raise SystemExit(1)
        log(f"{args.check}: {len(files)} rows, one per test image, all labels known")
        return

    cache = build_cache(
        test_dir,
        files,
        state["img_size"],
        args.cache_dir or default_cache_dir(test_dir.parent),
        args.cache_workers,
    )
    if cache.skipped and not args.skip_bad:
        raise SystemExit(
            f"{len(cache.skipped)} unreadable test image(s), nothing written: "
            + "; ".join(f"{test_dir / f} ({why})" for f, why in list(cache.skipped.items())[:10])
            + "\n(--skip-bad leaves them out of the CSV)"
        )
    trained = load_trained(args, state)
    dataset = CachedImages(cache, np.zeros(len(cache), dtype=np.int64))  # unlabelled
    loader = make_loader(dataset, args.batch_size, False, pin_memory=trained.device.type == "cuda")
    try:
        rows, seconds = write_predictions(
            args.out,
            trained.log_probs(loader, args.tta),
            [Path(f).stem for f in cache.files],
            trained.classes,
        )
    except BrokenPipeError:  # `predict.py | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    log(
        f"predicted {rows} images in {seconds:.1f} s ({rows / seconds:.0f} images/s) "
        f"with {args.ckpt}"
        + (f"; {len(cache.skipped)} unreadable images left out" if cache.skipped else "")
        + (f" -> {args.out}" if args.out else "")
    )


def write_predictions(path, log_probs, names, classes):
    """Rows streamed as the batches come: memory stays flat in the number of images. A file
    appears under `path` only once complete."""
    with atomic_file(path, "w", newline="") if path else nullcontext(sys.stdout) as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image_name", "pred_label"])
        start, row = time.perf_counter(), 0
        for log_p, _ in log_probs:
            for label in log_p.argmax(1).tolist():
                writer.writerow([names[row], classes[label]])
                row += 1
        seconds = time.perf_counter() - start
        out.flush()
    return row, seconds


if __name__ == "__main__":
    main()
