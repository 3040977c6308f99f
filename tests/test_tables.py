"""How every CSV is read (twophase/tables.py): its header, separator and encoding decided over
the whole file and said in one line, and messages that name what is wrong and the way on."""

import pytest

from twophase.tables import Names, read_class_weights, read_csv, read_labels
from utils import Problem

IMAGES = [f"img{i}.png" for i in range(6)]
LABELS = ["cat", "dog", "cat", "dog", "cat", "dog"]


def labels_text(rows, header=None, separator=","):
    lines = ([header] if header else []) + [f"{name}{separator}{label}" for name, label in rows]
    return "\n".join(lines) + "\n"


def rows_of(images=IMAGES, labels=LABELS, ext=False):
    return [
        (name if ext else name.removesuffix(".png"), label) for name, label in zip(images, labels)
    ]


def expected(images=IMAGES, labels=LABELS):
    return {file: label for file, label in zip(images, labels)}


def read(path, names, **options):
    return {file: label for file, (label, _) in read_labels(path, names, **options).items()}


# ----------------------------------------------------------------------------- the header


def test_a_headerless_weights_file_whose_first_row_holds_a_typo_reads_it_as_a_row(tmp_path):
    weights = tmp_path / "w.csv"
    weights.write_text("O,5.0\n1,2.0\n2,1.0\n")  # O for 0: a row still, its second cell a weight
    with pytest.raises(Problem, match="line 1: 'O' is not one of the 3 classes"):
        read_class_weights(weights, ["0", "1", "2"])
    weights.write_text("0,heavy\n1,2.0\n2,1.0\n")
    with pytest.raises(Problem, match="line 1: 'heavy' is no finite number"):
        read_class_weights(weights, ["0", "1", "2"])
    weights.write_text("name,w\n1,2.0\n2,1.0\n")  # neither cell of a row's kind: a header, said
    assert read_class_weights(weights, ["0", "1", "2"]) == [1.0, 2.0, 1.0]


def test_a_header_of_known_names_is_a_header_beside_an_image_of_that_name(tmp_path, capsys):
    images = ["id.png", *IMAGES]
    labels = tmp_path / "train.csv"
    labels.write_text(labels_text(rows_of(), header="id,label"))
    got = read(labels, Names(images, tmp_path))
    assert got == expected() and "label" not in got.values()
    assert capsys.readouterr().err == ""  # the plain case: nothing said


def test_a_headerless_first_row_naming_a_missing_image_is_a_row_and_its_problem(tmp_path, capsys):
    labels = tmp_path / "train.csv"
    labels.write_text(labels_text([("ghost", "cat"), *rows_of()]))
    for classes in (None, ["cat", "dog"]):  # a training set's labels, or answers
        with pytest.raises(Problem, match="line 1: 'ghost' names no image"):
            read(labels, Names(IMAGES, tmp_path), classes=classes)
    said = capsys.readouterr().err
    assert f"{labels} has no header: its line 1 (ghost,cat) is read as a row" in said


def test_a_header_of_unknown_names_is_said_so_a_row_taken_for_one_is_never_silent(tmp_path, capsys):
    labels = tmp_path / "train.csv"
    labels.write_text(labels_text(rows_of(), header="photo,kind"))
    assert read(labels, Names(IMAGES, tmp_path)) == expected()
    said = capsys.readouterr().err.splitlines()
    assert said == [
        f"{labels} has a header: its line 1 (photo,kind) names its columns; separator ','; "
        "encoding UTF-8; images from column 'photo', labels from column 'kind'"
    ]


def test_columns_named_on_a_file_without_a_header_say_it_reads_as_rows(tmp_path):
    labels = tmp_path / "train.csv"
    labels.write_text(labels_text(rows_of()))
    with pytest.raises(Problem, match="reads as a row, not a header: .* leave out --image-col"):
        read(labels, Names(IMAGES, tmp_path), image_col="id")


# ----------------------------------------------------------------------------- separators


@pytest.mark.parametrize("separator, name", [(";", "';'"), ("\t", "tab"), ("|", "'|'")])
def test_a_semicolon_tab_or_bar_separated_file_is_read_and_said(tmp_path, capsys, separator, name):
    labels = tmp_path / "train.csv"
    labels.write_text(labels_text(rows_of(), header=f"image{separator}label", separator=separator))
    assert read(labels, Names(IMAGES, tmp_path)) == expected()
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and f"separator {name};" in said, said
    weights = tmp_path / "w.csv"
    weights.write_text(f"cat{separator}5\ndog{separator}0,5\n")  # where commas are decimal
    assert read_class_weights(weights, ["cat", "dog", "eel"]) == [5.0, 0.5, 1.0]


def test_a_file_of_one_column_names_the_separators_it_looked_for(tmp_path):
    labels = tmp_path / "train.csv"
    labels.write_text("image\nimg0\nimg1\n")
    with pytest.raises(Problem, match="none of them is split by a comma, a semicolon, a tab"):
        read(labels, Names(IMAGES, tmp_path))


def test_a_prediction_file_for_a_grader_must_be_separated_by_commas(tmp_path):
    from twophase.submission import read_predictions

    guesses = tmp_path / "p.csv"
    guesses.write_text("image_name;pred_label\nimg0;cat\n")
    found = read_predictions(guesses, Names(IMAGES[:1], tmp_path), ["cat", "dog"])
    assert found.labels == {"img0.png": ["cat"]}
    assert found.problems and "a grader reads commas" in found.problems[0]


# ----------------------------------------------------------------------------- encodings


def test_utf8_with_or_without_a_bom_is_read_silently(tmp_path, capsys):
    labels = tmp_path / "train.csv"
    text = labels_text(rows_of(labels=["café", "naïve"] * 3), header="image,label")
    for data in (text.encode(), b"\xef\xbb\xbf" + text.encode()):
        labels.write_bytes(data)
        assert set(read(labels, Names(IMAGES, tmp_path)).values()) == {"café", "naïve"}
    assert capsys.readouterr().err == ""


def test_a_cp1252_file_is_read_and_its_encoding_said(tmp_path, capsys):
    labels = tmp_path / "train.csv"
    text = labels_text(rows_of(labels=["café", "naïve"] * 3), header="image,label")
    labels.write_bytes(text.encode("cp1252"))
    assert set(read(labels, Names(IMAGES, tmp_path)).values()) == {"café", "naïve"}
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "encoding cp1252 (not UTF-8)" in said


def test_a_utf16_file_with_its_mark_is_read_and_said(tmp_path, capsys):
    labels = tmp_path / "train.csv"
    text = labels_text(rows_of(), header="image\tlabel", separator="\t")
    labels.write_bytes(text.encode("utf-16"))
    assert read(labels, Names(IMAGES, tmp_path)) == expected()
    assert "separator tab; encoding UTF-16 (not UTF-8)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "data, why",
    [
        (b"image,label\nimg0,caf\x81\n", r"byte 0x81 \(line 2\) is neither UTF-8 nor cp1252"),
        ("image,label\nimg0,café\n".encode() + b"img1,na\xefve\n", "UTF-8 mixed with other"),
        (b"PK\x03\x04\x00\x00binary", "is not text"),
    ],
)
def test_bytes_no_encoding_reads_are_a_problem_naming_the_file(tmp_path, data, why):
    labels = tmp_path / "train.csv"
    labels.write_bytes(data)
    with pytest.raises(Problem, match=f"{labels}.*{why}"):
        read_csv(labels, header_needed=True)


# ----------------------------------------------------------------------------- messages


def test_a_name_that_differs_only_in_case_or_extension_is_named(tmp_path):
    labels = tmp_path / "train.csv"
    files = ["a1.JPG", "b2.png", *IMAGES]
    rows = [("a1.jpg", "cat"), ("b2.jpg", "dog"), ("B2", "dog"), *rows_of()]
    labels.write_text(labels_text(rows, header="image,label"))
    with pytest.raises(Problem) as refused:
        read(labels, Names(files, tmp_path))
    message = str(refused.value)
    assert "line 2: 'a1.jpg' names no image in" in message
    assert "; a1.JPG differs only in case" in message
    assert "line 3: 'b2.jpg' names no image in" in message and "; b2.png has another ext" in message
    assert (
        "line 4: 'B2' names no image in" in message and "; b2.png differs only in case" in message
    )


def test_swapped_columns_get_a_hint_naming_the_options(tmp_path):
    labels = tmp_path / "train.csv"
    swapped = [(label, name) for name, label in rows_of()]
    labels.write_text(labels_text(swapped, header="label,image"))
    with pytest.raises(Problem) as refused:
        read(labels, Names(IMAGES, tmp_path))
    assert "'cat' names no image" in str(refused.value)
    assert "give --image-col image --label-col label" in str(refused.value)
    assert read(labels, Names(IMAGES, tmp_path), image_col="image") == expected()
    labels.write_text(labels_text(swapped))  # no header: the order is the way
    with pytest.raises(Problem, match="its column 2 names the images"):
        read(labels, Names(IMAGES, tmp_path))


def test_a_reading_is_said_once_while_the_file_is_unchanged(tmp_path, capsys):
    weights = tmp_path / "w.csv"
    weights.write_text("cat;5\n")
    for _ in range(2):  # a run checks them as it starts, then reads them for its loss
        read_class_weights(weights, ["cat", "dog"])
    assert capsys.readouterr().err.count("has no header") == 1
    weights.write_text("cat;5\ndog;2\n")
    read_class_weights(weights, ["cat", "dog"])
    assert capsys.readouterr().err.count("has no header") == 1
