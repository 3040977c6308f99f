"""Every CSV a user gives the product, read one way: a training set's labels (--labels), its
validation labels (--val-labels), class weights (--class-weights FILE), the true labels of test
or held-back images (--answers), a prediction CSV read back (predict.py --check) and a dataset's
class_names.csv.

- The header: a CSV's first line is its header unless it reads as a row (its first cells name an
  image of the folder, or a class and its weight). A CSV read without a header says so, the same
  words for each: "FILE has no header: its line 1 (...) is read as a row".
- Names: an image is named by its file name or by that name without its extension (`cat.jpg` or
  `cat`), matched exactly (then without the spaces around it); a name without its extension that
  two files share (`a.jpg`, `a.png`) names neither, and the error names both. A class is named
  exactly as its folder or label is (then without spaces around it).
- Errors: every problem of a file at once, each as "line N: 'VALUE' why", under the file's path
  (the first 20 of them, and how many more).
"""

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from utils import MissingFile, Problem, log

SHOWN = 20  # problems listed in one message; the rest are counted


@dataclass
class Table:
    """A CSV: its header (None where its first line is a row) and its rows, each with its line
    number (blank lines dropped)."""

    path: Path
    header: list | None
    rows: list  # (line number, [cells])

    def column(self, name, option):
        """The index of the column called `name` (given as `option`), or a Problem."""
        if self.header is None:
            raise Problem(f"{self.path} has no header, so no column {name!r} ({option})")
        if name not in self.header:
            raise Problem(
                f"{self.path} has no column {name!r} ({option}); its columns: {self.header}"
            )
        return self.header.index(name)


def read_csv(path, is_row=None, header_needed=False):
    """The CSV at `path` as a Table. `is_row(cells)`: whether a first line is a row rather than a
    header, said in a line where it is (unless `header_needed`, where the Table keeps it as its
    header and the caller names the problem)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            lines = list(csv.reader(f))
    except FileNotFoundError:
        raise MissingFile(f"no file {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise Problem(f"cannot read {path} as a CSV: {e}") from None
    numbered = [(n, row) for n, row in enumerate(lines, 1) if any(cell.strip() for cell in row)]
    if not numbered:
        raise Problem(f"{path} is empty")
    (first_line, first), rows = numbered[0], numbered[1:]
    if is_row is not None and not header_needed and is_row(first):
        log(f"{path} has no header: its line {first_line} ({','.join(first)}) is read as a row")
        return Table(Path(path), None, numbered)
    return Table(Path(path), [cell.strip() for cell in first], rows)


class Problems:
    """The problems found in one CSV, each naming its line and value, raised together."""

    def __init__(self, path):
        self.path, self.found, self.hints = Path(path), [], {}

    def add(self, line, value, why, hint=None):
        """A problem; `hint`: a line said once after them all (the classes, for a label that is
        none of them)."""
        self.found.append(f"line {line}: {shown(value)} {why}")
        if hint:
            self.hints[hint] = None

    def lines(self):
        """The problems as lines, the first SHOWN and a count of the rest, then the hints."""
        rest = len(self.found) - SHOWN
        return self.found[:SHOWN] + ([f"(and {rest} more)"] if rest > 0 else []) + [*self.hints]

    def raise_if_any(self, rows):
        if self.found:
            raise Problem(
                f"{self.path}: {len(self.found)} of its {rows} rows cannot be read:\n  "
                + "\n  ".join(self.lines())
            )


def shown(value):
    """A cell as a message quotes it: in quotes, so that spaces and empty cells show."""
    return repr(value) if value else "an empty cell"


def cell(row, index):
    return row[index] if index < len(row) else ""


class Names:
    """The images of a folder by every name a CSV may give them: the file's name, or its name
    without the extension where no other file shares it."""

    def __init__(self, files, folder=None):
        self.files, self.folder = list(files), folder
        self.by_name = {Path(f).name: f for f in self.files}
        self.by_stem = {}
        for file in self.files:
            self.by_stem.setdefault(Path(file).stem, []).append(file)

    def find(self, name):
        """(the file `name` names, None) or (None, why it names none)."""
        for candidate in dict.fromkeys((name, name.strip())):
            if candidate in self.by_name:
                return self.by_name[candidate], None
            twins = self.by_stem.get(candidate, [])
            if len(twins) == 1:
                return twins[0], None
            if twins:
                return None, f"names {len(twins)} files: {', '.join(twins)}; give the extension"
        where = f" in {self.folder}" if self.folder else ""
        return None, f"names no image{where}"

    def file(self, name):
        return self.find(name)[0]


def find_class(label, index):
    """The class a label cell names (exactly, or without the spaces around it), or None."""
    for candidate in (label, label.strip()):
        if candidate in index:
            return candidate
    return None


def class_list(classes, most=30):
    rest = f", ... ({len(classes)} in all)" if len(classes) > most else ""
    return ", ".join(classes[:most]) + rest


# ----------------------------------------------------------------------------- the product's CSVs


def label_columns(table, image_col=None, label_col=None):
    """The image and label columns of a labels CSV: those named (by --image-col, --label-col), and
    for one not named, the first column the other is not."""
    image = table.column(image_col, "--image-col") if image_col else None
    label = table.column(label_col, "--label-col") if label_col else None
    width = len(table.header) if table.header else len(table.rows[0][1])
    if width < 2:
        raise Problem(f"{table.path}: two columns expected (an image's and its label's)")
    if image is None:
        image = next(i for i in range(width) if i != label)
    if label is None:
        label = next(i for i in range(width) if i != image)
    if image == label:
        raise Problem(f"{table.path}: --image-col and --label-col name one column, {image_col!r}")
    return image, label


def read_labels(path, names, image_col=None, label_col=None, classes=None):
    """{file: (label, line)} of a labels CSV (a training set's, a validation set's, the true
    labels of test images): each row an image of `names` (a Names) and its label, one of `classes`
    where they are given. An image named twice with one label is one row; with two, a problem."""
    named = bool(image_col or label_col)

    def is_row(cells):
        return len(cells) >= 2 and names.file(cells[0]) is not None

    table = read_csv(path, is_row, header_needed=named)
    if not table.rows:
        raise Problem(f"{path} labels no images: it holds a header line alone")
    image, label = label_columns(table, image_col, label_col)
    index = set(classes) if classes is not None else None
    problems, chosen = Problems(path), {}
    for line, row in table.rows:
        name, value = cell(row, image), cell(row, label)
        file, why = names.find(name) if name.strip() else (None, "is no image name")
        if file is None:
            problems.add(line, name, why)
            continue
        if not value.strip():
            problems.add(line, name, "has an empty label")
            continue
        found = value.strip() if index is None else find_class(value, index)
        if found is None:
            hint = f"the classes: {class_list(list(classes))}"
            problems.add(line, value, f"is not one of the {len(index)} classes", hint)
        elif file in chosen and chosen[file][0] != found:
            was, at = chosen[file]
            problems.add(line, name, f"is labelled {found!r} here and {was!r} on line {at}")
        else:
            chosen.setdefault(file, (found, line))
    problems.raise_if_any(len(table.rows))
    return chosen


def read_class_weights(path, classes):
    """--class-weights FILE: one weight a class, by a CSV of class,weight rows (classes it leaves
    out weigh 1)."""
    index = set(classes)

    def is_row(cells):
        return len(cells) >= 2 and find_class(cells[0], index) and number(cells[1]) is not None

    table = read_csv(path, is_row)
    problems, weights = Problems(path), {}
    for line, row in table.rows:
        name, value = cell(row, 0), cell(row, 1)
        found = find_class(name, index)
        if found is None:
            problems.add(line, name, f"is not one of the {len(classes)} classes of the data")
        elif number(value) is None or not math.isfinite(number(value)):
            problems.add(line, value, "is no finite number")
        elif number(value) < 0:
            problems.add(line, value, "is negative")
        elif found in weights:
            problems.add(line, name, "is given a weight twice")
        else:
            weights[found] = number(value)
    problems.raise_if_any(len(table.rows))
    return [weights.get(c, 1.0) for c in classes]


def number(text):
    try:
        return float(text)
    except ValueError:
        return None
