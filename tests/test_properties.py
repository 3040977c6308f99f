"""Properties over drawn inputs, not only the documented examples: class names as a folder or a CSV
can hold them, CSVs as users write them (headers or none, separators, encodings, typos), data
layouts, predict.py's format options read back by --check, and continued runs with options
changed. Hypothesis draws them; the profile in conftest.py bounds the examples so that the suite
stays within its time, the same every run (tests/README.md: a longer run with many more)."""

import contextlib
import csv
import io
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import data
import predict
import train
from conftest import COLOURS, TINY, examples, narrowed, write_image
from train import phase_setup
from twophase import submission, tables
from twophase.resolve import resolve

# What a class name may hold: letters of several scripts, digits (a leading zero, a name that
from utils import Problem

# What a class name may hold: letters of several scripts, digits (a leading zero, a name that
# reads as a number), spaces, commas, quotes, a backslash, $ and | (matplotlib's and Markdown's
# markup). Never / or NUL (no folder can), nor spaces around it (a CSV's cells are read
# without them), nor a leading . or __ (hidden folders are not classes).
CHARACTERS = st.sampled_from(list("abcXYZ019 ,'\"\\$|-_()éñ中ß"))
NAME = (
    st.text(CHARACTERS, min_size=1, max_size=12)
    .map(str.strip)
    .filter(lambda n: n and not n.startswith((".", "__")) and n not in ("test", "train", "val"))
)
LONG = st.just(("a long class name " * 11).strip())  # 197 characters: a folder name holds 255 bytes
CLASSES = st.lists(st.one_of(NAME, NAME, NAME, LONG), min_size=2, max_size=4, unique=True)


# ----------------------------------------------------------------------------- formats


@st.composite
def predictions(draw):
    classes = draw(CLASSES)
    n = draw(st.integers(1, 5))
    files = [f"img{i}.{draw(st.sampled_from(['png', 'jpg', 'JPEG']))}" for i in range(n)]
    p = draw(st.lists(st.lists(st.floats(0.01, 1), min_size=len(classes), max_size=len(classes))))
    probs = np.array((p + [[1.0] * len(classes)] * n)[:n])
    probs /= probs.sum(1, keepdims=True)
    layout = submission.Layout(
        columns=draw(st.sampled_from([("image_name", "pred_label"), ("id", "label")])),
        keep_ext=draw(st.booleans()),
        topk=draw(st.integers(1, len(classes))),
    )
    return classes, files, probs, layout


@settings(max_examples=examples(60))
@given(predictions())
def test_every_format_option_is_read_back_by_check_as_written(tmp_path_factory, drawn):
    """A prediction CSV (any columns, names with or without their extension, any top-k) and its
    probabilities, written as predict.py writes them, read back as --check reads them: every
    image, its k likeliest classes in order, the probabilities' likeliest first."""
    classes, files, probs, layout = drawn
    folder = tmp_path_factory.mktemp("formats")
    out, table = folder / "p.csv", folder / "probs.csv"
    submission.write(zip(files, probs), classes, layout, out, table)
    names = tables.Names(files, folder)
    expected = {
        f: [classes[i] for i in np.argsort(-p, kind="stable")] for f, p in zip(files, probs)
    }
    read = submission.read_predictions(out, names, classes)
    assert read.problems == [] and not read.probabilities
    assert read.labels == {f: ranked[: layout.topk] for f, ranked in expected.items()}
    spread = submission.read_predictions(table, names, classes)
    assert spread.problems == [] and spread.probabilities
    assert {f: ranked[0] for f, ranked in spread.labels.items()} == {
        f: ranked[0] for f, ranked in expected.items()
    }


@settings(max_examples=examples(40))
@given(CLASSES, st.data())
@example(["a", "b", "a b"], None).via("two names that make a third")
def test_a_label_cell_is_read_back_as_the_labels_written(classes, drawn):
    if drawn is None:  # the examples: the first two classes, in order
        labels = classes[:2]
    else:
        k = drawn.draw(st.integers(1, len(classes)))
        labels = drawn.draw(st.permutations(classes)).copy()[:k]
    cell = submission.join_labels(labels, set(classes))
    buffer = io.StringIO()
    csv.writer(buffer).writerow(["x", cell])
    (read,) = csv.reader(io.StringIO(buffer.getvalue()))
    assert submission.split_labels(read[1], set(classes)) == labels


def test_names_that_no_cell_can_tell_apart_are_refused_in_a_sentence():
    classes = {"1", "2", "1 2", "'1' '2'"}  # "1 2" and "'1' '2'": each the cell of 1 then 2
    with pytest.raises(Problem, match="predict with --topk 1"):
        submission.join_labels(["1", "2"], classes)


# ----------------------------------------------------------------------------- CSVs

SEPARATOR_SAID = {",": "','", ";": "';'", "\t": "tab"}
CODECS = {"UTF-8": "utf-8", "UTF-8 with a BOM": "utf-8-sig", "cp1252": "cp1252"}
HEADERS = {
    "labels": [("image", "label"), ("id", "class"), ("photo", "kind")],
    "weights": [("class", "weight"), ("name", "weight"), ("kind", "factor")],
}
# Class names for CSVs hold each separator too (a cell that holds its file's is quoted).
CSV_CLASSES = st.lists(
    st.one_of(NAME, st.text(st.sampled_from(list("ab;\t,|é")), min_size=1, max_size=6)).filter(
        lambda n: n.strip() == n and n
    ),
    min_size=2,
    max_size=4,
    unique=True,
)
# Headers of known column names: with commas and UTF-8, a file read without a word.
PLAIN_HEADERS = {("image", "label"), ("id", "class"), ("class", "weight"), ("name", "weight")}


class DrawnCsv(NamedTuple):
    what: str  # "labels" or "weights"
    classes: list
    given: bool  # labels: whether the classes are given (answers) or made by the labels
    files: list  # labels: the folder's images
    rows: list  # as written, the first perhaps with a typo
    typo: int | None  # the first row's cell (0 or 1) that holds a typo
    header: tuple | None
    separator: str
    encoding: str

    def data(self):
        buffer = io.StringIO()
        lines = ([self.header] if self.header else []) + self.rows
        csv.writer(buffer, delimiter=self.separator).writerows(lines)
        return buffer.getvalue().encode(CODECS[self.encoding])

    def read_as(self):
        """The encoding the file is read in: ASCII written as cp1252 is UTF-8 too."""
        ascii = all(c.isascii() for c in self.classes)
        return "cp1252" if self.encoding == "cp1252" and not ascii else "UTF-8"


@st.composite
def csv_files(draw):
    """A labels or class-weights CSV as a user may give it: with a header (of known names or
    not) or none, separated by `,` `;` or a tab, UTF-8 with or without a BOM or cp1252, its first
    row as meant or with a typo in one cell."""
    what, classes = draw(st.sampled_from(["labels", "weights"])), draw(CSV_CLASSES)
    if what == "labels":  # two images a class, named with or without their extension
        ext = draw(st.sampled_from(["", ".png"]))
        pairs = [(f"img{i}_{j}", c) for i, c in enumerate(classes) for j in range(2)]
        files = [f"{name}.png" for name, _ in pairs]
        rows = [[name + ext, c] for name, c in pairs]
    else:
        files, rows = [], [[c, draw(st.sampled_from(["0.5", "2", "1.25", "0"]))] for c in classes]
    rows = draw(st.permutations(rows))
    typo = draw(st.sampled_from([None, 0, 1]))
    if typo is not None:  # a name no image or class has, or a weight no number is
        rows[0] = list(rows[0])
        rows[0][typo] = "heavy" if (what, typo) == ("weights", 1) else rows[0][typo] + "zq"
    encoding = draw(st.sampled_from(sorted(CODECS)))
    try:
        "".join(classes).encode(CODECS[encoding])
    except UnicodeEncodeError:  # a name cp1252 cannot hold (中): such a file is UTF-8
        encoding = "UTF-8"
    return DrawnCsv(
        what=what,
        classes=classes,
        given=draw(st.booleans()),
        files=files,
        rows=rows,
        typo=typo,
        header=draw(st.sampled_from([None, *HEADERS[what]])),
        separator=draw(st.sampled_from(sorted(SEPARATOR_SAID))),
        encoding=encoding,
    )


def read_drawn(drawn, path):
    """The drawn CSV at `path` read as the product reads it: labels as {file: label}, weights as
    one a class."""
    if drawn.what == "weights":
        return tables.read_class_weights(path, drawn.classes)
    names = tables.Names(drawn.files, path.parent)
    classes = drawn.classes if drawn.given else None
    return {f: label for f, (label, _) in tables.read_labels(path, names, classes=classes).items()}


def meant(drawn):
    """What the drawn CSV holds: (its reading, None), or (None, the problem of its typo)."""
    line, typo = 2 if drawn.header else 1, drawn.typo
    if drawn.what == "weights":
        if typo is not None:
            return None, f"line {line}: {drawn.rows[0][typo]!r}"
        return [float(dict(drawn.rows)[c]) for c in drawn.classes], None
    if typo == 0 or (typo == 1 and drawn.given):
        return None, f"line {line}: {drawn.rows[0][typo]!r}"
    # A label with a typo, where the labels make the classes, is a class of its own.
    return {f"{name.removesuffix('.png')}.png": label for name, label in drawn.rows}, None


TYPO_ON_LINE_1 = DrawnCsv(
    "weights", ["0", "1", "2"], False, [], [["O", "5.0"], ["1", "2"]], 0, None, ",", "UTF-8"
)


@settings(max_examples=examples(60))
@given(csv_files())
@example(TYPO_ON_LINE_1).via("a header-less weights file, `O` for class `0` in its row 1")
def test_any_csv_is_read_as_meant_or_its_typo_named_and_how_it_was_read_is_said(
    tmp_path_factory, drawn
):
    """A drawn CSV is read as meant (every row, no row taken for a header nor a header for a
    row), or refused naming its first row's typo on that row's line; and how it was read is
    said in one line unless it is the plain case (a header of known names, commas, UTF-8)."""
    path = tmp_path_factory.mktemp("csv") / "file.csv"
    path.write_bytes(drawn.data())
    expected, problem = meant(drawn)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        try:
            got = read_drawn(drawn, path)
        except Problem as refused:
            assert problem is not None and problem in str(refused), str(refused)
        else:
            assert problem is None and got == expected
    event("refused" if problem else "read")
    lines = said.getvalue().splitlines()
    plain = drawn.header in PLAIN_HEADERS and drawn.separator == ","
    assert len(lines) == (0 if plain and drawn.read_as() == "UTF-8" else 1), lines
    if lines:
        (line,) = lines
        assert line.startswith(str(path)) and ("has no header" in line) == (drawn.header is None)
        assert f"separator {SEPARATOR_SAID[drawn.separator]};" in line
        assert f"encoding {drawn.read_as()}" in line


# ----------------------------------------------------------------------------- layouts

LAYOUTS = ("train+val", "train only", "root of classes", "csv", "csv+val csv", "csv+val folder")


def write_layout(root, layout, classes, extensions, lonely):
    """A dataset of `layout` with images of `classes` (2 a class for training, 1 for validation,
    the last class 1 training image where `lonely`), a test/ folder, and its options."""
    options, rows, val_rows = [], [], []
    for i, name in enumerate(classes):
        colour = COLOURS[i % len(COLOURS)]
        for j in range(1 if lonely and i == len(classes) - 1 else 2):
            stem = f"c{i}_{j}"
            if layout in ("train+val", "train only"):
                write_image(root / "train" / name / f"{stem}.png", colour, seed=10 * i + j)
            elif layout == "root of classes":
                write_image(root / name / f"{stem}.png", colour, seed=10 * i + j)
            else:
                write_image(root / "train" / f"{stem}.png", colour, seed=10 * i + j)
                rows.append((f"{stem}.png" if extensions else stem, name))
        stem = f"v{i}"
        if layout == "train+val":
            write_image(root / "val" / name / f"{stem}.png", colour, seed=100 + i)
        elif layout in ("csv+val csv", "csv+val folder"):
            folder = root / ("val" if layout == "csv+val folder" else "train")
            write_image(folder / f"{stem}.png", colour, seed=100 + i)
            val_rows.append((stem, name))
        write_image(root / "test" / f"t{i}.png", colour, seed=200 + i)
    for path, table, option in (
        ("train.csv", rows, "--labels"),
        ("val.csv", val_rows, "--val-labels"),
    ):
        if table:
            with open(root / path, "w", newline="") as f:
                csv.writer(f).writerows([("image", "label"), *table])
            options += [option, path]
    return options


@pytest.fixture
def narrow(narrow_models):
    """The narrow models (conftest's), by the name these tests use."""


@settings(
    max_examples=examples(8),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    layout=st.sampled_from(LAYOUTS),
    classes=CLASSES,
    extensions=st.booleans(),
    lonely=st.booleans(),
    k=st.integers(1, 3),
)
def test_any_layout_and_class_names_train_predict_and_check(
    tmp_path_factory, narrow, capsys, layout, classes, extensions, lonely, k
):
    """A one-step run on a drawn layout of drawn class names trains; its labels map back to the
    names; predict.py writes each format, and --check accepts each, scored against the truth."""
    root = tmp_path_factory.mktemp("layout")
    options = write_layout(root / "data", layout, classes, extensions, lonely)
    # A class of one image held out of (lonely) is said, as the test of data.py asserts.
    warnings.filterwarnings("ignore", "(?s).*with a single image", UserWarning)
    dataset = data.find_dataset(root / "data", **dataset_options(options))
    assert sorted(dataset.classes) == sorted(classes)
    for file, label in zip(dataset.train.files, dataset.train.labels):  # c<i>_<j>: classes[i]
        assert dataset.classes[label] == classes[int(Path(file).name[1:].split("_")[0])]
    out = root / "ck"
    argv = ["--data", str(root / "data"), *options, "--out", str(out), *TINY]
    train.main(argv + ["--epochs1", "1", "--epochs2", "0", "--batch-size", "2"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["classes"] == dataset.classes
    truth = root / "truth.csv"
    with open(truth, "w", newline="") as f:
        csv.writer(f).writerows([("id", "class")] + [(f"t{i}", c) for i, c in enumerate(classes)])
    formats = [[], ["--topk", str(min(k, len(classes)))], ["--keep-ext", "--columns", "id,label"]]
    formats.append(["--probs", str(root / "probs.csv")])
    for layout_options in formats:
        written = root / "p.csv"
        predict.main(["--ckpt", str(out / "last.pt"), "--out", str(written), *layout_options])
        capsys.readouterr()
        check = ["--ckpt", str(out / "last.pt"), "--check", str(written), "--answers", str(truth)]
        predict.main(check)
        assert f"{written}: accuracy" in capsys.readouterr().out
    predict.main([*check[:3], str(root / "probs.csv"), *check[4:]])  # the probabilities too


def dataset_options(argv):
    names = {"--labels": "labels", "--val-labels": "val_labels"}
    return {names[a]: b for a, b in zip(argv[::2], argv[1::2])}


# ----------------------------------------------------------------------------- continued runs

BASE = [*TINY, "--epochs1", "2", "--epochs2", "3", "--lr2", "2e-3"]  # a rate of the run's own
SPLIT = ("--epochs1", "--epochs2", "--warmup-epochs", "--cosine-epochs")
# Options a continued run may be given, and values other than the run's.
CHANGES = {
    "--lr2": ["1e-3", "1e-4"],
    "--warmup-epochs": ["0", "2"],
    "--warmup-start": ["0.3"],
    "--cosine-epochs": ["2", "6"],
    "--min-lr": ["1e-5"],
    "--epochs2": ["2", "5"],
    "--epochs": ["6", "9"],
    "--recipe": ["best", "fast", "report"],
    "--lr-decay": ["0.7"],
    "--optimizer2": ["adamw"],
    "--lr1": ["1e-3"],
    "--epochs1": ["3"],
    "--batch-size": ["2", "3"],
    "--accum-steps": ["2"],
    "--seed": ["5"],
    "--p-hflip": ["0.5"],
    "--ema": ["0.5"],
    "--label-smoothing": ["0.2"],
    "--arch": ["resnet34"],
}


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    """One run of BASE three ways: uninterrupted; stopped two batches into Phase II's second
    epoch; stopped once Phase I's last epoch was saved (phase1.pt beside its last.pt)."""
    from conftest import make_dataset, stop_at

    root = tmp_path_factory.mktemp("starts")
    data = make_dataset(root / "data")
    with narrowed():
        train.main(["--data", str(data), "--out", str(root / "straight"), *BASE])
        for name, moment in (("mid2", "step=14"), ("end1", "validation=2")):
            with pytest.MonkeyPatch.context() as stop:
                stop_at(stop, moment)
                with pytest.raises(SystemExit):
                    train.main(["--data", str(data), "--out", str(root / name), *BASE])
    return root, data


@st.composite
def continuations(draw):
    start = draw(st.sampled_from(["mid2", "end1", "phase 2 from phase1.pt"]))
    flags = draw(st.lists(st.sampled_from(sorted(CHANGES)), max_size=3, unique=True))
    return start, [word for f in flags for word in (f, draw(st.sampled_from(CHANGES[f])))]


@settings(
    max_examples=examples(16),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(continuations())
def test_a_continued_run_is_refused_in_a_sentence_or_trains_as_a_fresh_run_with_its_options(
    starts, tmp_path_factory, narrow, drawn
):
    """Continued with a drawn set of options changed: refused in one message, before anything is
    written; or each epoch it trains takes the learning rate a fresh run given those options
    takes at that epoch. With none changed, it ends with the uninterrupted run's weights."""
    root, data = starts
    start, changes = drawn
    folder = tmp_path_factory.mktemp("continued") / "ck"
    source = root / ("mid2" if start == "mid2" else "end1")
    shutil.copytree(source, folder)
    saved = torch.load(folder / "last.pt", weights_only=True)
    how = ["--phase", "2", "--out", str(folder)] if start.startswith("phase 2") else []
    how = how or ["--resume", str(folder / "last.pt")]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    try:
        train.main([*how, "--data", str(data), *changes])
    except SystemExit as refusal:
        event("refused")
        assert isinstance(refusal.code, str) or refusal.code == 2, refusal.code  # no traceback
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        return
    event("trained")
    end = torch.load(folder / "last.pt", weights_only=True)
    fresh = fresh_options(changes, saved)
    done = len(saved["history"]) if not start.startswith("phase 2") else 2
    for record in end["history"][done:]:
        assert record["lr"] == pytest.approx(fresh[record["phase"]][record["epoch"] - 1]), record
    if not changes:
        straight = torch.load(root / "straight" / "last.pt", weights_only=True)
        for key, value in straight["model"].items():
            assert torch.equal(end["model"][key], value), key


def fresh_options(changes, saved):
    """Each phase's learning rate at each epoch in a fresh run of BASE given `changes` (a new
    --epochs budget splits again, keeping the Phase I of a run past it)."""
    base = list(BASE)
    if "--epochs" in changes:
        base = [w for i, w in enumerate(base) if w not in SPLIT and base[i - 1] not in SPLIT]
        if saved["phase"] == 2 or saved["epoch"] >= saved["args"]["epochs1"]:
            base += ["--epochs1", str(saved["args"]["epochs1"])]
    args, _ = resolve([*base, *changes])[:2]
    model = torchvision.models.get_model(args.arch, num_classes=3)
    rates = {}
    for number in (1, 2):
        phase = phase_setup(
            number, args, model, torch.device("cpu"), torch.nn.CrossEntropyLoss(), None
        )
        rates[number] = phase.lrs()
    return rates
