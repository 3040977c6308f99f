"""Every CSV a user gives the product, read one way: a training set's labels (--labels), its
validation labels (--val-labels), class weights (--class-weights FILE), the true labels of test
or held-back images (--answers), a prediction CSV read back (predict.py --check) and a dataset's
class_names.csv.

How a file is read is decided by a rule over the whole file, never by one row, and said in one
line on standard error unless it is the plain case (UTF-8, commas, a header of known column
names, the first columns used): "FILE has no header: its line 1 (...) is read as a row;
separator ';'; encoding cp1252 (not UTF-8); images from column 1, labels from column 2".

- The encoding: UTF-8, with or without a spreadsheet's byte-order mark, read silently; UTF-16
  with its mark (a spreadsheet's "Unicode text"); else, where nothing in the file is UTF-8,
  cp1252 (Windows' western encoding: Excel's CSV in those locales). Bytes neither reads, UTF-8
  mixed with other bytes, or NUL bytes (a binary file) are a Problem naming the file and line.
- The separator: of `,` `;` tab and `|`, the one that splits the most lines into two cells or
  more; between equals, the one under which more cells are of their column's kind (below), then
  the one that leaves fewer cells empty or with spaces around them, then the one that gives
  every line as many cells, then the first in that order (a comma first). Where the separator
  is not a comma, a weight may have a decimal comma (`0,5`), as spreadsheets write it there.
- The header: the first line is the header where the file must have one (a prediction file,
  class_names.csv) or its columns are asked for by name (--image-col, --label-col). Otherwise
  it is a row when it resembles the other lines: one of its cells is of a kind that its
  column's cells mostly are in the other lines (of labels: an image of the folder, nearly one,
  or a name with an image's extension; a class, or where the labels make the classes, a label
  that another line gives too; of weights: a class, a number; of a file of one line: its own),
  and is no known column name (image, id, file, label, class, weight, ...: KNOWN). Else it is
  the header. So a first row with a typo in one cell (`O,5.0` for class `0`) is a row, its
  typo a problem of line 1 like any other line's, and `id,label` is a header beside an image
  `id.png`. A header none of whose names is known is said, so that were it a row, its loss
  would not be silent.
- Names: an image is named by its file name or by that name without its extension (`cat.jpg` or
  `cat`), matched exactly (then without the spaces around it); a name without its extension that
  two files share (`a.jpg`, `a.png`) names neither, and the error names both. A name that would
  match but for its case or its extension is not taken, and the error names the file it nearly
  names. A class is named exactly as its folder or label is (then without spaces around it).
- Errors: every problem of a file at once, each as "line N: 'VALUE' why", under the file's path
  (the first 20 of them, and how many more), then hints: the classes, for a label that is none;
  the column that holds the images, where the image column's cells name none.
"""

import codecs
import csv
import io
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from utils import MissingFile, Problem, log

SHOWN = 20  # problems listed in one message; the rest are counted
SEPARATORS = (",", ";", "\t", "|")  # in order of preference between equals
SEPARATOR_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
# Column names a header holds (compared without case, spaces as underscores): the product's own
# (image_name, pred_label; folder, words), Kaggle's and the common ones.
KNOWN = frozenset(
    "image images img image_name image_id image_file image_path imagename imageid id file "
    "filename file_name file_path path name label labels class class_name classname category "
    "target pred_label prediction species breed weight weights class_weight folder words "
    "description".split()
)
# A cell with one of these endings names an image file, whether or not it is in the folder.
IMAGE_ENDINGS = frozenset(".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm".split())
SAID = set()  # (a reading, its file's stamp) said in this process: Table.say
JUDGED = 1000  # the lines a column's kind is judged by (the first): a file of any length is quick


def column_name(cell):
    """A cell as KNOWN holds column names: without case, spaces or hyphens as underscores."""
    return cell.strip().casefold().replace(" ", "_").replace("-", "_")


def is_known_name(cell):
    return column_name(cell) in KNOWN


@dataclass
class Table:
    """A CSV: its header (None where its first line is a row) and its rows, each with its line
    number (blank lines dropped), and how it was read."""

    path: Path
    header: list | None
    rows: list  # (line number, [cells])
    separator: str = ","
    encoding: str = "UTF-8"
    first: tuple = (1, [])  # the first non-blank line: (its number, its cells)
    resembles: bool = False  # whether that line resembles the rows (read_csv's rule)
    plain_header: bool = True  # a header the file must have, or of known names, unlike a row
    stamp: tuple = ()  # the file's size and time as it was read

    def column(self, name, option):
        """The index of the column called `name` (given as `option`), or a Problem."""
        if self.header is None:
            raise Problem(f"{self.path} has no header, so no column {name!r} ({option})")
        if name in self.header:
            return self.header.index(name)
        why = f"{self.path} has no column {name!r} ({option}); its columns: {self.header}"
        if self.resembles:
            why += (
                f"; but its line {self.first[0]} ({self.shown(self.first[1])}) reads as a row, "
                f"not a header: without a header, leave out {option} and its columns are read "
                "in order"
            )
        raise Problem(why)

    def shown(self, cells):
        """A line as the file holds it (a tab shown as \\t)."""
        return self.separator.join(cells).replace("\t", "\\t")

    def where(self, index):
        """A column as a message names it: by its header, else by its place."""
        if self.header is not None and index < len(self.header):
            return f"column {self.header[index]!r}"
        return f"column {index + 1}"

    def reading(self, roles=(), asked=False):
        """How the file was read, in one line: its header or none, its separator, its encoding
        and the columns of `roles` ((what, index) pairs); None where it is the plain case (a
        header of known names, commas, UTF-8, the first columns or those `asked` for)."""
        width = len(self.first[1])
        columns = [index for _, index in roles]
        plain_columns = asked or (columns == list(range(len(columns))) and width <= len(columns))
        plain = self.plain_header and self.separator == "," and self.encoding == "UTF-8"
        if plain and (plain_columns or not roles):
            return None
        line, cells = self.first
        if self.header is None:
            parts = [f"has no header: its line {line} ({self.shown(cells)}) is read as a row"]
        else:
            parts = [f"has a header: its line {line} ({self.shown(cells)}) names its columns"]
        parts.append(f"separator {SEPARATOR_NAMES[self.separator]}")
        parts.append(
            f"encoding {self.encoding}" + ("" if self.encoding == "UTF-8" else " (not UTF-8)")
        )
        if roles:
            parts.append(", ".join(f"{what} from {self.where(index)}" for what, index in roles))
        return f"{self.path} " + "; ".join(parts)

    def say(self, roles=(), asked=False):
        """Say how the file was read (reading), where it is not the plain case: once a process
        while the file is unchanged, however often it is read (a run checks its class weights
        as it starts, then reads them for its loss)."""
        line = self.reading(roles, asked)
        if line and (line, self.stamp) not in SAID:
            SAID.add((line, self.stamp))
            log(line)


def read_csv(path, kinds=None, header_needed=False):
    """The CSV at `path` as a Table, read by the rule the module's docstring gives. `kinds`:
    the kinds of cell a row of the file holds, each as fits(cell, counts): whether a cell is of
    that kind (`counts`: a Counter of its column's stripped cells over the file's lines).
    With `header_needed`, or no kinds, the first line is the header. The caller says how the
    file was read (Table.say), once it has chosen its columns."""
    text, encoding = decode(path)
    try:
        separator, lines = choose_separator(text, kinds or ())
    except csv.Error as e:
        raise Problem(f"cannot read {path} as a CSV: {e}") from None
    if not lines:
        raise Problem(f"{path} is empty")
    how = dict(separator=separator, encoding=encoding, first=lines[0], stamp=stamp(path))
    resembles = bool(kinds) and first_is_row(lines, kinds)
    if resembles and not header_needed:
        return Table(Path(path), None, lines, resembles=True, plain_header=False, **how)
    header = [cell.strip() for cell in lines[0][1]]
    # A header of no known name is said: were it a row, its loss would not be silent.
    plain = header_needed or not kinds or any(is_known_name(c) for c in header)
    return Table(Path(path), header, lines[1:], resembles=resembles, plain_header=plain, **how)


def stamp(path):
    status = Path(path).stat()
    return str(Path(path).resolve()), status.st_size, status.st_mtime_ns


def decode(path):
    """The text of the file at `path` and its encoding's name (see the module's docstring)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingFile(f"no file {path}") from None
    except OSError as e:
        raise Problem(f"cannot read {path}: {e.strerror or e}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), "UTF-16"
        except UnicodeDecodeError as e:
            raise Problem(f"{path} cannot be read as UTF-16, as its first bytes say: {e}") from None
    if b"\0" in data:
        raise Problem(
            f"{path} is not text (it holds NUL bytes, line {line_of(data, data.index(0))}): a "
            "CSV is text; save a spreadsheet as CSV"
        )
    try:
        return data.decode("utf-8-sig"), "UTF-8"
    except UnicodeDecodeError as e:
        at = e.start
    byte = f"byte 0x{data[at]:02X} (line {line_of(data, at)})"
    if any(ord(c) > 127 and c != "\ufffd" for c in data.decode("utf-8", "replace")):
        # Some of it is UTF-8: read as cp1252, those characters would silently change.
        raise Problem(
            f"{path} is UTF-8 mixed with other bytes: its {byte} is no UTF-8, though other "
            "characters are; save it as UTF-8"
        )
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError as e:
        byte = f"byte 0x{data[e.start]:02X} (line {line_of(data, e.start)})"
        raise Problem(
            f"{path} cannot be read as text: its {byte} is neither UTF-8 nor cp1252; save it as "
            "UTF-8"
        ) from None


def line_of(data, offset):
    return data.count(b"\n", 0, offset) + 1


def split_lines(text, separator):
    """The non-blank lines of a CSV's `text` split at `separator`: (the line it starts on, its
    cells); a quoted cell may hold line breaks."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    lines, start = [], 1
    for cells in reader:
        if any(cell.strip() for cell in cells):
            lines.append((start, cells))
        start = reader.line_num + 1
    return lines


def choose_separator(text, kinds):
    """(separator, split lines) by the module docstring's rule."""
    splits, error = [], None
    for separator in [s for s in SEPARATORS if s in text] or [","]:
        try:
            splits.append((separator, split_lines(text, separator)))
        except csv.Error as e:  # a cell too long to be one: the file is not split there
            error = error or e
    if not splits:
        raise error

    def divided(lines):
        return sum(len(cells) >= 2 for _, cells in lines)

    def rank(split):  # min keeps the first of equals: between equals still, SEPARATORS' order
        lines = split[1]
        return -cells_resembling(lines, kinds), untidy_cells(lines), len({len(c) for _, c in lines})

    most = max(divided(lines) for _, lines in splits)
    tied = [(s, lines) for s, lines in splits if divided(lines) == most]
    return min(tied, key=rank) if len(tied) > 1 else tied[0]


def untidy_cells(lines):
    """The cells of `lines` that are empty or have spaces around them: what splitting at a
    separator that is not the file's leaves (`img0\t;cat` split at `;`: `img0\t` and `cat`)."""
    return sum(not c or c != c.strip() for _, cells in lines[:JUDGED] for c in cells)


def column_counts(lines, index):
    return Counter(cell(cells, index).strip() for _, cells in lines)


def column_kinds(lines, kinds, judged):
    """{column: (its kinds, its counts)}: for each column, those of `kinds` that its cells in
    the `judged` lines mostly are (and the column's counts, which a kind may consult)."""
    found = {}
    for index in range(max(len(cells) for _, cells in lines)):
        counts = column_counts(lines, index)
        held = [
            fits
            for fits in kinds
            if 2 * sum(fits(cell(cells, index), counts) for _, cells in judged) > len(judged)
        ]
        if held:
            found[index] = held, counts
    return found


def of_its_kind(value, column):
    held, counts = column
    return any(fits(value, counts) for fits in held)


def cells_resembling(lines, kinds):
    """How many cells of `lines` are of a kind their column's cells mostly are."""
    if not kinds:
        return 0
    judged = lines[:JUDGED]
    columns = column_kinds(lines, kinds, judged)
    return sum(
        of_its_kind(cell(cells, index), column)
        for index, column in columns.items()
        for _, cells in judged
    )


def first_is_row(lines, kinds):
    """Whether the first of `lines` resembles the others: one of its cells is of a kind its
    column's cells mostly are in the other lines (itself, where it is alone), and is no known
    column name."""
    (_, first), rest = lines[0], lines[1:]
    columns = column_kinds(lines, kinds, rest[:JUDGED] or lines[:1])
    return any(
        of_its_kind(cell(first, index), column) and not is_known_name(cell(first, index))
        for index, column in columns.items()
    )


class Problems:
    """The problems found in one CSV, each naming its line and value, raised together."""

    def __init__(self, path):
        self.path, self.found, self.hints = Path(path), [], {}

    def add(self, line, value, why, hint=None):
        """A problem; `hint`: a line said once after them all (the classes, for a label that is
        none of them)."""
        self.found.append(f"line {line}: {shown(value)} {why}")
        if hint:
            self.hint(hint)

    def hint(self, text):
        self.hints[text] = None

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
        self.by_name, self.by_stem, self.endings = {}, {}, set(IMAGE_ENDINGS)
        self.folded = {}, {}  # by name and by stem without case: what a name nearly names
        for file in self.files:
            path = Path(file)
            self.by_name[path.name] = file
            self.by_stem.setdefault(path.stem, []).append(file)
            self.endings.add(path.suffix.lower())
            self.folded[0].setdefault(path.name.casefold(), []).append(file)
            self.folded[1].setdefault(path.stem.casefold(), []).append(file)

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
        files, how = self.near(name)
        if files:
            listed = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
            return None, f"names no image{where}; {listed} {how[len(files) > 1]}"
        return None, f"names no image{where}"

    def file(self, name):
        return self.find(name)[0]

    def near(self, name):
        """The files `name` would name but for its case or its extension, and how they differ
        (singular, plural); ([], None) where there are none."""
        by_name, by_stem = self.folded
        key = name.strip()
        stem = Path(key).stem if Path(key).suffix else None
        for files, how in (
            (by_name.get(key.casefold()), ("differs only in case", "differ only in case")),
            (by_stem.get(key.casefold()), ("differs only in case", "differ only in case")),
            (stem and self.by_stem.get(stem), ("has another extension", "have other extensions")),
            (stem and by_stem.get(stem.casefold()), ("differs in case and extension",) * 2),
        ):
            if files:
                return files, how
        return [], None

    def resembles(self, name, counts=None):
        """Whether a cell is of an image column's kind: it names an image of the folder, nearly
        names one (near), or ends as an image file's name does."""
        key = name.strip()
        return bool(key) and (
            self.file(key) is not None
            or Path(key).suffix.lower() in self.endings
            or bool(self.near(key)[0])
        )


def find_class(label, index):
    """The class a label cell names (exactly, or without the spaces around it), or None."""
    for candidate in (label, label.strip()):
        if candidate in index:
            return candidate
    return None


def class_list(classes, most=30):
    rest = f", ... ({len(classes)} in all)" if len(classes) > most else ""
    return ", ".join(classes[:most]) + rest


def number(text, decimal_comma=False):
    """The number a cell holds, or None; with `decimal_comma`, `0,5` is 0.5 too."""
    if decimal_comma and text.count(",") == 1 and "." not in text:
        text = text.replace(",", ".")
    try:
        return float(text)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- the product's CSVs


def label_kind(classes):
    """fits(cell, counts) for a label column: one of `classes`, or where they are not given (a
    training set's labels, which make the classes), a label another line gives too."""
    if classes is None:
        return lambda value, counts: bool(value.strip()) and counts[value.strip()] >= 2
    index = set(classes)
    return lambda value, counts: find_class(value, index) is not None


def label_columns(table, image_col=None, label_col=None):
    """The image and label columns of a labels CSV: those named (by --image-col, --label-col), and
    for one not named, the first column the other is not."""
    image = table.column(image_col, "--image-col") if image_col else None
    label = table.column(label_col, "--label-col") if label_col else None
    width = len(table.header) if table.header else len(table.rows[0][1])
    if width < 2:
        raise Problem(
            f"{table.path}: two columns expected (an image's and its label's), but its lines "
            "hold one cell each: none of them is split by a comma, a semicolon, a tab or '|'"
        )
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
    table = read_csv(path, (names.resembles, label_kind(classes)), header_needed=named)
    if not table.rows:
        raise Problem(f"{path} labels no images: it holds a header line alone")
    image, label = label_columns(table, image_col, label_col)
    table.say([("images", image), ("labels", label)], asked=named)
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
    if len(chosen) < len(table.rows):
        hint = image_column_hint(table, names, image, label)
        if hint:
            problems.hint(hint)
    problems.raise_if_any(len(table.rows))
    return chosen


def image_column_hint(table, names, image, label):
    """Where the image column's cells mostly name no image and another column's do: which."""
    rows = [cells for _, cells in table.rows]

    def images_in(index):
        return sum(names.file(cell(cells, index)) is not None for cells in rows)

    if 2 * images_in(image) >= len(rows):
        return None
    others = [i for i in range(max(len(c) for c in rows)) if i != image]
    best = max(others, key=images_in, default=None)
    if best is None or 2 * images_in(best) <= len(rows):
        return None
    if table.header is None:
        return (
            f"its column {best + 1} names the images: without a header, the images are read "
            "from column 1 and the labels from column 2; put them in that order, or add a "
            "header and give --image-col and --label-col"
        )
    holds = table.header[best]
    if best == label:
        return (
            f"its columns seem swapped: {holds!r} names the images, so give --image-col {holds} "
            f"--label-col {table.header[image]}"
        )
    return f"its column {holds!r} names the images: give --image-col {holds} (and --label-col)"


def read_class_weights(path, classes):
    """--class-weights FILE: one weight a class, by a CSV of class,weight rows (classes it leaves
    out weigh 1)."""
    index = set(classes)
    kinds = (
        lambda value, counts: find_class(value, index) is not None,
        lambda value, counts: number(value, decimal_comma=True) is not None,
    )
    table = read_csv(path, kinds)
    table.say([("classes", 0), ("weights", 1)])
    # A spreadsheet that separates by ';' (or tabs) writes 0.5 as 0,5 where commas are decimal.
    decimal_comma = table.separator != ","
    problems, weights = Problems(path), {}
    for line, row in table.rows:
        name, value = cell(row, 0), cell(row, 1)
        found, weight = find_class(name, index), number(value, decimal_comma)
        if found is None:
            problems.add(line, name, f"is not one of the {len(classes)} classes of the data")
        elif weight is None or not math.isfinite(weight):
            problems.add(line, value, "is no finite number")
        elif weight < 0:
            problems.add(line, value, "is negative")
        elif found in weights:
            problems.add(line, name, "is given a weight twice")
        else:
            weights[found] = weight
    problems.raise_if_any(len(table.rows))
    return [weights.get(c, 1.0) for c in classes]
