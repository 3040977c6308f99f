"""The accuracy levers on real photos: each lever's test accuracy against the method's run at the
same budget, seed by seed, as exact counts; written into RESULTS.md (its `levers` notes block)
or printed.

    python benchmarks/levers.py checkpoints/tiny-transfer/levers \\
        --answers data/tiny-transfer/target/answers.csv --results RESULTS.md

Reads the runs benchmarks/tiny_transfer.sh trains into that folder, one per lever and seed
(`<lever>-s<seed>/`). Every row scores the weights of the run's last epoch (so that a lever that
only changes which weights are kept, like --ema, is compared at equal training), through
predict.py's path: the test folder, its cache, the checkpoint's preprocessing.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import count_parameters  # noqa: E402
from twophase.checkpoint import load_checkpoint  # noqa: E402
from twophase.inference import load_trained  # noqa: E402
from twophase.options import get_args_parser  # noqa: E402
from twophase.report import write_section  # noqa: E402
from twophase.submission import test_answers, test_score  # noqa: E402
from twophase.table1 import command_of  # noqa: E402
from utils import atomic_file, exits_on_problems, log  # noqa: E402

# (row, run folder, how its last.pt is scored): test-time options for the base run.
ROWS = [
    ("the method", "base", {}),
    ("--ema 0.99", "base", {"use": "ema"}),
    ("--tta (horizontal flip)", "base", {"tta": True}),
    ("test size 72 px", "base", {"img_size": 72}),
    ("test size 80 px", "base", {"img_size": 80}),
    ("--mixup 0.2", "mixup", {}),
    ("--cutmix 1.0", "cutmix", {}),
    ("--lr-decay 0.7", "lr-decay", {}),
    ("--p-vflip 0 (no vertical flips)", "no-vflip", {}),
    ("the recipe: --ema 0.99 --lr-decay 0.7 --p-vflip 0", "recipe", {"use": "ema"}),
    ("the recipe, with --tta", "recipe", {"use": "ema", "tta": True}),
]


def test_accuracy(path, answers, use="weights", tta=False, img_size=None):
    """(correct, images, parameters, balanced accuracy) of a checkpoint's weights on the test
    images. Remembered in the run's folder (scores.json), keyed by the checkpoint's size and time
    and the options, so that writing the table again scores only the runs that are new or
    changed."""
    path, answers = Path(path), Path(answers)
    stat = path.stat()
    key = json.dumps([path.name, stat.st_size, stat.st_mtime_ns, use, tta, img_size, str(answers)])
    memo = path.parent / "scores.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if len(known.get(key, [])) < 4:  # unknown, or remembered before the balanced accuracy was
        args = argparse.Namespace(
            ckpt=str(path), device="auto", amp=None, use=use, img_size=img_size, tta=tta
        )
        trained = load_trained(args)
        test_dir = Path(trained.state["data"]) / "test"
        result = test_score(trained, test_answers(test_dir, answers, trained.classes), 2, 256)
        params = count_parameters(trained.model.parameters())
        known[key] = [result.correct, result.total, params, result.balanced]

        with atomic_file(memo, "w") as f:
            json.dump(known, f, indent=1)
    return tuple(known[key])


def table(folder, answers):
    folder = Path(folder)
    finished = [p.parent for p in folder.glob("base-s*/done")]  # tiny_transfer.sh's marker
    seeds = sorted({m.group(1) for p in finished if (m := re.search(r"s(\d+)$", p.name))})
    defaults = vars(get_args_parser().parse_args([]))
    lines = [
        "| lever | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gain | parameters |",
        "| --- |" + " ---: |" * (len(seeds) + 3),
    ]
    base, commands = None, []
    for label, run, options in ROWS:
        paths = [folder / f"{run}-s{s}" / "last.pt" for s in seeds]
        if not all((p.parent / "done").is_file() for p in paths):
            log(f"{label}: not run yet ({paths[0].parent})")
            continue
        options = {"use": "weights", **options}  # a run trained with --ema: its weights unless said
        results = [test_accuracy(p, answers, **options) for p in paths]
        rates = [c / t for c, t, *_ in results]
        mean = statistics.mean(rates)
        base = mean if base is None else base
        params = results[0][2]
        counts = " | ".join(f"{c / t:.4f} ({c}/{t})" for c, t, *_ in results)
        gain = f"{100 * (mean - base):+.2f} points" if label != "the method" else ""
        lines.append(f"| {label} | {counts} | {mean:.4f} | {gain} | {params / 1e6:.1f}M |")
        state = load_checkpoint(paths[0])
        command = command_of(state, defaults)
        shown = {k: v for k, v in options.items() if k != "use" or state.get("ema")}
        test_time = " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in shown.items() if v is not True
        )
        test_time += " --tta" if options.get("tta") else ""
        commands.append(
            f"- {label}: `{command}`"
            + (f", scored with `{test_time.strip()}`" if test_time.strip() else "")
        )
    return (
        "\n".join(lines + ["", "Commands (seed 0; seed 1 adds `--seed 1`):", ""] + commands) + "\n"
    )


def averaging_table(runs, answers):
    """Weight averaging needs epochs to average, so it is measured on longer runs: each run's last
    epoch against the average of its kept epochs (python -m twophase.average's averaged.pt)."""
    runs = [Path(r) for r in runs if (Path(r) / "averaged.pt").is_file()]
    if not runs:
        return ""
    lines = [
        "| run | last epoch | average of the kept epochs | gain |",
        "| --- | ---: | ---: | ---: |",
    ]
    for run in runs:
        (c1, t1, *_), (c2, t2, *_) = (
            test_accuracy(run / name, answers) for name in ("last.pt", "averaged.pt")
        )
        lines.append(
            f"| {run.name} | {c1 / t1:.4f} ({c1}/{t1}) | {c2 / t2:.4f} ({c2}/{t2}) "
            f"| {100 * (c2 / t2 - c1 / t1):+.2f} points |"
        )
    kept = [Path(p).name for p in load_checkpoint(runs[-1] / "averaged.pt")["averaged"]]
    how = (
        f"Weight averaging of each run's last {len(kept)} epochs, batch norm statistics measured "
        "again on the training images: `python -m twophase.average "
        + " ".join(f"RUN/{name}" for name in kept)
        + " --out RUN/averaged.pt`."
    )
    return "\n".join(["", how, "", *lines]) + "\n"


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", help="the lever runs' folder")
    p.add_argument("--answers", required=True, help="the test images' true labels")
    p.add_argument(
        "--results", default=None, help="a report to write the table into (its levers notes)"
    )
    p.add_argument(
        "--averaging",
        nargs="*",
        default=[],
        help="runs holding an averaged.pt of their last epochs, to score against their last.pt",
    )
    args = p.parse_args(argv)
    text = table(args.folder, args.answers) + averaging_table(args.averaging, args.answers)
    print(text, end="")
    if args.results:
        write_section(args.results, "levers", "Accuracy levers", text)


if __name__ == "__main__":
    main()
