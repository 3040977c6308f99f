"""The copies check (twophase/data_check.py) on real photos: the threshold's evidence, its recall
and precision on planted copies, and its cost; anyone can rerun it.

    python benchmarks/data_check.py threshold --data data/tiny-transfer/target
    python benchmarks/data_check.py planted --data data/tiny-transfer/target --work /tmp/copies
    python benchmarks/data_check.py cost --data data/tiny-transfer/target --cache-dir /tmp/c224

  threshold  Hamming distances between the perceptual hashes of train/'s photos, all distinct:
             random pairs and each photo's nearest neighbour among all the others (a pass over
             all pairs, here alone), against copies made of a sample of them (resized,
             re-encoded at JPEG quality 50 to 90, cropped by 5 %, brightness, contrast,
             saturation and hue changed); the share of each within each distance
  planted    a cut of the data (--per-class training and validation images a class, --test
             test images) copied into --work, copies planted into it (into val/, test/, train/
             under the photo's class and under another), then the product's check as train.py
             runs it: the planted copies found (recall) and the pairs it reports that are planted
             (precision), by kind of copy
  cost       train/ cached at --img-size (224) into --cache-dir, outside the repository: the
             cache build's time (once; the fingerprints are made during it), then, each the
             median of --repeats runs, the fingerprints made again from the cached pixels (the
             hash step), and the index and its groups; and the index on a million hashes

Standard output is the tables (Markdown), standard error the progress.
"""

import argparse
import glob
import io
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from twophase import data_check, image_cache  # noqa: E402
from twophase.data_check import NEAR, checked_images, find_copies, near_pairs, popcount  # noqa: E402
from utils import Problem, exits_on_problems, log  # noqa: E402

SHOWN = (0, 2, 4, 6, 8, 10, 12, 14)  # the distances each table gives the share within


# ----------------------------------------------------------------------------- the copies made


def copies(image, rng):
    """{kind: a copy of the PIL image `image`}: the changes a photo goes through on its way into
    a dataset twice."""
    w, h = image.size
    made = {}
    for factor in (0.5, 0.75, 1.5, 2.0):
        size = (max(8, round(w * factor)), max(8, round(h * factor)))
        made[f"resized x{factor}"] = image.resize(size, Image.BICUBIC)
    for quality in (50, 70, 90):
        made[f"JPEG quality {quality}"] = jpeg(image, quality)
    cw, ch = round(w * 0.95), round(h * 0.95)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    made["cropped by 5 %"] = image.crop((x, y, x + cw, y + ch))
    for factor in (0.7, 1.3):
        made[f"brightness x{factor}"] = ImageEnhance.Brightness(image).enhance(factor)
        made[f"contrast x{factor}"] = ImageEnhance.Contrast(image).enhance(factor)
    made["saturation x0.3"] = ImageEnhance.Color(image).enhance(0.3)
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] += 20  # a hue turned by 28 degrees
    made["hue +28 degrees"] = Image.fromarray(hsv, "HSV").convert("RGB")
    return made


def jpeg(image, quality):
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=quality)
    return Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")


def within(distances, d):
    return float(np.mean(np.asarray(distances) <= d))


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


# ----------------------------------------------------------------------------- threshold


def threshold(args):
    files = sorted(p for p in (Path(args.data) / "train").glob("*/*") if p.is_file())
    log(f"decoding {len(files)} photos at {args.img_size} px")
    pixels = np.stack([image_cache.load_image(f, args.img_size) for f in files])
    hashes = image_cache.fingerprints(pixels)["perceptual"]
    rng = np.random.default_rng(args.seed)
    a, b = rng.integers(0, len(hashes), (2, 200_000))
    random_pairs = popcount(hashes[a[a != b]] ^ hashes[b[a != b]])
    nearest = nearest_distances(hashes)
    rows = [
        [f"{len(random_pairs):,} random pairs of distinct photos"]
        + [f"{100 * within(random_pairs, d):.3f} %" for d in SHOWN],
        [f"each of the {len(hashes):,} photos' nearest other"]
        + [f"{100 * within(nearest, d):.2f} %" for d in SHOWN],
    ]
    distances = {}
    for i in rng.choice(len(files), args.sample, replace=False):
        with Image.open(files[i]) as opened:
            photo = image_cache.to_rgb(opened)
        for kind, copy in copies(photo, rng).items():
            h = image_cache.fingerprints(image_cache.square(copy, args.img_size)[None])
            distances.setdefault(kind, []).append(int(popcount(h["perceptual"][0] ^ hashes[i])))
    for kind, found in distances.items():
        rows.append([f"{kind} ({len(found)})"] + [f"{100 * within(found, d):.1f} %" for d in SHOWN])
    print(table(rows, ["pairs", *(f"<= {d}" for d in SHOWN)]))
    pairs = int((np.asarray(nearest) <= NEAR).sum())
    print(f"\n{pairs} of {len(hashes):,} distinct photos have another within {NEAR} bits.")


def nearest_distances(hashes, block=1000):
    """Each hash's distance to its nearest other: all pairs, a block at a time."""
    nearest = np.empty(len(hashes), np.int64)
    for start in range(0, len(hashes), block):
        d = popcount(hashes[start : start + block, None] ^ hashes[None, :]).astype(np.int64)
        d[np.arange(len(d)), np.arange(start, start + len(d))] = 65
        nearest[start : start + block] = d.min(1)
    return nearest


# ----------------------------------------------------------------------------- planted


PLANTED_MARK = ".data_check_planted"  # in --work: a folder this benchmark made, to make again


def planted(args):
    work = Path(args.work)
    if work.exists():
        if any(work.iterdir()) and not (work / PLANTED_MARK).is_file():
            raise Problem(f"--work {work} is not a folder planted made: give a new or empty one")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / PLANTED_MARK).write_text("made by benchmarks/data_check.py planted\n")
    root = cut(Path(args.data), work / "data", args)
    truth = plant(root, np.random.default_rng(args.seed))
    dataset = data.find_dataset(root)
    splits = data.cache_splits(dataset, args.img_size, cache_dir=work / "cache", threads=2)
    test = data_check.test_folder_images(
        root / "test",
        argparse.Namespace(
            cache_dir=work / "cache", img_size=args.img_size, cache_workers=2, resize="crop"
        ),
    )
    parts = [("train", splits.train), ("val", splits.val), ("test", test)]
    found = find_copies(checked_images(parts, root, splits.classes))
    report_planted(found, truth)


def cut(source, root, args):
    """--per-class training and validation photos a class and --test test photos of `source`,
    copied into `root`."""
    rng = np.random.default_rng(args.seed)
    for split, n in (("train", args.per_class), ("val", args.per_class // 3)):
        for folder in sorted((source / split).iterdir()):
            files = sorted(folder.iterdir())
            for f in rng.choice(files, min(n, len(files)), replace=False):
                (root / split / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, root / split / folder.name / f.name)
    (root / "test").mkdir(parents=True)
    tests = sorted((source / "test").iterdir())
    for f in rng.choice(tests, min(args.test, len(tests)), replace=False):
        shutil.copy(f, root / "test" / f.name)
    return root


def plant(root, rng):
    """Copies of training photos planted into the cut: every kind of copies(), exact copies
    besides, each to val/ (the photo's class), test/, train/ under the photo's class, and
    train/ under another class. Returns {the copy's path in root: (its photo's path, kind)}."""
    photos = sorted(p for p in (root / "train").glob("*/*"))
    classes = sorted(p.name for p in (root / "train").iterdir())
    kinds = ["exact", *copies(Image.new("RGB", (64, 64)), rng)]
    places = ["val", "test", "train, its class", "train, another class"]
    truth = {}
    chosen = rng.choice(len(photos), len(kinds) * len(places) * 10, replace=False)
    for n, i in enumerate(chosen):
        photo, kind, place = photos[i], kinds[n % len(kinds)], places[n // len(kinds) % 4]
        label = photo.parent.name
        if place == "train, another class":
            label = classes[(classes.index(label) + 1) % len(classes)]
        folder = root / ("test" if place == "test" else place.split(",")[0])
        folder = folder if place == "test" else folder / label
        name = f"planted{n:04d}.png"
        if kind == "exact":
            shutil.copy(photo, folder / f"planted{n:04d}{photo.suffix}")
            name = f"planted{n:04d}{photo.suffix}"
        else:
            with Image.open(photo) as opened:
                copy = copies(image_cache.to_rgb(opened), rng)[kind]
            copy.save(folder / name)
        truth[(folder / name).relative_to(root).as_posix()] = (
            photo.relative_to(root).as_posix(),
            kind,
        )
    return truth


def report_planted(found, truth):
    """Recall by kind of copy, and the precision of the pairs reported (each group's first and
    each other image of it)."""
    paths = found.images.paths
    group_of = {paths[row]: g for g, rows in enumerate(found.groups) for row in rows}
    by_kind = {}
    for copy, (photo, kind) in truth.items():
        hit = copy in group_of and group_of.get(photo) == group_of[copy]
        by_kind.setdefault(kind, []).append(hit)
    rows = [
        [kind, f"{sum(h)}/{len(h)}", f"{100 * np.mean(h):.0f} %"] for kind, h in by_kind.items()
    ]
    every = [h for hits in by_kind.values() for h in hits]
    rows.append(["all", f"{sum(every)}/{len(every)}", f"{100 * np.mean(every):.1f} %"])
    print(table(rows, ["planted copy", "found", "recall"]))
    source = {copy: photo for copy, (photo, _) in truth.items()}
    exact = found.images.prints["exact"]
    kinds = {"planted": [], "the same pixels, in the data already": [], "neither": []}
    for group in found.groups:
        for row in group[1:]:
            a, b = paths[group[0]], paths[row]
            if source.get(a, a) == source.get(b, b):
                kinds["planted"].append((a, b))
            elif exact[group[0]] == exact[row]:
                kinds["the same pixels, in the data already"].append((a, b))
            else:
                kinds["neither"].append((a, b))
    reported = sum(map(len, kinds.values()))
    right = reported - len(kinds["neither"])
    print(
        f"\n{len(paths):,} images checked; {reported} pairs reported (each group's first and each "
        "other): "
        + "; ".join(f"{len(pairs)} {kind}" for kind, pairs in kinds.items())
        + f". Precision {right}/{reported} = {100 * right / max(reported, 1):.1f} %."
    )
    for kind in list(kinds)[1:]:
        for a, b in kinds[kind]:
            print(f"- {kind}: {a} ~ {b}")


# ----------------------------------------------------------------------------- cost


def cost(args):
    """Each step's wall-clock and CPU seconds (the CPU's, summed over threads, are what a shared
    machine's load does not inflate)."""
    train_dir = Path(args.data) / "train"
    classes = data.find_classes(train_dir)
    listed = data.listed_folders(train_dir, classes)
    without = timed(lambda: build(train_dir, listed.files, args, fingerprinted=False))
    built = timed(lambda: build(train_dir, listed.files, args, fingerprinted=True))
    cache = image_cache.build_cache(train_dir, listed.files, args.img_size, args.cache_dir)
    images = data.CachedImages(cache, listed.labels)
    hashing = [timed(lambda: image_cache.fingerprints(cache.open())) for _ in range(args.repeats)]
    indexing = [
        timed(lambda: find_copies(checked_images([("train", images)], train_dir.parent, classes)))
        for _ in range(args.repeats)
    ]
    million = scaled(cache.fingerprints()["perceptual"], 1_000_000, np.random.default_rng(0))
    pairs = []
    at_million = timed(lambda: pairs.extend(near_pairs(million, NEAR)[0]))
    n = f"{len(cache):,} images at {args.img_size} px, {args.threads} threads"
    per_image = 1e3 * median(hashing)[1] / len(cache)
    rows = [
        [f"cache build, {n}, without fingerprints", *shown(without)],
        [f"cache build, {n}, fingerprints made as the images decode", *shown(built)],
        [
            f"fingerprints from the cached pixels alone (the hash step), median of {args.repeats}",
            *shown(median(hashing), f" ({per_image:.2f} ms an image)"),
        ],
        [f"the index and its groups, median of {args.repeats}", *shown(median(indexing))],
        [
            f"the index on 1,000,000 hashes shaped like these (scaled()): {len(pairs):,} pairs",
            *shown(at_million),
        ],
    ]
    print(table(rows, ["step", "wall-clock", "CPU"]))


def timed(work):
    """(wall-clock seconds, CPU seconds) of work()."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(runs):
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def shown(seconds, cpu_note=""):
    return f"{seconds[0]:.2f} s", f"{seconds[1]:.2f} s{cpu_note}"


def build(folder, files, args, fingerprinted):
    """The cache built afresh (the folder's caches in --cache-dir removed first), with or without
    the fingerprints made as the images decode (without: removed after)."""
    forget_caches(folder, args.cache_dir)
    real = image_cache.fingerprints
    if not fingerprinted:
        image_cache.fingerprints = lambda pixels: np.zeros(len(pixels), image_cache.FINGERPRINT)
    try:
        image_cache.build_cache(folder, files, args.img_size, args.cache_dir, args.threads)
    finally:
        image_cache.fingerprints = real
    if not fingerprinted:
        forget_caches(folder, args.cache_dir)


def forget_caches(folder, cache_dir):
    """Every cache of `folder` in `cache_dir` (their names begin with its prefix), removed."""
    for path in Path(cache_dir).glob(glob.escape(image_cache.cache_prefix(folder)) + "*"):
        path.unlink()


def scaled(hashes, n, rng):
    """n hashes shaped like `hashes`: each a real one with 12 of its bits flipped (far enough to
    be another photo: 16 bits and more apart from one another, as distinct photos are)."""
    picked = hashes[rng.integers(0, len(hashes), n)]
    flips = np.zeros(n, np.uint64)
    for _ in range(12):
        flips |= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    return picked ^ flips


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=("threshold", "planted", "cost"))
    p.add_argument("--data", default="data/tiny-transfer/target")
    p.add_argument("--img-size", type=int, default=None, help="threshold, planted: 64; cost: 224")
    p.add_argument("--sample", type=int, default=500, help="threshold: photos copied")
    p.add_argument("--work", default="/tmp/data_check_planted", help="planted: its folder")
    p.add_argument("--per-class", type=int, default=30, help="planted: training photos a class")
    p.add_argument("--test", type=int, default=1000, help="planted: test photos")
    p.add_argument("--cache-dir", default="/tmp/data_check_cost", help="cost: the cache's folder")
    p.add_argument("--threads", type=int, default=2, help="cost: the cache build's threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p


@exits_on_problems
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.img_size = args.img_size or (224 if args.what == "cost" else 64)
    {"threshold": threshold, "planted": planted, "cost": cost}[args.what](args)


if __name__ == "__main__":
    main()
