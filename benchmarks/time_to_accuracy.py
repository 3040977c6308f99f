"""Time to accuracy on real photos: validation accuracy against minutes for the method, --recipe
best, --recipe fast and timm's train.py given the recipe's levers (8 epochs each, two seeds; the
time levers --progressive 0.75 --test-size auto, tiny_transfer.sh's pixels-8 step, and
--recipe fast at 4 epochs, its fast-4 step, are rows too where their runs are there), the
minutes each takes to reach timm's 8-epoch validation accuracy, and RESULTS.md's section "Time
to accuracy" (its `time_to_accuracy` notes block).

    python benchmarks/time_to_accuracy.py measure --images data/tiny-transfer/target \\
        --timm benchmarks/.work/timm --weights checkpoints/tiny-transfer/source/best.pt
    python benchmarks/time_to_accuracy.py section checkpoints/tiny-transfer \\
        --answers data/tiny-transfer/target/answers.csv --results RESULTS.md

RESULTS.md's runs are of variants.py's target-small, from the 2-epoch backbone of its variants
section trained into checkpoints/tt-small/source, then measured alone, then in two lanes of one
thread each, a seed a lane:

    python benchmarks/time_to_accuracy.py measure --images data/tiny-transfer/target-small \\
        --timm benchmarks/.work/timm --weights checkpoints/tt-small/source/best.pt \\
        --runs checkpoints/tt-small
    export OMP_NUM_THREADS=1 TARGET=data/tiny-transfer/target-small CHECKPOINTS=checkpoints/tt-small
    for seed in 0 1; do
        for step in fast-8 timm-recipe recipe-8 method-1+7 fast-4; do
            SEEDS=$seed STEPS=$step bash benchmarks/tiny_transfer.sh
        done &
    done; wait

The screens in the findings are the fast-8 step's command (tiny_transfer.sh) with the options
they name added, --out checkpoints/tt-small/<screen>-s$seed, stopped after the Phase II epoch they
name: --lr1 5e-3 and --lr1 2e-2 (Phase I's rate); --lr1 5e-4 (the report's), alone, with --lr2
2e-3 and with --epochs 4 in place of 8; --epochs1 0 --epochs2 7 --cosine-epochs 7
--warmup-epochs 0 (no Phase I). Their numbers are each run's history.csv; `section` draws the
rows above alone.

Two runs shared the machine at a time, so their own minutes say little about speed. Each
run's minutes are therefore counted at speeds measured alone (`measure`, on an idle machine):
this project's training images/s in each phase at each size a run trained at, and its
validation's, from benchmarks/bench.py on the same photos; timm's seconds an epoch, as the
difference between its train.py run for 2 epochs and for 1 (its start and its loaders' set-up
cancel out). An epoch of ours costs its training images at its phase's and size's speed, its
validations (two with --ema) at the validation speed; the end of the --recipe best and fast runs
(the average's batch norm pass, the test sizes, the flips) is counted the same way. Both the
counted and the runs' own minutes are in the table. Without `measure`'s speeds.json the counted
minutes are the runs' own: fair where every run had the same share of the machine (one thread
each, two runs at a time, as tiny_transfer.sh's steps run with OMP_NUM_THREADS=1 in two lanes).
"""

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import dataset_of  # noqa: E402
from levers import test_accuracy  # noqa: E402
from twophase.checkpoint import best_acc, full_history, load_checkpoint  # noqa: E402
from twophase.options import get_args_parser  # noqa: E402
from twophase.report import write_section  # noqa: E402
from twophase.schedule import size_step  # noqa: E402
from twophase.table1 import command_of  # noqa: E402
from utils import exits_on_problems  # noqa: E402

SEEDS = (0, 1)
RUNS = [  # (row, run folder, colour)
    ("the method (1 + 7)", "method-1+7-s{seed}", "tab:blue"),
    ("--recipe best", "recipe-8-s{seed}", "tab:green"),
    ("--recipe fast", "fast-8-s{seed}", "tab:orange"),
    ("--recipe best, progressive, test size", "pixels-8-s{seed}", "tab:brown"),
    ("--recipe fast, 4 epochs", "fast-4-s{seed}", "tab:purple"),
    ("timm, the recipe's levers", "timm-recipe-s{seed}", "tab:red"),
]
SPEEDS = "speeds.json"  # in the runs' folder


# ----------------------------------------------------------------------------- measuring


def bench(images, size, n, steps):
    """bench.py's images/s at `size`: Phase I and II training end to end, and prediction."""
    command = [sys.executable, "benchmarks/bench.py", "--device", "cpu", "--images", images]
    command += ["--img-size", str(size), "--n", str(n), "--steps", str(steps), "--repeats", "3"]
    command += ["--sections", "train,predict", "--workdir", f"benchmarks/.work/tta-{size}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = {
        line.split("|")[1].strip(): float(line.split("|")[2])
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line and "measurement" not in line
    }
    return {
        "phase1": rows["Phase 1 training, end to end"],
        "phase2": rows["Phase 2 training, end to end"],
        "predict": rows["predict"],
    }


def timm_epoch(args):
    """Seconds an epoch of timm's train.py takes here, with the recipe's levers: its run for 2
    epochs less its run for 1."""
    backbone = Path("benchmarks/.work/tta-backbone.pth")
    import torch

    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    torch.save(state["model"], backbone)
    seconds = {}
    for epochs in (1, 2):
        command = [sys.executable, str(args.timm / "train.py"), "--model", "resnet18"]
        command += [
            "--pretrained",
            "--model-kwargs",
            f"pretrained_cfg_overlay={{'file':'{backbone}'}}",
        ]
        command += ["--num-classes", "100", "--data-dir", str(args.images), "--train-split"]
        command += ["train", "--val-split", "val", "--img-size", "64", "--crop-pct", "1.0"]
        command += ["--batch-size", "72", "--epochs", str(epochs), "--workers", "2"]
        command += ["--device", "cpu", "--opt", "nadam", "--lr", "5e-4", "--weight-decay", "1e-4"]
        command += ["--warmup-epochs", "0", "--model-ema", "--model-ema-decay", "0.99"]
        command += ["--layer-decay", "0.7", "--vflip", "0", "--seed", "0"]
        command += ["--output", "benchmarks/.work/tta-timm", "--experiment", f"epochs{epochs}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds[epochs] = time.perf_counter() - start
    return seconds[2] - seconds[1]


def sizes_of(runs):
    """The sizes our runs in `runs` trained, validated and chose a test size at."""
    sizes = set()
    for checkpoint in runs.glob("*/best.pt"):
        if checkpoint.parent.name.startswith("timm"):
            continue
        state = load_checkpoint(checkpoint)
        size = state["args"]["img_size"]
        sizes.add(size)
        sizes.update(r["img_size"] for r in full_history(checkpoint, state) if r.get("img_size"))
        if state["args"].get("test_size") == "auto":
            sizes.update(size + k * size_step(size) for k in (1, 2))
    return sorted(sizes)


def measure(args):
    sizes = sizes_of(args.runs)
    if not sizes:
        sys.exit(f"no runs of this project (*/best.pt) in {args.runs}")
    speeds = {str(s): bench(str(args.images / "train"), s, args.n, args.steps) for s in sizes}
    speeds["timm_epoch_seconds"] = timm_epoch(args)
    out = args.runs / SPEEDS
    out.write_text(json.dumps(speeds, indent=1) + "\n")
    print(json.dumps(speeds, indent=1))


# ----------------------------------------------------------------------------- counting


def counted_minutes(history, state, speeds, train_images, val_images):
    """The minutes after each epoch of one of our runs, at the speeds measured alone, and those
    its end takes (--average-last, --test-size auto, --tta auto)."""
    args, seconds, curve = state["args"], 0.0, []
    validations = 2 if args.get("ema") else 1
    full = speeds[str(args["img_size"])]
    for record in history:
        side = speeds[str(record.get("img_size") or args["img_size"])]
        seconds += train_images / side[f"phase{record['phase']}"]
        seconds += validations * val_images / full["predict"]
        curve.append(seconds / 60)
    end = 0.0
    if args.get("average_last"):
        end += train_images / full["predict"] + val_images / full["predict"]
    if args.get("test_size") == "auto":
        step = size_step(args["img_size"])
        for k in (1, 2):
            larger = speeds[str(args["img_size"] + k * step)]
            end += 2 * val_images / larger["predict"] + train_images / larger["predict"]
    if args.get("tta") == "auto":
        end += 3 * val_images / full["predict"]
    return curve, end / 60


def evenly(minutes, epochs):
    """The minutes after each of `epochs` epochs that take `minutes` each (timm's runs)."""
    return [minutes * (i + 1) for i in range(epochs)]


def own_minutes(folder, state, history):
    """The minutes after each epoch as the run itself took them (timm's: its wall time, spread
    evenly over its epochs), and those its end took: the command's wall time that
    tiny_transfer.sh writes into the run's `done`, less its epochs' (0 where it is not there)."""
    if folder.name.startswith("timm"):
        return evenly(state["wall_seconds"] / 60 / len(history), len(history)), 0.0
    seconds = itertools.accumulate(r["seconds"] + r.get("val_seconds", 0) for r in history)
    curve = [s / 60 for s in seconds]
    done = folder / "done"
    whole = done.read_text().strip() if done.is_file() else ""
    if not whole.isdigit():
        return curve, 0.0
    return curve, max(0.0, int(whole) / 60 - curve[-1])


def describe(folder, answers, speeds, defaults):
    state = load_checkpoint(folder / "best.pt")
    history = full_history(folder / "best.pt", state)
    correct, total, *_ = test_accuracy(folder / "best.pt", answers, use="auto", tta=None)
    curve = [best_acc(r) for r in history]
    own_curve, own_end = own_minutes(folder, state, history)
    own = own_curve[-1] + own_end
    if speeds is None:  # no speeds measured alone: the runs' own minutes
        counted, end = own_curve, own_end
    elif folder.name.startswith("timm"):
        counted, end = evenly(speeds["timm_epoch_seconds"] / 60, len(history)), 0.0
    else:
        train_images = round(history[-1]["images_per_s"] * history[-1]["seconds"])
        val_images = len(dataset_of(state["args"], state["data"]).val.files)
        counted, end = counted_minutes(history, state, speeds, train_images, val_images)
    return {
        "correct": correct,
        "total": total,
        "curve": curve,
        "counted": counted,
        "end": end,
        "own": own,
        "command": command_of(state, defaults),
    }


def reach(run, level):
    """Counted minutes at the first epoch whose validation accuracy reaches `level`, or None.
    Equal to the fourth digit is reached: an accuracy is a count over the validation photos
    (steps of 0.0005 on 2,000), and the mean of timm's seeds is a float that may fall a hair
    below the count it stands for."""
    level = round(level, 4)
    epoch = next((i for i, acc in enumerate(run["curve"]) if round(acc, 4) >= level), None)
    return None if epoch is None else run["counted"][epoch]


def reach_finding(label, times, timm_minutes):
    """The line for a row's minutes to timm's accuracy at each seed (None: not reached)."""
    hits = [t for t in times if t is not None]
    if not hits:
        return f"- {label} does not reach it."
    mean = statistics.mean(hits)
    ratio = f"{mean:.1f} minutes ({mean / timm_minutes:.2f} of timm's)"
    if len(hits) < len(times):
        seeds = f"{len(hits)} of its {len(times)} seeds only"
        return f"- {label} reaches it at {seeds}, in {ratio} there."
    return f"- {label} reaches it in {ratio} on average."


def section(args):
    measured = args.runs / SPEEDS
    speeds = json.loads(measured.read_text()) if measured.is_file() else None
    defaults = vars(get_args_parser().parse_args([]))
    runs = {}
    for label, pattern, _ in RUNS:
        for seed in SEEDS:
            folder = args.runs / pattern.format(seed=seed)
            if (folder / "best.pt").is_file() and (
                (folder / "done").is_file() or folder.name.startswith("timm")
            ):
                runs.setdefault(label, {})[seed] = describe(folder, args.answers, speeds, defaults)
    timm = runs.get(RUNS[-1][0], {})
    level = statistics.mean(r["curve"][-1] for r in timm.values()) if timm else None
    timm_minutes = statistics.mean(r["counted"][-1] for r in timm.values()) if timm else None
    minutes = "minutes, counted | minutes, its own" if speeds else "minutes"
    lines = [
        f"| run | seed | test accuracy | best val acc | {minutes} | "
        "minutes to timm's 8-epoch val acc | command |",
        f"| --- | ---: | ---: | ---: | {'---: | ' * (2 if speeds else 1)}---: | --- |",
    ]
    for label, _, _ in RUNS:
        for seed, run in sorted(runs.get(label, {}).items()):
            reached = reach(run, level) if level is not None else None
            took = f"{run['counted'][-1] + run['end']:.1f}"
            if speeds:
                took += f" | {run['own']:.1f}"
            lines.append(
                f"| {label} | {seed} | {run['correct'] / run['total']:.4f} "
                f"({run['correct']}/{run['total']}) | {max(run['curve']):.4f} | {took} | "
                f"{'not reached' if reached is None else f'{reached:.1f}'} | `{run['command']}` |"
            )
    findings = []
    if level is not None:
        findings.append(
            f"- timm's 8-epoch validation accuracy, the mean of its seeds: {level:.4f}, in "
            f"{timm_minutes:.1f} {'counted' if speeds else 'of its own'} minutes."
        )
        for label, _, _ in RUNS[:-1]:
            times = [reach(r, level) for r in runs.get(label, {}).values()]
            if times:
                findings.append(reach_finding(label, times, timm_minutes))
    figure(runs, args.figures / "fig_time_to_accuracy.png", level, counted=speeds is not None)
    text = "\n".join(
        lines
        + [""]
        + findings
        + ["", "![time to accuracy](results/tta/fig_time_to_accuracy.png)", ""]
    )
    if args.results:
        write_section(args.results, "time_to_accuracy", "Time to accuracy", text)
    print(text)


def figure(runs, path, level, counted):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = {label: colour for label, _, colour in RUNS}
    for label, seeded in runs.items():
        for seed, run in sorted(seeded.items()):
            ax.plot(
                run["counted"],
                run["curve"],
                color=colours[label],
                linestyle="-" if seed == 0 else "--",
                marker="o",
                markersize=3,
                label=f"{label}, seed {seed}",
            )
    if level is not None:
        ax.axhline(level, color="grey", linewidth=0.8, linestyle=":")
    minutes = "counted at the speeds measured alone" if counted else "each run's own"
    ax.set(xlabel=f"minutes ({minutes})", ylabel="validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--images", type=Path, required=True, help="the dataset root (train/, val/)")
    m.add_argument("--timm", type=Path, required=True)
    m.add_argument("--weights", type=Path, required=True)
    m.add_argument("--runs", type=Path, default=Path("checkpoints/tiny-transfer"))
    m.add_argument("--n", type=int, default=2048)
    m.add_argument("--steps", type=int, default=20)
    s = sub.add_parser("section")
    s.add_argument("runs", type=Path)
    s.add_argument("--answers", type=Path, required=True)
    s.add_argument("--results", default=None)
    s.add_argument("--figures", type=Path, default=Path("results/tta"))
    args = p.parse_args(argv)
    measure(args) if args.what == "measure" else section(args)


if __name__ == "__main__":
    main()
