"""Files -> uint8 batches: class discovery, the preprocessing cache, datasets, loaders, demo data.

Data flows one way:

    files --(decode, EXIF, RGB, square crop, resize: deterministic)--> uint8 NxSxSx3 cache on disk
          --(loader: memmap rows -> uint8 batch, pinned)--> prefetch.py (onto the device)
          --> augment.py (per-sample random augmentation, normalisation) --> the model

The deterministic half runs once per folder and is kept on disk, so no epoch after the first
decodes an image.
"""

import csv
import hashlib
import itertools
import json
import os
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from utils import atomic_file, exclusive

# Bump when load_image changes what it writes: every cache built before is then rebuilt.
PREPROCESS_VERSION = 1
# Only formats Pillow can open: it registers some (.pdf, .eps) that it can only write.
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)


# ----------------------------------------------------------------------------- files and labels


def is_hidden(name):
    return name.startswith(".") or name.startswith("__")


def is_image_file(path):
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def find_classes(train_dir):
    """Class names are train/'s sub-folders: numeric order if every name is an integer."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise SystemExit(f"no folder {train_dir}")
    names = [d.name for d in train_dir.iterdir() if d.is_dir() and not is_hidden(d.name)]
    if not names:
        raise SystemExit(
            f"{train_dir} holds no class folders (expected {train_dir}/<class>/<image>)"
        )
    if all(_is_int(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _is_int(name):
    try:
        int(name)
        return True
    except ValueError:
        return False


def list_labelled_images(split_dir, classes):
    """Relative paths 'class/file' of every image under split_dir/<class>/, sorted."""
    split_dir = Path(split_dir)
    class_dirs = [d for d in split_dir.iterdir() if d.is_dir() and not is_hidden(d.name)]
    unknown = sorted(d.name for d in class_dirs if d.name not in set(classes))
    if unknown:
        raise SystemExit(f"{split_dir} has classes that train/ lacks: {', '.join(unknown)}")
    files = []
    for d in sorted(class_dirs):
        images = sorted(
            f"{d.name}/{p.name}" for p in d.iterdir() if p.is_file() and is_image_file(p)
        )
        if not images:
            warnings.warn(f"class folder {d} holds no images", stacklevel=2)
        files += images
    return files


def list_images(folder):
    """Names of the images directly inside folder (a flat test/ folder), sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))


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


# ----------------------------------------------------------------------------- preprocessing


def load_image(path, size):
    """The deterministic preprocessing: EXIF orientation, RGB, centre square crop, bilinear
    antialiased resize to size x size. Returns a uint8 array of shape (size, size, 3)."""
    with Image.open(path) as img:
        bits = png_significant_bits(path) if img.mode.startswith("I;16") else None
        img = to_rgb(ImageOps.exif_transpose(img), bits)
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        # Crop first: resize(box=...) would blend in pixels from outside the square. PIL's
        # bilinear filter widens when it shrinks, i.e. the resize is antialiased.
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def to_rgb(img, significant_bits=None):
    """RGB of any mode Pillow opens. 16-bit greyscale is scaled to 8 bits by its container's range
    (or the significant bits its PNG declares, 12 for a 12-bit image), the same for every image:
    a dim image stays dim beside a bright one. (convert would clip it to white.) Transparent modes
    keep their colours, as torchvision's loader does."""
    if img.mode.startswith("I"):
        bits = significant_bits or (16 if img.mode.startswith("I;16") else 32)
        pixels = np.asarray(img).astype(np.float64) * (255 / (2**bits - 1))
        img = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # direct P -> RGB warns about the transparency it drops
    return img.convert("RGB")


def png_significant_bits(path):
    """The bits a PNG's sBIT chunk says its grey samples carry (a 12-bit image in a 16-bit PNG
    says 12), or None. Pillow reads the chunk but does not expose it."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while header := f.read(8):
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"sBIT":
                return f.read(length)[0] or None
            if kind in (b"IDAT", b"IEND") or len(header) < 8:
                return None
            f.seek(length + 4, 1)  # the chunk and its CRC
    return None


def _load_or_reason(path, size):
    try:
        return load_image(path, size), None
    except Exception as e:  # any decoder failure: the caller names the file and goes on
        return None, f"{type(e).__name__}: {e}"


def why_unreadable(path):
    """Why the preprocessing cannot read the image at `path`, or None if it can."""
    return _load_or_reason(path, 8)[1]


# ----------------------------------------------------------------------------- the cache


@dataclass
class ImageCache:
    """A folder's preprocessed images: rows of a uint8 (n, size, size, 3) file on disk."""

    pixels_path: str
    files: list  # row i holds files[i] (relative to the folder)
    size: int
    skipped: dict  # file -> why it could not be read

    def __len__(self):
        return len(self.files)

    def open(self):
        if not self.files:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.memmap(
            self.pixels_path,
            dtype=np.uint8,
            mode="r",
            shape=(len(self.files), self.size, self.size, 3),
        )


def cache_key(folder, files, size):
    """Changes whenever a file is added, removed or changed, or the preprocessing changes."""
    h = hashlib.sha256(f"v{PREPROCESS_VERSION} size={size}\n".encode())
    for f in files:
        st = os.stat(os.path.join(folder, f))
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_cache(folder, files, size, cache_dir, threads=0):
    """Preprocess `files` (paths relative to `folder`) once and keep them in cache_dir.

    Reuses the cache when nothing changed. Unreadable images are skipped with a warning naming
    them. The pixels and then the index are written under temporary names and moved into place,
    so an interrupted build leaves no cache that looks complete. Two processes needing the same
    cache at once (two runs on one dataset) take turns: one builds it, the other waits and reads
    it."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    key = cache_key(folder, files, size)
    # The folder's full path in the name: datasets sharing a --cache-dir keep apart.
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    stem = f"{folder.name}-{where}-{size}px-{key}"
    index_path, pixels_path = cache_dir / f"{stem}.json", cache_dir / f"{stem}.u8"
    cache = _read_cache_index(index_path, pixels_path, size)
    if cache is None:
        lock = cache_dir / f"{folder.name}-{where}-{size}px.lock"  # one for every version
        with exclusive(lock, f"the cache {stem}", wait=True):
            cache = _read_cache_index(index_path, pixels_path, size)  # built while we waited?
            if cache is None:
                cache = _write_cache(folder, files, size, index_path, pixels_path, threads)
    for f, why in cache.skipped.items():
        warnings.warn(f"skipped unreadable image {folder / f}: {why}", stacklevel=2)
    return cache


def _read_cache_index(index_path, pixels_path, size):
    try:
        index = json.loads(index_path.read_text())
        row = size * size * 3
        if os.path.getsize(pixels_path) != len(index["files"]) * row:
            return None  # truncated or foreign: rebuild
        return ImageCache(str(pixels_path), index["files"], size, index["skipped"])
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(folder, files, size, index_path, pixels_path, threads):
    kept, skipped = [], {}
    bar = tqdm(
        total=len(files),
        desc=f"caching {folder}",
        unit="img",
        file=sys.stderr,
        disable=None,
        leave=False,
    )
    # Threads suffice: Pillow releases the GIL while it decodes and resizes. Chunks keep at most
    # one chunk of decoded images in memory, whatever the number of files.
    with bar, atomic_file(pixels_path) as out, ThreadPoolExecutor(max(threads, 1)) as pool:
        for start in range(0, len(files), 256):
            chunk = files[start : start + 256]
            for f, (pixels, why) in zip(
                chunk, pool.map(_load_or_reason, [folder / f for f in chunk], [size] * len(chunk))
            ):
                if pixels is None:
                    skipped[f] = why
                else:
                    out.write(pixels.tobytes())
                    kept.append(f)
            bar.update(len(chunk))
    with atomic_file(index_path, "w") as f:  # last: an index names only complete pixels
        json.dump({"files": kept, "skipped": skipped, "size": size}, f)
    _remove_stale(index_path, pixels_path)
    return ImageCache(str(pixels_path), kept, size, skipped)


def _remove_stale(index_path, pixels_path):
    """Earlier caches of the same folder and size: a changed dataset would otherwise leave
    a full copy of its pixels behind each time."""
    prefix = index_path.name.rsplit("-", 1)[0] + "-"
    for old in index_path.parent.glob(prefix + "*"):
        if old not in (index_path, pixels_path) and old.suffix in (".json", ".u8"):
            old.unlink(missing_ok=True)


def default_cache_dir(data_dir):
    """<data>/.cache, or a folder in the user's cache when the data folder is read-only."""
    candidate = Path(data_dir) / ".cache"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgcls" / digest
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


# ----------------------------------------------------------------------------- datasets and loaders


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

    def subset(self, rows):
        """The images at `rows` of this one."""
        return CachedImages(self.cache, self.labels, self.indices[np.asarray(rows, dtype=np.int64)])

    def __getitem__(self, batch):
        if self._pixels is None:
            self._pixels = self.cache.open()
        rows = self.indices[np.asarray(batch)]
        return torch.from_numpy(self._pixels[rows]), torch.from_numpy(self.labels[rows])


def make_loader(
    dataset, batch_size, shuffle, seed=0, pin_memory=False, drop_last=False, num_replicas=1, rank=0
):
    """A loader of whole batches, each one read of the cache, in the thread that iterates it (no
    loader processes: handing a batch over from one costs more than the read).
    With shuffle, the order depends only on (seed, epoch): call set_epoch(loader, e) before each
    epoch and a resumed run sees the same batches (set_epoch(loader, e, start) skips the first
    `start` of them unread). Under DDP each process gets its own shard."""
    if shuffle:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
    else:
        # Every num_replicas-th image from `rank` on: each image counted once, none padded in.
        sampler = range(rank, len(dataset), num_replicas)
    batches = EpochBatches(sampler, batch_size, drop_last=drop_last)
    # Its own generator: making an iterator would otherwise draw from the global RNG, and a resumed
    # run (a new iterator) would then see other random draws than one that never stopped.
    return torch.utils.data.DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


class EpochBatches(torch.utils.data.BatchSampler):
    """The batches of an epoch, from the `start`-th on."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def set_epoch(loader, epoch, start=0):
    """Shuffle for `epoch` (the order is a function of (seed, epoch) alone), and begin at its
    `start`-th batch: a run stopped mid-epoch goes on where it stopped."""
    loader.sampler.sampler.set_epoch(epoch)
    loader.sampler.start = start


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


def find_dataset(root, classes=None):
    """The training and validation images of a dataset root, listed and checked:
    <root>/train/<class>/<image>, and <root>/val/<class>/<image> if there is a val/. `classes`:
    the class list to label with (a checkpoint's), instead of train/'s folders."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise SystemExit(
            f"no training data at {train_dir}.\n"
            f"Point --data at a dataset root laid out as <root>/train/<class>/<image> (val/ and "
            f"test/ beside it are optional), or try the whole pipeline with: python train.py --demo"
        )
    classes = list(classes) if classes is not None else find_classes(train_dir)
    train = listed_folders(train_dir, classes)
    if not train.files:
        raise SystemExit(f"{train_dir} holds no images in its class folders")
    val_dir = root / "val"
    if not val_dir.is_dir():
        return DatasetFiles(root, classes, train, None, "train/ class folders, val held out")
    val = listed_folders(val_dir, classes)
    if not val.files:
        flat = list_images(val_dir)
        raise SystemExit(
            f"{val_dir} holds no images in class folders (expected {val_dir}/<class>/<image>)"
            + (f"; it holds {len(flat)} images directly" if flat else "")
            + f". Put them in class folders, or remove {val_dir} to hold out --val-fraction of "
            "train/ instead"
        )
    return DatasetFiles(root, classes, train, val, "train/ and val/ class folders")


def validation_is_drawn(options):
    """Whether the run's validation images are held out of its training images (by --seed and
    --val-fraction), as find_dataset would find them: no val/."""
    return not (Path(options["data"]) / "val").is_dir()


def trained_data_root(given, state):
    """The dataset root a checkpoint's scripts read: --data if `given`, else the one the run was
    trained on, where it was (a checkpoint records its absolute path) or, from a checkpoint that
    records it as typed, relative to here."""
    if given:
        return Path(given)
    for candidate in (state.get("data"), state.get("args", {}).get("data")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SystemExit(
        f"the dataset this checkpoint was trained on, {state.get('data')}, is not there: "
        "name it with --data"
    )


def validation_of(state, root, size, threads=4):
    """A checkpoint's validation images, exactly as its run held them out: its classes, its
    --val-fraction and --seed, its cache folder."""
    saved = state["args"]
    dataset = find_dataset(root, classes=state["classes"])
    return cache_splits(
        dataset,
        size,
        cache_dir=saved.get("cache_dir"),
        threads=threads,
        val_fraction=saved.get("val_fraction", 0.1),  # not in a checkpoint made elsewhere
        seed=saved.get("seed", 0),
        val_only=True,
    ).val


def listed_folders(split_dir, classes):
    files = list_labelled_images(split_dir, classes)
    return Listed(Path(split_dir), files, labels_of(files, classes))


@dataclass
class Splits:
    classes: list
    train: CachedImages | None
    val: CachedImages
    skipped: int  # unreadable images left out of train and val
    layout: str = ""


def cache_splits(
    dataset, size, cache_dir=None, threads=0, val_fraction=0.1, seed=0, val_only=False
):
    """The training and validation images of `dataset` (find_dataset's), cached: the one rule for
    which images validate. val/ if the dataset has one, else a stratified split of train/ fixed
    by (val_fraction, seed), over the images that could be read. With val_only the training
    images are cached only where validation is drawn from them."""
    cache_dir = cache_dir or default_cache_dir(dataset.root)

    def cached(listed):
        cache = build_cache(listed.folder, listed.files, size, cache_dir, threads)
        if listed.files and not cache.files:
            raise SystemExit(
                f"none of the {len(listed.files)} images of {listed.folder} could be read"
            )
        label = dict(zip(listed.files, listed.labels.tolist()))
        return CachedImages(cache, [label[f] for f in cache.files])

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
            raise SystemExit(
                f"no validation images: no class of {dataset.train.folder} has two readable "
                "images to hold one out of; give the data a val/ folder"
            )
    return Splits(dataset.classes, train, val, skipped, dataset.layout)


def load_splits(root, size, cache_dir=None, threads=0, val_fraction=0.1, seed=0):
    """train/ and val/ of a dataset root, cached (without val/: a stratified split of train/)."""
    return cache_splits(find_dataset(root), size, cache_dir, threads, val_fraction, seed)


def display_names(data_dir, classes):
    """Names to show for the classes: "<folder> (<words>)" where <data>/class_names.csv has a row
    for the folder (columns folder, ..., words), else the folder name."""
    path = Path(data_dir) / "class_names.csv"
    if not path.is_file():
        return {c: c for c in classes}
    with open(path, newline="") as f:
        words = {row["folder"]: row["words"] for row in csv.DictReader(f) if "folder" in row}
    return {c: f"{c} ({words[c].split(',')[0][:24]})" if words.get(c) else c for c in classes}


# ----------------------------------------------------------------------------- the demo dataset


def write_demo_dataset(root, size=32, seed=0):
    """scikit-learn's handwritten digits (8x8, 1,797 images, 10 classes) as a dataset root:
    train/ and val/ class folders of RGB PNGs, a flat test/ with opaque names, and the true
    test labels in answers.csv. Returns root. Does nothing if root already holds answers.csv."""
    root = Path(root)
    if (root / "answers.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Machines sharing a filesystem take turns: the second finds it written.
    with exclusive(root.parent / f".{root.name}.lock", f"the demo dataset {root}", wait=True):
        if not (root / "answers.csv").is_file():
            _write_digits(root, size, seed)
    return root


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
    if root.exists():  # a partial folder from an interrupted earlier write
        shutil.rmtree(root)
    os.replace(tmp, root)
