"""The labels the model disputes, and the copies the data check found.

Disputed labels are found as confident learning finds label issues (Northcutt, Jiang and
Chuang, JAIR 2021): each class's threshold is the mean probability the model gives it over the
images labelled with it, and an image is disputed where the model is confident of a class other
than its given one (that class's probability at or above its threshold) and predicts another
class than the given one. These are the off-diagonals of the confident joint, cleanlab's
`find_label_issues(labels, pred_probs, filter_by="confident_learning")` to the image, ranked by
self-confidence (the given label's probability), lowest first. The probabilities are the
validation split's: images the weights never trained on, so that a label learnt by heart does
not vouch for itself. They are candidates for a person to look at, not errors proven.

The copies are read from data_check.csv, written into the run's folder by train.py's data check:
a row per image of a group of copies (exact or near), with its split and label. The groups that
cross splits (a validation or test image with a copy the run trained on) or labels (one photo
under two classes) are shown side by side.
"""

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from twophase.checkpoint import DATA_CHECK_CSV
from twophase.figures import plot_copies, plot_disputed
from twophase.image_cache import load_image
from twophase.markdown import relative
from twophase.tables import read_csv
from utils import Problem, log

# cleanlab's tolerance: a probability within NEAR of a threshold is at it (a mean of equal
# probabilities may land a hair above each), and a given label within NEAR of the most probable
# class is predicted.
NEAR = 1e-6
# A threshold is never below this: a class whose images all get probability 0 would otherwise make
# the model "confident" of it on every image.
LOWEST = 2 * NEAR
SHOWN = 18  # disputed images in the figure: three rows
COPY_GROUPS = 8  # groups of copies in the figure, a row each
COPY_WIDTH = 6  # images of a group shown
THUMBNAIL = 96  # pixels a side of a copy's image in the figure
CHECK_COLUMNS = ("group", "kind", "distance", "split", "image", "label")


def confident_thresholds(probs, labels):
    """Each class's threshold: the mean probability of that class over the images labelled with
    it (its self-confidence), at least LOWEST; above any probability for a class no image is
    labelled with, whose typical probability is unknown."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    thresholds = np.full(probs.shape[1], 2.0)
    for k in np.unique(labels):
        thresholds[k] = probs[labels == k, k].mean()
    return np.maximum(thresholds, LOWEST)


def predicted_classes(probs, labels):
    """Each image's most probable class, the given one where it is within NEAR of the top."""
    tilted = np.array(probs, dtype=np.float64)
    tilted[np.arange(len(labels)), labels] += NEAR
    return tilted.argmax(axis=1)


def disputed(probs, labels):
    """The indices of the images whose given label the model disputes (the module's rule),
    ranked by the given label's probability, lowest first (ties in the images' order)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    confident = probs >= confident_thresholds(probs, labels) - NEAR
    confident[rows, labels] = False  # of another class than the given one
    found = confident.any(axis=1) & (predicted_classes(probs, labels) != labels)
    given = probs[rows, labels]
    return np.flatnonzero(found)[np.argsort(given[found], kind="stable")]


class Dispute(NamedTuple):
    """A disputed image: its place in the validation images, its path relative to the data
    folder, its given and predicted class (indices) and their probabilities."""

    index: int
    image: str
    given: int
    predicted: int
    p_given: float
    p_predicted: float


def disputes(probs, labels, images):
    """The Disputes, ranked; `images`: each validation image's path, relative to the data."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    predicted = predicted_classes(probs, labels)
    return [
        Dispute(
            index=int(i),
            image=images[i],
            given=int(labels[i]),
            predicted=int(predicted[i]),
            p_given=float(probs[i, labels[i]]),
            p_predicted=float(probs[i, predicted[i]]),
        )
        for i in disputed(probs, labels)
    ]


def image_paths(images, root):
    """The path of each of `images` (a CachedImages) relative to the data folder `root`."""
    cache = images.cache
    return [relative(Path(cache.folder) / cache.files[i], root) for i in images.indices]


LABEL_ISSUES = ("image", "given_label", "predicted_label", "given_probability",
                "predicted_probability", "rank")  # fmt: skip


def write_disputes(found, classes, path):
    """label_issues.csv: a row per disputed image, ranked, to review by hand."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_ISSUES)
        for rank, d in enumerate(found, 1):
            given, predicted = classes[d.given], classes[d.predicted]
            writer.writerow(
                [d.image, given, predicted, f"{d.p_given:.6f}", f"{d.p_predicted:.6f}", rank]
            )


def review_labels(probs, val, root, classes, shown, figures):
    """The validation labels the model disputes, from its probabilities `probs` of the images
    `val` (a CachedImages of the data folder `root`): label_issues.csv (of `classes`) and
    label_issues.png (the first SHOWN, titled by `shown`, the classes as the figures name them)
    written into `figures` (a Written); returns how many it disputes."""
    labels = val.labels[val.indices]
    found = disputes(probs, labels, image_paths(val, root))
    write_disputes(found, classes, figures.to_write("label_issues.csv"))
    first = found[:SHOWN]
    pixels = val[[d.index for d in first]][0].numpy() if first else []
    titles = [
        f"given: {shown[d.given]} ({d.p_given:.2f})\nmodel: {shown[d.predicted]} "
        f"({d.p_predicted:.2f})"
        for d in first
    ]
    plot_disputed(pixels, titles, figures.to_write("label_issues.png"))
    return len(found)


class Copy(NamedTuple):
    """An image of a group of copies, as the data check lists it."""

    group: str
    kind: str
    split: str
    image: str
    label: str


def read_copies(path):
    """The rows of a data_check.csv, as Copies; a file without its columns is a Problem."""
    table = read_csv(path, header_needed=True)
    missing = [c for c in CHECK_COLUMNS if c not in table.header]
    if missing:
        raise Problem(
            f"{path} has no column {', '.join(missing)}: its columns are {table.header}, where "
            f"a data check has {', '.join(CHECK_COLUMNS)}"
        )
    at = {name: table.header.index(name) for name in Copy._fields}
    width = max(at.values()) + 1
    cells = [row + [""] * (width - len(row)) for _, row in table.rows]
    return [Copy(**{name: row[i].strip() for name, i in at.items()}) for row in cells]


def crossing_groups(copies):
    """The groups of copies that cross splits or labels, as {group: its Copies}: those under two
    labels first (a label is wrong, or the classes overlap), then those across splits, each in
    the file's order; and how many groups cross splits, and how many labels."""
    groups = {}
    for c in copies:
        groups.setdefault(c.group, []).append(c)
    labelled = {g for g, rows in groups.items() if len({c.label for c in rows if c.label}) > 1}
    split = {g for g, rows in groups.items() if len({c.split for c in rows}) > 1}
    order = [g for g in groups if g in labelled] + [g for g in groups if g in split - labelled]
    return {g: groups[g] for g in order}, len(split), len(labelled)


class CopiesFound(NamedTuple):
    """What the report says of the data check's copies: the groups across splits, those under
    two labels, and how many groups copies.png shows."""

    across_splits: int
    two_labels: int
    shown: int


def review_copies(run_folder, root, names, figures):
    """The copies the data check found in the run's folder (`run_folder`'s data_check.csv) that
    cross splits or labels: copies.png, a row per group (COPY_GROUPS at most), written into
    `figures` (a Written); None where there is no data check (or one that cannot be read: said)."""
    path = Path(run_folder) / DATA_CHECK_CSV
    if not path.is_file():
        return None
    try:
        groups, across_splits, two_labels = crossing_groups(read_copies(path))
    except Problem as e:
        log(f"warning: {e}: the report says nothing of copies")
        return None
    rows = [shown_copies(group) for group in list(groups.values())[:COPY_GROUPS]]
    images = [[copy_image(Path(root) / c.image) for c in row] for row in rows]
    titles = [
        [copy_title(c, names, image is not None) for c, image in zip(row, row_images)]
        for row, row_images in zip(rows, images)
    ]
    grey = np.full((THUMBNAIL, THUMBNAIL, 3), 128, np.uint8)
    images = [[grey if image is None else image for image in row] for row in images]
    plot_copies(images, titles, figures.to_write("copies.png"), len(groups))
    return CopiesFound(across_splits, two_labels, len(rows))


def shown_copies(group):
    """The COPY_WIDTH copies of a group shown: one of each split and label first (what makes
    the group cross), then the others in the file's order."""
    seen, first, rest = set(), [], []
    for c in group:
        (rest if (c.split, c.label) in seen else first).append(c)
        seen.add((c.split, c.label))
    return (first + rest)[:COPY_WIDTH]


def copy_title(copy, names, readable=True):
    """A copy's split and label, and its file's name (said where it is a near copy, or could
    not be read)."""
    label = names.get(copy.label, copy.label) if copy.label else "no label"
    notes = [why for why, said in (("near", copy.kind == "near"), ("unread", not readable)) if said]
    return f"{copy.split}: {label}\n{Path(copy.image).name}" + "".join(f", {n}" for n in notes)


def copy_image(path):
    """A copy's image as a square thumbnail; None where the file is gone or unreadable (said)."""
    try:
        return load_image(path, THUMBNAIL)
    except Exception as e:  # any decoder failure: the figure shows the place, the log says why
        why = f"{type(e).__name__}: {e}"
        log(f"warning: {path}, listed in {DATA_CHECK_CSV}, cannot be shown: {why}")
        return None
