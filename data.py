"""Files -> uint8 images: class discovery, label CSVs, splits, the cached datasets, demo data.

Data flows one way:

    files --(image_cache.py: decode, EXIF, RGB, square, resize)--> uint8 NxSxSx3 cache on disk
          --(loader.py: memmap rows -> uint8 batch, pinned)--> prefetch.py (onto the device)
          --> augment.py (per-sample random augmentation, normalisation) --> the model

The deterministic half runs once per folder and is kept on disk, so no epoch after the first
decodes an image.
"""

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from twophase.image_cache import MemoryCache, build_cache, default_cache_dir
from twophase.tables import Names, cell, read_csv, read_labels
from utils import MissingFile, Problem, exclusive, log

# Only formats Pillow can open: it registers some (.pdf, .eps) that it can only write.
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)


# ----------------------------------------------------------------------------- files and labels


def is_hidden(name):
    return name.startswith(".") or name.startswith("__")


def is_image_file(path):
    """An image by its extension, or, with none, by its first bytes (a JPEG named `tmp`, as a
    well-known photo set ships one). Hidden files are never images."""
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or (not path.suffix and opens_as_image(path))


def opens_as_image(path):
    """Whether Pillow recognises the file (its header alone is read)."""
    try:
        with Image.open(path) as img:
            return img.format is not None
    except Exception:  # any file Pillow cannot identify
        return False


def images_in(folder, prefix=""):
    """The images directly inside `folder` (prefixed), sorted; the other files it holds, but for
    hidden ones, are named in a warning."""
    images, others = files_in(folder, prefix)
    warn_not_images(folder, others)
    return images


def files_in(folder, prefix=""):
    """(the images, the other files) directly inside `folder`, prefixed, sorted; no hidden one."""
    images, others = [], []
    for path in Path(folder).iterdir():
        if path.is_file() and not path.name.startswith("."):
            (images if is_image_file(path) else others).append(prefix + path.name)
    return sorted(images), sorted(others)


def warn_not_images(folder, others):
    """One warning for the files of `folder` (or its class folders) that are not images."""
    if others:
        warnings.warn(
            f"{folder}: {len(others)} file(s) that are not images left out: "
            + ", ".join(others[:5])
            + (", ..." if len(others) > 5 else ""),
            stacklevel=4,
        )


def find_classes(train_dir, skip=()):
    """Class names are train/'s sub-folders (but those in `skip`)."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise Problem(f"no folder {train_dir}")
    names = [d.name for d in class_folders(train_dir, skip)]
    if not names:
        raise Problem(f"{train_dir} holds no class folders (expected {train_dir}/<class>/<image>)")
    return ordered_classes(names)


def ordered_classes(names):
    """Numeric order if every name is an integer ("2" before "10"), else by name."""
    if all(_is_int(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _is_int(name):
    try:
        int(name)
        return True
    except ValueError:
        return False


def list_labelled_images(split_dir, classes, skip=()):
    """Relative paths 'class/file' of every image under split_dir/<class>/, sorted. Images lying
    in split_dir itself, beside the class folders, have no class: named in a warning."""
    split_dir = Path(split_dir)
    class_dirs = class_folders(split_dir, skip)
    warn_loose_images(split_dir, files_in(split_dir)[0])
    unknown = sorted(d.name for d in class_dirs if d.name not in set(classes))
    if unknown:
        raise Problem(f"{split_dir} has classes that train/ lacks: {', '.join(unknown)}")
    files, others = [], []
    for d in sorted(class_dirs):
        images, not_images = files_in(d, prefix=f"{d.name}/")
        if not images:
            warnings.warn(f"class folder {d} holds no images", stacklevel=2)
        files += images
        others += not_images
    warn_not_images(split_dir, others)  # once, however many class folders hold such files
    return files


def warn_loose_images(split_dir, loose):
    """One warning for the images of `split_dir` that lie beside its class folders, not in one."""
    if loose:
        warnings.warn(
            f"{split_dir}: {len(loose)} image(s) beside the class folders left out, such as "
            f"{loose[0]}: an image of a class must be in its class folder (images in a flat "
            "folder take their labels from a CSV, --labels)",
            stacklevel=4,
        )


def list_images(folder):
    """Names of the images directly inside folder (a flat test/ folder), sorted."""
    return images_in(folder)


def labels_of(files, classes):
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[f.split("/", 1)[0]] for f in files], dtype=np.int64)


def stratified_split(labels, fraction, seed):
    """Indices (train, val): a `fraction` of each class, and one or more of a class of two."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(train), np.sort(val)


# ----------------------------------------------------------------------------- the cached datasets


class CachedImages(torch.utils.data.Dataset):
    """Rows of an ImageCache with their labels. Indexed with a list of indices it returns a
    whole batch, (uint8 images NxSxSx3, int64 labels N), with one memmap read."""

    def __init__(self, cache, labels, indices=None):
        self.cache = cache
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices)
        self._pixels = None  # opened on first use

    def __len__(self):
        return len(self.indices)

    def digest(self):
        """A short hash of which files these images are: a run's held-out split, recognised."""
        names = getattr(self.cache, "files", [])
        files = sorted(names[i] for i in self.indices) if names else []

        return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]

    def paths(self, root):
        """Each image's path from the data root `root`, as train/cat/1.jpg (POSIX separators)."""
        folder = Path(os.path.relpath(self.cache.folder, root))
        return [(folder / self.cache.files[i]).as_posix() for i in self.indices]

    def class_counts(self, num_classes):
        """How many of these images each class has."""
        return np.bincount(self.labels[self.indices], minlength=num_classes)

    def subset(self, rows):
        """The images at `rows` of this one."""
        return CachedImages(self.cache, self.labels, self.indices[np.asarray(rows, dtype=np.int64)])

    def __getitem__(self, batch):
        if self._pixels is None:
            self._pixels = self.cache.open()
        rows = self.indices[np.asarray(batch)]
        return torch.from_numpy(self._pixels[rows]), torch.from_numpy(self.labels[rows])


def in_memory_images(pixels, labels):
    """CachedImages over preprocessed images held in memory."""
    return CachedImages(MemoryCache(pixels), labels)


# ----------------------------------------------------------------------------- the dataset


@dataclass
class Listed:
    """A folder's labelled images, listed and checked, none decoded yet."""

    folder: Path
    files: list  # relative to the folder
    labels: np.ndarray  # the class index of each file


@dataclass
class DatasetFiles:
    """What a dataset root holds for training, found before anything is decoded or written."""

    root: Path
    classes: list
    train: Listed
    val: Listed | None  # None: held out of train by --val-fraction and --seed
    layout: str  # how the root was read, in words


def find_dataset(root, classes=None, labels=None, image_col=None, label_col=None, val_labels=None):
    """The training and validation images of a dataset root, listed and checked, in one of three
    layouts:
    - <root>/train/<class>/<image>, with <root>/val/<class>/<image> if there is a val/;
    - images in a flat <root>/train/ with their labels in the CSV `labels` (columns `image_col`
      and `label_col`, by default its first two), validation from `val_labels` (the images it
      names in <root>/val/, or in train/ if there is no val/) if given;
    - no train/: <root>/<class>/<image>, a folder of class folders (torchvision's ImageFolder).
    Without val/ or `val_labels`, validation is held out of the training images (cache_splits).
    `classes`: the class list to label with (a checkpoint's), instead of the data's own."""
    root = Path(root)
    train_dir = root / "train"
    if labels:
        return dataset_from_csv(root, classes, labels, image_col, label_col, val_labels)
    if not train_dir.is_dir():
        if root.is_dir() and class_folders(root):
            classes = list(classes) if classes is not None else find_classes(root, skip=("test",))
            train = listed_folders(root, classes, skip=("test",))
            return DatasetFiles(
                root, classes, train, None, "class folders at the root, val held out"
            )
        raise Problem(
            f"no training data at {train_dir}.\n"
            f"Point --data at a dataset root laid out as <root>/train/<class>/<image> (val/ and "
            f"test/ beside it are optional), or as <root>/<class>/<image>; give the labels of a "
            f"flat train/ with --labels CSV; or try the whole pipeline with: python train.py --demo"
        )
    if not class_folders(train_dir) and list_images(train_dir):
        hint = next((f" ({c} is there)" for c in sorted(root.glob("*.csv"))), "")
        raise Problem(
            f"{train_dir} holds images but no class folders: give their labels with --labels "
            f"CSV{hint}, or put each class's images in a folder of its own"
        )
    classes = list(classes) if classes is not None else find_classes(train_dir)
    train = listed_folders(train_dir, classes)
    if not train.files:
        raise Problem(f"{train_dir} holds no images in its class folders")
    val_dir = root / "val"
    if not val_dir.is_dir():
        return DatasetFiles(root, classes, train, None, "train/ class folders, val held out")
    val = listed_folders(val_dir, classes)
    if not val.files:
        flat = list_images(val_dir)
        raise Problem(
            f"{val_dir} holds no images in class folders (expected {val_dir}/<class>/<image>)"
            + (f"; it holds {len(flat)} images directly" if flat else "")
            + f". Put them in class folders, or remove {val_dir} to hold out --val-fraction of "
            "train/ instead"
        )
    return DatasetFiles(root, classes, train, val, "train/ and val/ class folders")


def dataset_of(options, root=None, classes=None):
    """find_dataset as a run's options (a checkpoint's `args`) describe the data; `root`: where
    the data is now, if not at --data."""
    return find_dataset(
        root or options["data"],
        classes=classes,
        labels=options.get("labels"),
        image_col=options.get("image_col"),
        label_col=options.get("label_col"),
        val_labels=options.get("val_labels"),
    )


def trained_data_root(given, state):
    """The dataset root a checkpoint's scripts read: --data if `given`, else the one the run was
    trained on, where it was (a checkpoint records its absolute path) or, from a checkpoint that
    records it as typed, relative to here."""
    if given:
        return Path(given)
    for candidate in (state.get("data"), state.get("args", {}).get("data")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise Problem(
        f"the dataset this checkpoint was trained on, {state.get('data')}, is not there: "
        "name it with --data"
    )


def validation_of(state, root, size, threads=4):
    """A checkpoint's validation images (Splits, with `val` alone), exactly as its run held them
    out: its classes, its data layout, --resize, --val-fraction and --seed, its cache folder, the
    copies of training images it left out (--drop-copies). At
    a size other than the run's, images held out of the training ones are drawn at the run's
    size (whose cache is there) and only they are cached at the other."""
    saved = state["args"]
    resize, cache_dir = saved.get("resize", "crop"), saved.get("cache_dir")
    dataset = dataset_of(saved, root, classes=state["classes"])
    drawn_at = state["img_size"] if dataset.val is None else size
    splits = cache_splits(
        dataset,
        drawn_at,
        resize=resize,
        cache_dir=cache_dir,
        threads=threads,
        val_fraction=saved.get("val_fraction", 0.1),  # not in a checkpoint made elsewhere
        seed=saved.get("seed", 0),
        val_only=True,
    )
    if drawn_at != size:
        splits.val = resized(splits.val, size, resize, cache_dir, threads)
    left_out = set(state.get("val_left_out") or ())
    if left_out:  # the copies of training images the run left out of validation (--drop-copies)
        paths = splits.val.paths(dataset.root)
        splits.val = splits.val.subset([i for i, p in enumerate(paths) if p not in left_out])
        splits.left_out = tuple(sorted(left_out))
    return splits


def resized(images, size, resize, cache_dir=None, threads=0):
    """The same images (their files and labels) from a cache at another size, of them alone."""
    files = [images.cache.files[i] for i in images.indices]
    listed = Listed(Path(images.cache.folder), files, images.labels[images.indices])
    cache_dir = cache_dir or Path(images.cache.pixels_path).parent  # where theirs is
    return cached_images(listed, size, resize, cache_dir, threads)


def validation_is_drawn(options):
    """Whether the run's validation images are held out of its training images (by --seed and
    --val-fraction), as find_dataset would find them: neither --val-labels nor, without
    --labels, a val/ beside train/."""
    if options.get("labels"):
        return not options.get("val_labels")
    root = Path(options["data"])
    return not ((root / "train").is_dir() and (root / "val").is_dir())


def class_folders(folder, skip=()):
    folder = Path(folder)
    return [
        d for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name) and d.name not in skip
    ]


def listed_folders(split_dir, classes, skip=()):
    files = list_labelled_images(split_dir, classes, skip)
    return Listed(Path(split_dir), files, labels_of(files, classes))


# ----------------------------------------------------------------------------- labels in a CSV


def dataset_from_csv(root, classes, labels, image_col, label_col, val_labels):
    """find_dataset's second layout: a flat train/ and the CSV of its labels (Kaggle's). The
    classes are the training labels' (a label only the validation CSV names is an error, as a
    val/ class folder that train/ lacks is)."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise Problem(f"--labels {labels}: no folder {train_dir} of the images it names")
    train_names = Names(list_images(train_dir), train_dir)
    labels_file = labels_path(labels, root)
    rows = read_labels(labels_file, train_names, image_col, label_col, classes)
    if classes is None:
        classes = ordered_classes({label for label, _ in rows.values()})
    # A class of one image cannot both train and validate, where validation is held out of it.
    train = listed_from_rows(rows, train_dir, classes, labels_file, lonely=not val_labels)
    where = f"train/ images labelled by {Path(labels).name}"
    if not val_labels:
        warn_unlisted(train_names, [rows], [labels_file])
        return DatasetFiles(root, classes, train, None, f"{where}, val held out")
    val_dir = root / "val" if (root / "val").is_dir() else train_dir
    val_names = train_names if val_dir == train_dir else Names(list_images(val_dir), val_dir)
    val_file = labels_path(val_labels, root)
    val_rows = read_labels(val_file, val_names, image_col, label_col, classes)
    both = sorted(set(rows) & set(val_rows)) if val_dir == train_dir else []
    if both:
        raise Problem(
            f"{val_file} names images that {labels_file} names too, so they would train and "
            f"validate: {', '.join(both[:10])}"
        )
    if val_dir == train_dir:
        warn_unlisted(train_names, [rows, val_rows], [labels_file, val_file])
    else:
        warn_unlisted(train_names, [rows], [labels_file])
        warn_unlisted(val_names, [val_rows], [val_file])
    val = listed_from_rows(val_rows, val_dir, classes, val_file, lonely=False)
    return DatasetFiles(root, classes, train, val, f"{where}, val by {Path(val_labels).name}")


def labels_path(labels, root):
    """A --labels file as given, or inside the data root; one a run saved (an absolute path) is
    also found by its name in the root, where the dataset has moved since."""
    path = Path(labels)
    for candidate in (path, Path(root) / path, Path(root) / path.name):
        if candidate.is_file():
            return candidate
    raise MissingFile(f"no labels file {labels} (nor {Path(root) / path.name})")


def listed_from_rows(rows, folder, classes, source, lonely=True):
    """The images `rows` (read_labels') label, in file order; with `lonely`, a class with one
    image is a warning (it cannot both train and validate)."""
    files = sorted(rows)
    counts = Counter(rows[f][0] for f in files)
    lonely = sorted(c for c, n in counts.items() if n == 1) if lonely else []
    if lonely:
        warnings.warn(
            f"{source}: {len(lonely)} class(es) with a single image, which cannot be both "
            f"trained and validated on: {', '.join(lonely[:10])}",
            stacklevel=2,
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[rows[f][0]] for f in files], dtype=np.int64)
    return Listed(Path(folder), files, labels)


def warn_unlisted(names, row_sets, sources):
    """A warning where the labels CSVs of a folder leave some of its images out."""
    named = set().union(*row_sets)
    unlisted = len(names.files) - len(named)
    if unlisted:
        which = " and ".join(str(Path(s).name) for s in sources)
        warnings.warn(
            f"{which} name {len(named)} of the {len(names.files)} images in {names.folder}; "
            f"the other {unlisted} are left out",
            stacklevel=3,
        )


UNEVEN = 3  # the largest class this many times the smallest: top-1 accuracy favours the large


def uneven(counts):
    """Whether classes of these image counts are uneven: the largest UNEVEN times the smallest."""
    counts = [int(c) for c in counts]
    return bool(counts) and max(counts) >= UNEVEN * max(min(counts), 1)


@dataclass
class Splits:
    classes: list
    train: CachedImages | None
    val: CachedImages
    skipped: int  # unreadable images left out of train and val
    layout: str = ""
    left_out: tuple = ()  # validation images left out (--drop-copies), by their paths in the root


def cache_splits(
    dataset,
    size,
    *,
    resize="crop",
    cache_dir=None,
    threads=0,
    val_fraction=0.1,
    seed=0,
    val_only=False,
):
    """The training and validation images of `dataset` (find_dataset's), cached at `size` by
    `resize`: the one rule for which images validate. The dataset's own validation images if it
    has them, else a stratified split of the training images fixed by (val_fraction, seed), over
    the images that could be read. With val_only the training images are cached only where
    validation is drawn from them."""
    cache_dir = cache_dir or default_cache_dir(dataset.root)

    def cached(listed):
        return cached_images(listed, size, resize, cache_dir, threads)

    if dataset.val is not None:
        val = cached(dataset.val)
        train = None if val_only else cached(dataset.train)
        skipped = len(val.cache.skipped) + (len(train.cache.skipped) if train else 0)
    else:
        whole = cached(dataset.train)
        train_rows, val_rows = stratified_split(whole.labels, val_fraction, seed)
        train, val = whole.subset(train_rows), whole.subset(val_rows)
        skipped = len(whole.cache.skipped)
        if not len(val):
            raise Problem(
                f"no validation images: no class of {dataset.train.folder} has two readable "
                "images to hold one out of; give the data a val/ folder"
            )
    return Splits(dataset.classes, train, val, skipped, dataset.layout)


def cached_images(listed, size, resize, cache_dir, threads=0):
    """The images `listed` names, with their labels, from their cache at `size` (built where it
    is not there yet); those that cannot be read are left out, and all of them is an error."""
    cache = build_cache(listed.folder, listed.files, size, cache_dir, threads, resize)
    if listed.files and not cache.files:
        raise Problem(f"none of the {len(listed.files)} images of {listed.folder} could be read")
    label = dict(zip(listed.files, listed.labels.tolist()))
    return CachedImages(cache, [label[f] for f in cache.files])


def display_names(data_dir, classes):
    """Names to show for the classes: "<folder> (<words>)" where <data>/class_names.csv has a row
    for the folder (columns folder, ..., words), else the folder name."""
    path = Path(data_dir) / "class_names.csv"
    if not path.is_file():
        return {c: c for c in classes}
    try:
        table = read_csv(path, header_needed=True)
    except Problem as unreadable:  # an optional file: the names are shown as they are
        log(f"{unreadable}: the classes are shown by their names")
        return {c: c for c in classes}
    table.say()
    if not {"folder", "words"} <= set(table.header):
        log(f"{path} has no columns folder and words: the classes are shown by their names")
        return {c: c for c in classes}
    folder, words = (table.column(name, "class_names.csv") for name in ("folder", "words"))
    named = {cell(row, folder): cell(row, words) for _, row in table.rows}
    return {c: f"{c} ({named[c].split(',')[0][:24]})" if named.get(c) else c for c in classes}


# ----------------------------------------------------------------------------- the demo dataset


def write_demo_dataset(root, size=32, seed=0):
    """scikit-learn's handwritten digits (8x8, 1,797 images, 10 classes) as a dataset root:
    train/ and val/ class folders of RGB PNGs, a flat test/ with opaque names, and the true
    test labels in answers.csv. Returns root. Does nothing if root already holds answers.csv; a
    folder holding anything else is the user's, refused."""
    root = Path(root)
    if (root / "answers.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Machines sharing a filesystem take turns: the second finds it written.
    with exclusive(root.parent / f".{root.name}.lock", f"the demo dataset {root}", wait=True):
        if not (root / "answers.csv").is_file():
            refuse_a_folder_of_ones_own(root)
            _write_digits(root, size, seed)
    return root


def refuse_a_folder_of_ones_own(root):
    """The demo's dataset goes into a new or empty folder only (written whole, it has its
    answers.csv): any other is the user's, never written over."""
    if root.is_dir() and any(root.iterdir()) or root.is_file():
        raise Problem(
            f"--demo writes its dataset into {root}, which holds files of its own (no "
            "answers.csv: not the demo's): give --data a new folder, or leave --data out "
            "(data/demo)"
        )


def _write_digits(root, size, seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = n_test = len(order) * 15 // 100
    parts = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }
    answers = []
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    for split, idx in parts.items():
        for i in idx:
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            img = Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB")
            label = str(digits.target[i])
            if split == "test":
                name = hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()[:10]
                answers.append((name, label))
                path = tmp / "test" / f"{name}.png"
            else:
                path = tmp / split / label / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
    lines = ["image_name,pred_label"] + [f"{n},{label}" for n, label in sorted(answers)]
    (tmp / "answers.csv").write_text("\n".join(lines) + "\n")
    if root.is_dir():  # empty: os.replace takes no folder's place on every system
        root.rmdir()
    os.replace(tmp, root)
