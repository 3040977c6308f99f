"""The files a grader reads: a prediction CSV in the layout asked for, written as predictions
stream in; read back and checked against the images and the classes; scored against the true
labels (accuracy, balanced accuracy, top-k, the most confused pairs).

    image_name,pred_label           the default: one row per image, sorted by name
    id,breed                        predict.py --columns id,breed
    img_01.jpg,cat                  --keep-ext: file names with their extension
    img_01,cat dog fox              --topk 3: the 3 likeliest classes, best first
    id,beagle,cat,...               --probs FILE: a probability per class, each row sums to 1

Reading, a name may be written with its extension or without (true labels often keep it), any
two column names are taken (image first), and a file of probabilities is told by its header.
"""

import csv
import math
import shlex
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from twophase.inference import confusion_matrix, most_confused, predict_folder, test_images
from twophase.tables import (
    SEPARATOR_NAMES,
    Names,
    Problems,
    class_list,
    find_class,
    read_csv,
    read_labels,
)
from twophase.written import replacing
from utils import Problem

DEFAULT_COLUMNS = ("image_name", "pred_label")


@dataclass(frozen=True)
class Layout:
    """How a prediction CSV is written: its column names, its image names (with their extension
    or not) and how many labels a row holds."""

    columns: tuple = DEFAULT_COLUMNS
    keep_ext: bool = False
    topk: int = 1

    @classmethod
    def parse_columns(cls, text):
        names = tuple(name.strip() for name in text.split(","))
        if len(names) != 2 or not all(names):
            raise Problem(
                f"--columns {text}: two column names, image first (image_name,pred_label)"
            )
        return names

    def name(self, file):
        return Path(file).name if self.keep_ext else Path(file).stem


def write(rows, classes, layout, out=None, probs=None):
    """The prediction CSV of `rows`, (file, probabilities) as they stream in, to `out` (a path;
    None: standard output), and with `probs` a CSV of every class's probability beside it.
    Memory stays flat in the number of images; a file appears under its name only complete, and
    one there that predict.py did not write is set aside, not replaced (twophase/written.py).
    Returns (rows written, seconds)."""
    with ExitStack() as files:
        labels = files.enter_context(
            replacing(out, "predict.py", newline="") if out else nullcontext(sys.stdout)
        )
        writer = csv.writer(labels, lineterminator="\n")
        writer.writerow(layout.columns)
        spread = None
        if probs:
            table = files.enter_context(replacing(probs, "predict.py", newline=""))
            spread = csv.writer(table, lineterminator="\n")
            spread.writerow([layout.columns[0], *classes])
        start, count, known = time.perf_counter(), 0, set(classes)
        for file, p in rows:
            name = layout.name(file)
            best = np.argsort(-p, kind="stable")[: layout.topk]
            writer.writerow([name, join_labels([classes[i] for i in best], known)])
            if spread is not None:
                spread.writerow([name, *(f"{v:.6g}" for v in p)])
            count += 1
        seconds = time.perf_counter() - start
        labels.flush()
    return count, seconds


# ----------------------------------------------------------------------------- reading back


def join_labels(labels, classes):
    """A row's labels as its label cell: one class name as it is; several, best first, separated
    by spaces (Kaggle's layout), a name that holds a space, a quote or a backslash in quotes as a
    shell word (`'golden retriever' beagle`). Where that cell would read as another class's name
    (`a b` for the classes a and b, beside a class "a b"), every name is in quotes. split_labels
    reads back exactly what was meant, or this says why it cannot."""
    if len(labels) == 1:
        return labels[0]
    cell = " ".join(map(quoted, labels))
    if cell in classes:
        cell = " ".join(map(in_quotes, labels))
    if split_labels(cell, classes) != list(labels):
        raise Problem(
            f"the classes {', '.join(map(repr, labels))} cannot be written as one label cell that "
            "reads back as them: predict with --topk 1 (and --probs FILE for every class)"
        )
    return cell


def quoted(label):
    """A class name as a shell word: in quotes where it holds a space, a quote or a backslash."""
    if any(c.isspace() or c in "'\"\\" for c in label):
        return in_quotes(label)
    return label


def in_quotes(label):
    return "'" + label.replace("'", "'\"'\"'") + "'"


def split_labels(cell, classes):
    """A label cell as its labels, best first (join_labels' inverse): a cell that names a class is
    that class; any other is read as shell words. A list of names, each still to check."""
    found = find_class(cell, classes)
    if found is not None:
        return [found]
    try:
        return shlex.split(cell)
    except ValueError:  # an unclosed quote: one label, which will not be a class
        return [cell.strip()]


@dataclass
class Predictions:
    """A prediction CSV read and checked: each image's labels, best first (or the likeliest
    class of a file of probabilities), and every problem as a line."""

    labels: dict  # file -> [labels]
    problems: list
    probabilities: bool = False


def read_predictions(path, names, classes):
    """A prediction CSV (any of write's layouts) checked against the images `names` (a Names)
    and the classes: a header, each image at most once, every label a class, and for a file of
    probabilities, a column for every class and rows that sum to 1."""
    table = read_csv(path, header_needed=True)
    table.say()
    index, problems, labels = set(classes), Problems(path), {}
    if table.separator != ",":
        problems.add(
            1,
            table.shown(table.first[1]),
            f"is separated by {SEPARATOR_NAMES[table.separator]}: a grader reads commas, so "
            "write the file with commas",
        )
    if names.file(table.header[0]) is not None:
        problems.add(
            1,
            table.header[0],
            "names an image, not a column: a grader reads the first line as the header, so "
            "write one (e.g. id,label) above the rows",
        )
    probabilities = len(table.header) > 2 and set(table.header[1:]) == index
    if len(table.header) != 2 and not probabilities:
        problems.add(
            1,
            ",".join(table.header),
            f"is a header of {len(table.header)} columns: expected an image's and a label's, or "
            "an image's and one for each class",
        )
        return Predictions({}, problems.lines())
    first = {}  # file -> the line of its first row
    for line, row in table.rows:
        if len(row) != len(table.header):
            problems.add(line, ",".join(row), f"has {len(row)} fields, not {len(table.header)}")
            continue
        file, why = names.find(row[0])
        if file is None:
            problems.add(line, row[0], why)
            continue
        if file in first:
            problems.add(line, row[0], f"is a second row of {file} (the first: line {first[file]})")
            continue
        first[file] = line
        if probabilities:
            ranked, why = ranked_classes(row[1:], table.header[1:])
            if why:
                problems.add(line, row[0], why)
                continue
        else:
            ranked = split_labels(row[1], index)
            unknown = [label for label in ranked if label not in index]
            if unknown or not ranked:
                hint = f"the checkpoint's classes: {class_list(classes)}"
                why = "is not one of the checkpoint's classes"
                problems.add(line, unknown[0] if unknown else row[1], why, hint)
                continue
        labels[file] = ranked
    return Predictions(labels, problems.lines(), probabilities)


def ranked_classes(cells, classes):
    """A row of probabilities as the classes ranked by it, or the reason it is not one."""
    try:
        p = np.array([float(c) for c in cells])
    except ValueError:
        return None, "has a probability that is not a number"
    if not (np.all(p >= 0) and math.isclose(p.sum(), 1.0, abs_tol=1e-3)):
        return None, f"has probabilities that sum to {p.sum():.4f}, not 1"
    return [classes[i] for i in np.argsort(-p, kind="stable")], None


def read_answers(path, names, classes):
    """True labels (two columns, image first, under a header or none; names with or without
    their extension): file -> label, checked; a Problem naming every problem."""
    return {file: label for file, (label, _) in read_labels(path, names, classes=classes).items()}


def missing(labels, expected):
    """The images of `expected` a CSV has no row for, as problems."""
    return [f"{Path(file).name}: missing" for file in sorted(set(expected) - set(labels))]


# ----------------------------------------------------------------------------- scoring


class Score(NamedTuple):
    """Predictions against true labels, from exact counts."""

    correct: int  # images whose best label is true
    total: int
    balanced: float  # the mean over the classes present of each one's share of correct images
    topk_correct: int  # images with the true label among their labels
    k: int  # how many labels a row held (the most of any)
    confused: list  # the most confused pairs (inference.most_confused)
    classes: int = 0  # how many the model tells apart (top-k of all of them says nothing)

    @property
    def accuracy(self):
        return self.correct / self.total if self.total else float("nan")


def score(labels, answers, classes, top=10):
    """The Score of `labels` (file -> labels, best first) on the images of `answers`."""
    index = {c: i for i, c in enumerate(classes)}
    files = sorted(answers)
    truth = np.array([index[answers[f]] for f in files], dtype=np.int64)
    best = np.array([index[labels[f][0]] for f in files], dtype=np.int64)
    counts = confusion_matrix(truth, best, len(classes), normalize=False)
    present = counts.sum(axis=1) > 0
    recall = np.diag(counts)[present] / counts.sum(axis=1)[present]
    return Score(
        correct=int((truth == best).sum()),
        total=len(files),
        balanced=float(recall.mean()) if len(recall) else float("nan"),
        topk_correct=sum(answers[f] in labels[f] for f in files),
        k=max((len(labels[f]) for f in files), default=1),
        confused=most_confused(counts, classes, top),
        classes=len(classes),
    )


def describe(score):
    """A Score as the line predict.py --check prints."""
    line = (
        f"accuracy {score.accuracy:.4f} ({score.correct}/{score.total}), balanced accuracy "
        f"{score.balanced:.4f}"
    )
    if 1 < score.k < (score.classes or score.k + 1):  # top-k of every class is 1 by definition
        hits = score.topk_correct
        line += f", top-{score.k} {hits / score.total:.4f} ({hits}/{score.total})"
    return line


class Answers(NamedTuple):
    """A test folder's images and their true labels, read from a CSV and checked."""

    folder: Path
    files: list
    truth: dict  # file -> label
    path: Path  # the CSV


def test_answers(test_dir, answers, classes):
    """The Answers of a test folder from the CSV `answers`, checked against its images."""
    files = test_images(test_dir, keep_ext=True)
    truth = read_answers(answers, Names(files, test_dir), classes)
    return Answers(Path(test_dir), files, truth, Path(answers))


def test_score(trained, answers, threads=4, batch_size=128, top=10):
    """A checkpoint's Score on the test folder of `answers` (test_answers'), predicted as
    predict.py predicts it."""
    rows, _ = predict_folder(trained, answers.folder, answers.files, None, threads, batch_size)
    labels = {file: [trained.classes[int(p.argmax())]] for file, p in rows}
    gaps = missing(labels, answers.truth)
    if gaps:
        raise Problem(f"{answers.path} does not match {answers.folder}: " + "; ".join(gaps[:10]))
    return score(labels, answers.truth, trained.classes, top)
