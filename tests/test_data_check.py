"""The copies check: exact and near copies planted across and within splits are found, said in
train.py's line, listed in data_check.csv, left out of validation with --drop-copies (and so by
evaluate.py), and said by predict.py and evaluate.py of the test folder; the index finds every
pair a pass over all pairs would; the fingerprints are kept with the cache."""

import csv
import io
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance

import data
import evaluate
import predict
import train
from conftest import TINY, examples, narrowed
from twophase import data_check, image_cache
from twophase.data_check import NEAR, Checked, find_copies, near_pairs, popcount

SIZE = 32  # the cache's side: the hash's own thumbnail


def photo(seed, side=96):
    """A photo-like image of its own: a random field whose amplitude falls as 1/frequency, as
    photos' do (their energy in the coarse shapes a perceptual hash reads)."""
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij"))
    amplitude = (1 / np.maximum(f, 1 / side))[..., None]
    noise = rng.normal(size=(side, side, 3)) + 1j * rng.normal(size=(side, side, 3))
    field = np.fft.ifft2(amplitude * noise, axes=(0, 1)).real
    field = (field - field.mean()) / field.std() * 40 + 128
    return Image.fromarray(field.clip(0, 255).astype(np.uint8))


def jpeg(image, quality):
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=quality)
    return Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")


def save(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def planted(root):
    """A dataset of distinct photos with copies planted: an exact copy and a resized one of
    training images in val/, a re-encoded one in test/, an exact copy of a validation image in
    test/, one photo under two classes, one photo three times in one class."""
    seeds = iter(range(100))
    for split, per_class in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            for i in range(per_class):
                save(photo(next(seeds)), root / split / c / f"{i}.png")
    for i in range(3):
        save(photo(next(seeds)), root / "test" / f"t{i}.png")
    train_dir = root / "train"
    shutil.copy(train_dir / "a" / "0.png", root / "val" / "a" / "copy.png")
    resized = Image.open(train_dir / "b" / "1.png").resize((58, 58), Image.BICUBIC)
    save(resized, root / "val" / "b" / "resized.png")
    save(jpeg(Image.open(train_dir / "a" / "2.png"), 60), root / "test" / "reencoded.jpg")
    shutil.copy(root / "val" / "b" / "0.png", root / "test" / "of_val.png")
    shutil.copy(train_dir / "a" / "3.png", train_dir / "b" / "twin.png")  # two classes
    for name in ("again.png", "again2.png"):
        shutil.copy(train_dir / "a" / "1.png", train_dir / "a" / name)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs on the planted dataset: as it is, and with --drop-copies; each run's standard
    error."""
    root = tmp_path_factory.mktemp("copies")
    dataset = planted(root / "data")
    options = [*TINY, "--img-size", str(SIZE), "--epochs1", "1", "--epochs2", "0"]
    said = {}
    with narrowed(), pytest.MonkeyPatch.context() as patch:
        for name, extra in (("plain", []), ("dropped", ["--drop-copies"])):
            lines = []
            patch.setattr(data_check, "log", lines.append)
            train.main(["--data", str(dataset), "--out", str(root / name), *options, *extra])
            said[name] = lines
    return root, dataset, said


def groups_of(path):
    groups = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["group"], []).append(row)
    return list(groups.values())


def test_the_line_before_training_leads_with_what_crosses_splits(runs):
    _, _, said = runs
    (line,) = said["plain"]
    assert line.startswith(
        "2 validation images are copies of training images: validation accuracy counts them as "
        "unseen (--drop-copies leaves them out); 1 test image is a copy of a training image; "
        "1 test image is a copy of a validation image; 1 photo stands in two classes; "
        "2 photos are in the training images more than once (5 images); "
    )
    assert line.endswith("data_check.csv lists every group")


def test_data_check_csv_lists_every_planted_group_with_its_kind_and_distance(runs):
    root, _, _ = runs
    path = root / "plain" / "data_check.csv"
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["group", "kind", "distance", "split", "image", "label"]
    found = {
        frozenset(row["image"] for row in group): [(r["kind"], int(r["distance"])) for r in group]
        for group in groups_of(path)
    }
    exact, near = [("exact", 0), ("exact", 0)], ("near", 0)
    assert found[frozenset({"train/a/0.png", "val/a/copy.png"})] == exact
    assert found[frozenset({"train/a/3.png", "train/b/twin.png"})] == exact
    three = frozenset({"train/a/1.png", "train/a/again.png", "train/a/again2.png"})
    assert found[three] == exact + [("exact", 0)]
    assert found[frozenset({"val/b/0.png", "test/of_val.png"})] == exact
    for pair in ({"train/b/1.png", "val/b/resized.png"}, {"train/a/2.png", "test/reencoded.jpg"}):
        (first, copy) = found[frozenset(pair)]
        assert first == near and copy[0] == "near" and copy[1] <= NEAR
    assert len(found) == 6  # the distinct photos are in none
    rows = {r["image"]: r for group in groups_of(path) for r in group}
    assert rows["test/of_val.png"]["label"] == "" and rows["train/b/twin.png"]["label"] == "b"
    assert [r["split"] for r in groups_of(path)[0]] == ["train", "val"]  # by split, then path


def test_drop_copies_leaves_them_out_of_validation_and_evaluate_py_too(runs):
    root, dataset, said = runs
    (line,) = said["dropped"]
    assert line.startswith(
        "2 validation images are copies of training images: left out of validation (--drop-copies);"
    )
    state = torch.load(root / "dropped" / "last.pt", weights_only=True)
    assert state["val_left_out"] == ["val/a/copy.png", "val/b/resized.png"]
    assert torch.load(root / "plain" / "last.pt", weights_only=True)["val_left_out"] == []
    assert len(data.validation_of(state, dataset, SIZE).val) == 4  # of 6
    assert len(data.validation_of(state, dataset, 40).val) == 4  # at another size too
    # Nothing of the data is removed or changed.
    assert (dataset / "val" / "a" / "copy.png").is_file()


def test_predict_and_evaluate_say_which_test_images_are_copies_of_training_images(
    runs, tmp_path, capsys, narrow_models
):
    root, dataset, _ = runs
    best = root / "plain" / "best.pt"
    predict.main(["--ckpt", str(best), "--out", str(tmp_path / "prediction.csv")])
    assert "1 test image is a copy of a training image" in capsys.readouterr().err
    answers = tmp_path / "answers.csv"
    names = sorted(p.name for p in (dataset / "test").iterdir() if p.is_file())
    answers.write_text("image,label\n" + "".join(f"{n},a\n" for n in names))
    argv = ["--ckpt", str(best), "--answers", str(answers), "--figures", str(tmp_path / "fig")]
    evaluate.main(argv)
    assert "1 test image is a copy of a training image" in capsys.readouterr().err


def test_a_run_without_copies_says_nothing_and_removes_an_earlier_list(tmp_path, narrow_models):
    root = tmp_path / "data"
    for i, c in enumerate(("a", "a", "b", "b", "a", "b")):
        save(photo(200 + i), root / "train" / c / f"{i}.png")
    for i, c in enumerate(("a", "b")):
        save(photo(300 + i), root / "val" / c / f"{i}.png")
    out = tmp_path / "ck"
    options = [*TINY, "--img-size", str(SIZE), "--epochs1", "1", "--epochs2", "0"]
    train.main(["--data", str(planted(tmp_path / "copies")), "--out", str(out), *options])
    assert (out / "data_check.csv").is_file()  # the earlier run's list
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_check, "log", lines.append)
        train.main(["--data", str(root), "--out", str(out), *options, "--overwrite"])
    assert lines == [] and not (out / "data_check.csv").exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_check, "log", lines.append)
        train.main(["--data", str(root), "--out", str(tmp_path / "ck2"), *options, "--drop-copies"])
    assert lines == [data_check.NONE_TO_DROP]


def test_a_copy_of_a_training_image_held_by_another_group_joins_it():
    """T2 is a near copy of T1 and joins its group; V is a near copy of T2 alone (12 bits from
    T1): it joins their group, said as a copy of a training image, its distance to the first
    above NEAR."""
    base = 0x0123456789ABCDEF
    t2 = base ^ 0b111111  # 6 bits off
    v = t2 ^ (0b111111 << 20)  # 6 more: 12 from base
    prints = np.zeros(3, image_cache.FINGERPRINT)
    prints["perceptual"] = [base, t2, v]
    prints["exact"] = [b"1", b"2", b"3"]
    names = ["train/a/1.png", "train/a/2.png", "val/a/v.png"]
    checked = Checked(np.array(["train", "train", "val"], dtype=object), names, ["a"] * 3, prints)
    found = find_copies(checked)
    assert found.groups == [[0, 1, 2]] and found.in_groups_with("val", "train") == [2]
    assert [r["distance"] for r in found.rows()] == [0, 6, 12]


def test_drop_copies_refuses_to_leave_no_validation_image(tmp_path, narrow_models):
    root = tmp_path / "data"
    for i in range(2):
        for c in ("a", "b"):
            image = photo(10 * i + ord(c))
            save(image, root / "train" / c / f"{i}.png")
            save(image, root / "val" / c / f"{i}.png")
    argv = ["--data", str(root), "--out", str(tmp_path / "ck"), *TINY, "--drop-copies"]
    with pytest.raises(SystemExit, match="every one of the 4 validation images is a copy"):
        train.main(argv)


# ----------------------------------------------------------------------------- properties


def hashes_of(images):
    """Each PIL image's perceptual hash, cached as the run would cache it."""
    pixels = np.stack([image_cache.square(image.convert("RGB"), SIZE) for image in images])
    return image_cache.fingerprints(pixels)


def copies_found(original, copy):
    """Whether find_copies puts `copy` in a group with `original`."""
    prints = hashes_of([original, copy])
    checked = Checked(np.array(["train", "val"], dtype=object), ["o", "c"], ["a", "a"], prints)
    return find_copies(checked).groups == [[0, 1]]


@settings(max_examples=examples(12))
@given(
    seed=st.integers(0, 10_000),
    factor=st.floats(0.5, 2.0),
    quality=st.integers(50, 95),
    crop=st.integers(0, 1),  # pixels off each side of a 128-px photo: up to 1 %
    corner=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    light=st.floats(0.8, 1.25),
)
def test_copies_within_the_tolerance_are_found_and_distinct_photos_are_not(
    seed, factor, quality, crop, corner, light
):
    """The tolerance docs/data.md states: resized by 0.5 to 2, re-encoded at JPEG quality 50 to
    95, cropped by up to 1 % of a side, brightness or contrast changed by up to 25 % (5 % crops
    of real photos: measured, not promised)."""
    original = photo(seed, side=128)
    side = round(128 * factor)
    x, y = corner[0] * crop, corner[1] * crop
    copies = {
        "resized": original.resize((side, side), Image.BICUBIC),
        "re-encoded": jpeg(original, quality),
        "cropped": original.crop((x, y, 128 - crop + x, 128 - crop + y)),
        "brightness": ImageEnhance.Brightness(original).enhance(light),
        "contrast": ImageEnhance.Contrast(original).enhance(light),
    }
    for how, copy in copies.items():
        assert copies_found(original, copy), how
    assert not copies_found(original, photo(seed + 10_001, side=128))


@settings(max_examples=examples(30))
@given(
    hashes=st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=40),
    flips=st.lists(st.lists(st.integers(0, 63), max_size=12), max_size=40),
    near=st.integers(0, 14),
)
def test_the_index_finds_every_pair_a_pass_over_all_pairs_finds(hashes, flips, near):
    """Multi-index hashing against all pairs, over drawn hashes and near ones planted beside them
    (each a drawn hash with drawn bits flipped): the same pairs, each once."""
    planted = [h ^ sum(1 << bit for bit in set(bits)) for h, bits in zip(hashes, flips)]
    values = np.array(hashes + planted, dtype=np.uint64)
    a, b = near_pairs(values, near)
    every = {
        (i, j)
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if bin(int(values[i]) ^ int(values[j])).count("1") <= near
    }
    assert sorted(zip(a.tolist(), b.tolist())) == sorted(every)


def test_the_index_picks_bands_that_keep_lookups_few_as_the_images_grow():
    assert [data_check.bands_for(n, NEAR) for n in (100, 20_000, 1_000_000)] == [9, 5, 3]


def test_popcount_without_numpy_2(monkeypatch):
    values = np.array([0, 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF], dtype=np.uint64)
    expected = [bin(int(v)).count("1") for v in values]
    assert popcount(values).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert popcount(values).tolist() == expected


def test_flat_images_are_exact_copies_of_their_own_pixels_alone():
    """A uniform image has no shape to hash: two of one colour are exact copies, two of two
    colours are not copies at all (their hashes would agree, their photos do not)."""
    grey, blue = (Image.new("RGB", (40, 40), colour) for colour in ((90, 90, 90), (0, 0, 200)))
    prints = hashes_of([grey, blue, grey.copy()])
    assert (prints["perceptual"] == 0).all()
    checked = Checked(np.array(["train"] * 3, dtype=object), ["g", "b", "g2"], ["a"] * 3, prints)
    assert find_copies(checked).groups == [[0, 2]]


# ----------------------------------------------------------------------------- kept with the cache


def test_the_fingerprints_are_kept_with_the_cache_and_made_from_its_pixels_where_missing(
    tmp_path, monkeypatch
):
    folder = tmp_path / "train"
    files = [save(photo(i), folder / f"{i}.png").name for i in range(3)]
    cache = image_cache.build_cache(folder, files, SIZE, tmp_path / "cache")
    built = cache.fingerprints()
    assert np.array_equal(built, image_cache.fingerprints(cache.open()))
    (kept,) = (tmp_path / "cache").glob("*.hashes")

    def never(*args):
        raise AssertionError("decoded or hashed again")

    monkeypatch.setattr(image_cache, "fingerprints", never)
    monkeypatch.setattr(image_cache, "load_image", never)
    again = image_cache.build_cache(folder, files, SIZE, tmp_path / "cache")
    assert np.array_equal(again.fingerprints(), built)  # read back: nothing computed
    monkeypatch.undo()
    kept.unlink()  # a cache made before fingerprints were kept
    monkeypatch.setattr(image_cache, "load_image", never)
    older = image_cache.build_cache(folder, files, SIZE, tmp_path / "cache")
    assert np.array_equal(older.fingerprints(), built)  # from its pixels, nothing decoded
    assert kept.is_file()


def test_a_stale_cache_goes_with_its_fingerprints(tmp_path):
    folder = tmp_path / "train"
    files = [save(photo(i), folder / f"{i}.png").name for i in range(2)]
    image_cache.build_cache(folder, files, SIZE, tmp_path / "cache")
    save(photo(7), folder / "1.png")  # changed: the first cache can never be wanted again
    image_cache.build_cache(folder, files, SIZE, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.hashes"))) == 1


def test_the_range_test_alone_says_what_it_found_and_names_no_file_it_does_not_write(
    tmp_path, narrow_models, capsys
):
    dataset = planted(tmp_path / "data")
    out = tmp_path / "ck"
    argv = ["--data", str(dataset), "--out", str(out), *TINY, "--img-size", str(SIZE)]
    train.main(argv + ["--epochs1", "1", "--epochs2", "0", "--find-lr", "--find-lr-steps", "20"])
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "copies of training" in ln)
    assert "data_check.csv" not in line and not (out / "data_check.csv").exists()
