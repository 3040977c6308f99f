"""train.py's options table (twophase/options.py): `python train.py --help` prints Table 1."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from twophase.continuing import shown
from twophase.options import OPTIONS, get_args_parser

# ----------------------------------------------------------------------------- --help


def help_entries(text):
    """{flag: its entry's words, joined across the lines argparse wrapped} of an options list."""
    entries, flag = {}, None
    for line in text.splitlines():
        start = re.match(r"  (-\S+)", line)
        if start:
            flag = start.group(1).rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {f: " ".join(words.split()) for f, words in entries.items()}


@pytest.fixture(scope="module")
def train_help():
    """What `python train.py --help` prints, as a user runs it."""
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
        check=True,
    )
    return done.stdout


def test_python_train_py_help_prints_table_1_each_default_beside_its_option(train_help):
    entries = help_entries(train_help)
    with_default = [o for o in OPTIONS if o.default is not None and not o.switch]
    for option in with_default:
        assert f"(default: {shown(option.default)})" in entries[option.flag], option.flag
    assert train_help.count("(default:") == len(with_default)
    table_1 = {
        "--arch": "wide_resnet50_2",
        "--img-size": "224",
        "--batch-size": "72",
        "--epochs1": "10",
        "--lr1": "0.0005",
        "--wd1": "0.0001",
        "--epochs2": "125",
        "--optimizer2": "nadam",
        "--lr2": "0.0005",
        "--warmup-epochs": "5",
        "--cosine-epochs": "45",
        "--clip": "0.8",
        "--label-smoothing": "0.1",
        "--p-hflip": "0.3",
    }
    for flag, value in table_1.items():
        assert f"(default: {value})" in entries[flag], flag
    assert "--keep-last K" in entries["--keep-last"] and "(default: 0)" in entries["--keep-last"]


def test_resolves_parser_prints_the_same_help():
    """resolve reads the command line with a parser whose defaults are left out (to know what was
    given): its --help is train.py's all the same."""
    assert get_args_parser(defaults=False).format_help() == get_args_parser().format_help()
