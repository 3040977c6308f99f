"""The labels the model disputes (twophase/label_issues.py): confident learning's rule on
probability matrices made by hand and drawn, the same images as cleanlab's (where cleanlab is
installed), and evaluate.py --report's section, figure and CSV on a tiny run, with the copies of a
data check beside them."""

import csv
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
from conftest import NO_AUGMENT, examples, tiny_run
from twophase import label_issues
from twophase.label_issues import confident_thresholds, disputed
from twophase.written import Written


def probabilities(rows):
    p = np.array(rows, dtype=float)
    return p / p.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- the rule

# Three classes, two images of each called right with confidence, and one image labelled 0 that
# the model gives to class 1 as confidently as it gives the images labelled 1.
CLEAR = probabilities(
    [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.1, 0.8, 0.1],
     [0.05, 0.05, 0.9], [0.1, 0.1, 0.8], [0.03, 0.92, 0.05]]
)  # fmt: skip
CLEAR_LABELS = [0, 0, 1, 1, 2, 2, 0]


def test_an_obvious_flip_is_disputed_and_the_images_called_right_are_not():
    assert disputed(CLEAR, CLEAR_LABELS).tolist() == [6]
    found = label_issues.disputes(CLEAR, CLEAR_LABELS, [f"val/{i}.png" for i in range(7)])
    assert found == [label_issues.Dispute(6, "val/6.png", 0, 1, 0.03, 0.92)]


def test_a_confident_call_of_the_given_label_is_never_disputed():
    """An image labelled 0 whose class 2 probability is at class 2's threshold: the model is
    confident of another class too, but predicts the given one, so it disputes nothing; once it
    predicts class 2, it disputes the label."""
    probs = probabilities(
        [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1],
         [0.3, 0.3, 0.4], [0.25, 0.3, 0.45], [0.5, 0.05, 0.45]]
    )  # fmt: skip
    labels = [0, 0, 1, 1, 2, 2, 0]
    assert confident_thresholds(probs, labels).tolist() == pytest.approx([2 / 3, 0.75, 0.425])
    assert disputed(probs, labels).tolist() == []
    probs[6] = [0.4, 0.05, 0.55]
    assert disputed(probs, labels).tolist() == [6]


def test_disputes_are_ranked_by_the_given_labels_probability_lowest_first():
    probs = probabilities(
        [[0.9, 0.1], [0.85, 0.15], [0.35, 0.65], [0.45, 0.55], [0.3, 0.7], [0.05, 0.95],
         [0.2, 0.8]]
    )  # fmt: skip
    labels = [0, 0, 1, 1, 0, 0, 0]
    assert disputed(probs, labels).tolist() == [5, 6, 4]  # 0.05, 0.2, 0.3
    ties = probabilities([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.2, 0.8]])
    assert disputed(ties, [0, 0, 1, 0, 0]).tolist() == [3, 4]  # equal: in the images' order


def test_a_class_never_predicted_is_disputed_but_never_makes_a_correct_call_disputed():
    """Class 2 is never the model's most probable class: its threshold is low, the mean of what
    the model gives it on its own images, so the model is often "confident" of it; an image that
    the model calls as labelled is still no dispute, one of class 2's own images that the model
    confidently calls another class is, and one it calls another without confidence is not."""
    probs = probabilities(
        [[0.7, 0.1, 0.2], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.15, 0.7, 0.15],
         [0.75, 0.1, 0.15], [0.45, 0.4, 0.15]]
    )  # fmt: skip
    labels = [0, 0, 1, 1, 2, 2]
    assert confident_thresholds(probs, labels).tolist() == pytest.approx([0.75, 0.75, 0.15])
    assert (probs.argmax(1) != 2).all()
    assert disputed(probs, labels).tolist() == [4]  # 0 and 3: class 2 confident, called right


def test_a_class_without_validation_images_is_never_one_the_model_is_confident_of():
    """Of a class none of the images is labelled with, the model's usual probability is unknown:
    an image given to it is not disputed on its account."""
    probs = probabilities([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    assert confident_thresholds(probs, [0, 0, 0])[1:].tolist() == [2.0, 2.0]
    assert disputed(probs, [0, 0, 0]).tolist() == []


@st.composite
def predictions(draw):
    """(probabilities, labels): a few images of a few classes, each row from a handful of values
    (so that ties and probabilities at a threshold come up) or from anything in [0, 1]."""
    n, k = draw(st.integers(1, 12)), draw(st.integers(2, 5))
    value = draw(st.sampled_from([st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), st.floats(0, 1)]))
    rows = draw(st.lists(st.lists(value, min_size=k, max_size=k), min_size=n, max_size=n))
    rows = [row if sum(row) > 0 else [1.0] * k for row in rows]
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return probabilities(rows), labels


def disputed_by_hand(probs, labels, i):
    """The rule, said one image at a time: another class the model is confident of, and a
    prediction other than the given label (a tie with the given label goes to it)."""
    y, p = labels[i], probs[i]
    own = {k: [probs[j][k] for j in range(len(labels)) if labels[j] == k] for k in set(labels)}
    threshold = {k: max(sum(v) / len(v), 2e-6) for k, v in own.items()}
    confident = [k for k in threshold if k != y and p[k] >= threshold[k] - 1e-6]
    return bool(confident) and max(p[k] for k in range(len(p)) if k != y) > p[y] + 1e-6


@settings(max_examples=examples(100))
@given(predictions())
def test_every_disputed_image_keeps_the_rule_none_is_missed_and_the_ranking_rises(drawn):
    probs, labels = drawn
    found = disputed(probs, labels).tolist()
    assert found == [i for i in found if disputed_by_hand(probs, labels, i)]
    assert set(found) == {i for i in range(len(labels)) if disputed_by_hand(probs, labels, i)}
    own = [probs[i, labels[i]] for i in found]
    assert own == sorted(own)
    ties = [(own[a], found[a]) for a in range(len(found))]
    assert ties == sorted(ties)  # equal probabilities in the images' order


@settings(max_examples=examples(100))
@given(predictions())
def test_the_disputed_images_are_cleanlabs_confident_learning_ones(drawn):
    cleanlab = pytest.importorskip("cleanlab.filter")
    probs, labels = drawn
    if len(set(labels)) < 2:  # cleanlab asks for two classes among the labels
        return
    mask = cleanlab.find_label_issues(
        np.array(labels), probs, filter_by="confident_learning", n_jobs=1
    )
    found = disputed(probs, labels)
    assert set(found.tolist()) == set(np.flatnonzero(mask).tolist())
    ranked = cleanlab.find_label_issues(
        np.array(labels),
        probs,
        filter_by="confident_learning",
        return_indices_ranked_by="self_confidence",
        n_jobs=1,
    )
    rows = np.arange(len(labels))
    given_p = probs[rows, labels]
    assert given_p[found].tolist() == given_p[ranked].tolist()  # the same order, ties aside


# ----------------------------------------------------------------------------- the data check


def data_check(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "kind", "distance", "split", "image", "label"])
        writer.writerows(rows)


def test_groups_that_cross_labels_come_first_then_those_across_splits(tmp_path):
    data_check(
        tmp_path / "data_check.csv",
        [
            [1, "exact", 0, "train", "train/cat/a.png", "cat"],
            [1, "exact", 0, "val", "val/cat/b.png", "cat"],
            [2, "near", 3, "train", "train/cat/c.png", "cat"],
            [2, "near", 3, "train", "train/cat/d.png", "cat"],
            [3, "near", 4, "train", "train/cat/e.png", "cat"],
            [3, "near", 4, "train", "train/dog/e.png", "dog"],
            [4, "exact", 0, "test", "test/x.png", ""],
            [4, "exact", 0, "train", "train/dog/x.png", "dog"],
        ],
    )
    groups, across_splits, two_labels = label_issues.crossing_groups(
        label_issues.read_copies(tmp_path / "data_check.csv")
    )
    assert list(groups) == ["3", "1", "4"]  # 2: copies within one split, under one label
    assert (across_splits, two_labels) == (2, 1)  # a test image's missing label is no label


def test_a_large_group_shows_what_makes_it_cross_first():
    train = [label_issues.Copy("1", "near", "train", f"train/cat/{i}.png", "cat") for i in range(8)]
    val = label_issues.Copy("1", "near", "val", "val/cat/x.png", "cat")
    shown = label_issues.shown_copies([*train, val])
    assert len(shown) == label_issues.COPY_WIDTH and shown[:2] == [train[0], val]
    assert label_issues.copy_title(val, {"cat": "cat (house cat)"}, readable=False) == (
        "val: cat (house cat)\nx.png, near, unread"
    )


def test_a_data_check_without_its_columns_is_said_and_the_copies_left_out(tmp_path, capsys):
    (tmp_path / "data_check.csv").write_text("group,image\n1,train/cat/a.png\n")
    assert label_issues.review_copies(tmp_path, tmp_path, {}, Written(tmp_path, "t")) is None
    err = capsys.readouterr().err
    assert "data_check.csv has no column kind, distance, split, label" in err


# ----------------------------------------------------------------------------- evaluate.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run that learnt its colours; afterwards both validation cats copied into dog/:
    one of the two copies is given to cat at least as surely as the cats are on average, so the
    model disputes at least one label."""
    options = ["--epochs1", "0", "--epochs2", "4", "--lr2", "5e-3", *NO_AUGMENT]  # best: all right
    root = tiny_run(tmp_path_factory.mktemp("labels"), *options)
    for name in ("v000.jpg", "v001.jpg"):
        shutil.copy(root / "data/val/cat" / name, root / "data/val/dog" / f"cat-{name}")
    return root


def evaluated(run, figures):
    evaluate.main(
        [
            "--ckpt",
            str(run / "ck/best.pt"),
            "--report",
            "--figures",
            str(figures),
            "--device",
            "cpu",
        ]
    )
    return (figures / "report.md").read_text()


def section(report, title="## Data"):
    return report.split(title)[1].split("\n## ")[0]


def test_the_report_shows_the_labels_the_model_disputes_and_a_csv_of_them(
    run, tmp_path, narrow_models
):
    data = section(evaluated(run, tmp_path / "fig"))
    with open(tmp_path / "fig" / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(label_issues.LABEL_ISSUES)
    assert {"val/dog/cat-v000.jpg", "val/dog/cat-v001.jpg"} & {r["image"] for r in rows}
    for rank, row in enumerate(rows, 1):
        assert (run / "data" / row["image"]).is_file() and row["rank"] == str(rank)
        assert row["image"].split("/")[1] == row["given_label"] != row["predicted_label"]
    given = [float(r["given_probability"]) for r in rows]
    assert given == sorted(given)
    assert f"the model disputes {len(rows)} of the 8 validation labels" in data
    assert "candidates to look at, not errors proven" in data
    assert "](label_issues.csv)" in data and "](label_issues.png)" in data
    assert "copies" not in data.lower()  # no data check: nothing of copies
    assert json.loads((tmp_path / "fig" / "metrics.json").read_text())["disputed_labels"] == len(
        rows
    )


def test_with_a_data_check_the_report_shows_the_copies_across_splits_and_labels(
    run, tmp_path, narrow_models
):
    check = run / "ck" / "data_check.csv"
    data_check(
        check,
        [
            [1, "exact", 0, "val", "val/cat/v000.jpg", "cat"],
            [1, "exact", 0, "val", "val/dog/cat-v000.jpg", "dog"],
            [2, "near", 2, "train", "train/eel/000.png", "eel"],
            [2, "near", 2, "test", "test/img_02.png", ""],
            [3, "near", 5, "train", "train/gone.png", "eel"],
            [3, "near", 5, "val", "val/eel/v000.jpg", "eel"],
        ],
    )
    try:
        data = section(evaluated(run, tmp_path / "fig"))
    finally:
        check.unlink()
    assert "In the data: 2 photos with copies in two splits or more; 1 photo under two labels" in (
        data
    )
    assert "](copies.png)" in data and "each image titled with its split and label" in data
    assert data.index("copies.png") < data.index("label_issues.png")
    from PIL import Image

    with Image.open(tmp_path / "fig" / "copies.png") as image:
        assert image.height > image.width / 3  # three rows of copies
