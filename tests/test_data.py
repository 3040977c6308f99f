import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import data
from conftest import load_splits, make_dataset, write_image
from twophase import image_cache
from twophase.loader import BalancedSampler, make_loader, start_epoch
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


def test_preprocessing_crops_the_centre_square_then_resizes(tmp_path):
    # 90x30: red | green | blue thirds. The centre square is the green third alone.
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:60] = (0, 255, 0)
    pixels[:, 60:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = image_cache.load_image(tmp_path / "wide.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == (0, 255, 0)).all()

    # A tall grey image, RGB output, with a vertical gradient kept top to bottom.
    tall = np.tile(np.linspace(0, 255, 60).astype(np.uint8)[:, None], (1, 20))
    Image.fromarray(tall, mode="L").save(tmp_path / "tall.png")
    out = image_cache.load_image(tmp_path / "tall.png", 10)
    assert out.shape == (10, 10, 3)
    column = out[:, 5, 0].astype(int)
    assert (np.diff(column) > 0).all() and 85 < column.mean() < 170  # the middle rows only


def test_preprocessing_applies_exif_orientation(tmp_path):
    # Stored 40x20, left half black; orientation 6 shows it rotated 90 degrees clockwise,
    # so the black half comes out on top.
    pixels = np.full((20, 40, 3), 255, np.uint8)
    pixels[:, :20] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = image_cache.load_image(tmp_path / "rot.jpg", 8).astype(int)
    assert out[:3].mean() < 40 and out[5:].mean() > 215


def test_cache_is_reused_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    decoded = []
    original = image_cache.load_image
    monkeypatch.setattr(
        image_cache, "load_image", lambda p, *a: decoded.append(p) or original(p, *a)
    )

    def build():
        files = data.list_labelled_images(root / "train", ["a", "b"])
        return image_cache.build_cache(root / "train", files, 12, tmp_path / "cache")

    first = build()
    assert len(decoded) == 6 and len(first) == 6
    pixels = np.array(first.open())
    decoded.clear()
    again = build()
    assert decoded == [] and again.pixels_path == first.pixels_path
    assert np.array_equal(np.array(again.open()), pixels)

    write_image(root / "train" / "a" / "new.png", (5, 5, 5))  # added
    assert len(build()) == 7 and len(decoded) == 7
    # The first cache's files are all there as they were: a run may still want it.
    assert Path(first.pixels_path).is_file()
    decoded.clear()
    os.remove(root / "train" / "b" / "000.png")  # removed
    assert len(build()) == 6 and len(decoded) == 6
    decoded.clear()
    target = root / "train" / "a" / "001.png"  # changed in place
    write_image(target, (250, 250, 250), seed=99)
    os.utime(target, ns=(1, 10**18))
    cache = build()
    assert len(decoded) == 6
    row = cache.files.index("a/001.png")
    assert np.array_equal(cache.open()[row], image_cache.load_image(target, 12))
    # A changed or removed file ends every cache that held it: only the current one is left.
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".lock", ".u8"]


def stored_png(path, colour):
    """A PNG stored uncompressed: the same size in bytes for any colour."""
    Image.new("RGB", (24, 20), colour).save(path, compress_level=0)
    return path


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_file_replaced_keeping_its_size_and_modification_time_is_cached_again(how, tmp_path):
    """cp -p writes in place, rsync -t and tar write beside and rename: either keeps the size
    and, set by os.utime, the modification time. Its change time or inode tells."""
    folder = tmp_path / "train"
    folder.mkdir()
    target = stored_png(folder / "a.png", (10, 20, 30))
    stored_png(folder / "b.png", (40, 50, 60))
    files = ["a.png", "b.png"]
    first = image_cache.build_cache(folder, files, 8, tmp_path / "c")
    before = os.stat(target)
    if how == "in place":
        stored_png(target, (200, 100, 0))
    else:
        os.replace(stored_png(tmp_path / "new.png", (200, 100, 0)), target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = image_cache.build_cache(folder, files, 8, tmp_path / "c")
    assert again.pixels_path != first.pixels_path
    assert (again.open()[0] == (200, 100, 0)).all() and (again.open()[1] == (40, 50, 60)).all()
    assert not Path(first.pixels_path).exists()  # it held a file that is gone: swept


def test_the_cache_of_a_read_only_data_folder_is_in_the_users_cache_and_said_once(
    tmp_path, monkeypatch, capsys
):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    load_splits(root, 8)  # writable: beside the data, and nothing to say
    assert (root / ".cache").is_dir() and capsys.readouterr().err == ""
    ro = make_dataset(tmp_path / "ro", classes=("a", "b"), per_class=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    real_access = os.access
    monkeypatch.setattr(  # root, as tests often run, writes anywhere: read-only as a user sees it
        image_cache.os,
        "access",
        lambda p, mode: not str(p).startswith(str(ro)) and real_access(p, mode),
    )
    splits = load_splits(ro, 8)
    place = Path(splits.train.cache.pixels_path).parent
    assert place.parent == tmp_path / "home-cache" / "imgcls"
    said = capsys.readouterr().err.splitlines()
    assert said == [
        f"{ro} cannot be written: its preprocessed images are cached in {place} "
        "(--cache-dir puts them elsewhere)"
    ]
    load_splits(ro, 8)
    assert capsys.readouterr().err == ""  # once a process


def test_truncated_cache_is_rebuilt(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a",), per_class=3)
    files = data.list_labelled_images(root / "train", ["a"])
    cache = image_cache.build_cache(root / "train", files, 8, tmp_path / "c")
    good = np.array(cache.open())
    with open(cache.pixels_path, "r+b") as f:
        f.truncate(100)
    again = image_cache.build_cache(root / "train", files, 8, tmp_path / "c")
    assert np.array_equal(np.array(again.open()), good)


def test_unreadable_image_is_skipped_with_a_warning_naming_it(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        splits = load_splits(root, 8, tmp_path / "c")
    assert splits.skipped == 1 and len(splits.train) == 6
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


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


def test_loader_yields_uint8_batches_in_a_seeded_order(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=5)
    splits = load_splits(root, 8, tmp_path / "c")
    loader = make_loader(splits.train, 4, shuffle=True, seed=1)

    def order(epoch):
        start_epoch(loader, epoch)
        return torch.cat([labels for _, labels in loader]).tolist()

    images, labels = next(iter(loader))
    assert (
        images.dtype == torch.uint8 and images.shape == (4, 8, 8, 3) and labels.dtype == torch.int64
    )
    assert order(0) == order(0) and order(0) != order(1)


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


def test_making_a_loader_iterator_leaves_the_global_random_state_alone(tmp_path):
    """Else a resumed run, which makes a new iterator, would draw other augmentations."""
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    splits = load_splits(root, 8, tmp_path / "c")
    loader = make_loader(splits.train, 2, shuffle=True, seed=1)
    torch.manual_seed(5)
    next(iter(loader))
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_caches_of_two_datasets_in_one_cache_dir_are_kept_apart(tmp_path):
    one = make_dataset(tmp_path / "one", classes=("a",), per_class=2)
    two = make_dataset(tmp_path / "two", classes=("a",), per_class=3, seed=7)
    first = load_splits(one, 8, tmp_path / "shared")
    second = load_splits(two, 8, tmp_path / "shared")
    assert os.path.exists(first.train.cache.pixels_path) and len(second.train) == 3
    assert np.array_equal(
        first.train[[0, 1]][0].numpy(),
        np.stack([image_cache.load_image(one / "train" / f, 8) for f in first.train.cache.files]),
    )


def bad_inputs(folder):
    """Every kind of file a real image folder turns up, and whether training can use it."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    good.save(folder / "ok.jpg", quality=90)
    jpeg = (folder / "ok.jpg").read_bytes()
    good.save(folder / "ok_png.png")
    png = (folder / "ok_png.png").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "random.png").write_bytes(np.random.default_rng(1).bytes(500))
    good.convert("CMYK").save(folder / "cmyk.jpg")
    good.convert("RGBA").save(folder / "rgba.png")
    good.convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "tiny.png")
    good.save(folder / "with space ünïcødé.png")
    return {
        "readable": {
            "ok.jpg",
            "ok_png.png",
            "cmyk.jpg",
            "rgba.png",
            "palette.png",
            "sixteen_bit.png",
            "tiny.png",
            "with space ünïcødé.png",
        },
        "unreadable": {"zero.jpg", "truncated.jpg", "truncated.png", "random.png"},
    }


def test_bad_inputs_are_skipped_by_name_and_odd_ones_read(tmp_path):
    expected = bad_inputs(tmp_path / "train" / "a")
    with pytest.warns(UserWarning) as caught:
        splits = load_splits(tmp_path, 8, tmp_path / "c")
    messages = " ".join(str(w.message) for w in caught)
    for name in expected["unreadable"]:
        assert name in messages
    assert splits.skipped == len(expected["unreadable"])
    cache = splits.train.cache
    assert {f.split("/", 1)[1] for f in cache.files} == expected["readable"]
    rows = dict(zip((f.split("/", 1)[1] for f in cache.files), np.array(cache.open())))
    assert (
        150 <= rows["sixteen_bit.png"].mean() <= 160
    )  # 40000 / 65535 of white, not clipped to 255
    assert (rows["tiny.png"] == (10, 200, 30)).all()


def test_an_image_over_the_decompression_bomb_limit_is_skipped(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200 x 200 is over twice the limit
    with pytest.warns(UserWarning, match="huge.png"):
        cache = image_cache.build_cache(tmp_path, ["huge.png"], 8, tmp_path / "c")
    assert cache.files == [] and "DecompressionBomb" in cache.skipped["huge.png"]


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


def write_grey16(path, values, significant_bits=None):
    info = PngImagePlugin.PngInfo()
    if significant_bits:
        info.add(b"sBIT", bytes([significant_bits]))
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path, pnginfo=info)
    return path


def test_16_bit_images_are_scaled_alike_and_12_bit_ones_keep_their_levels(tmp_path):
    """One scale for every 16-bit image, not one per image: a dim photo stays dim beside a
    bright one. A 12-bit image in a 16-bit PNG (its sBIT chunk says so) spans the 8-bit range."""
    ramp = np.tile(np.arange(0, 4096, 16), (256, 1))  # 256 levels of 12 bits, square
    dim = image_cache.load_image(
        write_grey16(tmp_path / "dim.png", ramp // 16), 256
    )  # all below 256
    bright = image_cache.load_image(write_grey16(tmp_path / "bright.png", ramp * 16), 256)
    assert dim.max() <= 1 and bright.max() >= 250  # the same light, a 257th of the range
    twelve = write_grey16(tmp_path / "twelve.png", ramp, significant_bits=12)
    pixels = image_cache.load_image(twelve, 256)[0, :, 0]
    assert pixels.max() >= 250 and len(np.unique(pixels)) > 200  # not 17 grey levels


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


def test_each_resize_mode_keeps_what_it_says_of_a_wide_photo_and_has_its_own_cache(tmp_path):
    """A 3:1 photo, red at its left end, blue at its right: crop keeps neither end, squish both,
    pad both and black bars above and below."""
    pixels = np.full((20, 60, 3), 128, np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, -10:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    crop, squish, pad = (
        image_cache.load_image(tmp_path / "wide.png", 12, m) for m in image_cache.RESIZE_MODES
    )
    assert crop[6, 0].tolist() == [128, 128, 128] and crop[6, -1].tolist() == [128, 128, 128]
    assert squish[6, 0, 0] > 200 and squish[6, -1, 2] > 200
    assert pad[0].max() == 0 and pad[-1].max() == 0 and pad[6, 0, 0] > 200
    files = ["wide.png"]
    caches = {
        m: image_cache.build_cache(tmp_path, files, 12, tmp_path / "c", resize=m).pixels_path
        for m in ("crop", "squish")
    }
    assert caches["crop"] != caches["squish"]
    assert all(Path(p).exists() for p in caches.values())  # neither removed the other


def test_the_balanced_sampler_draws_classes_evenly_the_same_on_every_process(tmp_path):
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)  # 90:9:1
    sampler = BalancedSampler(labels, seed=3)
    draws = []
    for epoch in (0, 0, 1):
        sampler.set_epoch(epoch)
        draws.append(list(sampler))
    assert draws[0] == draws[1] != draws[2] and len(draws[0]) == 100  # by (seed, epoch) alone
    per_class = np.bincount(labels[draws[0] + draws[2]], minlength=3)
    assert per_class.min() > 40  # each about a third of 200, where shuffling gives 2 of class 2
    shards = [BalancedSampler(labels, 3, rank, seed=3) for rank in range(3)]
    merged = [i for triple in zip(*(list(s) for s in shards)) for i in triple]
    # Three processes take every third draw of one sequence, padded to 102: the one-process
    # epoch's 100 draws, then two more.
    assert len(merged) == 102 and merged[:100] == list(BalancedSampler(labels, seed=3))


def flat_with_two_csvs(root, train_rows=4, val_rows=2):
    """A flat root/train/ of every image, train.csv naming some and val.csv the others, no val/:
    the layout --val-labels' help describes."""
    train, val = ["id,label"], ["id,label"]
    for i, c in enumerate(("cat", "dog")):
        for j in range(train_rows + val_rows):
            name = f"{c}{j}"
            write_image(root / "train" / f"{name}.png", (40 + 90 * i, 200, 90), seed=10 * i + j)
            (train if j < train_rows else val).append(f"{name},{c}")
    (root / "train.csv").write_text("\n".join(train) + "\n")
    (root / "val.csv").write_text("\n".join(val) + "\n")
    return root


def test_two_label_files_over_one_flat_folder_each_keep_their_own_cache(tmp_path, recwarn):
    root = flat_with_two_csvs(tmp_path / "k")
    dataset = data.find_dataset(root, labels="train.csv", val_labels="val.csv")
    assert not [w for w in recwarn if "left out" in str(w.message)]  # the two name every image
    splits = data.cache_splits(dataset, 8, cache_dir=tmp_path / "c")
    assert (len(splits.train), len(splits.val)) == (8, 4)
    # Both caches are there to read, however the second was built after the first.
    for images in (splits.train, splits.val):
        assert images[list(range(len(images)))][0].shape[0] == len(images)
    # A second run labelling the folder another way keeps both of the first run's caches too.
    (root / "other.csv").write_text("id,label\ncat0,cat\ncat1,cat\ndog0,dog\ndog1,dog\n")
    data.cache_splits(data.find_dataset(root, labels="other.csv"), 8, cache_dir=tmp_path / "c")
    assert all(Path(i.cache.pixels_path).is_file() for i in (splits.train, splits.val))


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
