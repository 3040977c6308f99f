"""This project's train.py and predict.py against timm's train.py and inference.py, on one machine
and one real folder, as a user would run each: the wall time of whole commands (imports, cache
builds and all), taken in turns so that the machine's drift hits both alike, medians over the
repeats and the ratios, each repeat's pair measured next to each other.

    python benchmarks/vs_timm.py --data data/tiny-transfer/target \\
        --weights checkpoints/tiny-transfer/source/best.pt --timm benchmarks/.work/timm

- training: `train.py --epochs 2` (Phase I and Phase II, one epoch each) from the weights,
  building its cache afresh each time, against timm's train.py for 2 epochs from the same
  weights (its own recipe; workers as many as the cores), batch 72, 64 px;
- prediction: `predict.py` on test/ (its cache built afresh) against timm's inference.py on the
  same folder, each with the checkpoint its training wrote.

The folder is a subset of --data (--per-class training images a class, a tenth of that for
validation, --test images), linked, not copied: the same photos for both. timm's train.py and
inference.py are timm's repository's (github.com/huggingface/pytorch-image-models), at --timm;
`pip install timm pandas` brings what they import.

"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import list_images, list_labelled_images  # noqa: E402
from utils import exits_on_problems  # noqa: E402


def subset(source, folder, per_class, tests):
    """train/ and val/ with per_class and per_class // 10 images a class, test/ with `tests`
    images, linked from `source`."""
    classes = sorted((d.name for d in (source / "train").iterdir() if d.is_dir()), key=str)
    for split, keep in (("train", per_class), ("val", max(1, per_class // 10))):
        taken = {c: 0 for c in classes}
        for f in list_labelled_images(source / split, classes):
            c = f.split("/", 1)[0]
            if taken[c] < keep:
                link(source / split / f, folder / split / f)
                taken[c] += 1
    for f in list_images(source / "test")[:tests]:
        link(source / "test" / f, folder / "test" / f)
    return folder


def link(source, destination):
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not destination.exists():
        os.symlink(source.resolve(), destination)


def timed(command, log):
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed: see {log}")
    return time.perf_counter() - start


def commands(args, work, n):
    """The four commands of repeat n: ours and timm's, training and prediction."""
    py, folder, timm = sys.executable, work / "data", args.timm
    ours = work / f"ours-{n}"
    train = [py, "train.py", "--data", folder, "--arch", "resnet18", "--img-size", "64"]
    train += ["--weights", args.weights, "--epochs", "2", "--device", "cpu"]
    train += ["--out", ours / "ck", "--cache-dir", ours / "cache"]
    predict = [py, "predict.py", "--ckpt", ours / "ck" / "best.pt", "--test-dir", folder / "test"]
    predict += ["--cache-dir", ours / "test-cache", "--out", ours / "prediction.csv"]
    theirs = work / f"timm-{n}"
    overlay = f"pretrained_cfg_overlay={{'file':'{work / 'backbone.pth'}'}}"
    timm_train = [py, timm / "train.py", "--model", "resnet18", "--pretrained"]
    timm_train += ["--model-kwargs", overlay, "--num-classes", "100", "--data-dir", folder]
    timm_train += ["--train-split", "train", "--val-split", "val", "--img-size", "64"]
    timm_train += ["--crop-pct", "1.0", "--batch-size", "72", "--epochs", "2"]
    timm_train += ["--warmup-epochs", "0", "--workers", str(os.cpu_count()), "--device", "cpu"]
    timm_train += ["--output", theirs, "--experiment", "run", "--seed", "0"]
    timm_predict = [py, timm / "inference.py", "--data-dir", folder / "test"]
    timm_predict += ["--model", "resnet18", "--num-classes", "100", "--img-size", "64"]
    timm_predict += ["--crop-pct", "1.0", "--workers", str(os.cpu_count()), "--device", "cpu"]
    timm_predict += ["--checkpoint", theirs / "run" / "last.pth.tar", "--results-dir", theirs]
    return [
        ("train", "ours", [str(c) for c in train]),
        ("train", "timm", [str(c) for c in timm_train]),
        ("predict", "ours", [str(c) for c in predict]),
        ("predict", "timm", [str(c) for c in timm_predict]),
    ]


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="a dataset root with test/")
    p.add_argument("--weights", type=Path, required=True, help="a checkpoint of this project")
    p.add_argument("--timm", type=Path, required=True, help="timm's repository: train.py")
    p.add_argument("--per-class", type=int, default=50, help="training images a class")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "vs-timm")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    subset(args.data, args.work / "data", args.per_class, args.test)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in state["model"].items()}, args.work / "backbone.pth")
    seconds = {}
    for n in range(args.repeats):
        steps = commands(args, args.work, n)
        if n % 2:  # in turns: timm first every other repeat
            steps = [steps[1], steps[0], steps[3], steps[2]]

        for what, who, command in steps:
            t = timed(command, args.work / f"{what}-{who}-{n}.log")
            seconds.setdefault((what, who), []).append(t)
            print(f"repeat {n}: {what}, {who}: {t:.1f} s", file=sys.stderr, flush=True)
    lines = [
        "| command | this project (s) | timm (s) | ratio | repeats: ours / timm |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for what in ("train", "predict"):
        ours, theirs = seconds[(what, "ours")], seconds[(what, "timm")]
        ratio = statistics.median(a / b for a, b in zip(ours, theirs))
        runs = ", ".join(f"{a:.0f} / {b:.0f}" for a, b in zip(ours, theirs))
        lines.append(
            f"| {what} | {statistics.median(ours):.1f} | {statistics.median(theirs):.1f} | "
            f"{ratio:.2f} | {runs} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
