"""What a report's Markdown is made of: exact counts, a name as a table's cell holds it, a path
as a report shows it (relative, never the machine's own), a link."""

import os
from pathlib import Path


def count(correct, total):
    return f"{correct / total:.4f} ({correct}/{total})" if total else "n/a"


def relative(path, folder):
    """`path` relative to `folder`, names joined by / (a report's links read the same on every
    system); where none can be (another drive, on Windows), `path` itself."""
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def shown_path(value, folder):
    """A path as the report shows it: relative to the report's `folder` where it is near it (two
    folders up at most), else its last two parts; never the absolute path of this machine."""
    text = str(value)
    if not os.path.isabs(text):
        return text
    near = relative(text, folder)
    if not near.startswith("../../..") and not os.path.isabs(near):
        return near
    return "/".join(Path(text).parts[-2:])


def cell(text):
    """A name as a Markdown table's cell holds it: a | in it would end the cell."""
    return str(text).replace("|", "\\|")


def link(path, report):
    return relative(path, Path(report).parent)
