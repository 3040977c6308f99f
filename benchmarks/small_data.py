"""Small data on real photos: the levers and the learning rates where a student's data is a few
hundred photos, and RESULTS.md's section "Small data" (its `small_data` notes blocks).

    python benchmarks/variants.py make data/tiny-transfer/target     # target-few, target-two
    python benchmarks/small_data.py run --data data/tiny-transfer \\
        --weights checkpoints/small/source/best.pt --runs checkpoints/small
    python benchmarks/small_data.py section checkpoints/small --data data/tiny-transfer \\
        --results RESULTS.md

Every run fine-tunes one backbone (`--weights`, pretrained on tiny-transfer's source/ half) with
resnet18 at 64 px, on one thread (OMP_NUM_THREADS=1; two `run`s at a time, a seed each, with
`--seeds 0` and `--seeds 1`), and is scored on its cut's test photos as its user would submit it
(best.pt, as the run chose on validation). A finished run (its folder's `done`, the wall seconds)
is skipped and a stopped one resumed, so `run` can be stopped and run again; `--only` picks rows
by their folder's name.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from variants import backbone_of, section  # noqa: E402

from twophase.report import write_section  # noqa: E402
from utils import exits_on_problems  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ("--epochs", "12")  # each cut's runs: 12 epochs, split as the report splits its 135

# (block, title, cut, rows): each row (label, folder, its options beyond the cut's and the budget)
TABLES = (
    (
        "small_data_levers",
        "Small data: 20 classes of 30 training photos",
        "target-few",
        (
            ("the method", "few-method-s{seed}", ()),
            ("--recipe best", "few-best-s{seed}", ("--recipe", "best")),
            ("--l2sp 0.01", "few-l2sp-s{seed}", ("--l2sp", "0.01")),
            ("--sam 0.05", "few-sam-s{seed}", ("--sam", "0.05")),
            (
                "--recipe best --l2sp 0.01",
                "few-best-l2sp-s{seed}",
                ("--recipe", "best", "--l2sp", "0.01"),
            ),
            (
                "--recipe best --sam 0.05",
                "few-best-sam-s{seed}",
                ("--recipe", "best", "--sam", "0.05"),
            ),
            ("--phase1-features 1", "few-features-s{seed}", ("--phase1-features", "1")),
            (
                "--epochs1 10 --phase1-features 1",
                "few-head10-features-s{seed}",
                ("--epochs1", "10", "--phase1-features", "1"),
            ),
            ("--epochs1 10", "few-head10-s{seed}", ("--epochs1", "10")),
            (
                "--recipe best --lr1 auto --lr2 auto",
                "few-best-auto-s{seed}",
                ("--recipe", "best", "--lr1", "auto", "--lr2", "auto"),
            ),
        ),
    ),
    (
        "small_data_rates",
        "Small data: the learning rate where the default is wrong",
        "target-few",
        (
            ("--batch-size 16", "few-b16-s{seed}", ("--batch-size", "16")),
            (
                "--batch-size 16 --lr1 auto --lr2 auto",
                "few-b16-auto-s{seed}",
                ("--batch-size", "16", "--lr1", "auto", "--lr2", "auto"),
            ),
            ("--optimizer2 sgd", "few-sgd-s{seed}", ("--optimizer2", "sgd")),
            (
                "--optimizer2 sgd --lr2 auto",
                "few-sgd-auto-s{seed}",
                ("--optimizer2", "sgd", "--lr2", "auto"),
            ),
            (
                "--optimizer2 sgd --lr2 1e-2",
                "few-sgd-1e-2-s{seed}",
                ("--optimizer2", "sgd", "--lr2", "1e-2"),
            ),
        ),
    ),
    (
        "small_data_two",
        "Small data: two classes of 120 training photos",
        "target-two",
        (
            ("the defaults", "two-method-s{seed}", ()),
            (
                "--batch-size 8 --lr1 auto --lr2 auto (train.py's suggestion)",
                "two-suggested-s{seed}",
                ("--batch-size", "8", "--lr1", "auto", "--lr2", "auto"),
            ),
            ("--batch-size 8", "two-b8-s{seed}", ("--batch-size", "8")),
            ("--recipe best", "two-best-s{seed}", ("--recipe", "best")),
        ),
    ),
)


def train(out, cut_dir, weights, options, seed):
    """train.py into `out` unless a call finished it; a stopped one goes on from its last.pt."""
    if (out / "done").is_file():
        return
    resume = ["--resume", str(out / "last.pt")] if (out / "last.pt").is_file() else []
    command = [sys.executable, "train.py", "--data", str(cut_dir), "--arch", "resnet18"]
    command += ["--img-size", "64", "--weights", str(weights), *BUDGET, *options]
    command += ["--seed", str(seed), "--out", str(out), *resume]
    out.parent.mkdir(parents=True, exist_ok=True)
    print("==", " ".join(command), flush=True)
    started = time.time()
    with open(f"{out}.log", "a") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    (out / "done").write_text(f"{time.time() - started:.0f}\n")


def run(args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for _, _, cut, rows in TABLES:
        for _, folder, options in rows:
            for seed in args.seeds:
                name = folder.format(seed=seed)
                if args.only and not any(word in name for word in args.only):
                    continue
                train(args.runs / name, args.data / cut, args.weights.resolve(), options, seed)


def write(args):
    for block, title, cut, rows in TABLES:
        answers = args.data / cut / "answers.csv"
        named = [(label, folder) for label, folder, _ in rows]
        lines, commands = section(args.runs, named, lambda folder, a=answers: a)
        if len(lines) <= 2:
            continue
        seconds = []
        for _, folder, _ in rows:
            done = args.runs / folder.format(seed=0) / "done"
            if done.is_file():
                seconds.append(f"{folder.format(seed=0)} {int(done.read_text())} s")
        text = [backbone_of(args.runs, named), "", *lines, ""]
        text += ["Commands (seed 0; seed 1 adds `--seed 1`):", "", *commands, ""]
        text += [f"Wall time of each seed-0 run on one thread: {', '.join(seconds)}.", ""]
        print(f"## {title}\n\n" + "\n".join(text))
        if args.results:
            write_section(args.results, block, title, "\n".join(text))


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    runs = sub.add_parser("run", help="train the rows' runs that are not done")
    runs.add_argument("--data", type=Path, required=True, help="holds target-few, target-two")
    runs.add_argument("--weights", type=Path, required=True, help="the backbone")
    runs.add_argument("--runs", type=Path, required=True, help="the runs' folder")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    runs.add_argument("--only", nargs="+", help="rows whose folder's name holds one of these")
    table = sub.add_parser("section", help="the section of the finished runs")
    table.add_argument("runs", type=Path)
    table.add_argument("--data", type=Path, required=True)
    table.add_argument("--results", default=None, help="write the sections into this report")
    args = p.parse_args(argv)
    run(args) if args.what == "run" else write(args)


if __name__ == "__main__":
    main()
