"""Files -> the preprocessing cache: each image decoded once (EXIF orientation, RGB, to a square of
the run's size) into a uint8 (n, size, size, 3) file on disk that every later epoch and run reads.

A cache is named by what it holds: its folder, its size and resize mode, and a key of its file
list (each file's name and file_stat: size, modification and change times, inode) and of the
preprocessing's version. So two
splits of one folder (a flat train/ whose --val-labels name some of its images), two label files
over one folder, or two runs at two sizes each have a cache of their own, and none reads
another's. A cache is removed only when nothing can want it again: when one of the files it holds
has changed or gone since it was built (its key can never come up again), or it was made by
another version of the preprocessing. Each new cache sweeps its folder's others by that rule.

Beside its pixels a cache keeps each image's fingerprints (fingerprints(): a perceptual hash and
a hash of its pixels), computed as the images are decoded, or from the pixels of a cache made
before they were kept: the copies check (data_check.py) reads them and decodes nothing."""

import glob
import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from utils import atomic_file, exclusive, log

# Bump when load_image changes what it writes: every cache built before is then rebuilt.
PREPROCESS_VERSION = 1
# Bump when fingerprints changes what it computes: each cache's are then computed again from its
# pixels, no image decoded again.
FINGERPRINT_VERSION = 1


# ----------------------------------------------------------------------------- preprocessing


RESIZE_MODES = ("crop", "squish", "pad")


def load_image(path, size, resize="crop"):
    """The deterministic preprocessing: EXIF orientation, RGB, then to size x size (bilinear,
    antialiased) by `resize`: "crop" the centre square first (the method's), "squish" the whole
    photo to a square, or "pad" it, whole and in its proportions, onto black. Returns a uint8
    array of shape (size, size, 3)."""
    with Image.open(path) as img:
        bits = png_significant_bits(path) if img.mode.startswith("I;16") else None
        return square(to_rgb(ImageOps.exif_transpose(img), bits), size, resize)


def square(img, size, resize="crop"):
    """An RGB PIL image as load_image's uint8 size x size array."""
    w, h = img.size
    if resize == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        # Crop first: resize(box=...) would blend in pixels from outside the square. PIL's
        # bilinear filter widens when it shrinks, i.e. the resize is antialiased.
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
    elif resize == "squish":
        img = img.resize((size, size), Image.BILINEAR)
    elif resize == "pad":
        scale = size / max(w, h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new("RGB", (size, size))  # black: the affine augmentation's fill too
        canvas.paste(
            img.resize(inner, Image.BILINEAR), ((size - inner[0]) // 2, (size - inner[1]) // 2)
        )
        img = canvas
    else:
        raise ValueError(f"resize mode {resize!r} is not one of {RESIZE_MODES}")
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


def _load_or_reason(path, size, resize="crop"):
    try:
        return load_image(path, size, resize), None
    except Exception as e:  # any decoder failure: the caller names the file and goes on
        return None, f"{type(e).__name__}: {e}"


def why_unreadable(path):
    """Why the preprocessing cannot read the image at `path`, or None if it can."""
    return _load_or_reason(path, 8)[1]


# ----------------------------------------------------------------------------- fingerprints

# An image's fingerprints: its perceptual hash (0: none, the image is flat) and the first 128
# bits of the SHA-256 of its cached pixels (two files decoding to the same pixels are copies).
FINGERPRINT = np.dtype([("perceptual", "<u8"), ("exact", "S16")])
HASH_SIDE = 32  # the grey thumbnail the perceptual hash reads: its DCT's lowest 8 x 8 frequencies
FLAT = 1.0  # a thumbnail whose grey levels spread less (std, of 255) has no shape to hash


def fingerprints(pixels, chunk=64):
    """The FINGERPRINT of each of `pixels` (uint8 n x S x S x 3): the perceptual hash is the
    64-bit DCT hash (pHash): the grey image averaged down to 32 x 32, its 8 x 8 lowest DCT
    frequencies, a bit for each, set where it is above their median. A change of brightness moves
    only the first (the mean), one of contrast scales them all, and neither moves the median's
    side of any; a resize, a re-encoding, a slight crop move a few."""
    out = np.empty(len(pixels), FINGERPRINT)
    for start in range(0, len(pixels), chunk):
        part = pixels[start : start + chunk]
        out["perceptual"][start : start + len(part)] = perceptual_hashes(part)
        out["exact"][start : start + len(part)] = [
            hashlib.sha256(np.ascontiguousarray(image)).digest()[:16] for image in part
        ]
    return out


def perceptual_hashes(pixels):
    n = len(pixels)
    if not n:
        return np.zeros(0, "<u8")
    thumbnails = np.stack([thumbnail(image) for image in pixels])  # n x 32 x 32
    dct = dct_rows(HASH_SIDE, 8)
    low = np.einsum("ki,nij,lj->nkl", dct, thumbnails, dct).reshape(n, 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    hashes = np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel()
    return np.where(thumbnails.reshape(n, -1).std(axis=1) < FLAT, 0, hashes)


def thumbnail(image):
    """The grey 32 x 32 image the perceptual hash reads: each pixel the mean of the pixels its
    area covers (Pillow's box filter, in part where it covers part), in floating point. Pillow
    runs it without the GIL and without a BLAS, whose threads, started for each of thousands of
    small products, would cost more than the products."""
    grey = Image.fromarray(np.ascontiguousarray(image)).convert("F")  # ITU-R 601's weights
    return np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.BOX), dtype=np.float32)


def dct_rows(side, k):
    """The first k rows of the (unnormalised) DCT-II of length `side`."""
    x = np.arange(side)
    return np.cos(np.pi * (2 * x + 1) * np.arange(k)[:, None] / (2 * side)).astype(np.float32)


def fingerprints_path(pixels_path):
    return Path(pixels_path).with_suffix(f".v{FINGERPRINT_VERSION}.hashes")


def hash_files(index_path):
    """Every fingerprints file of the cache whose index is at `index_path`, of any version."""
    return index_path.parent.glob(glob.escape(index_path.stem) + ".v*.hashes")


# ----------------------------------------------------------------------------- the cache


@dataclass
class ImageCache:
    """A folder's preprocessed images: rows of a uint8 (n, size, size, 3) file on disk."""

    pixels_path: str
    files: list  # row i holds files[i] (relative to the folder)
    size: int
    skipped: dict  # file -> why it could not be read
    folder: Path | None = None  # where the files are

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

    def fingerprints(self):
        """Each row's FINGERPRINT, as kept beside the pixels; a cache made before they were kept
        (or by another version of them) has them computed from its pixels now, and kept."""
        path = fingerprints_path(self.pixels_path)
        try:
            if os.path.getsize(path) == len(self.files) * FINGERPRINT.itemsize:
                return np.fromfile(path, FINGERPRINT)
        except OSError:
            pass
        prints = fingerprints(self.open())
        try:
            with atomic_file(path) as f:
                f.write(prints.tobytes())
            for other in hash_files(Path(self.pixels_path).with_suffix(".json")):
                if other != path:
                    other.unlink(missing_ok=True)
        except OSError:  # a cache folder that cannot be written: computed again next time
            pass
        return prints


@dataclass
class MemoryCache:
    """Preprocessed images kept in memory, for a few images predicted once: an ImageCache
    without its file."""

    pixels: np.ndarray  # (n, size, size, 3) uint8
    skipped: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.pixels)

    def open(self):
        return self.pixels

    def fingerprints(self):
        return fingerprints(self.pixels)


def cache_key(stats, size, resize="crop"):
    """Changes whenever a file is added, removed or changed (`stats`: each file's file_stat, in
    order), or the preprocessing changes."""
    h = hashlib.sha256(f"v{PREPROCESS_VERSION} size={size} resize={resize}\n".encode())
    for f, stat in stats.items():
        h.update(("\0".join(map(str, [f, *stat])) + "\n").encode())
    return h.hexdigest()[:16]


def build_cache(folder, files, size, cache_dir, threads=0, resize="crop"):
    """Preprocess `files` (paths relative to `folder`) once, to `size` by `resize` (load_image),
    and keep them in cache_dir: each size and resize mode a cache of its own.

    Reuses the cache when nothing changed. Unreadable images are skipped with a warning naming
    them. The pixels and then the index are written under temporary names and moved into place,
    so an interrupted build leaves no cache that looks complete. Two processes needing the same
    cache at once (two runs on one dataset) take turns: one builds it, the other waits and reads
    it."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    stats, kind, index_path = _where(folder, files, size, cache_dir, resize)
    cache = _read_cache_index(index_path, size, folder)
    if cache is None:
        stem = index_path.stem
        with exclusive(cache_dir / f"{kind}.lock", f"the cache {stem}", wait=True):  # any version
            cache = _read_cache_index(index_path, size, folder)  # built meanwhile?
            if cache is None:
                cache = _write_cache(folder, stats, (size, resize), index_path, threads)
    for f, why in cache.skipped.items():
        warnings.warn(f"skipped unreadable image {folder / f}: {why}", stacklevel=2)
    return cache


def find_cache(folder, files, size, cache_dir, resize="crop"):
    """The cache build_cache would give, where it is built already, else None: nothing decoded."""
    folder = Path(folder)
    try:
        index_path = _where(folder, files, size, Path(cache_dir), resize)[2]
    except OSError:  # a file gone: no cache can hold it
        return None
    return _read_cache_index(index_path, size, folder)


def _where(folder, files, size, cache_dir, resize):
    """(the files' stats, the kind of cache, its index's path): what names the cache."""
    stats = {f: file_stat(folder / f) for f in files}  # the key's, and the index's: one look
    kind = f"{cache_prefix(folder)}{size}px-{resize}"
    return stats, kind, cache_dir / f"{kind}-{cache_key(stats, size, resize)}.json"


def _read_cache_index(index_path, size, folder):
    pixels_path = index_path.with_suffix(".u8")
    try:
        index = json.loads(index_path.read_text())
        row = size * size * 3
        if os.path.getsize(pixels_path) != len(index["files"]) * row:
            return None  # truncated or foreign: rebuild
        return ImageCache(str(pixels_path), index["files"], size, index["skipped"], folder)
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(folder, stats, preprocessing, index_path, threads):
    size, resize = preprocessing
    files, pixels_path = list(stats), index_path.with_suffix(".u8")
    kept, skipped, prints = [], {}, []
    bar = tqdm(
        total=len(files),
        desc=f"caching {folder}",
        unit="img",
        file=sys.stderr,
        disable=None,
        leave=False,
    )
    # Threads suffice: Pillow releases the GIL while it decodes and resizes, and while it makes a
    # chunk's thumbnails here, as the threads decode the next chunk: at most two chunks of
    # decoded images in memory, whatever the number of files.
    with bar, atomic_file(pixels_path) as out, ThreadPoolExecutor(max(threads, 1)) as pool:
        for chunk, decoded in _decoded_chunks(pool, folder, files, size, resize):
            images = []
            for f, (pixels, why) in zip(chunk, decoded):
                if pixels is None:
                    skipped[f] = why
                else:
                    out.write(pixels.tobytes())
                    kept.append(f)
                    images.append(pixels)
            if images:
                prints.append(fingerprints(np.stack(images)))
            bar.update(len(chunk))
    with atomic_file(fingerprints_path(pixels_path)) as f:  # before the index, as the pixels
        f.write(np.concatenate(prints or [np.empty(0, FINGERPRINT)]).tobytes())
    index = {"files": kept, "skipped": skipped, "size": size, "version": PREPROCESS_VERSION}
    index["stats"] = stats  # as the key saw them: a file changed meanwhile makes it stale
    with atomic_file(index_path, "w") as f:  # last: an index names only complete pixels
        json.dump(index, f)
    _remove_stale(folder, index_path, stats)
    return ImageCache(str(pixels_path), kept, size, skipped, folder)


def _decoded_chunks(pool, folder, files, size, resize, chunk=256):
    """(files, their (pixels, why unreadable) pairs), a chunk of files at a time, decoded by the
    threads of `pool`; the next chunk is decoding while the caller takes one."""
    chunks = [files[start : start + chunk] for start in range(0, len(files), chunk)]

    def decode(names):
        n = len(names)
        return pool.map(_load_or_reason, [folder / f for f in names], [size] * n, [resize] * n)

    ahead = decode(chunks[0]) if chunks else None
    for i, names in enumerate(chunks):
        decoded = list(ahead)
        if i + 1 < len(chunks):
            ahead = decode(chunks[i + 1])
        yield names, decoded


def file_stat(path):
    """What says a file's bytes are the ones cached: its size and modification time, and its
    change time and inode, which no one sets by hand. A file replaced with the same size and
    modification time (cp -p, rsync -t and tar keep them) has a new change time (written in
    place) or a new inode (written beside it and renamed). All four come from the one stat the
    key needs anyway; a hash of the bytes would read the whole dataset at every start."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cache_prefix(folder):
    """What the names of a folder's caches begin with: its name and a hash of its full path, so
    that datasets sharing a --cache-dir keep apart."""
    where = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]
    return f"{Path(folder).name}-{where}-"


def _remove_stale(folder, index_path, known):
    """The caches of `folder` (at any size, of any file list) that nothing can want again: one of
    their files has changed or gone, or another preprocessing version made them. A changed
    dataset would otherwise leave a full copy of its pixels behind each time. `known`: the stats
    of the files just cached, not asked of the disk again."""
    for old in index_path.parent.glob(glob.escape(cache_prefix(folder)) + "*.json"):
        if old != index_path and _is_stale(folder, old, known):
            for path in (old, old.with_suffix(".u8"), *hash_files(old)):
                try:
                    path.unlink(missing_ok=True)
                except PermissionError:  # Windows: open in a run that still reads it; next time
                    pass


def _is_stale(folder, index_path, known):
    try:
        index = json.loads(index_path.read_text())
        built = index_path.stat().st_mtime_ns
    except (OSError, ValueError):
        return False  # being written, or not ours: left alone
    if index.get("version", 1) != PREPROCESS_VERSION:
        return True
    stats = index.get("stats")
    files = stats or [*index.get("files", []), *index.get("skipped", {})]
    for f in files:
        try:
            now = known.get(f) or file_stat(folder / f)
        except OSError:
            return True  # gone
        # An index written before files' stats were kept: a file changed after it was built.
        if (stats[f] != now) if stats else now[1] > built:
            return True
    return False


def default_cache_dir(data_dir):
    """<data>/.cache, or a folder in the user's cache when the data folder is read-only: said,
    once a process for each such folder (a home folder often has a quota, and a cache of
    20,000 images at 224 px is 3 GB)."""
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
    if fallback not in _SAID:
        _SAID.add(fallback)
        log(
            f"{data_dir} cannot be written: its preprocessed images are cached in {fallback} "
            "(--cache-dir puts them elsewhere)"
        )
    return fallback


_SAID = set()  # the fallback folders default_cache_dir has named in this process
