"""The image cache: each image decoded once, preprocessed as the run needs it, rebuilt where a
file changed, kept apart per dataset and resize mode; unreadable images skipped by name."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import data
from conftest import flat_with_two_csvs, load_splits, make_dataset, write_image
from twophase import image_cache


def stored_png(path, colour):
    """A PNG stored uncompressed: the same size in bytes for any colour."""
    Image.new("RGB", (24, 20), colour).save(path, compress_level=0)
    return path


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


def write_grey16(path, values, significant_bits=None):
    info = PngImagePlugin.PngInfo()
    if significant_bits:
        info.add(b"sBIT", bytes([significant_bits]))
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path, pnginfo=info)
    return path


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
    suffixes = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert suffixes == [".hashes", ".json", ".lock", ".u8"]


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
