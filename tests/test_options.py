"""train.py's options table (twophase/options.py): `python train.py --help` prints Table 1, and
every value an option takes is checked before anything is read or written, with one sentence
naming the option; evaluate.py's, predict.py's and twophase.average's numbers too."""

import contextlib
import io
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import predict
import train
from conftest import REPO, examples
from twophase import average
from twophase.checks import rate
from twophase.continuing import shown
from twophase.options import AUGMENTATION, OPTIONS, get_args_parser
from twophase.resolve import resolve
from utils import Problem

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


# ----------------------------------------------------------------------------- every value checked


def takes_a_value(option):
    return not option.switch and not option.choices


def test_every_option_that_takes_a_value_has_a_check_or_says_why_it_needs_none():
    """A number is checked by its row's check; a path is a file that must exist (file) or a folder
    the run writes in (folder), checked as the run's options are resolved; anything else says in
    its row why it needs no check here (unchecked=...)."""
    for option in filter(takes_a_value, OPTIONS):
        checked = option.check is not None or option.file or option.folder
        assert checked != bool(option.unchecked), option.flag


def test_every_default_preset_and_other_value_passes_its_check():
    for option in OPTIONS:
        if option.check is None:
            continue
        values = [option.default, *option.presets.values()]
        if option.other:
            other = [(option.type or str)(word) for word in option.other]
            values.append(other if option.nargs else other[0])
        for value in values:
            assert value is None or option.check(value) is None, (option.flag, value)


# What a user expects of each number: the interval it must lie in, "[" or "(" saying whether an
# end is in it. Written here, apart from the table's checks, which must agree with it.
BOUNDS = {
    "--img-size": (8, math.inf, "[)"),
    "--val-fraction": (0, 1, "()"),
    "--batch-size": (1, math.inf, "[)"),
    "--cache-workers": (0, math.inf, "[)"),
    "--epochs": (2, math.inf, "[)"),
    "--epochs1": (0, math.inf, "[)"),
    "--lr1": (0, math.inf, "()"),
    "--wd1": (0, math.inf, "[)"),
    "--phase1-features": (0, math.inf, "[)"),
    "--epochs2": (0, math.inf, "[)"),
    "--lr2": (0, math.inf, "()"),
    "--wd2": (0, math.inf, "[)"),
    "--warmup-epochs": (0, math.inf, "[)"),
    "--warmup-start": (0, 1, "(]"),
    "--cosine-epochs": (1, math.inf, "[)"),
    "--min-lr": (0, math.inf, "[)"),
    "--clip": (0, math.inf, "[)"),
    "--save-every": (0, math.inf, "[)"),
    "--save-min-acc": (0, 1, "[]"),
    "--label-smoothing": (0, 1, "[)"),
    "--accum-steps": (1, math.inf, "[)"),
    "--ema": (0, 1, "()"),
    "--mixup": (0, math.inf, "[)"),
    "--cutmix": (0, math.inf, "[)"),
    "--lr-decay": (0, 1, "(]"),
    "--keep-last": (0, math.inf, "[)"),
    "--progressive": (0, 1, "(]"),
    "--progressive-until": (0, 1, "(]"),
    "--degrees": (0, math.inf, "[)"),
    "--translate": (0, 1, "[]"),
    "--shear": (0, 90, "[)"),
    "--jitter": (0, 1, "[]"),
    "--hue": (0, 0.5, "[]"),
    "--p-jitter": (0, 1, "[]"),
    "--p-blur": (0, 1, "[]"),
    "--p-hflip": (0, 1, "[]"),
    "--p-vflip": (0, 1, "[]"),
    "--save-every-steps": (0, math.inf, "[)"),
    "--find-lr-steps": (20, math.inf, "[)"),
    "--tensorboard-every": (1, math.inf, "[)"),
    "--seed": (0, 2**31 - 1, "[]"),
    "--l2sp": (0, math.inf, "[)"),
    "--sam": (0, math.inf, "[)"),
}
BY_FLAG = {o.flag: o for o in OPTIONS}


def inside(flag, value):
    low, high, ends = BOUNDS[flag]
    return (value >= low if ends[0] == "[" else value > low) and (
        value <= high if ends[1] == "]" else value < high
    )


def resolves(argv, capsys):
    """Whether train.py takes these options; where it refuses them, the one line it says why."""
    try:
        resolve(argv)
    except SystemExit:
        return False, capsys.readouterr().err.strip().splitlines()[-1]
    return True, None


def test_the_bounds_cover_every_single_number():
    """Every option of one int or float, or a rate (a float or auto; --average-last's 0 or 2 or
    more is no interval: its own test below)."""
    single = {o.flag for o in OPTIONS if o.type in (int, float, rate) and o.nargs is None}
    assert single - {"--average-last"} == set(BOUNDS)


def value_of(flag):
    """A value for `flag`: near its bounds, where checks go wrong, or far off."""
    low, high, _ = BOUNDS[flag]
    edges = [low, high] if high != math.inf else [low]
    near = st.sampled_from(edges).flatmap(
        lambda edge: st.sampled_from([edge - 1, edge - 0.5, edge - 1e-3, edge, edge + 1e-3])
    )
    value = st.one_of(near, st.floats(-1e4, 1e4, allow_nan=False))
    return value.map(math.floor if BY_FLAG[flag].type is int else float)


# --epochs is left out: with the phases' epochs drawn beside it, a budget they do not add up to
# is refused as well, whatever the bounds (its own bound is tested below).
@settings(max_examples=examples(40))
@given(
    st.lists(
        st.sampled_from(sorted(set(BOUNDS) - {"--epochs"})), min_size=1, max_size=3, unique=True
    ).flatmap(lambda flags: st.tuples(*(st.tuples(st.just(f), value_of(f)) for f in flags)))
)
def test_a_run_takes_its_numbers_exactly_where_each_is_within_its_bounds(values):
    """Over drawn combinations of options and values: train.py refuses them if and only if one is
    outside its bounds, in one sentence that names the first such option and its value."""
    argv = [f"{flag}={value}" for flag, value in values]
    order = list(BY_FLAG)
    outside = sorted((order.index(f), f, v) for f, v in values if not inside(f, v))
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = resolve(argv).options
    except SystemExit:
        assert outside, argv
        _, flag, value = outside[0]
        assert f"error: {flag} {value}: " in said.getvalue(), (argv, said.getvalue())
        return
    assert not outside, argv
    for flag, value in values:
        assert getattr(args, BY_FLAG[flag].dest) == value


@pytest.mark.parametrize(
    "argv, words",
    [
        ("--val-fraction 1.5", "--val-fraction 1.5: the share of each class held out to validate"),
        ("--val-fraction 0", "a val/ folder (or --val-labels) holds validation images of its own"),
        ("--img-size 0", "--img-size 0: the side must be 8 px or more"),
        ("--epochs 1", "--epochs 1: the budget needs at least 2 epochs, one for each phase"),
        ("--average-last 1", "--average-last 1: 0 (off), or 2 or more: an average needs two"),
        ("--std 0.2 0 0.2", "--std 0.2 0.0 0.2: each must be more than 0"),
        ("--scale 1.2 0.8", "--scale 1.2 0.8: the first must be more than 0, the second"),
        ("--blur-sigma 0 0", "--blur-sigma 0.0 0.0: the first must be more than 0"),
        ("--time-budget 0s", "--time-budget 0.0: must be more than 0"),
        ("--max-params 0", "--max-params 0: must be 1 or more"),
        ("--seed -1", "--seed -1: must be between 0 and 2147483647"),
        ("--lr2 inf", "--lr2 inf: not a finite number"),
        ("--mean 0.5 nan 0.5", "--mean 0.5 nan 0.5: not a finite number"),
        ("--max-params inf", "not a parameter count: 'inf'"),
    ],
)
def test_a_bad_value_is_refused_in_one_sentence_naming_it(argv, words, capsys):
    accepted, why = resolves(argv.split(), capsys)
    assert not accepted and words in why


def test_a_folder_the_run_writes_in_is_refused_where_a_file_is_there(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    for flag in ("--out", "--cache-dir", "--tensorboard"):
        with pytest.raises(Problem, match=f"{flag} {file}: a file is there"):
            resolve([flag, str(file)])


def test_img_size_0_is_refused_before_an_image_is_read(tiny_args, dataset, capsys):
    with pytest.raises(SystemExit):  # a warning (an unreadable image) would fail the test
        train.main(tiny_args + ["--img-size", "0"])
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("error: --img-size 0: the side must be 8 px or more")
    )
    assert not (dataset / ".cache").exists()


@pytest.mark.parametrize("value", ["1.5", "1", "0", "-0.1"])
def test_val_fraction_outside_0_1_is_refused_before_the_images_are_split(
    value, tiny_args, dataset, capsys
):
    shutil.rmtree(dataset / "val")  # validation would be held out of train/
    with pytest.raises(SystemExit):
        train.main(tiny_args + ["--val-fraction", value])
    assert (
        f"error: --val-fraction {float(value)}: the share of each class" in capsys.readouterr().err
    )
    assert not (dataset / ".cache").exists()


def test_resolves_parser_prints_the_same_help():
    """resolve reads the command line with a parser whose defaults are left out (to know what was
    given): its --help is train.py's all the same."""
    assert get_args_parser(defaults=False).format_help() == get_args_parser().format_help()


# ----------------------------------------------------------------------------- the other scripts


@pytest.mark.parametrize(
    "parser, argv, words",
    [
        (evaluate.get_args_parser, "--batch-size 0", "--batch-size: 0: must be 1 or more"),
        (evaluate.get_args_parser, "--img-size 0", "--img-size: 0: the side must be 8 px or more"),
        (evaluate.get_args_parser, "--cache-workers -1", "--workers: -1: must be 0 or more"),
        (evaluate.get_args_parser, "--top-pairs -1", "--top-pairs: -1: must be 0 or more"),
        (evaluate.get_args_parser, "--max-params 0", "--max-params: 0: must be 1 or more"),
        (predict.get_args_parser, "--batch-size -3", "--batch-size: -3: must be 1 or more"),
        (predict.get_args_parser, "--img-size 4", "--img-size: 4: the side must be 8 px or more"),
        (predict.get_args_parser, "--topk 0", "--topk: 0: must be 1 or more"),
        (average.get_args_parser, "x.pt --out y.pt --batch-size 0", "must be 1 or more"),
    ],
)
def test_evaluate_and_predict_refuse_a_bad_number_in_one_sentence(parser, argv, words, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv.split())
    assert words in capsys.readouterr().err


def test_evaluate_and_predict_take_their_defaults():
    assert evaluate.get_args_parser().parse_args([]).batch_size == 128
    assert predict.get_args_parser().parse_args([]).topk == 1


def test_the_augmentation_group_of_the_table_is_the_augmentations_own_fields():
    from dataclasses import fields

    from twophase.augment import Augmentation

    group = tuple(o.dest for o in OPTIONS if o.group == AUGMENTATION)
    assert group == tuple(f.name for f in fields(Augmentation))
