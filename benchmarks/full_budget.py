"""--recipe best over whole runs on real photos, against the method and against timm's train.py
given the same levers: the tables, the time-to-accuracy figure and the findings of RESULTS.md's
section "The recipe at the full budget" (its `full_budget` notes block), or printed.

    python benchmarks/full_budget.py checkpoints/tiny-transfer \\
        --answers data/tiny-transfer/target/answers.csv --results RESULTS.md

Reads the runs benchmarks/tiny_transfer.sh trains into that folder (its `method-1+7`, `recipe-8`,
`timm-recipe` and `budget-16` steps); a run that has not finished is left out. Each run is
scored as its user would submit it: best.pt through predict.py's path (for --recipe best, the
model --average-last and --tta auto chose; for timm, its best epoch of the moving average).
Minutes are the run's own: its epochs' training and validation, and for --recipe best the
choice of its result after them; timm's, the wall time of its process.
"""

import argparse
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from levers import test_accuracy  # noqa: E402
from twophase.checkpoint import best_acc, full_history, load_checkpoint  # noqa: E402
from twophase.options import get_args_parser  # noqa: E402
from twophase.report import write_section  # noqa: E402
from twophase.table1 import command_of  # noqa: E402
from utils import exits_on_problems  # noqa: E402

SEEDS = (0, 1)
EIGHT = [  # (row, run folder, colour in the figure)
    ("the method (1 + 7)", "method-1+7-s{seed}", "tab:blue"),
    ("--recipe best", "recipe-8-s{seed}", "tab:green"),
    ("timm, the recipe's levers", "timm-recipe-s{seed}", "tab:red"),
]
SIXTEEN = [
    ("the method (1 + 15)", "method-16", "tab:blue"),
    ("Phase II alone (16)", "phase2-only-16", "tab:orange"),
    ("--recipe best", "recipe-16", "tab:green"),
    ("the method + --mixup 0.2", "mixup-16", "tab:purple"),
    ("the method + --cutmix 1.0", "cutmix-16", "tab:brown"),
]


def finished(folder):
    """A run tiny_transfer.sh finished: its `done` marker (ours) or its converted best.pt (timm)."""
    return (folder / "done").is_file() or (
        folder.name.startswith("timm") and (folder / "best.pt").is_file()
    )


def describe(folder, answers, defaults):
    """A finished run's row: test accuracy (exact), best validation accuracy, epochs, minutes, the
    validation curve against epochs and minutes, and its command."""
    state = load_checkpoint(folder / "best.pt")
    history = full_history(folder / "best.pt", state)
    correct, total, *_ = test_accuracy(folder / "best.pt", answers, use="auto", tta=None)
    seconds = [r["seconds"] + r.get("val_seconds", 0) for r in history]
    minutes = sum(seconds) / 60
    if state.get("wall_seconds"):  # timm's: its process, from start to end
        minutes = state["wall_seconds"] / 60
    elif (folder / "averaged.pt").is_file():  # and the choice of the result after the epochs
        chosen, ended = ((folder / name).stat().st_mtime for name in ("best.pt", "last.pt"))
        minutes += (chosen - ended) / 60
    elapsed = [sum(seconds[: i + 1]) / 60 for i in range(len(seconds))]
    if state.get("wall_seconds"):
        elapsed = [minutes * (i + 1) / len(history) for i in range(len(history))]
    return {
        "correct": correct,
        "total": total,
        "best_val": max(map(best_acc, history)),
        "curve": [best_acc(r) for r in history],
        "minutes_curve": elapsed,
        "minutes": minutes,
        "epochs": len(history),
        "command": command_of(state, defaults),
        "result": result_of(state),
        "tta": bool(state.get("tta")),
    }


def result_of(state):
    """Which weights the run submits: the average, the moving average or the weights."""
    if state.get("averaged"):
        return "average"
    return state.get("eval_weights", "model")


def row(label, seed, run):
    what = f"{run['result']}" + (" + TTA" if run["tta"] else "")
    test = f"{rate(run):.4f} ({run['correct']}/{run['total']})"
    return (
        f"| {label} | {seed} | {test} | {what} | {run['best_val']:.4f} | {run['epochs']} | "
        f"{run['minutes']:.1f} | `{run['command']}` |"
    )


def rate(run):
    return run["correct"] / run["total"]


HEADER = [
    "| run | seed | test accuracy | result | best val acc | epochs | minutes | command |",
    "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
]


def first_epoch_reaching(curve, level):
    return next((i + 1 for i, acc in enumerate(curve) if acc >= level), None)


def eight_epochs(runs):
    """The 8-epoch table's findings: means, seed spreads, the recipe against timm, and how soon the
    recipe's validation accuracy reaches timm's."""
    lines = []
    means = {}
    for label, _, _ in EIGHT:
        seeded = [r for r in runs.get(label, {}).values()]
        if len(seeded) == len(SEEDS):
            rates = [rate(r) for r in seeded]
            spread = max(r["correct"] for r in seeded) - min(r["correct"] for r in seeded)
            means[label] = statistics.mean(rates)
            lines.append(
                f"- {label}: mean test accuracy {means[label]:.4f}, the seeds {spread} images "
                "apart."
            )
    recipe, timm = runs.get(EIGHT[1][0], {}), runs.get(EIGHT[2][0], {})
    both = [s for s in SEEDS if s in recipe and s in timm]
    if both:
        gains = [100 * (rate(recipe[s]) - rate(timm[s])) for s in both]
        lines.append(
            "- `--recipe best` against timm with the same levers: "
            + ", ".join(f"{g:+.2f} points at seed {s}" for s, g in zip(both, gains))
            + "."
        )
        reach = []
        for s in both:
            epoch = first_epoch_reaching(recipe[s]["curve"], timm[s]["best_val"])
            reach.append(
                f"after {epoch} epoch{'s' * (epoch != 1)} at seed {s}"
                if epoch
                else f"not within its {recipe[s]['epochs']} epochs at seed {s}"
            )
        lines.append(
            "- `--recipe best` reaches timm's 8-epoch validation accuracy "
            + " and ".join(reach)
            + " (Figure: time to accuracy)."
        )
    method = EIGHT[0][0]
    if method in means and EIGHT[1][0] in means:
        gain = 100 * (means[EIGHT[1][0]] - means[method])
        lines.append(f"- `--recipe best` against the method: {gain:+.2f} points on average.")
    return lines


def sixteen_epochs(runs):
    lines = []
    rates = {label: rate(r) for label, r in runs.items()}
    method = SIXTEEN[0][0]
    if method in rates:
        for label, _, _ in SIXTEEN[1:]:
            if label in rates:
                gap = 100 * (rates[label] - rates[method])
                lines.append(f"- {label} against the method: {gap:+.2f} points.")
    return lines


def plot(eight, sixteen, folder):
    """Validation accuracy against epochs and against minutes: the 8-epoch runs (Figure: time to
    accuracy), and the 16-epoch runs."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for runs, rows, name in (
        (eight, EIGHT, "fig_time_to_accuracy_8_epochs.png"),
        (sixteen, SIXTEEN, "fig_time_to_accuracy_16_epochs.png"),
    ):
        if not runs:
            continue
        fig, (by_epoch, by_minute) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for label, _, colour in rows:
            for seed, run in sorted(runs.get(label, {}).items()):
                style = dict(color=colour, marker="o", markersize=3)
                style |= dict(linestyle="--" if seed else "-", label=f"{label}, seed {seed}")
                epochs = range(1, len(run["curve"]) + 1)
                by_epoch.plot(epochs, run["curve"], **style)
                by_minute.plot(run["minutes_curve"], run["curve"], **style)
        by_epoch.set(xlabel="epoch", ylabel="validation accuracy")
        by_minute.set(xlabel="minutes of training and validation (this CPU)")
        by_minute.legend(fontsize=8)
        for ax in (by_epoch, by_minute):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def section(folder, answers, figures, report_path=None):
    """The section's text: two tables, the findings and the figures."""
    folder, defaults = Path(folder), vars(get_args_parser().parse_args([]))
    eight = {}
    for label, pattern, _ in EIGHT:
        for seed in SEEDS:
            run = folder / pattern.format(seed=seed)
            if finished(run):
                eight.setdefault(label, {})[seed] = describe(run, answers, defaults)
    sixteen = {}
    for label, name, _ in SIXTEEN:
        if finished(folder / name):
            sixteen[label] = {0: describe(folder / name, answers, defaults)}
    lines = ["Eight epochs, two seeds:", "", *HEADER]
    for label, _, _ in EIGHT:
        lines += [row(label, s, r) for s, r in sorted(eight.get(label, {}).items())]
    lines += ["", *eight_epochs(eight), "", "Sixteen epochs, seed 0:", "", *HEADER]
    for label, _, _ in SIXTEEN:
        lines += [row(label, s, r) for s, r in sorted(sixteen.get(label, {}).items())]
    lines += ["", *sixteen_epochs({k: v[0] for k, v in sixteen.items()})]
    base = Path(report_path).parent if report_path else Path(".")
    for name in plot(eight, sixteen, Path(figures)):
        link = (Path(figures) / name).resolve().relative_to(base.resolve())
        lines += ["", f"![{name[:-4].replace('_', ' ')}]({link})"]
    return "\n".join(lines) + "\n"


@exits_on_problems
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", help="the folder tiny_transfer.sh trains its runs into")
    p.add_argument("--answers", required=True, help="the test images' true labels")
    p.add_argument("--results", default=None, help="a report to write the section into")
    p.add_argument("--figures", default="results/recipe", help="where the figures go")
    args = p.parse_args(argv)
    text = section(args.folder, args.answers, args.figures, args.results)
    print(text, end="")
    if args.results:
        write_section(args.results, "full_budget", "The recipe at the full budget", text)


if __name__ == "__main__":
    main()
