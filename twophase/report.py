"""The Markdown report of a run, written by `evaluate.py --report FILE.md`: Table 1 as the run
used it (from its checkpoint, not from today's defaults), its result as exact counts, Figures 1,
2 and 5 and the mistakes gallery, a summary of its per-class metrics, and, with --compare,
Figures 3 and 4 with their table.

Text between `<!-- notes:NAME -->` and `<!-- /notes -->` is kept when the report is written
again over an earlier one: write the prose there, and regenerate the numbers at will.
"""

import os
import re
import shlex
from pathlib import Path
from typing import NamedTuple

from twophase.checkpoint import best_acc
from twophase.options import DEMO, RECIPES, split_budget
from utils import atomic_file

NOTES = re.compile(r"<!-- notes:(\w+) -->\n(.*?)<!-- /notes -->", re.S)
# Sections that other tools add to a report (benchmarks/levers.py's) follow this line: a report
# written again over an earlier one keeps them as they were.
APPENDIX = "<!-- sections added to the report -->\n"


def count(correct, total):
    return f"{correct / total:.4f} ({correct}/{total})" if total else "n/a"


def notes(name, kept):
    """A slot for prose, holding what an earlier version of the report had there."""
    return f"<!-- notes:{name} -->\n{kept.get(name, '')}<!-- /notes -->"


def write_section(report_path, name, title, text):
    """`text` as the `name` notes block of a report's added section `title` (a prose slot,
    `name`_findings, before it), the section appended on its first write."""
    report = Path(report_path).read_text()
    if f"<!-- notes:{name} -->" not in report:
        report += "" if APPENDIX in report else "\n" + APPENDIX
        report += f"\n## {title}\n\n{notes(name + '_findings', {})}\n\n{notes(name, {})}\n"
    block = f"<!-- notes:{name} -->\n{text}<!-- /notes -->"
    report = NOTES.sub(lambda m: block if m.group(1) == name else m.group(0), report)
    with atomic_file(report_path, "w") as f:
        f.write(report)


def cell(text):
    """A name as a Markdown table's cell holds it: a | in it would end the cell."""
    return str(text).replace("|", "\\|")


def link(path, report):
    return os.path.relpath(path, Path(report).parent)


def table1(state):
    """The method's hyperparameters as this run had them, in the report's Table 1 layout."""
    a = state["args"]
    cpu = state.get("device", "cuda") != "cuda"
    amp = (
        "off (float32 on the CPU)" if cpu else {"off": "off"}.get(a["amp"], f"{a['amp']} autocast")
    )
    steps = f" x {a['accum_steps']} accumulated" if a.get("accum_steps", 1) > 1 else ""
    clip = a["clip"] or "none"
    save = f"every {a['save_every']} epochs if val acc >= {a['save_min_acc']}"
    lr2 = (
        f"{a['lr2']:g} -> {a['min_lr']:g}: linear warmup from {a['warmup_start']:g}x over "
        f"{a['warmup_epochs']} epoch(s), then cosine with half-period {a['cosine_epochs']}"
    )
    jitter = f"{a['jitter']:g} (hue {a['hue']:g}), p {a['p_jitter']:g}"
    blur = f"3x3, sigma {a['blur_sigma'][0]:g}-{a['blur_sigma'][1]:g}, p {a['p_blur']:g}"
    rows = [
        ("Training", "batch size", f"{a['batch_size']}{steps}", "both"),
        ("Training", "Phase I epochs", a["epochs1"], "I"),
        ("Training", "Phase II epochs", a["epochs2"], "II"),
        ("Training", "mixed precision", amp, "both"),
        ("Training", "gradient clip (L2 norm)", clip, "II"),
        ("Training", "periodic checkpoints", save, "II"),
        ("Optimizer", "Phase I", f"AdamW, lr {a['lr1']:g} constant, wd {a['wd1']:g}", "I"),
        ("Optimizer", "Phase II", f"{a['optimizer2']}, wd {a['wd2']:g}", "II"),
        ("Optimizer", "Phase II learning rate", lr2, "II"),
        ("Optimizer", "batch norm in Phase I", "frozen" if a["freeze_bn"] else "adapts", "I"),
        ("Loss", "label smoothing", a["label_smoothing"], "both"),
        ("Augmentation", "rotation", f"+-{a['degrees']:g} deg", "train"),
        ("Augmentation", "translation", f"+-{a['translate']:.0%}", "train"),
        ("Augmentation", "scale", f"{a['scale'][0]:g}-{a['scale'][1]:g}", "train"),
        ("Augmentation", "shear", f"+-{a['shear']:g} deg", "train"),
        ("Augmentation", "colour jitter", jitter, "train"),
        ("Augmentation", "Gaussian blur", blur, "train"),
        (
            "Augmentation",
            "flips",
            f"horizontal p {a['p_hflip']:g}, vertical p {a['p_vflip']:g}",
            "train",
        ),
        ("Data", "classes", f"{len(state['classes'])}, {counts_of(state)}", "both"),
        ("Data", "square images by", a.get("resize", "crop"), "all"),
        ("Model", "architecture", state["arch"], "both"),
        ("Model", "input resolution", f"{state['img_size']}x{state['img_size']}", "both"),
        ("Model", "pretrained weights", a["weights"], "both"),
    ]
    rows += levers(a)
    lines = ["| category | parameter | value | phase |", "| --- | --- | --- | --- |"]
    return lines + [f"| {c} | {p} | {v} | {ph} |" for c, p, v, ph in rows]


def levers(a):
    """Table 1's rows for the options beyond the report that the run switched on (--recipe best
    switches several), after the recipe's own row."""
    rows = [("Levers", "recipe", a.get("recipe", "report"), "")]
    on = [
        ("moving average of the weights (EMA)", a.get("ema"), f"decay {a.get('ema')}", "both"),
        ("layer-wise lr decay", a.get("lr_decay", 1) != 1, f"x{a.get('lr_decay')} a stage", "II"),
        ("class weights", a.get("class_weights", "none") != "none", a.get("class_weights"), "both"),
        ("batches", a.get("sampler") == "balanced", "balanced: each class equally often", "both"),
        ("MixUp", a.get("mixup"), f"alpha {a.get('mixup')}", "II"),
        ("CutMix", a.get("cutmix"), f"alpha {a.get('cutmix')}", "II"),
        (
            "weight averaging",
            a.get("average_last"),
            f"the last {a.get('average_last')} Phase II epochs, if it validates better",
            "result",
        ),
        (
            "test-time augmentation",
            a.get("tta") == "auto",
            "horizontal flip, if it validates better",
            "result",
        ),
        (
            "progressive resizing",
            a.get("progressive", 1) < 1,
            f"from {a.get('progressive')} of the size, full after "
            f"{a.get('progressive_until')} of the epochs",
            "II",
        ),
        (
            "test size",
            a.get("test_size") == "auto",
            "the size (and batch norm) that validates best, of three",
            "result",
        ),
    ]

    return rows + [("Levers", name, value, phase) for name, used, value, phase in on if used]


def command_of(state, defaults):
    """The train.py command line of a run: --demo and --recipe if it used them, then the options
    that differ from what the defaults, those presets and the --epochs split make of them."""
    if state.get("command"):
        return state["command"]
    args, parts = state["args"], ["python train.py"]
    implied = {**defaults, **(DEMO if args.get("demo") else {})}
    implied |= RECIPES.get(args.get("recipe", "report"), {})
    if args.get("epochs"):
        implied |= split_budget(args["epochs"])
    if args.get("demo"):
        parts.append("--demo")
    skip = {"resume", "overwrite", "cache_workers", "device", "demo", "mean", "std"}
    for key, value in args.items():
        if key in skip or key not in defaults or value == implied[key] or value is None:
            continue
        if value is True:
            parts.append(f"--{key.replace('_', '-')}")
        elif value is not False:
            values = value if isinstance(value, list) else [value]
            parts.append(
                f"--{key.replace('_', '-')} " + " ".join(shlex.quote(str(v)) for v in values)
            )
    return " ".join(parts)


def counts_of(state):
    """The training images per class, in words: how uneven the classes are."""
    counts = state.get("class_counts")
    if not counts:
        return "training images per class not recorded"
    low, high = min(counts), max(counts)
    return f"{low} to {high} training images each" if low != high else f"{low} training images each"


def per_class_summary(metrics, names, top=5):
    """The classes by F1, the best and the worst (each one, for few classes), with their
    validation and training images: a small class that fails shows here."""
    rows = sorted(metrics["per_class"], key=lambda r: r["f1"])
    present = [r for r in rows if r["support"]]  # as the balanced accuracy averages
    macro = {k: sum(r[k] for r in present) / len(present) for k in ("precision", "recall", "f1")}
    median = present[len(present) // 2]["f1"]
    trained = rows[0].get("train_images") is not None
    absent = len(rows) - len(present)
    lines = [
        f"Over the {len(present)} classes with validation images"
        + (f" ({absent} {'has' if absent == 1 else 'have'} none)" if absent else "")
        + f": macro-averaged precision {macro['precision']:.4f}, recall {macro['recall']:.4f} "
        f"(the balanced accuracy), F1 {macro['f1']:.4f}; median F1 {median:.4f}.",
        "",
        "| | class | precision | recall | F1 | images |"
        + (" training images |" if trained else ""),
        "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if trained else ""),
    ]
    groups = [("best", rows[::-1][:top]), ("worst", rows[:top][::-1])]
    if len(rows) <= 2 * top:  # few classes: each once
        groups = [("", rows[::-1])]
    for label, group in groups:
        for r in group:
            lines.append(
                f"| {label} | {cell(names.get(r['class'], r['class']))} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                + (f" {r['train_images']} |" if trained else "")
            )
    return lines


def confused_table(pairs, names):
    lines = ["| true class | predicted as | images | share of the true class |"]
    lines.append("| --- | --- | ---: | ---: |")
    for p in pairs:
        true, predicted = (cell(names.get(c, c)) for c in (p["true"], p["predicted"]))
        lines.append(f"| {true} | {predicted} | {p['count']} | {p['share']:.1%} |")
    return lines


def comparison_lines(comparison, report, defaults, kept):
    title, folder, runs = comparison["title"], comparison["folder"], comparison["runs"]
    tested = any(r.get("test") for r in runs)
    header = "| run | architecture | Phase II optimizer | parameters | "
    header += "test accuracy | " if tested else ""
    header += "best val acc | epochs | minutes | command |"
    lines = [
        f"## Comparison: {title} (Figures 3 and 4)",
        "",
        notes(f"compare_{comparison['key']}", kept),
        "",
    ]
    lines += [header, "| --- " * (header.count("|") - 1) + "|"]
    for r in runs:
        test = f"{count(*r['test'][:2])} | " if tested else ""
        lines.append(
            f"| {r['label']} | {r['arch']} | {r['optimizer2']} | {r['params'] / 1e6:.1f}M | {test}"
            f"{r['best_acc']:.4f} | {len(r['history'])} | {r['minutes']:.1f} | "
            f"`{command_of(r['state'], defaults)}` |"
        )
    for name, caption in (
        ("fig3_accuracy_vs_parameters.png", "Figure 3: best validation accuracy against size"),
        ("fig4_validation_accuracy_curves.png", "Figure 4: validation accuracy per epoch"),
    ):
        lines += ["", f"![{caption}]({link(folder / name, report)})"]
    return lines + [""]


def where_from(state, history):
    """Which weights of the run these are, and what the run cost."""
    if state.get("averaged"):
        what = f"The weights are the average of {len(state['averaged'])} checkpoints"
        if state.get("val_acc") is not None:
            what += f" (validation accuracy {state['val_acc']:.4f})"
    else:
        kind = {"ema": "the moving average of the weights", "model": "the weights"}
        what = f"The checkpoint holds {kind[state.get('eval_weights', 'model')]} after "
        what += f"phase {state['phase']} epoch {state['epoch']}"
        what += f" ({state['step']} batches into the next)" if state.get("step") else ""
    if state.get("tta"):
        what += ", predicted with each image's horizontal flip averaged in (it validated better)"
    if history:
        best = max(history, key=best_acc)
        what += f"; the run's best validation epoch was phase {best['phase']} epoch {best['epoch']}"
        minutes = sum(r["seconds"] + r.get("val_seconds", 0) for r in history) / 60
        what += f", of {len(history)} ({minutes:.1f} minutes of training and validation)"
    return [what + "."]


class Evaluated(NamedTuple):
    """A checkpoint as evaluate.py found it: its dict, its run's history, its validation metrics
    and, with --answers, its test Score."""

    state: dict
    history: list
    metrics: dict
    test: object = None


def write_report(path, figures, evaluated, comparisons, names, defaults):
    """The report of `evaluated` as Markdown at `path`; its images are in `figures` (linked
    relatively)."""
    state, history, metrics, test = evaluated
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    kept = dict(NOTES.findall(old))
    n = metrics["images"]
    lines = [
        f"# {state['arch']} on {state['data']}: results",
        "",
        notes("summary", kept),
        "",
        "## The method as this run used it (Table 1)",
        "",
        *(table1(state) if "lr1" in state["args"] else ["Trained by another program."]),
        "",
        f"Command: `{command_of(state, defaults)}`",
        "",
        "## Result",
        "",
        f"Data: {metrics.get('data_layout') or state['data']}.",
        "",
        "| split | images | top-1 | balanced accuracy | top-5 |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| validation | {n} | {count(metrics['top1_correct'], n)} | {metrics['balanced']:.4f} | "
        f"{count(metrics['top5_correct'], n)} |",
    ]
    if test:
        lines.append(
            f"| test | {test.total} | {count(test.correct, test.total)} | {test.balanced:.4f} | |"
        )
    lines += ["", *where_from(state, history), "", notes("result", kept), ""]
    if history:
        lines += [
            "## Training (Figures 1 and 2)",
            "",
            f"![Figure 1: training loss]({link(figures / 'fig1_loss.png', path)})",
            "",
            f"![Figure 2: validation accuracy]({link(figures / 'fig2_val_accuracy.png', path)})",
            "",
        ]
    lines += [
        notes("training", kept),
        "",
        "## Errors (Figure 5, the mistakes gallery)",
        "",
        f"![Figure 5: confusion matrix]({link(figures / 'fig5_confusion_matrix.png', path)})",
        "",
        f"![The most confident mistakes]({link(figures / 'mistakes.png', path)})",
        "",
        "Where the model looks (Grad-CAM on its last residual stage, for the predicted class): the "
        "most confident mistakes, then as many of the most confident correct predictions.",
        "",
        f"![Grad-CAM]({link(figures / 'gradcam.png', path)})",
        "",
        "The most confused pairs on the validation split:",
        "",
        *confused_table(metrics["most_confused"], names),
        "",
        notes("errors", kept),
        "",
        "## Per-class metrics",
        "",
        *per_class_summary(metrics, names),
        "",
        f"Every class: [per_class_metrics.csv]({link(figures / 'per_class_metrics.csv', path)}).",
        "",
    ]
    for comparison in comparisons:
        lines += comparison_lines(comparison, path, defaults, kept)
    if APPENDIX in old:
        lines += [APPENDIX + old.split(APPENDIX, 1)[1]]
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines))
