"""The user's data checked for copies before training: exact copies (two files whose cached
pixels are the same) and near copies (the same photo resized, re-encoded, slightly cropped or
recoloured: perceptual hashes within NEAR bits of each other), within each split and across
train/, val/ and test/. Found from the fingerprints the image cache keeps beside its pixels
(image_cache.fingerprints): nothing is decoded for it but test/'s images, into the cache that
predict.py then reads; nothing is removed or changed by it but what --drop-copies asks.

    train.py      one line before training, leading with what crosses splits; every group in
                  <out>/data_check.csv (group, kind, distance, split, image, label)
    predict.py    one line: how many test images are copies of the run's training images
    evaluate.py   the same, where it scores the test folder (--answers)

Near copies come from an index, not a pass over all pairs: multi-index hashing (Norouzi et al.,
2012). The 64 bits are cut into m bands; two hashes within NEAR bits differ in at most
NEAR // m bits of one band at least (pigeonhole), so each hash looks up, in each band's table,
the band values within that many bits of its own, and only the hashes found there are compared
whole. m is chosen for the number of images (bands_for): docs/data.md gives the cost.
"""

import csv
import itertools
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from data import CachedImages, dataset_of, files_in, stratified_split, trained_data_root
from twophase.checkpoint import DATA_CHECK_CSV
from twophase.image_cache import FINGERPRINT, build_cache, default_cache_dir, find_cache
from utils import Problem, atomic_file, log

# Perceptual hashes this many bits apart, or fewer, are near copies: on 20,000 distinct photos
# (Tiny ImageNet's) 9 pairs are this close, against 61 % of 5 % crops, 98 % of brightness and
# hue changes and every resize and JPEG re-encoding of them (docs/data.md, the measurements).
NEAR = 8
COLUMNS = ("group", "kind", "distance", "split", "image", "label")
SPLITS = ("train", "val", "test")  # a group lists its images in this order
NAMES = {"train": "training", "val": "validation", "test": "test"}
NONE_TO_DROP = "--drop-copies: no validation image is a copy of a training image"
WIDEST_BAND = 22  # a band's table holds 2**bits counts: 16 MB at 22


# ----------------------------------------------------------------------------- the check


@dataclass
class Checked:
    """The images checked, a row each: its split, its path in the data root, its class ("" for
    an unlabelled test image) and its fingerprints."""

    splits: np.ndarray
    paths: list
    labels: list
    prints: np.ndarray  # image_cache.FINGERPRINT


def checked_images(parts, root, classes):
    """Checked of `parts`, (split, CachedImages) pairs; the test split's are unlabelled."""
    splits, paths, labels, prints = [], [], [], []
    for split, images in parts:
        splits += [split] * len(images)
        paths += images.paths(root)
        shown = [classes[i] for i in images.labels[images.indices]]
        labels += [""] * len(images) if split == "test" else shown
        prints.append(images.cache.fingerprints()[images.indices])
    prints = np.concatenate(prints) if prints else np.empty(0, FINGERPRINT)
    return Checked(np.array(splits, dtype=object), paths, labels, prints)


@dataclass
class Found:
    """The groups of copies among Checked images: each a list of row numbers, its first the
    one every distance is measured from (by split, then path)."""

    images: Checked
    groups: list

    def in_groups_with(self, split, other, without=None):
        """The rows of `split` that are in a group with an image of `other` (and none of
        `without`)."""
        splits = self.images.splits
        rows = []
        for group in self.groups:
            held = set(splits[group])
            if other in held and (without is None or without not in held):
                rows += [row for row in group if splits[row] == split]
        return rows

    def in_two_classes(self):
        """The groups whose labelled images carry two classes or more, and the most classes one
        carries."""
        counts = [len({self.images.labels[row] for row in g} - {""}) for g in self.groups]
        return sum(n >= 2 for n in counts), max(counts, default=0)

    def within(self, split):
        """(groups holding two images or more of `split`, those images)."""
        splits = self.images.splits
        counts = [int((splits[group] == split).sum()) for group in self.groups]
        return sum(n >= 2 for n in counts), sum(n for n in counts if n >= 2)

    def rows(self):
        """data_check.csv's rows: a row per image of each group."""
        prints = self.images.prints
        for number, group in enumerate(self.groups, start=1):
            first = group[0]
            exact = prints["exact"][group] == prints["exact"][first]
            for row, same in zip(group, exact):
                if row == first:  # the group's kind: exact where every image is of its pixels
                    same = exact.all()
                kind = "exact" if same else "near"
                distance = int(popcount(prints["perceptual"][row] ^ prints["perceptual"][first]))
                yield {
                    "group": number,
                    "kind": kind,
                    "distance": distance,
                    "split": self.images.splits[row],
                    "image": self.images.paths[row],
                    "label": self.images.labels[row],
                }


def find_copies(images, near=NEAR):
    """Found: the exact and near copies among `images` (Checked), each image in one group with
    one of its copies at least (groups()). Two images are copies where their pixels are the same
    or their perceptual hashes `near` bits or fewer apart."""
    prints = images.prints
    _, first, same = np.unique(prints["exact"], return_index=True, return_inverse=True)
    same = same.ravel()  # each row's set: the images of its pixels
    hashes = prints["perceptual"][first]
    shaped = np.flatnonzero(hashes != 0)  # a flat image has no hash: its exact copies alone
    a, b = near_pairs(hashes[shaped], near)
    a, b = shaped[a], shaped[b]
    sizes = np.bincount(same, minlength=len(first))
    involved = (sizes > 1) | np.isin(np.arange(len(first)), np.concatenate([a, b]))
    rows = sorted(np.flatnonzero(involved[same]).tolist(), key=lambda r: placed(images, r))
    neighbours = {}
    for u, v in zip(a.tolist(), b.tolist()):
        neighbours.setdefault(u, []).append(v)
        neighbours.setdefault(v, []).append(u)
    rows_of = {}  # each set's rows in order, the sets in the order of their first rows
    for row in rows:
        rows_of.setdefault(same[row], []).append(row)
    order = {row: i for i, row in enumerate(rows)}
    return Found(images, groups(rows_of, neighbours, order))


def groups(rows_of, neighbours, order):
    """The groups of the sets of `rows_of` (in order; `order`: each row's place) under
    `neighbours`, each a list of rows in order: a set that is a copy of
    one an earlier group holds joins that group (the group of its earliest such copy: a training
    image's, where it has one); any other opens a group with its copies that are not copies of
    any image an earlier group holds. So every image of a group is a copy of the group's first,
    or (joined) of another of its images, and a chain of look-alikes does not make one group of
    a whole class; and an image that is a copy of a training image is in a group with one."""
    rank = {u: i for i, u in enumerate(rows_of)}
    group_of, members = {}, []
    for u in rows_of:
        if u in group_of:
            continue
        held = [v for v in neighbours.get(u, ()) if v in group_of]
        if held:
            group = group_of[min(held, key=rank.get)]
            members[group].append(u)
            group_of[u] = group
            continue
        free = [
            v
            for v in neighbours.get(u, ())
            if v not in group_of and not any(w in group_of for w in neighbours.get(v, ()))
        ]
        for v in (u, *free):
            group_of[v] = len(members)
        members.append([u, *free])
    found = [sorted((row for m in sets for row in rows_of[m]), key=order.get) for sets in members]
    return [rows for rows in found if len(rows) > 1]


def placed(images, row):
    return SPLITS.index(images.splits[row]), images.paths[row]


# ----------------------------------------------------------------------------- the index


def popcount(x):
    """The set bits of each of the uint64s `x`."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy 2
        return np.bitwise_count(x)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def band_widths(m):
    """64 bits cut into m bands as even as they go."""
    return [64 // m + (i < 64 % m) for i in range(m)]


def probes(bits, radius):
    """How many band values lie within `radius` bits of one, in a band of `bits`."""
    return sum(math.comb(bits, r) for r in range(radius + 1))


def bands_for(n, near):
    """The number of bands whose lookups and comparisons cost least for n hashes, were their
    bits spread evenly: each hash looks up probes(b, r) values in each band and finds n / 2**b
    hashes at each."""

    def cost(m):
        radius = near // m
        return sum(probes(b, radius) * (1 + n / 2**b) for b in band_widths(m))

    fewest = math.ceil(64 / WIDEST_BAND)
    return min(range(fewest, max(fewest, near + 1) + 1), key=cost)


def near_pairs(hashes, near, budget=1 << 22):
    """The pairs (a, b), a < b, of `hashes` (uint64) at most `near` bits apart, each once: by
    multi-index hashing. Candidates are compared `budget` at a time, so memory stays bounded."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n, m = len(hashes), bands_for(len(hashes), near)
    found, low = [], 0
    for bits in band_widths(m):
        keys = ((hashes >> np.uint64(low)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        low += bits
        counts = np.bincount(keys, minlength=1 << bits)
        starts, order = np.cumsum(counts) - counts, np.argsort(keys, kind="stable")
        for flips in itertools.chain.from_iterable(
            itertools.combinations(range(bits), r) for r in range(near // m + 1)
        ):
            wanted = keys ^ sum(1 << bit for bit in flips)
            found += candidates(hashes, wanted, counts, starts, order, near, budget)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found))
    return pairs // max(n, 1), pairs % max(n, 1)


def candidates(hashes, wanted, counts, starts, order, near, budget):
    """The pairs (as a * n + b) of hash a and each hash b whose band value is a's `wanted`, that
    are within `near` bits: in pieces of about `budget` candidates."""
    n, found = len(hashes), []
    many = counts[wanted]
    ends = np.cumsum(many)
    cuts = np.searchsorted(ends, np.arange(budget, ends[-1] if n else 0, budget))
    for piece in np.split(np.arange(n), np.unique(cuts)):
        c = many[piece]
        if not c.sum():
            continue
        a = np.repeat(piece, c)
        offsets = np.arange(len(a)) - np.repeat(np.cumsum(c) - c, c)
        b = order[np.repeat(starts[wanted[piece]], c) + offsets]
        keep = (a < b) & (popcount(hashes[a] ^ hashes[b]) <= near)
        found.append(a[keep] * n + b[keep])
    return found


# ----------------------------------------------------------------------------- what is said


def plural(n, one, many):
    return f"{n} {one if n == 1 else many}"


def copies_of(found, split, other, without=None):
    """'12 test images are copies of training images', or None."""
    n = len(found.in_groups_with(split, other, without))
    if not n:
        return None
    if n == 1:
        return f"1 {NAMES[split]} image is a copy of a {NAMES[other]} image"
    return f"{n} {NAMES[split]} images are copies of {NAMES[other]} images"


def found_line(found, where, dropped=False):
    """The line train.py gives before training: what crosses splits first, then the photos in
    two classes, then the copies within a split; None where there is nothing to say."""
    parts = []
    if line := copies_of(found, "val", "train"):
        unseen = "validation accuracy counts them as unseen (--drop-copies leaves them out)"
        parts.append(f"{line}: {'left out of validation (--drop-copies)' if dropped else unseen}")
    parts += filter(
        None, [copies_of(found, "test", "train"), copies_of(found, "test", "val", "train")]
    )
    photos, most = found.in_two_classes()
    if photos:
        classes = "two classes" if most == 2 else "two classes or more"
        parts.append(f"{plural(photos, 'photo stands', 'photos stand')} in {classes}")
    for split in SPLITS:
        groups, images = found.within(split)
        if groups:
            held = plural(groups, "photo is", "photos are")
            parts.append(f"{held} in the {NAMES[split]} images more than once ({images} images)")
    listed = [f"{where} lists every group"] if where else []
    return "; ".join(parts + listed) if parts else None


# ----------------------------------------------------------------------------- the scripts


def check_copies(args, dataset, splits, folder):
    """train.py's check, before training: the training and validation images (`splits`) and the
    images of the data's test/ (cached as predict.py caches them), their groups written to
    <out>/data_check.csv and said in a line. With --drop-copies the validation images that are
    copies of training images are left out of `splits`' validation; returns the splits."""
    parts = [("train", splits.train), ("val", splits.val)]
    test = test_folder_images(dataset.root / "test", args)
    if test is not None:
        parts.append(("test", test))
    found = find_copies(checked_images(parts, dataset.root, splits.classes))
    path = folder.path / DATA_CHECK_CSV
    if folder.writer:
        write_data_check(found, path)
    if args.drop_copies:
        splits = without_copies(splits, found, dataset.root)
    written = path if folder.writer else None  # --find-lr writes no file: none is named
    line = found_line(found, written, dropped=args.drop_copies)
    if args.drop_copies and not splits.left_out:  # asked for: said, though there is none
        line = "; ".join(filter(None, [NONE_TO_DROP, line]))
    if line:
        log(line)
    return splits


def test_folder_images(test_dir, args):
    """The images of a flat test/ beside the training data, cached (predict.py reads that cache),
    or None where there is none."""
    files = files_in(test_dir)[0] if test_dir.is_dir() else []
    if not files:
        return None
    cache_dir = args.cache_dir or default_cache_dir(test_dir.parent)
    cache = build_cache(test_dir, files, args.img_size, cache_dir, args.cache_workers, args.resize)
    return unlabelled(cache)


def unlabelled(cache):
    return CachedImages(cache, np.zeros(len(cache), np.int64))


def write_data_check(found, path):
    """data_check.csv: every group, a row per image; where none is found, an earlier run's
    file is removed (it spoke of other images)."""
    rows = list(found.rows())
    if not rows:
        path.unlink(missing_ok=True)  # a run file (RUN_FILES), as history.csv is
        return
    with atomic_file(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def without_copies(splits, found, root):
    """`splits` with the validation images that are copies of training images left out."""
    copies = set(found.in_groups_with("val", "train"))
    if not copies:
        return splits
    paths = found.images.paths
    left_out = {paths[row] for row in copies}
    val_paths = splits.val.paths(root)
    kept = [i for i, p in enumerate(val_paths) if p not in left_out]
    if not kept:
        raise Problem(
            f"--drop-copies: every one of the {len(val_paths)} validation images is a copy of a "
            "training image, so nothing would validate; train without --drop-copies, or give the "
            "data a validation set of other photos"
        )
    return replace(splits, val=splits.val.subset(kept), left_out=tuple(sorted(left_out)))


def test_copies_line(state, test_dir, files, cache_dir=None, threads=0, data=None):
    """predict.py's and evaluate.py's line: how many images of `test_dir` are copies of the
    run's training images, from their caches (the test images' built where they are not), or
    None: none are, or the training images' cache is not here (nothing of them is decoded)."""
    training = cached_training_images(state, data)
    if training is None:
        return None
    with warnings.catch_warnings():  # an unreadable test image: the prediction says it
        warnings.simplefilter("ignore")
        size, resize = state["img_size"], state["args"].get("resize", "crop")
        cache_dir = cache_dir or default_cache_dir(Path(test_dir).parent)
        test = unlabelled(build_cache(test_dir, files, size, cache_dir, threads, resize))
    root = Path(test_dir).parent
    parts = [("train", training), ("test", test)]
    return copies_of(find_copies(checked_images(parts, root, state["classes"])), "test", "train")


def cached_training_images(state, data=None):
    """The images a checkpoint's run trained on, from their cache at the run's size, where it is
    here; else None. Held-out validation images are not among them (the run's --seed and
    --val-fraction, as cache_splits holds them out)."""
    saved = state["args"]
    with warnings.catch_warnings():  # what the listing warns of was said when the run trained
        warnings.simplefilter("ignore")
        try:
            dataset = dataset_of(saved, trained_data_root(data, state), classes=state["classes"])
        except (Problem, OSError):
            return None
    cache_dir = saved.get("cache_dir") or default_cache_dir(dataset.root)
    listed, size = dataset.train, state["img_size"]
    cache = find_cache(listed.folder, listed.files, size, cache_dir, saved.get("resize", "crop"))
    if cache is None:
        return None
    label = dict(zip(listed.files, listed.labels.tolist()))
    images = CachedImages(cache, [label[f] for f in cache.files])
    if dataset.val is None:  # held out of them, as cache_splits holds them out
        fraction, seed = saved.get("val_fraction", 0.1), saved.get("seed", 0)
        images = images.subset(stratified_split(images.labels, fraction, seed)[0])
    return images
