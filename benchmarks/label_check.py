"""How many wrong labels the report's disputed labels find, on real photos: a cut of tiny-transfer's
target/ (its first --classes classes), a share (--flip) of its training and of its validation
images moved to another class folder at random (recorded in flips.csv), trained, evaluated with
--report, then scored: precision at N, the share of flipped validation labels among the first N
disputed images (the ones a person reviews first), and recall, the share of the flipped
validation labels that the model disputes at all.

    python benchmarks/label_check.py --weights checkpoints/tiny-transfer/source/best.pt \\
        --classes 20 --flip 0.05 --epochs1 2 --epochs2 6 --out checkpoints/label-check

Options it does not know go to train.py as they are (--batch-size 64, --device cuda, ...). The
cut is made once into OUT/data (OUT/cut.json says how; another cut wants another --out), the
run trains into OUT/run with --resume auto (stopped, it goes on; finished, it is left as it
is), the figures and report go to OUT/figures, and the score is printed and written to
OUT/score.json. Flipped training labels make the run learn from wrong labels, as a real set's
are; only validation labels are scored, since only they were never trained on.
"""

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import find_classes, list_images  # noqa: E402
from utils import Problem, exits_on_problems, log  # noqa: E402

FLIPS = ("split", "image", "true_label", "given_label", "photo")  # photo: its path in --images


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images",
        default=str(REPO / "data/tiny-transfer/target"),
        help="the photos: a dataset root of train/ and val/ class folders",
    )
    p.add_argument("--out", default="checkpoints/label-check", help="the cut, the run, the score")
    p.add_argument("--classes", type=int, default=20, help="the first N classes of the photos")
    p.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        metavar="N",
        help="the first N training images of each class (default: all)",
    )
    p.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        metavar="N",
        help="the first N validation images of each class (default: all)",
    )
    p.add_argument(
        "--flip",
        type=float,
        default=0.05,
        help="the share of each split's images moved to another class",
    )
    p.add_argument("--seed", type=int, default=0, help="which images are flipped, and to what")
    p.add_argument(
        "--weights",
        required=True,
        help="train.py's --weights: the backbone (a checkpoint, imagenet, or none)",
    )
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", default="64")
    p.add_argument("--epochs1", default="2")
    p.add_argument("--epochs2", default="6")
    p.add_argument("--top", type=int, default=20, help="N of precision at N")
    return p  # fmt: skip


def first_images(folder, n):
    """The first `n` images of a class folder by name (all where n is None)."""
    return sorted(list_images(folder))[:n]


def cut_plan(args):
    """What the cut is made of and how, to tell a cut made before from another."""
    keys = ("images", "classes", "train_per_class", "val_per_class", "flip", "seed")
    return {k: getattr(args, k) for k in keys}


def make_cut(args, root):
    """root/{train,val}/<class>/ of the first --classes classes, each split's --flip share of
    images copied into another class's folder instead (drawn by --seed); flips.csv beside the
    folders names each (its path in the cut, its true class, the class it is given, its path in
    --images). Returns the flips, as dicts of FLIPS."""
    images, rng = Path(args.images), random.Random(args.seed)
    classes = find_classes(images / "train")[: args.classes]
    if len(classes) < 2:
        raise Problem(f"{images / 'train'} has {len(classes)} class(es): a flip needs two")
    flips = []
    for split, n in (("train", args.train_per_class), ("val", args.val_per_class)):
        files = [(c, f) for c in classes for f in first_images(images / split / c, n)]
        flipped = set(rng.sample(range(len(files)), round(args.flip * len(files))))
        for i, (true, name) in enumerate(files):
            given = rng.choice([c for c in classes if c != true]) if i in flipped else true
            target = root / split / given / Path(name).name
            if target.exists():  # a name two classes share: the flipped copy named apart
                target = target.with_name(f"{true}-{target.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(images / split / true / name, target)
            if given != true:
                image = target.relative_to(root).as_posix()
                photo = f"{split}/{true}/{name}"
                flips.append(dict(zip(FLIPS, (split, image, true, given, photo))))
    with open(root / "flips.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FLIPS)
        writer.writeheader()
        writer.writerows(flips)
    return flips


def the_cut(args, out):
    """The flips of the cut in out/data: made now, or read where out holds this cut already."""
    root, record = out / "data", out / "cut.json"
    plan = cut_plan(args)
    if record.is_file():
        made = json.loads(record.read_text())
        if made != plan:
            raise Problem(f"{out} holds a cut made otherwise ({made}): give another --out")
        with open(root / "flips.csv", newline="") as f:
            return list(csv.DictReader(f))
    if root.exists():
        raise Problem(f"{root} exists but {record} does not: give another --out")
    flips = make_cut(args, root)
    record.write_text(json.dumps(plan, indent=1) + "\n")
    log(f"the cut: {root}, {len(flips)} labels flipped (flips.csv)")
    return flips


def score(disputed, flips, top):
    """Precision at `top` and recall of the disputed images (paths, ranked) against the flipped
    validation labels, as (found, of) pairs."""
    flipped = {f["image"] for f in flips if f["split"] == "val"}
    first = disputed[:top]
    return {
        "precision_at": top,
        "precision": [sum(image in flipped for image in first), len(first)],
        "recall": [len(flipped & set(disputed)), len(flipped)],
        "disputed": len(disputed),
    }


def run(command):
    log("$ " + " ".join(command))
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)


@exits_on_problems
def main(argv=None):
    args, train_options = get_args_parser().parse_known_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    flips = the_cut(args, out)
    trained = ["--arch", args.arch, "--img-size", args.img_size, "--weights", args.weights]
    trained += ["--epochs1", args.epochs1, "--epochs2", args.epochs2]
    run(["train.py", "--data", str(out / "data"), "--out", str(out / "run"), *trained,
         "--resume", "auto", *train_options])  # fmt: skip
    figures = out / "figures"
    run(["evaluate.py", "--ckpt", str(out / "run/best.pt"), "--figures", str(figures),
         "--report"])  # fmt: skip
    with open(figures / "label_issues.csv", newline="") as f:
        disputed = [row["image"] for row in csv.DictReader(f)]
    result = score(disputed, flips, args.top)
    (out / "score.json").write_text(json.dumps(result, indent=1) + "\n")
    (hit, shown), (found, flipped) = result["precision"], result["recall"]
    print(
        f"disputed {len(disputed)} validation labels; precision at {args.top}: {hit}/{shown}; "
        f"recall: {found}/{flipped} flipped validation labels ({figures / 'report.md'})"
    )


if __name__ == "__main__":
    main()
