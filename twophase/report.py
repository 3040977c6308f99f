"""The Markdown report of a run, written by `evaluate.py --report`, fit to hand in as it is: its
result as exact counts first (balanced accuracy beside top-1 where the classes are uneven),
Table 1 as the run used it (from its checkpoint, not from today's defaults: no row of what it did
not do), its figures numbered in the order it shows them (the method's report's own number given
where it differs), the labels the model disputes and the data check's copies (its Data section),
a summary of its per-class metrics, and, with --compare, the comparison. No path of the machine
it was made on: paths relative to the report, or names.

Prose written between `<!-- notes:NAME -->` and `<!-- /notes -->`, with NAME one of SLOTS, is
kept in its place when the report is written again: the numbers can be made again at will. A
report carries a mark, the digest of its text outside the notes: one edited elsewhere (or a file
that is no report of evaluate.py's) is the user's, moved aside rather than written over.
"""

import hashlib
import re
import statistics
from pathlib import Path
from typing import NamedTuple

from data import uneven
from twophase.checkpoint import best_acc, epoch_name, epochs_name, weights_name
from twophase.markdown import cell, count, link
from twophase.table1 import command_lines, command_of, table1
from twophase.written import set_aside
from utils import atomic_file

NOTES = re.compile(r"<!-- notes:(\w+) -->\n(.*?)<!-- /notes -->", re.S)
# Sections that other tools add to a report (benchmarks/levers.py's) follow this line: a report
# written again over an earlier one keeps them as they were.
APPENDIX = "<!-- sections added to the report -->\n"
MARK = re.compile(r"<!-- written by evaluate\.py --report \(([0-9a-f]{16})\)[^\n]*-->\n?")


def digest(text):
    """The digest of a report's own text (before APPENDIX) outside its notes and its mark, blanks
    aside: what an edit of the user's changes, and prose in a slot does not."""
    outside = NOTES.sub("", MARK.sub("", text.partition(APPENDIX)[0]))
    return hashlib.sha256(" ".join(outside.split()).encode()).hexdigest()[:16]


def marked(text):
    """A report's own text with its mark last: its digest, and what it means to the reader."""
    return (
        text.rstrip("\n")
        + f"\n\n<!-- written by evaluate.py --report ({digest(text)}): prose between the notes "
        "markers is kept when it is written again; a change elsewhere makes this file yours, "
        "kept aside then -->\n"
    )


def as_written(text):
    """Whether `text` is a report evaluate.py wrote, unchanged but in its notes (prose in a slot,
    a slot added) and in the sections added after APPENDIX."""
    found = MARK.search(text.partition(APPENDIX)[0])
    return found is not None and found.group(1) == digest(text)


def why_kept(text):
    """Why a report that evaluate.py would write over (or remove) is kept: it is not one of its
    reports, or one edited outside its notes, or one holding prose (None: it holds none)."""
    if text is None or not MARK.search(text):
        return "is not a report evaluate.py wrote"
    if not as_written(text):
        return "was edited outside its notes"
    generated, _, appendix = text.partition(APPENDIX)
    if appendix or any(prose.strip() for _, prose in NOTES.findall(generated)):
        return "holds prose of its own"
    return None


SLOTS = ("summary", "result", "training", "errors", "data", "per_class")  # and compare_KEY


def notes(name, kept):
    """A slot for prose, holding what an earlier version of the report had there."""
    return f"<!-- notes:{name} -->\n{kept.get(name, '')}<!-- /notes -->"


def kept_notes(name, kept):
    """The prose an earlier version of the report kept in the slot `name`, as lines (none where it
    kept none: a generated report holds no empty slot)."""
    if not kept.get(name, "").strip():
        return []
    return [notes(name, kept), ""]


def dataset_name(state):
    """The dataset's name: its folder's, as the run was given it (`data/demo`: demo). The folder
    above is never taken for it: for data in a clone's data/, that is the clone's name."""
    root = Path(state["args"].get("data") or state.get("data") or "data")
    return root.name or root.resolve().name


CAPTIONS = {  # a figure's file: its caption, to the report's reader
    "fig1_loss.png": (
        "the training loss over the steps (smoothed) and the validation loss at each epoch's end"
    ),
    "fig2_val_accuracy.png": (
        "validation accuracy at each epoch's end, epochs numbered within their phase; the star "
        "marks the weights evaluated here"
    ),
    "fig5_confusion_matrix.png": (
        "the confusion matrix: the validation images of each true class (rows) by the class "
        "predicted (columns), coloured by their share of the row"
    ),
    "fig5_most_confused.png": "the same for the classes most often in a mistake, alone",
    "mistakes.png": "the validation images misclassified with the highest confidence",
    "gradcam.png": (
        "where the model looks (Grad-CAM for the predicted class, on the deepest residual stage "
        "whose maps are 4 x 4 or more): the most confident mistakes, then correct predictions, "
        "each class in turn"
    ),
    "label_issues.png": (
        "the validation labels the model disputes, the least likely first, each titled with its "
        "given class and the model's and the probability of each: candidates to look at, not "
        "errors proven"
    ),
    "copies.png": (
        "copies that cross splits or labels, a group a row, each image titled with its split and "
        "label"
    ),
    "fig3_accuracy_vs_parameters.png": "each run's best validation accuracy against its size",
    "fig4_validation_accuracy_curves.png": "each run's validation accuracy at each epoch's end",
}


class Figures:
    """The report's figures, numbered in the order it shows them."""

    def __init__(self, report):
        self.report, self.shown = Path(report), 0

    def __call__(self, path):
        """A figure's lines: the image, and its caption (CAPTIONS) with its number."""
        self.shown += 1
        title = f"Figure {self.shown}: {CAPTIONS[Path(path).name]}"
        return [f"![{title}]({link(path, self.report)})", "", f"*{title}.*", ""]


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


def per_class_summary(metrics, names, top=5):
    """The classes by F1, the best and the worst (each one, for few classes), with their
    validation and training images: a small class that fails shows here."""
    rows = sorted(metrics["per_class"], key=lambda r: r["f1"])
    present = [r for r in rows if r["support"]]  # as the balanced accuracy averages
    macro = {k: sum(r[k] for r in present) / len(present) for k in ("precision", "recall", "f1")}
    median = statistics.median(r["f1"] for r in present)
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


def comparison_lines(comparison, figures, defaults, kept):
    """A comparison's section: its table of runs and its two figures (the method's report's
    Figures 3 and 4), numbered by `figures` (a Figures)."""
    title, folder, runs = comparison["title"], comparison["folder"], comparison["runs"]
    here = figures.report.parent
    tested = any(r.get("test") for r in runs)
    header = "| run | architecture | Phase II optimizer | parameters | "
    header += "test accuracy | " if tested else ""
    header += "best val acc | epochs | minutes | command |"
    lines = [f"## Comparison: {title}", "", *kept_notes(f"compare_{comparison['key']}", kept)]
    lines += [header, "| --- " * (header.count("|") - 1) + "|"]
    for r in runs:
        test = f"{count(*r['test'][:2])} | " if tested else ""
        lines.append(
            f"| {cell(r['label'])} | {r['arch']} | {r['optimizer2']} | {r['params'] / 1e6:.1f}M | "
            f"{test}{r['best_acc']:.4f} | {len(r['history'])} | {r['minutes']:.1f} | "
            f"`{command_of(r['state'], defaults, here)}` |"
        )
    lines.append("")
    lines += figures(folder / "fig3_accuracy_vs_parameters.png")
    return lines + figures(folder / "fig4_validation_accuracy_curves.png")


def where_from(state, history, metrics, test_source=None):
    """Where each number of the result comes from: the images and labels of each split, the
    weights the checkpoint holds, that validation chose them (so its accuracy flatters them),
    and what each phase did."""
    n = metrics["images"]
    chose = "the split that chose these weights, so its accuracy is optimistic"
    split = validation_words(metrics.get("data_layout") or "", state["args"])
    lines = [f"- Validation: the {n} images of {split}; {chose}."]
    if test_source:
        lines.append(f"- Test: {test_source}; not seen in training or in choosing the weights.")
    else:
        lines.append(
            "- Test: none given; held-out images with their labels (evaluate.py --test-dir and "
            "--answers) give the estimate validation cannot."
        )
    lines.append(f"- Weights: {weights_held(state, history)}.")
    lines += phases_done(state, history, metrics)
    if history:
        minutes = sum(r["seconds"] + r.get("val_seconds", 0) for r in history) / 60
        lines.append(
            f"- Cost: {len(history)} epochs, {minutes:.1f} minutes of training and validation."
        )
    return lines


def validation_words(layout, a):
    """Which images validated the run, by how its data was laid out (data.DatasetFiles.layout)."""
    if "held out" in layout:
        share = a.get("val_fraction")
        share = f"{share:g} of each class, " if share is not None else ""
        return f"the training images held out for validation ({share}by --seed {a.get('seed')})"
    if a.get("val_labels"):
        return f"val/, labelled by {Path(a['val_labels']).name}"
    return "val/"


def weights_held(state, history):
    """Which weights the checkpoint holds, in words, and the run's best epoch beside them."""
    best = max(history, key=best_acc) if history else None
    if state.get("averaged"):
        names = [Path(p).name for p in state["averaged"]]
        records = [r for r in history if r["phase"] == 2][-len(names) :]
        what = f"the average of {epochs_name(records) if records else ', '.join(names)}"
        if state.get("val_acc") is not None:
            what += f" (validation accuracy {state['val_acc']:.4f})"
        if best:
            what += f", which validated better than the best epoch, {epoch_name(best)} "
            what += f"({weights_name(best)}, {best_acc(best):.4f})"
    else:
        kind = {"ema": "the weights' moving average", "model": "the weights"}
        what = f"{kind[state.get('eval_weights', 'model')]} after {epoch_name(state)}"
        what += f" ({state['step']} batches into the next)" if state.get("step") else ""
        if best and (best["phase"], best["epoch"]) == (state["phase"], state["epoch"]):
            what += ", the run's best validation epoch"
        elif best:
            what += f"; the run's best validation epoch was {epoch_name(best)}"
    if state.get("test_size") and state.get("test_size") != state.get("img_size"):
        what += f", tested at {state['test_size']} px (it validated better there)"
    if state.get("tta"):
        what += ", predicted with each image's horizontal flip averaged in (it validated better)"
    return what


def phases_done(state, history, metrics):
    """A line for each phase the run trained: its epochs and optimizer steps and where it took
    validation accuracy, said where it left the model no better than always answering the
    largest class."""
    a, counts = state["args"], state.get("class_counts") or []
    supports = [r["support"] for r in metrics["per_class"]]
    largest = max(supports) / sum(supports) if sum(supports) else 0.0
    batch = a.get("batch_size", 1) * a.get("accum_steps", 1)
    steps = -(-sum(counts) // batch) if counts else None
    lines = []
    for number in (1, 2):
        records = [r for r in history if r["phase"] == number]
        if not records:
            continue
        did = f"{len(records)} epoch{'s' * (len(records) > 1)}"
        if steps:
            did += f", {steps * len(records)} optimizer steps"
        end = records[-1]["val_acc"]
        line = f"- Phase {'I' * number}: {did}; validation accuracy {end:.4f} at its end"
        if records[-1]["val_acc"] <= largest + 0.01:
            line += (
                f", no better than always answering the largest class ({largest:.4f}): it moved "
                "the model little"
            )
            if number == 1:
                line += " (more Phase I epochs or a smaller batch give the head more steps)"
        lines.append(line + ".")
    return lines


class Evaluated(NamedTuple):
    """A checkpoint as evaluate.py found it: its dict, its run's history, its validation metrics
    and, with --answers, its test Score and where it came from (its images and labels)."""

    state: dict
    history: list
    metrics: dict
    test: object = None
    test_source: str | None = None


def headline(state, metrics, test):
    """The result in a sentence or two: top-1 on the validation (and test) images, and where the
    classes are uneven, balanced accuracy beside it, and why it counts."""
    n = metrics["images"]
    line = f"Validation top-1 {count(metrics['top1_correct'], n)}"
    counts = state.get("class_counts") or []
    if uneven(counts):
        line += f", balanced accuracy {metrics['balanced']:.4f}"
    if test:
        line += f"; test top-1 {count(test.correct, test.total)}"
        line += f", balanced {test.balanced:.4f}" if uneven(counts) else ""
    line += "."
    if uneven(counts):
        line += (
            f" The classes are uneven ({min(counts)} to {max(counts)} training images each): top-1 "
            "favours the large ones, and balanced accuracy, the mean of each class's share of its "
            "images called right, is the fairer measure."
        )
    return line


def write_report(path, figures, evaluated, comparisons, names, defaults):
    """The report of `evaluated` as Markdown at `path`; its images are in `figures` (linked
    relatively)."""
    state, history, metrics, test, test_source = evaluated
    path = Path(path)
    old = read_report(path)
    # The sections other tools added keep their own notes.
    generated, _, appendix = (old or "").partition(APPENDIX)
    kept, shown, here = dict(NOTES.findall(generated)), Figures(path), path.parent
    n, top5 = metrics["images"], len(state["classes"]) > 5  # of 5 classes or fewer, top-5 is 1
    lines = [
        f"# {state['arch']} on {dataset_name(state)}: results",
        "",
        headline(state, metrics, test),
        "",
    ]
    lines += kept_notes("summary", kept)
    lines += [
        "## Result",
        "",
        "| split | images | top-1 | balanced accuracy |" + (" top-5 |" if top5 else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: |" if top5 else ""),
        f"| validation | {n} | {count(metrics['top1_correct'], n)} | {metrics['balanced']:.4f} |"
        + (f" {count(metrics['top5_correct'], n)} |" if top5 else ""),
    ]
    if test:
        lines.append(
            f"| test | {test.total} | {count(test.correct, test.total)} | {test.balanced:.4f} |"
            + (" |" if top5 else "")
        )
    lines += [
        "",
        *where_from(state, history, metrics, test_source),
        "",
        *kept_notes("result", kept),
    ]
    lines += ["## The method as this run used it (Table 1)", ""]
    lines += table1(state, here, history) if "lr1" in state["args"] else ["Trained elsewhere."]
    lines += ["", *command_lines(state, defaults, here), ""]
    if history:
        lines += ["## Training", ""]
        lines += shown(figures / "fig1_loss.png") + shown(figures / "fig2_val_accuracy.png")
        lines += kept_notes("training", kept)
    lines += errors_lines(figures, metrics, names, shown) + kept_notes("errors", kept)
    lines += data_lines(figures, metrics, shown) + kept_notes("data", kept)
    lines += ["## Per-class metrics", "", *per_class_summary(metrics, names), ""]
    every = link(figures / "per_class_metrics.csv", path)
    lines += [f"Every class: [per_class_metrics.csv]({every}).", ""]
    lines += kept_notes("per_class", kept)
    for comparison in comparisons:
        lines += comparison_lines(comparison, shown, defaults, kept)
    placed = set(NOTES.findall("\n".join(lines)))
    unplaced = [name for name, text in kept.items() if text.strip() and (name, text) not in placed]
    if unplaced:  # a slot this report has no place for (a name mistyped, a comparison not made)
        lines += ["## Notes", ""] + [line for name in unplaced for line in kept_notes(name, kept)]
    text = marked("\n".join(lines))
    if appendix:
        text += f"\n{APPENDIX}{appendix}".rstrip("\n") + "\n"
    if (path.exists() or path.is_symlink()) and (old is None or not as_written(old)):
        set_aside(path, why_kept(old))  # its notes are in the new one too, all of it there
    with atomic_file(path, "w") as f:
        f.write(text)


def read_report(path):
    """The text of the report at `path`: "" where there is none, None where what is there is no
    text (a folder, a binary file)."""
    if not path.exists():
        return ""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def errors_lines(figures, metrics, names, shown):
    """The errors' section: the confusion matrix (and the most confused classes alone, where
    there are many), the most confident mistakes, Grad-CAM, the most confused pairs."""
    lines = ["## Errors", "", *shown(figures / "fig5_confusion_matrix.png")]
    if (figures / "fig5_most_confused.png").is_file():
        lines += shown(figures / "fig5_most_confused.png")
    lines += shown(figures / "mistakes.png") + shown(figures / "gradcam.png")
    pairs = confused_table(metrics["most_confused"], names)
    return lines + ["The most confused pairs on the validation split:", "", *pairs, ""]


def data_lines(figures, metrics, shown):
    """The data's section: the copies the run's data check found across splits or labels (where
    it had one) and the validation labels the model disputes, counted, then each shown."""
    disputed, copies, n = metrics.get("disputed_labels"), metrics.get("copies"), metrics["images"]
    if disputed is None:  # metrics of an evaluate.py from before
        return []
    found = [f"the model disputes {disputed} of the {n} validation labels"]
    if copies:
        found[:0] = [
            f"{photos(copies['across_splits'])} with copies in two splits or more",
            f"{photos(copies['two_labels'])} under two labels or more",
        ]
    lines = ["## Data", "", f"In the data: {'; '.join(found)}.", ""]
    if copies and copies["shown"]:
        lines += [COPIES, "", *shown(figures / "copies.png")]
    lines += [disputed_words(disputed, link(figures / "label_issues.csv", shown.report)), ""]
    return lines + (shown(figures / "label_issues.png") if disputed else [])


def photos(n):
    return f"{n} photo{'s' * (n != 1)}"


COPIES = (
    "Copies, as train.py's data check found them (data_check.csv in the run's folder): a photo "
    "in two splits is scored on what the run may have trained on, so that split's accuracy "
    "flatters the model; a photo under two labels has one of them wrong, or two classes overlap. "
    "Keep one copy, in one split, under its right label, and train again."
)


def disputed_words(disputed, csv_link):
    """What the disputed labels are, and what to do with them."""
    if not disputed:
        return "The model disputes no validation label."
    return (
        "A label is disputed where the model is confident of another class (its probability at "
        "or above that class's mean over the images labelled with it) and predicts another class "
        "than the given one: confident learning's rule (Northcutt et al., 2021). The model saw "
        "none of these images in training. They are candidates to look at, not errors proven: "
        "the label may be wrong, the photo may show two things, or the model may be mistaken. "
        f"[label_issues.csv]({csv_link}) lists every one, the least likely label first, to review "
        "by hand; a label found wrong is mended by moving the file to its class's folder (or "
        "its row in the labels CSV), and counts from the next training."
    )
