"""The rule every writer keeps in a folder that is the user's too (twophase/written.py): it
replaces or removes only what it wrote, as it wrote it. Folders holding files of the user's,
files the product wrote and files it wrote that the user edited since, under the names the
writers write, go through every writer (evaluate.py with and without --report and --compare,
predict.py's --out and --probs, twophase.average's --out) in a drawn order: no byte of the
user's is lost, and where a file of theirs moved, a line said where."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import evaluate
import predict
from conftest import examples, tiny_run
from twophase import average, report, written

# Names the writers write, and a few beside them that a user might choose.
NAMES = [
    *evaluate.OUTPUTS,
    "report.md",
    "thesis.md",
    written.RECORD,
    written.HIDDEN,
    "prediction.csv",
    "probs.csv",
    "averaged.pt",
    "runs/comparison.md",
    "runs/fig3_accuracy_vs_parameters.png",
    "comparison.md",
    "report.replaced.md",
    "notes.txt",
]
USER = st.tuples(st.just("user"), st.sampled_from(NAMES), st.text("ab ,\n#|é", max_size=12))
STEPS = st.one_of(
    USER,
    st.tuples(st.just("edit"), st.integers(0, 99), st.sampled_from(["append", "notes"])),
    st.tuples(
        st.just("evaluate"),
        st.sampled_from(["best.pt", "last.pt"]),
        st.sampled_from([None, "", "thesis.md"]),  # --report: none, the folder's, a file named
        st.booleans(),  # --compare best.pt last.pt
    ),
    st.tuples(
        st.just("predict"),
        st.sampled_from(["prediction.csv", "report.md", "per_class_metrics.csv", "notes.txt"]),
        st.sampled_from([None, "probs.csv", "metrics.json"]),
    ),
    st.tuples(st.just("average"), st.sampled_from(["averaged.pt", "report.md", "notes.txt"])),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run of two epochs: its best.pt and last.pt, two owners of a figures folder."""
    return tiny_run(tmp_path_factory.mktemp("written"), "--epochs1", "1", "--epochs2", "1") / "ck"


@pytest.fixture
def quick_figures(monkeypatch):
    """The figures drawn as a few bytes each: where they go is what is tested, not how they
    look (test_evaluate.py), and matplotlib's seconds would bound the examples."""
    drawn = [0]

    def draw(*args, **kwargs):
        drawn[0] += 1
        path = next(a for a in args if isinstance(a, Path))
        path.write_bytes(f"figure {drawn[0]} of {path.name}".encode())

    for name in dir(evaluate):
        if name.startswith("plot_"):
            monkeypatch.setattr(evaluate, name, draw)


def product_step(step, run, folder):
    """One writer run into `folder`; a refusal (the average's) is an outcome, not a failure."""
    kind, *drawn = step
    if kind == "evaluate":
        ckpt, given_report, compare = drawn
        argv = ["--ckpt", str(run / ckpt), "--figures", str(folder), "--device", "cpu"]
        if given_report is not None:
            argv += ["--report", str(folder / given_report) if given_report else ""]
        if compare:
            argv += ["--compare", str(run / "best.pt"), str(run / "last.pt")]
        if compare and given_report is None:  # the comparison alone, into the folder
            argv = ["--compare", *argv[-2:], "--figures", str(folder)]
        event(f"evaluate.py, report {given_report!r}" + ", compare" * compare)
        evaluate.main(argv)
    elif kind == "predict":
        out, probs = drawn
        argv = ["--ckpt", str(run / "best.pt"), "--out", str(folder / out)]
        predict.main(argv + (["--probs", str(folder / probs)] if probs else []))
    else:
        try:
            average.main(
                [str(run / "best.pt"), str(run / "last.pt"), "--out", str(folder / drawn[0])]
                + ["--no-bn-update", "--device", "cpu"]
            )
        except SystemExit as refusal:
            assert str(refusal.code).startswith(f"--out {folder / drawn[0]}")
            event("average refused")


def user_step(step, folder, kept, n):
    """The user writes a file, or edits one the product wrote (a line added; in a report, prose
    in a slot of its own); `kept` notes what of theirs must stay: (where, bytes, the whole file
    or bytes in it)."""
    kind, *drawn = step
    if kind == "user":
        name, text = drawn
        path = folder / name
        if path.is_dir():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        content = f"user file {n}: {text}".encode()
        path.write_bytes(content)
        for key, (where, _, _) in list(kept.items()):
            if where == path:  # theirs, written over by them
                del kept[key]
        kept[n] = (path, content, True)
        return
    pick, how = drawn
    mine = {where for where, _, whole in kept.values() if whole}  # not the product's
    theirs = sorted(
        p for p in folder.rglob("*") if p.is_file() and p not in mine and ".replaced" not in p.name
    )
    reports = [p for p in theirs if report.MARK.search(p.read_bytes().decode(errors="replace"))]
    if how == "notes" and reports:
        theirs = reports
    if not theirs:
        return
    path = theirs[pick % len(theirs)]
    text = path.read_bytes()
    if how == "notes" and reports:
        note = f"user note {n}".encode()
        path.write_bytes(text + b"<!-- notes:mine%d -->\n%s\n<!-- /notes -->\n" % (n, note))
        kept[n] = (path, note, False)  # the prose, in a file: the report keeps it where it can
        event("a note in a report")
    else:
        path.write_bytes(text + f"\nuser edit {n}\n".encode())
        kept[n] = (path, path.read_bytes(), True)
        event(f"an edited {path.suffix or path.name}")


def check_nothing_lost(folder, kept, err):
    """Each thing of the user's is in some file of the folder: where it was, or where a line of
    `err` said it went (and from there on, there)."""
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for key, (where, content, whole) in list(kept.items()):
        holding = [p for p, b in files.items() if (b == content if whole else content in b)]
        assert holding, f"lost: {content!r} (was {where})\n{err}"
        if where not in holding:
            said = [p for p in holding if f"kept as {p}" in err]
            assert said, f"{where} moved without a word:\n{err}"
            kept[key] = (said[0], content, whole)
            event("set aside")


@settings(
    max_examples=examples(15),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(USER, max_size=4), st.lists(STEPS, min_size=2, max_size=7))
def test_no_writer_loses_a_byte_of_the_users(
    run, tmp_path_factory, narrow_models, quick_figures, capsys, files, steps
):
    folder = tmp_path_factory.mktemp("folder")
    kept = {}
    for n, step in enumerate(files + steps):
        if step[0] in ("user", "edit"):
            user_step(step, folder, kept, n)
            continue
        capsys.readouterr()
        product_step(step, run, folder)
        check_nothing_lost(folder, kept, capsys.readouterr().err)


def test_a_comparison_an_older_record_lists_by_name_gives_way_but_for_its_words(tmp_path):
    """A record of names alone (before fingerprints) trusts its figures, not its Markdown: the
    comparison's images go, its table (which may hold words of the user's) is set aside."""
    folder = tmp_path / "figures"
    (folder / "optimizers").mkdir(parents=True)
    for name in evaluate.COMPARISON:
        (folder / "optimizers" / name).write_text(f"{name} as written, then edited\n")
    (folder / written.RECORD).write_text(json.dumps({"files": ["optimizers"], "run": "r"}))
    figures = written.Written(folder, "evaluate.py")
    evaluate.give_way(figures, "optimizers")
    table = folder / "optimizers" / "comparison.replaced.md"
    assert table.read_text() == "comparison.md as written, then edited\n"
    assert sorted(p.name for p in (folder / "optimizers").iterdir()) == [table.name]
