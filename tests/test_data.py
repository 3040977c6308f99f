import os
import warnings

import numpy as np
import pytest
from PIL import Image

import data
from conftest import flat_with_two_csvs, load_splits, make_dataset, write_image
from utils import Problem


def test_classes_in_numeric_order_hidden_folders_ignored(tmp_path):
    for name in [str(i) for i in range(12)] + [".ipynb_checkpoints", "__MACOSX"]:
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    assert data.find_classes(tmp_path / "train") == [str(i) for i in range(12)]


def test_classes_in_lexicographic_order_when_not_all_integers(tmp_path):
    for name in ["b", "10", "a", "2"]:
        (tmp_path / "train" / name).mkdir(parents=True)
    assert data.find_classes(tmp_path / "train") == ["10", "2", "a", "b"]


def test_labels_follow_class_order_not_folder_listing(tmp_path):
    classes = [str(i) for i in range(12)]
    files = ["10/a.png", "2/b.png", "0/c.png"]
    assert data.labels_of(files, classes).tolist() == [10, 2, 0]


def test_non_image_files_and_hidden_files_are_ignored(tmp_path):
    write_image(tmp_path / "train" / "a" / "x.png", (1, 2, 3))
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / "a" / "readme.txt").write_text("hi")
    (tmp_path / "train" / "a" / "paper.pdf").write_bytes(
        b"%PDF-1.4"
    )  # Pillow writes PDFs, never reads them
    write_image(tmp_path / "train" / "a" / "._x.png", (1, 2, 3))
    write_image(tmp_path / "y.jpg", (1, 2, 3)).rename(tmp_path / "train" / "a" / "tmp")
    write_image(tmp_path / "train" / "b" / "z.png", (1, 2, 3))
    (tmp_path / "train" / "b" / "Thumbs.db").write_bytes(b"\0")
    with pytest.warns(UserWarning) as warned:
        listed = data.list_labelled_images(tmp_path / "train", ["a", "b"])
    assert listed == ["a/tmp", "a/x.png", "b/z.png"]  # a JPEG without an extension is read
    assert [str(w.message) for w in warned] == [  # one warning, however many class folders
        f"{tmp_path / 'train'}: 3 file(s) that are not images left out: a/paper.pdf, "
        "a/readme.txt, b/Thumbs.db"
    ]


def test_images_beside_the_class_folders_are_named_in_one_warning(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=2, val_per_class=0)
    for name in ("stray2.png", "stray1.jpg", "stray3.png"):
        write_image(root / "train" / name, (1, 2, 3))
    (root / "train" / "notes.txt").write_text("not an image: no class to want it")
    with pytest.warns(UserWarning) as warned:
        dataset = data.find_dataset(root)
    assert [str(w.message) for w in warned] == [
        f"{root / 'train'}: 3 image(s) beside the class folders left out, such as stray1.jpg: "
        "an image of a class must be in its class folder (images in a flat folder take their "
        "labels from a CSV, --labels)"
    ]
    assert dataset.train.files == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def test_val_class_missing_from_train_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path, classes=("a", "b"))
    write_image(root / "val" / "zebra" / "1.png", (9, 9, 9))
    with pytest.raises(Problem, match="zebra"):
        load_splits(root, 8)


def test_stratified_split_without_val_folder(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class=10, val_per_class=0)
    (root / "train" / "a" / "broken.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="broken.png"):
        splits = load_splits(root, 8, tmp_path / "c", val_fraction=0.2, seed=3)
    assert splits.skipped == 1  # one file, counted once though train and val share its folder
    val_labels = splits.val.labels[splits.val.indices]
    assert len(splits.val) == 6 and np.bincount(val_labels).tolist() == [2, 2, 2]
    assert not set(splits.train.indices) & set(splits.val.indices)
    with pytest.warns(UserWarning, match="broken.png"):  # each run names it again
        again = load_splits(root, 8, tmp_path / "c", val_fraction=0.2, seed=3)
    assert np.array_equal(again.val.indices, splits.val.indices)


def test_demo_dataset_layout(demo_images):
    root = demo_images
    assert data.find_classes(root / "train") == [str(i) for i in range(10)]
    tests = data.list_images(root / "test")
    answers = (root / "answers.csv").read_text().splitlines()
    assert answers[0] == "image_name,pred_label" and len(answers) - 1 == len(tests) > 200
    assert sorted(line.split(",")[0] + ".png" for line in answers[1:]) == tests
    assert not any(
        name[0].isdigit() and name[1] == "_" for name in tests
    )  # names do not leak labels
    with Image.open(root / "val" / "3" / os.listdir(root / "val" / "3")[0]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path):
    write_image(tmp_path / "train" / "a" / "x.png", (1, 2, 3))
    (tmp_path / "train" / "b").mkdir()
    with pytest.warns(UserWarning, match="train/b holds no images"):
        assert data.list_labelled_images(tmp_path / "train", ["a", "b"]) == ["a/x.png"]


@pytest.mark.parametrize("how", ["flat", "empty", "unreadable"])
def test_a_val_folder_that_yields_no_images_is_an_error_saying_why(how, tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3, val_per_class=1)
    for image in (root / "val").rglob("*.jpg"):
        if how == "flat":
            image.rename(root / "val" / f"{image.parent.name}-{image.name}")
        elif how == "empty":
            image.unlink()
        else:
            image.write_bytes(b"no image")
    expected = {
        "flat": "holds no images in class folders .* it holds 2 images directly",
        "empty": "holds no images in class folders",
        "unreadable": "none of the 2 images of .*val could be read",
    }[how]
    with pytest.raises(Problem, match=expected), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each unreadable image's own warning
        load_splits(root, 8, tmp_path / "c")


def kaggle_layout(root, classes=("10", "2", "1"), per_class=4, with_ext=False):
    """A flat root/train/ of images and root/train.csv of id,label, Kaggle's layout: the columns
    in another order, an extra one, names without their extension unless `with_ext`."""
    lines = ["label,notes,id"]
    for i, c in enumerate(classes):
        for j in range(per_class):
            name = f"img{i}{j:02d}"
            write_image(root / "train" / f"{name}.png", (40 * i, 200, 90), seed=i * 10 + j)
            lines.append(f"{c},x,{name}.png" if with_ext else f"{c},x,{name}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_labels_from_a_csv_name_images_with_or_without_extension_in_numeric_class_order(tmp_path):
    root = kaggle_layout(tmp_path / "k")
    for csv_name in ("train.csv", str(root / "train.csv")):  # inside the root, or a path
        dataset = data.find_dataset(root, labels=csv_name, image_col="id", label_col="label")
        assert dataset.classes == ["1", "2", "10"] and dataset.val is None
        assert dataset.train.files[:2] == ["img000.png", "img001.png"]
        assert dataset.train.labels.tolist()[:4] == [2, 2, 2, 2]  # "10" is the third class
    kaggle_layout(tmp_path / "e", with_ext=True)
    again = data.find_dataset(tmp_path / "e", labels="train.csv", image_col="id", label_col="label")
    assert again.train.files == dataset.train.files
    splits = data.cache_splits(dataset, 8, cache_dir=tmp_path / "c", val_fraction=0.25)
    assert (len(splits.train), len(splits.val)) == (
        9,
        3,
    ) and "labelled by train.csv" in splits.layout


def test_a_labels_csv_with_problems_is_refused_naming_each_line(tmp_path):
    root = kaggle_layout(tmp_path / "k")
    lines = (root / "train.csv").read_text().splitlines()
    lines[2] = "2,x,img000"  # img000 again, with another label than line 2's
    lines += ["1,x,nowhere", ",x,img101", "1,x,img102"]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(Problem) as refused:
        data.find_dataset(root, labels="train.csv", image_col="id", label_col="label")
    message = str(refused.value)
    assert "4 of its 15 rows cannot be read" in message  # every problem at once
    assert "line 15: 'img101' has an empty label" in message
    lines.pop(-2)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(Problem) as refused:
        data.find_dataset(root, labels="train.csv", image_col="id", label_col="label")
    message = str(refused.value)
    assert "line 3: 'img000' is labelled '2' here and '10' on line 2" in message
    assert "line 14: 'nowhere' names no image in" in message
    with pytest.raises(Problem, match="no column 'image'"):
        data.find_dataset(root, labels="train.csv", image_col="image")
    fine = kaggle_layout(tmp_path / "fine")
    (fine / "val.csv").write_text("label,notes,id\n")  # a header and no row: no images
    with pytest.raises(Problem, match="val.csv labels no images: it holds a header line alone"):
        data.find_dataset(fine, labels="train.csv", val_labels="val.csv", image_col="id")


def test_a_class_with_one_image_is_warned_of_and_val_labels_must_not_repeat_train(tmp_path):
    root = kaggle_layout(tmp_path / "k", per_class=3)
    val = ["id,label", "img000,10", "img100,2"]
    (root / "val.csv").write_text("\n".join(val) + "\n")
    with pytest.raises(Problem, match="val.csv names images that .*train.csv names too.*img000"):
        data.find_dataset(
            root, labels="train.csv", val_labels="val.csv", image_col="id", label_col="label"
        )
    (root / "val").mkdir()
    for name in ("img000", "img100"):
        (root / "val" / f"{name}.png").write_bytes((root / "train" / f"{name}.png").read_bytes())
    rows = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(rows[:2] + rows[4:]) + "\n")  # class 10: one image
    # Validated on val.csv's images, a class of one training image is no matter for a warning.
    with pytest.warns(UserWarning, match="train.csv name 7 of the 9 images") as said:
        dataset = data.find_dataset(
            root, labels="train.csv", val_labels="val.csv", image_col="id", label_col="label"
        )
    assert not [w for w in said if "single image" in str(w.message)]
    assert dataset.val.folder == root / "val" and dataset.val.files == ["img000.png", "img100.png"]
    # Held out of train.csv's images, it cannot both train and validate: said.
    with pytest.warns(UserWarning) as said:
        data.find_dataset(root, labels="train.csv", image_col="id", label_col="label")
    assert any("1 class(es) with a single image" in str(w.message) for w in said)
    assert not data.validation_is_drawn({"data": str(root), "labels": "x", "val_labels": "y"})


def test_a_folder_of_class_folders_is_the_training_set_and_validation_is_held_out(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=5, val_per_class=0)
    for folder in (root / "train").iterdir():
        folder.rename(root / folder.name)
    (root / "train").rmdir()
    dataset = data.find_dataset(root)  # test/ beside the classes is no class
    assert dataset.classes == ["a", "b"] and dataset.layout.startswith("class folders at the root")
    assert data.validation_is_drawn({"data": str(root)})
    with pytest.raises(Problem, match="holds images but no class folders: .* --labels CSV"):
        (tmp_path / "flat" / "train").mkdir(parents=True)
        write_image(tmp_path / "flat" / "train" / "x.png", (1, 2, 3))
        data.find_dataset(tmp_path / "flat")


def test_a_label_only_the_validation_csv_names_is_refused_as_a_class_without_training_images(
    tmp_path,
):
    root = flat_with_two_csvs(tmp_path / "k")
    (root / "val.csv").write_text((root / "val.csv").read_text() + "dog5,eel\n")
    with pytest.raises(Problem, match=r"val.csv: 1 of its 5 rows .*\n  line 6: 'eel' is not one"):
        data.find_dataset(root, labels="train.csv", val_labels="val.csv")


def test_one_column_named_takes_the_other_from_the_first_column_it_is_not(tmp_path):
    root = kaggle_layout(tmp_path / "k")
    rows = [line.split(",") for line in (root / "train.csv").read_text().splitlines()]
    (root / "two.csv").write_text("".join(f"{r[0]},{r[2]}\n" for r in rows))  # label,id
    for named in (dict(image_col="id"), dict(label_col="label")):
        dataset = data.find_dataset(root, labels="two.csv", **named)
        assert dataset.classes == ["1", "2", "10"] and len(dataset.train.files) == 12, named
    with pytest.raises(Problem, match="--image-col and --label-col name one column"):
        data.find_dataset(root, labels="two.csv", image_col="id", label_col="id")


def test_a_class_names_file_of_other_columns_leaves_the_names_as_they_are(tmp_path, capsys):
    (tmp_path / "class_names.csv").write_text("class_index,class_name\n0,cat\n")
    assert data.display_names(tmp_path, ["0", "1"]) == {"0": "0", "1": "1"}
    assert "no columns folder and words" in capsys.readouterr().err
    (tmp_path / "class_names.csv").write_text("")  # an empty one stops nothing either
    assert data.display_names(tmp_path, ["0", "1"]) == {"0": "0", "1": "1"}
    assert (
        "class_names.csv is empty: the classes are shown by their names" in capsys.readouterr().err
    )


def test_a_class_names_file_separated_by_semicolons_is_read_and_said(tmp_path, capsys):
    (tmp_path / "class_names.csv").write_text("folder;words\nn01;tench, Tinca tinca\n")
    assert data.display_names(tmp_path, ["n01", "n02"]) == {"n01": "n01 (tench)", "n02": "n02"}
    assert "class_names.csv has a header" in capsys.readouterr().err


def test_the_demo_never_writes_over_a_folder_of_the_users(tmp_path):
    """--demo --data DIR writes the demo dataset into DIR only where DIR is new, empty or the
    demo's: a folder of one's own is refused, before anything is written, and kept whole."""
    photos = tmp_path / "photos"
    write_image(photos / "train" / "cat" / "a.png", (200, 30, 30))
    with pytest.raises(Problem, match=f"--demo writes its dataset into {photos}, which holds"):
        data.write_demo_dataset(photos)
    assert [p.name for p in photos.rglob("*")] == ["train", "cat", "a.png"]
