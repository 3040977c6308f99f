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
import sys
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data import more
from inference import confusion_matrix, most_confused, predict_folder, test_images
from utils import Problem, atomic_file, log

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
    Memory stays flat in the number of images; a file appears under its name only complete.
    Returns (rows written, seconds)."""
    with ExitStack() as files:
        labels = files.enter_context(
            atomic_file(out, "w", newline="") if out else nullcontext(sys.stdout)
        )
        writer = csv.writer(labels, lineterminator="\n")
        writer.writerow(layout.columns)
        spread = None
        if probs:
            table = files.enter_context(atomic_file(probs, "w", newline=""))
            spread = csv.writer(table, lineterminator="\n")
            spread.writerow([layout.columns[0], *classes])
        start, count = time.perf_counter(), 0
        for file, p in rows:
            name = layout.name(file)
            best = np.argsort(-p, kind="stable")[: layout.topk]
            writer.writerow([name, " ".join(classes[i] for i in best)])
            if spread is not None:
                spread.writerow([name, *(f"{v:.6g}" for v in p)])
            count += 1
        seconds = time.perf_counter() - start
        labels.flush()
    return count, seconds


# ----------------------------------------------------------------------------- reading back


@dataclass
class Table:
    """A CSV read back: its header and rows (blank lines dropped), where it came from."""

    path: Path
    header: list
    rows: list  # (line number, cells)


def read_table(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except OSError as e:
        raise Problem(f"cannot read {path}: {e}") from None
    if not lines:
        raise Problem(f"{path} is empty: expected a header, then a row per image")
    rows = [(n, row) for n, row in enumerate(lines[1:], start=2) if any(c.strip() for c in row)]
    return Table(Path(path), [c.strip() for c in lines[0]], rows)


class Names:
    """The images of a folder by every name a CSV may give them: the file's name or its stem."""

    def __init__(self, files):
        self.files = list(files)
        self.of = {}
        for file in self.files:
            self.of[Path(file).name] = file
            self.of.setdefault(Path(file).stem, file)

    def file(self, name):
        return self.of.get(name)


@dataclass
class Predictions:
    """A prediction CSV read and checked: each image's labels, best first (or the likeliest
    class of a file of probabilities), and every problem as a sentence."""

    labels: dict  # file -> [labels]
    problems: list
    probabilities: bool = False


def read_predictions(path, names, classes):
    """A prediction CSV (any of write's layouts) checked against the images `names` (a Names)
    and the classes: each image at most once, every label a class, and for a file of
    probabilities, a column for every class and rows that sum to 1."""
    table = read_table(path)
    known, problems, labels = set(classes), [], {}
    if table.header and names.file(table.header[0]):  # its first row is an answer
        problems.append(
            f"line 1 names an image ({table.header[0]}), not the columns: a grader reads the "
            "first line as the header, so write one (e.g. id,label) above the rows"
        )
    probabilities = len(table.header) > 2 and set(table.header[1:]) == known
    if len(table.header) != 2 and not probabilities:
        problems.append(
            f"the header has {len(table.header)} columns: expected an image's and a label's, or "
            "an image's and one for each class"
        )
        return Predictions({}, problems)
    seen = Counter()
    for line, row in table.rows:
        if len(row) != len(table.header):
            problems.append(f"line {line}: expected {len(table.header)} fields, found {len(row)}")
            continue
        file = names.file(row[0].strip())
        if file is None:
            problems.append(f"line {line}: {row[0]} is not among the images")
            continue
        seen[file] += 1
        if probabilities:
            ranked, why = ranked_classes(row[1:], table.header[1:])
        else:
            ranked = row[1].split()
            unknown = [label for label in ranked if label not in known]
            why = (
                f"{', '.join(map(repr, unknown))} {UNKNOWN}"
                if unknown
                else "no label"
                if not ranked
                else None
            )
        if why:
            problems.append(f"line {line}: {why}")
        else:
            labels[file] = ranked
    problems += [f"{Path(file).name}: {n} rows" for file, n in sorted(seen.items()) if n > 1]
    return Predictions(labels, problems, probabilities)


def ranked_classes(cells, classes):
    """A row of probabilities as the classes ranked by it, or the reason it is not one."""
    try:
        p = np.array([float(c) for c in cells])
    except ValueError:
        return None, "a probability that is not a number"
    if not (np.all(p >= 0) and math.isclose(p.sum(), 1.0, abs_tol=1e-3)):
        return None, f"probabilities that sum to {p.sum():.4f}, not 1"
    return [classes[i] for i in np.argsort(-p, kind="stable")], None


def read_answers(path, names, classes):
    """True labels (any two columns, image first; names with or without their extension):
    file -> label, checked; A Problem naming every problem."""
    table = read_table(path)
    answers, problems, known = {}, [], set(classes)
    if len(table.header) != 2:
        raise Problem(f"{path}: expected two columns, an image's and its label's")
    rows = table.rows
    if names.file(table.header[0]):
        log(f"{path}: line 1 names an image ({table.header[0]}): read as an answer, not a header")
        rows = [(1, table.header), *rows]
    for line, row in rows:
        file = names.file(row[0].strip()) if len(row) == 2 else None
        if len(row) != 2:
            problems.append(f"line {line}: expected 2 fields, found {len(row)}")
        elif file is None:
            problems.append(f"line {line}: {row[0]} is not among the images")
        elif row[1].strip() not in known:
            problems.append(f"line {line}: {row[1]!r} {UNKNOWN}")
        elif file in answers:
            problems.append(f"line {line}: {row[0]} again")
        else:
            answers[file] = row[1].strip()
    if problems:
        raise Problem(
            f"{path}: {len(problems)} of its {len(rows)} rows cannot be scored:\n  "
            + "\n  ".join(problems[:20])
            + more(problems, 20)
            + "".join(f"\n  {hint}" for hint in classes_hint(problems, classes))
        )
    return answers


UNKNOWN = "is not one of the checkpoint's classes"


def classes_hint(problems, classes):
    """The checkpoint's classes, as a line to add where a problem is a label outside them."""
    if not any(UNKNOWN in problem for problem in problems):
        return []
    rest = f", ... ({len(classes)} in all)" if len(classes) > 30 else ""
    return [f"the checkpoint's classes: {', '.join(classes[:30])}{rest}"]


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
    )


def describe(score):
    """A Score as the line predict.py --check prints."""
    line = (
        f"accuracy {score.accuracy:.4f} ({score.correct}/{score.total}), balanced accuracy "
        f"{score.balanced:.4f}"
    )
    if score.k > 1:
        hits = score.topk_correct
        line += f", top-{score.k} {hits / score.total:.4f} ({hits}/{score.total})"
    return line


def test_score(trained, test_dir, answers, threads=4, batch_size=128, top=10):
    """A checkpoint's Score on a test folder against its true labels (`answers`, a CSV),
    predicted as predict.py predicts it."""
    files = test_images(test_dir)
    truth = read_answers(answers, Names(files), trained.classes)
    rows, _ = predict_folder(trained, test_dir, files, None, threads, batch_size)
    labels = {file: [trained.classes[int(p.argmax())]] for file, p in rows}
    gaps = missing(labels, truth)
    if gaps:
        raise Problem(f"{answers} does not match {test_dir}: " + "; ".join(gaps[:10]))
    return score(labels, truth, trained.classes, top)
