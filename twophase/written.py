"""What the product wrote into a folder that is the user's too (a figures folder, a report's
folder, predict.py's --out), and the one rule every writer keeps there: it replaces or removes a
file only where it wrote that file and nobody changed it since. Any other file at a name it
writes is moved aside, to NAME.replaced.EXT (NAME.replaced1.EXT, ... where that is taken: a copy
set aside is never replaced either), and a line says where.

A folder's record (evaluate.py's written.json, predict.py's .written.json) names the files
written there, each with its size and SHA-256: a file changed since no longer matches it, and
is the user's. A report carries its own mark instead (twophase/report.py): its notes are meant
to be edited.
"""

import hashlib
import itertools
import json
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from utils import Problem, atomic_file, log

RECORD = "written.json"  # evaluate.py's, in a figures folder: whose its files are, and which
HIDDEN = ".written.json"  # predict.py's, beside --out and --probs in a folder of the user's


def fingerprint(path):
    """A file's size and SHA-256: what it was when written, to tell it from a changed copy."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def aside_name(path):
    """Where what is at `path` goes aside: NAME.replaced.EXT, else NAME.replaced1.EXT, ...: the
    first name free."""
    path = Path(path)
    for n in itertools.count():
        kept = path.with_name(f"{path.stem}.replaced{n or ''}{path.suffix}")
        if not kept.exists() and not kept.is_symlink():
            return kept


def set_aside(path, why):
    """What is at `path` moved aside (aside_name), and a line saying why and where it is now."""
    kept = aside_name(path)
    Path(path).rename(kept)
    log(f"{path} {why}: kept as {kept}")
    return kept


def read_record(path):
    """A record's contents: {} where there is none; None where the file there is no record of
    the product's (the user's, set aside before a record takes its name)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "files" in saved else None


class Written:
    """The files the product (`by`: the script) wrote into `folder`, by its record (`record`: the
    record's file name), and those it writes now: `to_write` before each, `save` once after."""

    def __init__(self, folder, by, record=RECORD):
        self.folder, self.by = Path(folder), by
        self.path = self.folder / record
        saved = read_record(self.path)
        self.foreign = saved is None  # a file of the user's under the record's name
        saved = saved or {}
        files = saved.pop("files", {})
        # A record from before fingerprints lists names alone: their files taken as written, but
        # for Markdown, which could hold a paragraph of the user's.
        self.files = dict.fromkeys(files) if isinstance(files, list) else dict(files)
        self.owner = saved  # evaluate.py's: whose the files are
        self.fresh = []  # written now: fingerprinted at save

    def wrote(self, name):
        """Whether folder/name is a file as the product wrote it: recorded, and unchanged since."""
        path, recorded = self.folder / name, self.files.get(name)
        if name not in self.files or not path.is_file():
            return False
        if recorded is None:
            return path.suffix != ".md"
        return recorded == fingerprint(path)

    def to_write(self, *parts):
        """folder/parts (a file, or a file in a subfolder), ready to be written: a file there that
        the product did not write, or that was changed since, moved aside first (said); the file
        noted as written."""
        name = str(PurePosixPath(*parts))
        path = self.folder / name
        refuse_the_record_name(path, self.path.name)
        if (path.exists() or path.is_symlink()) and name not in self.fresh and not self.wrote(name):
            set_aside(path, f"was not written by {self.by} (or was changed since)")
        self.fresh.append(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def note(self, name):
        """folder/name noted as written now, by a writer that made room for it itself (a report:
        by its mark)."""
        self.fresh.append(name)

    def forget(self, name):
        self.files.pop(name, None)

    def save(self, **owner):
        """The record written: the files written now as they are, those of before still there as
        they were, and `owner` (where given) for whose they are."""
        for name in self.fresh:
            if (self.folder / name).is_file():
                self.files[name] = fingerprint(self.folder / name)
        self.files = {name: fp for name, fp in self.files.items() if (self.folder / name).is_file()}
        self.owner = owner or self.owner
        self.fresh = []
        if self.foreign and (self.path.exists() or self.path.is_symlink()):
            set_aside(self.path, f"is no record of the files {self.by} wrote")
            self.foreign = False
        with atomic_file(self.path, "w") as f:
            f.write(json.dumps({**self.owner, "files": self.files}, indent=2) + "\n")


def refuse_the_record_name(path, record):
    if Path(path).name == record:
        raise Problem(f"{path}: {record} is the name of the record of what was written there")


@contextmanager
def replacing(path, by, record=HIDDEN, **open_kwargs):
    """`path` open for writing text, atomically (utils.atomic_file); once it is complete, and only
    then, a file there that the folder's record does not say `by` wrote is moved aside (said),
    and the record notes the new one."""
    path = Path(path)
    refuse_the_record_name(path, record)  # before anything is written
    with atomic_file(path, "w", **open_kwargs) as f:
        yield f
        written = Written(path.parent, by, record)  # read now: another file of it saved since
        written.to_write(path.name)
    written.save()
