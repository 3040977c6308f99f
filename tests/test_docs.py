"""The pages say nothing the code contradicts: every option they name exists in its script, every
relative link and image resolves, and every command in their code blocks parses."""

import re
import shlex
import sys

import pytest

import evaluate
import predict
from conftest import REPO
from twophase import average, options

sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS = {
    "train.py": options.get_args_parser,
    "evaluate.py": evaluate.get_args_parser,
    "predict.py": predict.get_args_parser,
    "twophase.average": average.get_args_parser,  # python -m twophase.average
    "benchmarks/bench.py": bench.get_args_parser,
    "jobs/slurm.sh": options.get_args_parser,  # its arguments go to train.py
}
# Options of other programs that the pages name: torchrun's, SLURM's, pip's.
FOREIGN = {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_id", "--rdzv_backend"}
FOREIGN |= {"--rdzv_endpoint", "--standalone", "--signal", "--gres", "--requeue", "--open-mode"}
FOREIGN |= {"--max-restarts", "--nproc-per-node"}
FOREIGN |= {"--logdir"}  # tensorboard's
FOREIGN |= {"--docs"}  # python -m twophase.options --docs
# Stand-ins for the shell's variables and patterns in the commands.
SHELL = {"$arch": "resnet34", "$opt": "adamw", "$out": "checkpoints/run1", "$NPROC": "4"}


def options_of(script):
    parser = PARSERS[script]()
    return {option for action in parser._actions for option in action.option_strings}


def code_blocks(text):
    """The commands of a page: its fenced and indented blocks, continuation lines joined."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    indented = re.findall(r"(?:^|\n\n)((?: {4}.*\n?)+)", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = "\n".join(fenced + indented).replace("\\\n", " ")
    return [line.strip().lstrip("!") for line in lines.splitlines() if line.strip()]


def commands(line):
    """(script, its arguments) of each invocation of one of PARSERS' scripts on a line."""
    for variable, value in SHELL.items():
        line = line.replace(variable, value)
    line = re.sub(r"\{([^,}]+),[^}]*\}", r"\1", line)  # a brace expansion: its first word
    tokens = list(shlex.shlex(line, posix=True, punctuation_chars=True))
    stops = {";", "&&", "||", "|", ">", ">>", "then", "else", "fi", "do", "done"}
    for i, token in enumerate(tokens):
        if token in PARSERS:
            rest = []
            for t in tokens[i + 1 :]:
                if t in stops:
                    break
                rest.append(t)
            yield token, rest


def all_commands():
    for page in PAGES:
        for line in code_blocks(page.read_text()):
            for script, argv in commands(line):
                yield pytest.param(script, argv, id=f"{page.name}: {script} {' '.join(argv)}")


@pytest.mark.parametrize("script, argv", list(all_commands()))
def test_every_command_in_the_pages_parses(script, argv):
    try:
        PARSERS[script]().parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"{script} {' '.join(argv)}: {error}")


def test_the_patterns_find_the_readmes_commands_and_links():
    text = (REPO / "README.md").read_text()
    scripts = {script for line in code_blocks(text) for script, _ in commands(line)}
    assert {"train.py", "evaluate.py", "predict.py"} <= scripts
    assert "docs/options.md" in re.findall(r"\]\(([^)\s]+)\)", text)
    clusters = code_blocks((REPO / "docs" / "clusters.md").read_text())
    assert ("jobs/slurm.sh", ["--data", "data", "--out", "checkpoints/run1"]) in [
        command for line in clusters for command in commands(line)
    ]
    with pytest.raises(SystemExit):  # a misspelt option fails
        PARSERS["train.py"]().parse_args(["--epoch2", "3"])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_option_a_page_names_exists(page):
    """In a command, the option must be its script's; in prose, some script's (or torchrun's,
    SLURM's)."""
    known = set().union(*(options_of(script) for script in PARSERS)) | FOREIGN
    text = page.read_text()
    for line in code_blocks(text):
        for script, argv in commands(line):
            named = {a.split("=")[0] for a in argv if a.startswith("--")}
            assert named <= options_of(script), (script, named - options_of(script))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
    assert named <= known, named - known


@pytest.mark.parametrize(
    "page", [*PAGES, REPO / "RESULTS.md", REPO / "BENCHMARKS.md"], ids=lambda p: p.name
)
def test_every_relative_link_and_image_resolves(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t[0] != "#"]
    for target in local:
        assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_estimates_are_quoted_in_the_readme_and_nowhere_disagree():
    """The suite's time, the demo's and a GPU run's: said once (README.md), referred to
    elsewhere; the one derived in docs/time.md is the README's number."""
    readme = (REPO / "README.md").read_text()
    suite = re.findall(r"runs the tests \(about (\d+) s on 2 cores\)", readme)
    h100 = re.findall(r"both phases: about (\d+) minutes", readme)
    assert len(suite) == 1 and len(h100) == 1
    table = re.findall(
        r"\| H100 80GB, fp16 \|[^|]*\|[^|]*\| about (\d+) minutes",
        (REPO / "docs" / "time.md").read_text(),
    )
    assert table == h100
    others = [
        REPO / "requirements-base.txt",
        REPO / "tests" / "README.md",
        *(REPO / "docs").glob("*.md"),
    ]
    for page in others:
        text = page.read_text()
        said = re.findall(
            r"(?:suite|pytest -q)[^.\n]{0,40}?(\d+ (?:s|seconds|minutes?)|two minutes)", text
        )
        assert not said, f"{page.name} quotes the suite's time: {said}"
