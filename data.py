"""Files -> tensors: class discovery, the uint8 preprocessing cache, loaders, device augmentation.

Data flows one way:

    files --(decode, EXIF, RGB, square crop, resize: deterministic)--> uint8 NxSxSx3 cache on disk
          --(DataLoader: memmap rows -> uint8 batch, pinned)--> device
          --(per-sample random augmentation of the whole batch, on the device)--> float, normalised

The deterministic half runs once per folder and is kept on disk, so no epoch after the first
decodes an image. The random half runs batched on the training device.
"""
import hashlib
import json
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when load_image changes what it writes: every cache built before is then rebuilt.
PREPROCESS_VERSION = 1
# Only formats Pillow can open: it registers some (.pdf, .eps) that it can only write.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


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
        raise SystemExit(f"{train_dir} holds no class folders (expected {train_dir}/<class>/<image>)")
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
        images = sorted(f"{d.name}/{p.name}" for p in d.iterdir() if p.is_file() and is_image_file(p))
        if not images:
            warnings.warn(f"class folder {d} holds no images")
        files += images
    return files


def list_images(folder):
    """Names of the images directly inside folder (a flat test/ folder), sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))


def labels_of(files, classes):
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[f.split("/", 1)[0]] for f in files], dtype=np.int64)


def stratified_split(labels, fraction, seed):
    """Indices (train, val): a `fraction` of each class, at least one image where a class has two."""
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
        img = to_rgb(ImageOps.exif_transpose(img))
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        # Crop first: resize(box=...) would blend in pixels from outside the square. PIL's
        # bilinear filter widens when it shrinks, i.e. the resize is antialiased.
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def to_rgb(img):
    """RGB of any mode Pillow opens. 16- and 32-bit greyscale is scaled to 8 bits first (convert
    would clip it to white); transparent modes keep their colours, as torchvision's loader does."""
    if img.mode.startswith("I"):
        pixels = np.asarray(img).astype(np.float64)
        scale = 255 / 65535 if pixels.max() > 255 else 1.0
        img = Image.fromarray((pixels * scale).round().clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # direct P -> RGB warns about the transparency it drops
    return img.convert("RGB")


def _load_or_reason(path, size):
    try:
        return load_image(path, size), None
    except Exception as e:  # any decoder failure: the caller names the file and goes on
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- the cache

@dataclass
class ImageCache:
    """A folder's preprocessed images: rows of a uint8 (n, size, size, 3) file on disk."""
    pixels_path: str
    files: list          # row i holds files[i] (relative to the folder)
    size: int
    skipped: dict        # file -> why it could not be read

    def __len__(self):
        return len(self.files)

    def open(self):
        if not self.files:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.memmap(self.pixels_path, dtype=np.uint8, mode="r",
                         shape=(len(self.files), self.size, self.size, 3))


@contextmanager
def atomic_file(path, mode="wb", **open_kwargs):
    """A temporary file beside `path`, open for writing, that becomes `path` (flushed and synced to
    disk) only when the block ends without an error: a crash never leaves a half-written file, and
    a failed write keeps what was there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_key(folder, files, size):
    """Changes whenever a file is added, removed or changed, or the preprocessing changes."""
    h = hashlib.sha256(f"v{PREPROCESS_VERSION} size={size}\n".encode())
    for f in files:
        st = os.stat(os.path.join(folder, f))
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_cache(folder, files, size, cache_dir, workers=0):
    """Preprocess `files` (paths relative to `folder`) once and keep them in cache_dir.

    Reuses the cache when nothing changed. Unreadable images are skipped with a warning naming
    them. The pixels and then the index are written under temporary names and moved into place,
    so an interrupted build leaves no cache that looks complete."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    key = cache_key(folder, files, size)
    # The folder's full path in the name: datasets sharing a --cache-dir never touch each other's files.
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    stem = f"{folder.name}-{where}-{size}px-{key}"
    index_path, pixels_path = cache_dir / f"{stem}.json", cache_dir / f"{stem}.u8"
    cache = _read_cache_index(index_path, pixels_path, size)
    if cache is None:
        cache = _write_cache(folder, files, size, index_path, pixels_path, workers)
    for f, why in cache.skipped.items():
        warnings.warn(f"skipped unreadable image {folder / f}: {why}")
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


def _write_cache(folder, files, size, index_path, pixels_path, workers):
    kept, skipped = [], {}
    bar = tqdm(total=len(files), desc=f"caching {folder}", unit="img", file=sys.stderr, disable=None, leave=False)
    # Threads suffice: Pillow releases the GIL while it decodes and resizes. Chunks keep at most
    # one chunk of decoded images in memory, whatever the number of files.
    with bar, atomic_file(pixels_path) as out, ThreadPoolExecutor(max(workers, 1)) as pool:
        for start in range(0, len(files), 256):
            chunk = files[start:start + 256]
            for f, (pixels, why) in zip(chunk, pool.map(_load_or_reason, [folder / f for f in chunk],
                                                        [size] * len(chunk))):
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
        self._pixels = None  # opened lazily, once per process (DataLoader workers)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, batch):
        if self._pixels is None:
            self._pixels = self.cache.open()
        rows = self.indices[np.asarray(batch)]
        return torch.from_numpy(self._pixels[rows]), torch.from_numpy(self.labels[rows])

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}


def make_loader(dataset, batch_size, shuffle, seed=0, pin_memory=False, drop_last=False, num_replicas=1, rank=0,
                workers=0):
    """A DataLoader of whole batches. With shuffle, the order depends only on (seed, epoch):
    call set_epoch(loader, e) before each epoch and a resumed run sees the same batches.
    workers: loader processes. Training, evaluation and prediction use none: a batch is one read
    of the cache, cheaper in the thread that prepares batches (on_device) than sent from another
    process; on an H100 that made WRN-50-2's Phase I 21-37 % faster end to end (BENCHMARKS.md)."""
    if shuffle:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    else:
        # Every num_replicas-th image from `rank` on: each image counted once, none padded in.
        sampler = range(rank, len(dataset), num_replicas)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=drop_last)
    # Its own generator: making an iterator would otherwise draw from the global RNG, and a resumed
    # run (a new iterator) would then see other random draws than one that never stopped.
    return torch.utils.data.DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


def set_epoch(loader, epoch):
    """Shuffle for `epoch`: the order is a function of (seed, epoch) alone."""
    loader.sampler.sampler.set_epoch(epoch)


@dataclass
class Splits:
    classes: list
    train: CachedImages
    val: CachedImages
    skipped: int  # unreadable images left out of train and val


def load_splits(data_dir, size, cache_dir=None, workers=0, val_fraction=0.1, seed=0):
    """train/ and val/ of a dataset root as cached datasets; no val/: a stratified split of train/."""
    data_dir = Path(data_dir)
    classes = find_classes(data_dir / "train")
    train_cache = cache_split(data_dir, "train", classes, size, cache_dir, workers)
    if len(train_cache) == 0:
        raise SystemExit(f"{data_dir / 'train'} holds no readable images")
    if (data_dir / "val").is_dir():
        val_cache = cache_split(data_dir, "val", classes, size, cache_dir, workers)
        train, val = labelled(train_cache, classes), labelled(val_cache, classes)
        skipped = len(train_cache.skipped) + len(val_cache.skipped)
    else:
        train, val = split_train(train_cache, classes, val_fraction, seed)
        skipped = len(train_cache.skipped)
    return Splits(classes, train, val, skipped)


def load_val(data_dir, classes, size, cache_dir=None, workers=0, val_fraction=0.1, seed=0):
    """The validation split exactly as training saw it."""
    data_dir = Path(data_dir)
    if (data_dir / "val").is_dir():
        return labelled(cache_split(data_dir, "val", classes, size, cache_dir, workers), classes)
    return split_train(cache_split(data_dir, "train", classes, size, cache_dir, workers), classes,
                       val_fraction, seed)[1]


def cache_split(data_dir, split, classes, size, cache_dir=None, workers=0):
    folder = Path(data_dir) / split
    return build_cache(folder, list_labelled_images(folder, classes), size,
                       cache_dir or default_cache_dir(data_dir), workers)


def labelled(cache, classes, indices=None):
    return CachedImages(cache, labels_of(cache.files, classes), indices)


def split_train(cache, classes, val_fraction, seed):
    """(train, val) from one folder: a stratified split fixed by (val_fraction, seed)."""
    labels = labels_of(cache.files, classes)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return CachedImages(cache, labels, train_idx), CachedImages(cache, labels, val_idx)


# ----------------------------------------------------------------------------- on the device

class DeviceAugment(torch.nn.Module):
    """The report's training augmentation on a whole float batch in [0, 1], on its device:

        RandomAffine(+-10 deg, +-10 % shift, 0.9-1.1 scale, +-10 deg x-shear, zero fill), always;
        ColorJitter(brightness, contrast, saturation 0.25, hue 0.1), p 0.5;
        GaussianBlur(3x3, sigma 0.1-2.0), p 0.5; horizontal flip, p 0.3; vertical flip, p 0.3.

    Every image draws its own parameters, from the distributions of torchvision's transforms (the
    shift too is rounded to whole pixels, as RandomAffine does). Each op is torchvision's (tests
    compare them), written for whole batches. What it costs the device is kept small:
    - the parameters are drawn on the host, from this module's own generator (`reseed` it), and
      reach the device in a few small copies that never make the host wait for the device;
    - the flips are folded into the affine's sampling grid: they commute with the colour ops and
      with the symmetric blur, so flipping first gives the same images, at no cost;
    - jitter and blur run on the chosen samples only. The host knows which those are, so picking
      them out needs no device-to-host round trip.
    The order of the four colour operations is drawn once per batch, as kornia does; every image
    still draws its own factors and coin."""

    def __init__(self, degrees=10.0, translate=0.1, scale=(0.9, 1.1), shear=10.0, jitter=0.25, hue=0.1,
                 p_jitter=0.5, blur_sigma=(0.1, 2.0), p_blur=0.5, p_hflip=0.3, p_vflip=0.3, seed=0):
        super().__init__()
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, tuple(scale), shear
        self.jitter, self.hue, self.p_jitter = jitter, hue, p_jitter
        self.blur_sigma, self.p_blur = tuple(blur_sigma), p_blur
        self.p_hflip, self.p_vflip = p_hflip, p_vflip
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, *parts):
        """Start the parameter draws anew from integers: training reseeds each epoch from (seed,
        epoch, rank), so a resumed run draws what an uninterrupted one would have."""
        words = np.random.SeedSequence([part & (2**64 - 1) for part in parts]).generate_state(1, np.uint64)
        self.generator.manual_seed(int(words[0]))

    def sample(self, n):
        """The random parameters of n images, as host tensors."""
        g = self.generator

        def uniform(low, high):
            return torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=g)

        def coin(p):
            return torch.rand(n, dtype=torch.float64, generator=g) < p

        j = self.jitter
        return {
            "angle": uniform(-self.degrees, self.degrees), "shear": uniform(-self.shear, self.shear),
            "scale": uniform(*self.scale), "tx": uniform(-self.translate, self.translate),
            "ty": uniform(-self.translate, self.translate),
            "jitter": coin(self.p_jitter), "brightness": uniform(1 - j, 1 + j), "contrast": uniform(1 - j, 1 + j),
            "saturation": uniform(1 - j, 1 + j), "hue": uniform(-self.hue, self.hue),
            "color_order": torch.randperm(4, generator=g).tolist(),
            "blur": coin(self.p_blur), "sigma": uniform(*self.blur_sigma),
            "hflip": coin(self.p_hflip), "vflip": coin(self.p_vflip),
        }

    @torch.no_grad()
    def forward(self, x, params=None):
        p = self.sample(x.shape[0]) if params is None else params
        h, w = x.shape[-2:]
        tx, ty = torch.round(p["tx"] * w) / w, torch.round(p["ty"] * h) / h  # whole pixels, as RandomAffine's
        jittered, blurred = p["jitter"].nonzero().squeeze(1), p["blur"].nonzero().squeeze(1)
        factors = torch.stack([p[k][jittered] for k in ("brightness", "contrast", "saturation", "hue")], 1)
        theta, factors, kernels, jittered, blurred = host_to_device(
            [affine_theta(p["angle"], tx, ty, p["scale"], p["shear"], p["hflip"], p["vflip"]),
             factors.float(), blur_kernels(p["sigma"][blurred]), jittered, blurred], x.device)
        x = affine(x, theta)
        if len(jittered):
            colours = color_jitter(x.index_select(0, jittered), *factors.unbind(1), p["color_order"])
            x.index_copy_(0, jittered, colours)
        if len(blurred):
            x.index_copy_(0, blurred, gaussian_blur3(x.index_select(0, blurred), kernels))
        return x


def host_to_device(tensors, device):
    """Host tensors on `device`, copied from pinned memory so that the host does not wait."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def affine_theta(angle, tx, ty, scale, shear, hflip=None, vflip=None):
    """affine_grid's output-to-input matrices (N x 2 x 3, float32) of torchvision's affine about the
    centre of square images, per sample: angle and shear (x only) in degrees, tx and ty as
    fractions of the side. A flip after the affine is its grid mirrored: a column of theta negated."""
    rot, sx = torch.deg2rad(angle.double()), torch.deg2rad(shear.double())
    # torchvision's _get_inverse_affine_matrix with no y-shear.
    a, c = torch.cos(rot), torch.sin(rot)
    b = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    inv = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / scale.double().view(-1, 1, 1)
    shift = torch.stack([tx, ty], 1).double() * 2  # in grid units, where the side is 2
    theta = torch.cat([inv, -(inv @ shift.unsqueeze(2))], dim=2)
    for column, flip in enumerate((hflip, vflip)):
        if flip is not None:
            theta[:, :, column] *= 1 - 2 * flip.double().view(-1, 1)
    return theta.float()


def affine(x, theta):
    """Bilinear resampling with zero fill on the grids of `theta` (see affine_theta)."""
    grid = affine_grid(theta, *x.shape[2:])
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_grid(theta, h, w):
    """F.affine_grid(theta, (n, c, h, w), align_corners=False), written as the outer sum it is:
    coordinate i of output pixel (y, x) is theta[i, 0] x + theta[i, 1] y + theta[i, 2]. The library
    version multiplies a materialised n x h x w x 3 grid of pixel centres by theta, several times
    the memory traffic and, on the CPU, twelve times the time."""
    centres = [torch.arange(size, dtype=theta.dtype, device=theta.device).mul_(2 / size).add_(1 / size - 1)
               for size in (w, h)]  # pixel centres in [-1, 1]
    xs, ys = centres[0].view(1, 1, w), centres[1].view(1, h, 1)
    grid = torch.empty(len(theta), h, w, 2, dtype=theta.dtype, device=theta.device)
    t = theta.view(-1, 2, 3, 1, 1)
    for i in range(2):
        torch.addcmul(torch.addcmul(t[:, i, 2], t[:, i, 1], ys), t[:, i, 0], xs, out=grid[..., i])
    return grid


def grayscale(x):
    r, g, b = x.unbind(1)
    return torch.add(r * 0.2989, g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def blend(x, other, factor):
    """torchvision's _blend: factor * x + (1 - factor) * other, clamped to [0, 1]; per sample."""
    factor = factor.view(-1, 1, 1, 1)
    return torch.addcmul((1 - factor) * other, factor, x).clamp_(0, 1)


def adjust_hue(x, shift):
    """torchvision's adjust_hue: rotate the HSV hue by `shift` (a fraction of the circle)."""
    minc, maxc = torch.aminmax(x, dim=1)
    chroma = maxc - minc
    divisor = torch.where(chroma == 0, 1.0, chroma)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / divisor.unsqueeze(1)).unbind(1)
    r, g, _ = x.unbind(1)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.add(shift.view(-1, 1, 1), h, alpha=1 / 6).remainder_(1.0)
    # Back to RGB with V = max and V*S = chroma: channel n gets V - chroma*clamp(min(k, 4-k), 0, 1)
    # with k = (5, 3, 1)[n] + 6h mod 6. (arange, not a tensor from a list: that copy would wait.)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)
    k = torch.add(offsets, h.unsqueeze(1), alpha=6).remainder_(6.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(x, brightness, contrast, saturation, hue, order=(0, 1, 2, 3)):
    """torchvision's ColorJitter with given factors, one per sample, its four ops in `order`."""
    for op in order:
        if op == 0:
            x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
        elif op == 1:
            x = blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
        elif op == 2:
            x = blend(x, grayscale(x), saturation)
        else:
            x = adjust_hue(x, hue)
    return x


def blur_kernels(sigma):
    """torchvision's 3-tap Gaussian kernels, one row per sigma: [e, 1, e] / (1 + 2e), e = exp(-1/2sigma^2)."""
    e = torch.exp(-0.5 / sigma.double() ** 2)
    return (torch.stack([e, torch.ones_like(e), e], 1) / (1 + 2 * e).unsqueeze(1)).float()


def gaussian_blur3(x, kernels):
    """torchvision's 3x3 Gaussian blur (reflected borders), one kernel per sample (see blur_kernels):
    one depthwise convolution of the whole batch, each image and channel its own group."""
    n, c, h, w = x.shape
    weight = (kernels[:, :, None] * kernels[:, None, :]).repeat_interleave(c, 0).unsqueeze(1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv2d(padded.reshape(1, n * c, h + 2, w + 2), weight, groups=n * c).view(n, c, h, w)


def on_device(loader, preprocess, device, background=None, ahead=2):
    """(inputs, labels) batches of a loader of uint8 batches, preprocessed on the device.

    With `background` (the default on CUDA) a thread loads, copies and preprocesses batches ahead,
    keeping up to `ahead` of them ready, on CUDA in a stream of its own. The training thread then
    only queues model steps: the pipeline's host work overlaps them (PyTorch ops release the GIL),
    and so does its device work where the model leaves the GPU room (BENCHMARKS.md measures it).
    Batches keep the loader's order; an error in the thread is raised here. On the CPU, where the
    model keeps every core busy, a second thread was no faster beyond noise and at worst 17 %
    slower (BENCHMARKS.md): each batch is prepared when it is due.
    Iterate it inside `with contextlib.closing(...)`: the thread then stops as soon as the loop
    does, even when an error ends it."""
    def prepare(batch):
        images, labels = batch
        return preprocess(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)

    if background is None:
        background = device.type == "cuda"
    return _prepared_in_background(loader, prepare, device, ahead) if background else (prepare(b) for b in loader)


def _prepared_in_background(loader, prepare, device, ahead):
    batches = iter(loader)  # here, not in the thread: a DataLoader starts its worker processes now
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    stream = _side_stream(index) if cuda else None
    queue, stop = Queue(maxsize=ahead), threading.Event()

    def produce():
        try:
            if cuda:
                torch.cuda.set_device(index)  # the current device is per thread
            with torch.cuda.stream(stream) if cuda else nullcontext():
                for batch in batches:
                    x, y = prepare(batch)
                    if not _put(queue, (x, y, stream.record_event() if cuda else None), stop):
                        return
        except BaseException as error:  # noqa: B036 (handed to the consumer, which raises it)
            _put(queue, error, stop)
            return
        _put(queue, _DONE, stop)

    thread = threading.Thread(target=produce, name="on_device", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            x, y, ready = item
            if cuda:
                current = torch.cuda.current_stream(index)
                current.wait_event(ready)  # the device waits for the batch; the host does not
                x.record_stream(current)  # made on the side stream: not to be reused while this one uses it
                y.record_stream(current)
            yield x, y
    finally:
        stop.set()
        thread.join()


_DONE = object()
_SIDE_STREAMS = {}


def _side_stream(index):
    """One stream per device for the input pipeline, kept for the process: the caching allocator
    keeps freed memory per stream, so a new stream each epoch would strand the last one's."""
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _put(queue, item, stop):
    """Put item unless the consumer has stopped; False if it has."""
    while not stop.is_set():
        try:
            queue.put(item, timeout=0.05)
            return True
        except Full:
            continue
    return False


class BatchPreprocess(torch.nn.Module):
    """uint8 NxHxWx3 batch on the device -> (augmented) normalised float NCHW, channels_last, the
    layout the convolutions want: the normalisation writes it in the same pass."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None):
        super().__init__()
        std = torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / std, persistent=False)
        self.augment = augment

    @torch.no_grad()
    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if self.augment is not None:
            x = self.augment(x)
        out = torch.empty(x.shape, device=x.device, memory_format=torch.channels_last)
        return torch.addcmul(self.shift, x, self.scale, out=out)  # (x - mean) / std


# ----------------------------------------------------------------------------- the demo dataset

def write_demo_dataset(root, size=32, seed=0):
    """scikit-learn's handwritten digits (8x8, 1,797 images, 10 classes) as a dataset root:
    train/ and val/ class folders of RGB PNGs, a flat test/ with opaque names, and the true
    test labels in answers.csv. Returns root. Does nothing if root already holds answers.csv."""
    root = Path(root)
    if (root / "answers.csv").is_file():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = n_test = len(order) * 15 // 100
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
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
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():  # a partial folder from an interrupted earlier write
        import shutil
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
