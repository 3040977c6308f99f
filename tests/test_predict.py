import csv
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import predict
import train
from conftest import REPO, TINY, make_dataset, narrowed
from twophase import inference, submission

# Folders listed "1", "10", "2" but labelled in numeric order 1, 2, 10; test image j shows the
# colour of the j % 3-th class named here.
CLASSES = ("10", "2", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "data", classes=CLASSES, per_class=8, test=7)
    recipe = "--epochs1 0 --epochs2 6 --lr2 3e-3 --warmup-epochs 0 --cosine-epochs 6".split()
    with narrowed():
        train.main(["--data", str(data), "--out", str(root / "ck"), *TINY, *recipe])
    return root


@pytest.fixture(autouse=True)
def narrow(narrow_models):
    """predict.main in this process builds the narrow model the checkpoints hold."""


def read_csv(text):
    return list(csv.reader(text.splitlines()))


def test_prediction_csv_names_classes_not_indices(trained, capsys):
    predict.main(["--ckpt", str(trained / "ck" / "best.pt"), "--device", "cpu"])
    out, err = capsys.readouterr()
    rows = read_csv(out)  # nothing but the CSV on standard output
    assert rows[0] == ["image_name", "pred_label"]
    assert [r[0] for r in rows[1:]] == [
        f"img_{j:02d}" for j in range(7)
    ]  # stems, sorted, one per image
    assert [r[1] for r in rows[1:]] == [CLASSES[j % 3] for j in range(7)]
    assert "images/s" in err


def test_out_file_and_tta(trained, tmp_path):
    out = tmp_path / "prediction.csv"
    predict.main(
        ["--ckpt", str(trained / "ck" / "best.pt"), "--device", "cpu", "--out", str(out), "--tta"]
    )
    rows = read_csv(out.read_text())
    assert len(rows) == 8 and [r[1] for r in rows[1:]] == [CLASSES[j % 3] for j in range(7)]
    # No temporary file left behind: the CSV and the record of what predict.py wrote (its hash).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".written.json", out.name]


def test_a_checkpoint_marked_for_tta_is_predicted_with_it_unless_told_otherwise(
    trained, tmp_path, monkeypatch
):
    state = torch.load(trained / "ck" / "best.pt", weights_only=True)
    torch.save({**state, "tta": True}, tmp_path / "marked.pt")  # as train.py --tta auto marks it
    used = []
    real = inference.predict_logits

    def spy(*args):
        used.append(args[-1])  # its tta
        return real(*args)

    monkeypatch.setattr(inference, "predict_logits", spy)
    for option, expected in (([], True), (["--no-tta"], False)):
        used.clear()
        out = tmp_path / "p.csv"
        predict.main(["--ckpt", str(tmp_path / "marked.pt"), "--out", str(out), *option])
        assert used and set(used) == {expected}
    used.clear()
    predict.main(["--ckpt", str(trained / "ck" / "best.pt"), "--out", str(out)])
    assert set(used) == {False}  # unmarked: off


def test_unreadable_test_image_is_an_error_unless_skipped(trained, tmp_path):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for src in sorted((trained / "data" / "test").iterdir())[:3]:
        (test_dir / src.name).write_bytes(src.read_bytes())
    (test_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "p.csv"
    ckpt = str(trained / "ck" / "best.pt")
    with (
        pytest.raises(SystemExit, match="broken.jpg"),
        pytest.warns(UserWarning, match="broken.jpg"),
    ):
        predict.main(
            ["--ckpt", ckpt, "--test-dir", str(test_dir), "--out", str(out), "--device", "cpu"]
        )
    assert not out.exists()
    with pytest.warns(UserWarning, match="broken.jpg"):
        predict.main(
            [
                "--ckpt",
                ckpt,
                "--test-dir",
                str(test_dir),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--skip-bad",
            ]
        )
    assert [r[0] for r in read_csv(out.read_text())[1:]] == ["img_00", "img_01", "img_02"]
    # --check takes the file --skip-bad wrote: the unreadable image is left out, not missing.
    predict.main(["--ckpt", ckpt, "--test-dir", str(test_dir), "--check", str(out)])
    (test_dir / "img_02.png").unlink()  # a readable image the CSV names but the folder lacks
    (test_dir / "img_09.png").write_bytes((test_dir / "img_00.png").read_bytes())
    with pytest.raises(SystemExit):
        predict.main(["--ckpt", ckpt, "--test-dir", str(test_dir), "--check", str(out)])


def test_check_accepts_a_good_csv_and_names_each_problem(trained, tmp_path, capsys):
    ckpt = str(trained / "ck" / "best.pt")
    good = tmp_path / "good.csv"
    predict.main(["--ckpt", ckpt, "--device", "cpu", "--out", str(good)])
    predict.main(["--ckpt", ckpt, "--check", str(good)])

    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    # img_00 missing, img_01 twice, img_02 with an unknown label.
    bad.write_text("\n".join([lines[0], lines[2], lines[2], "img_02,zebra"] + lines[4:]) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as failed:
        predict.main(["--ckpt", ckpt, "--check", str(bad)])
    assert failed.value.code != 0
    err = capsys.readouterr().err
    assert "img_00.png: missing" in err and "img_02: not among" not in err
    assert "line 3: 'img_01' is a second row of img_01.png (the first: line 2)" in err
    assert "line 4: 'zebra' is not one of the checkpoint's classes" in err


def test_check_with_answers_prints_the_exact_accuracy_and_the_confused_pairs(
    trained, tmp_path, capsys
):
    ckpt = str(trained / "ck" / "best.pt")
    answers = tmp_path / "answers.csv"  # test image j shows class CLASSES[j % 3]
    answers.write_text(
        "image_name,pred_label\n" + "".join(f"img_{j:02d},{CLASSES[j % 3]}\n" for j in range(7))
    )
    guesses = tmp_path / "guesses.csv"  # 5 of 7 right: img_01 and img_04 called "1", not "2"
    guesses.write_text(
        "image_name,pred_label\n"
        + "".join(f"img_{j:02d},{'1' if j in (1, 4) else CLASSES[j % 3]}\n" for j in range(7))
    )
    check = ["--ckpt", ckpt, "--check", str(guesses), "--answers", str(answers)]
    predict.main(check)
    out = capsys.readouterr().out
    # Class "10" 3 of 3, "2" 0 of 2, "1" 2 of 2: the balanced accuracy is the mean, 2/3.
    assert f"{guesses}: accuracy 0.7143 (5/7), balanced accuracy 0.6667 against {answers}" in out
    assert "  2 -> 1: 2 (100.0%)" in out  # both images of class "2"

    # Answers may name their images with the extension, and leave some out: said so.
    answers.write_text(
        answers.read_text().replace("img_03,10\n", "").replace("img_05,", "img_05.png,")
    )
    predict.main(check)
    assert "(6 of the 7 images have answers)" in capsys.readouterr().out
    # Answers of images that are not there, or of one twice with two labels: each named.
    answers.write_text(answers.read_text() + "img_99,2\nimg_00,2\n")
    with pytest.raises(SystemExit) as stop:
        predict.main(check)
    assert "2 of its 8 rows cannot be read" in str(stop.value)
    assert "line 8: 'img_99' names no image in" in str(stop.value)
    assert "line 9: 'img_00' is labelled '2' here and '10' on line 2" in str(stop.value)
    assert "accuracy" not in capsys.readouterr().out

    # Labels outside the checkpoint's classes: counted, and its classes listed.
    answers.write_text("image,label\n" + "".join(f"img_{j:02d},{j % 3}\n" for j in range(7)))
    with pytest.raises(SystemExit, match="3 of its 7 rows cannot be read") as stop:
        predict.main(check)
    assert "line 2: '0' is not one of the 3 classes" in str(stop.value)
    assert "the classes: 1, 2, 10" in str(stop.value)  # in label order


def test_an_answers_csv_without_a_header_keeps_its_first_row_and_a_submission_needs_one(
    trained, tmp_path, capsys
):
    ckpt = str(trained / "ck" / "best.pt")
    rows = "".join(f"img_{j:02d},{CLASSES[j % 3]}\n" for j in range(7))
    answers, guesses = tmp_path / "answers.csv", tmp_path / "guesses.csv"
    answers.write_text(rows)  # no header: its first line is img_00's answer
    guesses.write_text("image_name,pred_label\n" + rows)
    predict.main(["--ckpt", ckpt, "--check", str(guesses), "--answers", str(answers)])
    out, err = capsys.readouterr()
    assert "accuracy 1.0000 (7/7)" in out and "(6 of the 7" not in out
    assert f"{answers} has no header: its line 1 (img_00,10) is read as a row" in err
    guesses.write_text(rows)  # a grader would read img_00's row as the header
    with pytest.raises(SystemExit):
        predict.main(["--ckpt", ckpt, "--check", str(guesses)])
    assert "line 1: 'img_00' names an image, not a column" in capsys.readouterr().err


def test_rows_sort_by_image_name_and_names_may_start_with_underscores(trained, tmp_path, capsys):
    test_dir = tmp_path / "photos"
    test_dir.mkdir()
    source = (trained / "data" / "test" / "img_00.png").read_bytes()
    for name in ("a.png", "a-b.png", "a b.png", "__init.png", "nested/b.png"):
        (test_dir / name).parent.mkdir(exist_ok=True)
        (test_dir / name).write_bytes(source)
    predict.main(["--ckpt", str(trained / "ck" / "best.pt"), "--test-dir", str(test_dir)])
    out, err = capsys.readouterr()
    assert [r[0] for r in read_csv(out)[1:]] == ["__init", "a", "a b", "a-b"]
    assert "sub-folders are ignored: nested" in err


def test_a_closed_pipe_ends_quietly(trained, tmp_path, monkeypatch):
    """`predict.py | head`: the reader leaves early; no traceback, exit status 1."""

    class ClosedPipe:
        def __init__(self):
            self.file = open(tmp_path / "sink", "w")

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return self.file.fileno()

        def flush(self):
            pass

    pipe = ClosedPipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--ckpt", str(trained / "ck" / "best.pt"), "--device", "cpu"])
    pipe.file.close()
    assert exit_.value.code == 1


def test_a_run_trained_from_a_relative_data_path_is_read_from_any_folder(
    tmp_path, monkeypatch, capsys
):
    """The checkpoint records its dataset's absolute path: --data data given in one folder, the
    run evaluated and predicted from another."""
    make_dataset(tmp_path / "project" / "data")
    monkeypatch.chdir(tmp_path / "project")
    train.main(["--data", "data", "--out", "ck", *TINY, "--epochs1", "1", "--epochs2", "0"])
    monkeypatch.chdir(tmp_path)
    predict.main(["--ckpt", "project/ck/best.pt", "--out", "p.csv"])
    assert len(read_csv((tmp_path / "p.csv").read_text())) == 6


def test_predictions_in_a_graders_layout_and_probabilities_are_read_back_by_check(
    trained, tmp_path, capsys
):
    ckpt = str(trained / "ck" / "best.pt")
    out, probs = tmp_path / "submission.csv", tmp_path / "probs.csv"
    layout = ["--columns", "id,breed", "--keep-ext", "--topk", "2", "--probs", str(probs)]
    predict.main(["--ckpt", ckpt, "--out", str(out), *layout])
    rows = read_csv(out.read_text())
    assert rows[0] == ["id", "breed"] and rows[1][0] == "img_00.png"
    assert all(len(r[1].split()) == 2 for r in rows[1:])  # the 2 likeliest, best first
    table = read_csv(probs.read_text())
    assert table[0] == ["id", "1", "2", "10"]  # a column per class, in the classes' order
    for row in table[1:]:
        p = [float(v) for v in row[1:]]
        assert sum(p) == pytest.approx(1, abs=1e-4)
        best = table[0][1 + p.index(max(p))]
        assert best == next(r[1].split()[0] for r in rows if r[0] == row[0])
    answers = tmp_path / "answers.csv"  # names with their extension, as true labels often are
    answers.write_text(
        "file,label\n" + "".join(f"img_{j:02d}.png,{CLASSES[j % 3]}\n" for j in range(7))
    )
    capsys.readouterr()
    for written in (out, probs):
        predict.main(["--ckpt", ckpt, "--check", str(written), "--answers", str(answers)])
    printed = capsys.readouterr().out
    assert "top-2" in printed.splitlines()[0] and "balanced accuracy" in printed


def test_a_few_image_files_are_predicted_without_a_cache(trained, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for j in (0, 1):
        (photos / f"shot{j}.png").write_bytes(
            (trained / "data" / "test" / f"img_0{j}.png").read_bytes()
        )
    predict.main(
        [
            "--ckpt",
            str(trained / "ck" / "best.pt"),
            str(photos / "shot1.png"),
            str(photos / "shot0.png"),
        ]
    )
    rows = read_csv(capsys.readouterr().out)
    assert [r[0] for r in rows[1:]] == ["shot1", "shot0"]  # in the order given
    assert [r[1] for r in rows[1:]] == [CLASSES[1], CLASSES[0]]
    assert sorted(p.name for p in photos.iterdir()) == ["shot0.png", "shot1.png"]  # nothing else
    with pytest.raises(SystemExit, match="unreadable image"):
        (photos / "bad.png").write_bytes(b"no")
        predict.main(["--ckpt", str(trained / "ck" / "best.pt"), str(photos / "bad.png")])


def test_the_snippet_in_docs_in_your_code_runs_as_written(trained, tmp_path, monkeypatch, capsys):
    page = (REPO / "docs" / "in-your-code.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    snippet = snippet.replace("path/to/this/repo", str(REPO))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes((trained / "ck" / "best.pt").read_bytes())
    test = trained / "data" / "test"
    (tmp_path / "cat.jpg").write_bytes((test / "img_01.png").read_bytes())  # a PNG named .jpg
    Image.open(test / "img_02.png").save(tmp_path / "dog.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(snippet, scope)
    names, probs = scope["names"], scope["probs"]
    assert names == [CLASSES[1], CLASSES[2]] and probs.shape == (2, 3)
    assert np.allclose(probs.sum(1), 1) and CLASSES[1] in capsys.readouterr().out
    pil = scope["classifier"].predict([Image.open(test / "img_01.png")])[0]
    assert pil == [CLASSES[1]]  # a PIL image, as its file


ODD = ("golden retriever", "a,b", 'say "cheese" | $5')  # spaces, a comma, quotes, | and $


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    """A run whose class folders hold a space, a comma and quotes, and the true labels of its
    test images in a CSV."""
    root = tmp_path_factory.mktemp("odd")
    data = make_dataset(root / "data", classes=ODD, per_class=4, val_per_class=1, test=3)
    with narrowed():
        train.main(["--data", str(data), "--out", str(root / "ck"), *TINY, "--epochs", "2"])
    with open(root / "answers.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label")] + [(f"img_{j:02d}", ODD[j]) for j in range(3)])
    return root / "ck" / "best.pt", root / "answers.csv"


@pytest.mark.parametrize("layout", [[], ["--topk", "1"], ["--topk", "2"], ["--topk", "3"]])
def test_class_names_with_spaces_commas_and_quotes_are_written_and_checked_unchanged(
    odd_names, layout, tmp_path, capsys
):
    ckpt, answers = odd_names
    out = tmp_path / "p.csv"
    predict.main(["--ckpt", str(ckpt), "--out", str(out), *layout])
    rows = read_csv(out.read_text())[1:]
    k = int(layout[1]) if layout else 1
    cells = [submission.split_labels(r[1], set(ODD)) for r in rows]
    assert all(len(c) == k and set(c) <= set(ODD) for c in cells)
    if k == 1:
        assert all(r[1] in ODD for r in rows)  # the class name itself
    capsys.readouterr()
    predict.main(["--ckpt", str(ckpt), "--check", str(out), "--answers", str(answers)])
    assert f"{out}: accuracy" in capsys.readouterr().out


def test_keep_ext_predicts_two_images_that_share_a_name_but_not_an_extension(trained, tmp_path):
    test = tmp_path / "test"
    test.mkdir()
    for ext in ("png", "jpg"):
        Image.open(trained / "data" / "test" / "img_00.png").save(test / f"a.{ext}")
    ckpt = str(trained / "ck" / "best.pt")
    with pytest.raises(SystemExit, match=r"a.jpg, a.png \(--keep-ext"):
        predict.main(["--ckpt", ckpt, "--test-dir", str(test)])
    out = tmp_path / "p.csv"
    predict.main(["--ckpt", ckpt, "--test-dir", str(test), "--keep-ext", "--out", str(out)])
    assert [r[0] for r in read_csv(out.read_text())[1:]] == ["a.jpg", "a.png"]
    predict.main(["--ckpt", ckpt, "--test-dir", str(test), "--check", str(out)])


def test_an_image_given_twice_is_one_row(trained, capsys):
    image = str(trained / "data" / "test" / "img_00.png")
    predict.main(["--ckpt", str(trained / "ck" / "best.pt"), image, image])
    out, err = capsys.readouterr()
    assert [r[0] for r in read_csv(out)[1:]] == ["img_00"] and "given more than once" in err


def test_odd_class_names_go_through_evaluate_and_its_report_unchanged(odd_names, tmp_path):
    ckpt, _ = odd_names
    report, figures = tmp_path / "report.md", tmp_path / "fig"
    evaluate.main(["--ckpt", str(ckpt), "--figures", str(figures), "--report", str(report)])
    assert '| say "cheese" \\| $5 |' in report.read_text()  # one table cell
    with open(figures / "per_class_metrics.csv", newline="") as f:
        assert sorted(row["class"] for row in csv.DictReader(f)) == sorted(ODD)
    assert (figures / "fig5_confusion_matrix.png").stat().st_size > 1000


def test_one_image_is_answered_in_words_beside_the_csv(trained, capsys):
    image = str(trained / "data" / "test" / "img_00.png")
    predict.main(["--ckpt", str(trained / "ck" / "best.pt"), image, "--words"])
    out, err = capsys.readouterr()
    assert read_csv(out) == [["image_name", "pred_label"], ["img_00", CLASSES[0]]]  # the CSV alone
    said = next(line for line in err.splitlines() if line.startswith(image))
    words = said.split(": ", 1)[1].split(" · ")
    assert len(words) == 3 and words[0].startswith(f"{CLASSES[0]} ")  # the likeliest first
    shares = [float(w.rsplit(" ", 2)[1]) for w in words]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(100, abs=0.2)
    predict.main(["--ckpt", str(trained / "ck" / "best.pt"), image])  # not a terminal: the CSV
    assert " · " not in capsys.readouterr().err


def test_topk_above_the_class_count_is_said_and_check_gives_no_top_k_of_every_class(
    trained, tmp_path, capsys
):
    out, ckpt = tmp_path / "p.csv", str(trained / "ck" / "best.pt")
    predict.main(["--ckpt", ckpt, "--out", str(out), "--topk", "5"])
    assert "--topk 5: the model has 3 classes, so each row holds all 3" in capsys.readouterr().err
    assert all(len(r[1].split()) == 3 for r in read_csv(out.read_text())[1:])
    answers = tmp_path / "answers.csv"
    answers.write_text(
        "image,label\n" + "".join(f"img_{j:02d},{CLASSES[j % 3]}\n" for j in range(7))
    )
    predict.main(["--ckpt", ckpt, "--check", str(out), "--answers", str(answers)])
    assert "top-" not in capsys.readouterr().out  # the true label is always among all 3
    predict.main(["--ckpt", ckpt, "--out", str(out), "--topk", "2"])
    predict.main(["--ckpt", ckpt, "--check", str(out), "--answers", str(answers)])
    assert "top-2" in capsys.readouterr().out


def test_a_test_folder_of_folders_says_what_it_holds_and_what_to_give(trained, tmp_path):
    test = tmp_path / "test"
    (test / "cats").mkdir(parents=True)
    image = (trained / "data" / "test" / "img_00.png").read_bytes()
    (test / "cats" / "a.png").write_bytes(image)
    ckpt = str(trained / "ck" / "best.pt")
    inside = re.escape(str(test / "cats"))
    with pytest.raises(SystemExit, match=f"holds no images, only the folder cats: .* {inside}$"):
        predict.main(["--ckpt", ckpt, "--test-dir", str(test)])
    (test / "dogs").mkdir()
    with pytest.raises(SystemExit, match="only the folders cats, dogs: .*class folders"):
        predict.main(["--ckpt", ckpt, "--test-dir", str(test)])


def test_out_and_probs_set_a_file_of_the_users_aside_and_replace_their_own(
    trained, tmp_path, capsys
):
    """--out answers.csv by mistake keeps the answers (set aside, said); predict.py's own file is
    replaced when it writes it again; one changed since is the user's."""
    out, probs = tmp_path / "answers.csv", tmp_path / "probs.csv"
    out.write_text("image_name,pred_label\nimg_00,10\n")
    argv = ["--ckpt", str(trained / "ck" / "best.pt"), "--out", str(out), "--probs", str(probs)]
    predict.main(argv)
    err = capsys.readouterr().err
    kept = tmp_path / "answers.replaced.csv"
    assert f"{out} was not written by predict.py (or was changed since): kept as {kept}" in err
    assert (
        kept.read_text() == "image_name,pred_label\nimg_00,10\n"
        and len(read_csv(out.read_text())) == 8
    )
    predict.main(argv)  # its own, as it wrote them: replaced
    assert "kept as" not in capsys.readouterr().err
    probs.write_text(probs.read_text() + "img_99,1,0,0\n")
    predict.main(argv)
    assert f"kept as {tmp_path / 'probs.replaced.csv'}" in capsys.readouterr().err
    assert "img_99" in (tmp_path / "probs.replaced.csv").read_text()
