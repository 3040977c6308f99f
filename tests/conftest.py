"""What the tests share: tiny datasets written on the fly (a few coloured images per class, no
downloads), narrow models, the options of a run that takes a second or two on a CPU, and a stop
signal sent at a chosen moment of a run."""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

import data
import train
from narrow import narrow_get_model
from twophase import augment, inference, run_folder

REPO = Path(__file__).resolve().parents[1]

# One thread for each test process and each process a test starts: the suite runs in as many
# processes as the machine has cores (pytest-xdist, pytest.ini), and threads on top of them would
# only contend (on two cores, twice the time).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Property tests (test_properties.py) draw a few examples each, the same ones every run, and keep
# no database in the repository; HYPOTHESIS_PROFILE=long draws twenty times as many, anew each run.
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))  # its own files: not the repo's
settings.register_profile("suite", derandomize=True, database=None, deadline=None)
settings.register_profile("long", database=None, deadline=None)
settings.load_profile("long" if LONG else "suite")


def examples(n):
    """A property test's examples: n in the suite, twenty times n in the long profile."""
    return n * 20 if LONG else n


# Class i is a square of its own colour on a noisy background: learnable in a step or two.
COLOURS = [
    (220, 30, 30),
    (30, 200, 40),
    (40, 60, 220),
    (230, 220, 40),
    (200, 40, 210),
    (40, 210, 210),
]


def write_image(path, colour, size=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_dataset(root, classes=("cat", "dog", "eel"), per_class=6, val_per_class=2, test=5, seed=0):
    """root/train/<class>/*.png, root/val/<class>/*.png, root/test/*.png."""
    root = Path(root)
    k = 0
    for i, c in enumerate(classes):
        colour = COLOURS[i % len(COLOURS)]
        for j in range(per_class):
            write_image(root / "train" / c / f"{j:03d}.png", colour, seed=seed + k)
            k += 1
        for j in range(val_per_class):
            write_image(root / "val" / c / f"v{j:03d}.jpg", colour, seed=seed + k)
            k += 1
    for j in range(test):
        write_image(root / "test" / f"img_{j:02d}.png", COLOURS[j % len(classes)], seed=seed + k)
        k += 1
    return root


def load_splits(root, size, cache_dir=None, threads=0, val_fraction=0.1, seed=0):
    """train/ and val/ of a dataset root, cached as train.py caches them (without val/: a
    stratified split of train/)."""
    return data.cache_splits(
        data.find_dataset(root),
        size,
        cache_dir=cache_dir,
        threads=threads,
        val_fraction=val_fraction,
        seed=seed,
    )


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


@pytest.fixture(autouse=True)
def away_from_the_repository(tmp_path_factory, monkeypatch):
    """Every test runs in a folder of its own: none reads or writes the repository's own
    checkpoints/, data/ or figures/ (the README's demo may have filled them)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """The demo dataset (python train.py --demo's), written once a test process: seconds each."""
    return data.write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")


def copy_of(demo_images, root):
    """root/demo, a copy of the demo dataset for a run to build its cache in."""
    return shutil.copytree(demo_images, Path(root) / "demo")


# Options for a run that takes a second or two on a CPU (with narrow_models: well under).
TINY = (
    "--arch resnet18 --weights none --img-size 16 --batch-size 4 --cache-workers 0 --device cpu "
    "--warmup-epochs 1 --cosine-epochs 3"
).split()


@contextlib.contextmanager
def narrowed():
    """resnet18 and resnet34 built narrow for the block: a module fixture's own runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torchvision.models, "get_model", narrow_get_model(torchvision.models.get_model)
        )
        yield patch


def tiny_run(root, *options, **dataset):
    """A tiny run trained narrow, for a module's fixture: the dataset at root/data (make_dataset's
    `dataset` options), the run in root/ck with TINY and `options`; returns root."""
    data = make_dataset(Path(root) / "data", **dataset)
    with narrowed():
        train.main(["--data", str(data), "--out", str(Path(root) / "ck"), *TINY, *options])
    return Path(root)


@pytest.fixture
def narrow_models(monkeypatch):
    """resnet18 and resnet34 built narrow (tests/narrow.py) in this process."""
    monkeypatch.setattr(
        torchvision.models, "get_model", narrow_get_model(torchvision.models.get_model)
    )


@pytest.fixture
def tiny_args(dataset, tmp_path, narrow_models):
    return ["--data", str(dataset), "--out", str(tmp_path / "ck")] + TINY


# Every random op of the augmentation off: runs that must match exactly in other ways.
NO_AUGMENT = (
    "--degrees 0 --translate 0 --scale 1 1 --shear 0 "
    "--p-jitter 0 --p-blur 0 --p-hflip 0 --p-vflip 0"
).split()


class Killed(BaseException):
    """kill -9, in this process: nothing runs after it, but for the folder lock's release."""


def stop_at(monkeypatch, moment, number=signal.SIGTERM, times=1):
    """SIGTERM (or signal `number`, `times` times) to this process as the n-th training batch is
    augmented (step=n), the n-th validation pass starts (validation=n) or the n-th checkpoint
    write runs (save=n); or death right after the n-th checkpoint write (kill=n)."""
    what, n = moment.split("=")
    owner, name = {
        "step": (augment.DeviceAugment, "forward"),
        "validation": (inference, "predict_logits"),
        "save": (run_folder, "save_checkpoints"),
        "kill": (run_folder, "save_checkpoints"),
    }[what]
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n) and what != "kill":
            for _ in range(times):
                os.kill(os.getpid(), number)
        result = real(*args, **kwargs)
        if calls[0] == int(n) and what == "kill":
            raise Killed
        return result

    monkeypatch.setattr(owner, name, wrapper)


class Forked:
    """fn(*args) in a process forked from this one: a second run beside the test's, as another
    `python train.py` would be, without a fresh interpreter importing torch (seconds each). With
    stderr=True its standard error can be read line by line from `.stderr`; else it is dropped.
    wait() returns its exit status as subprocess's returncode does (-9 when SIGKILLed)."""

    def __init__(self, fn, *args, stderr=False):
        read, write = os.pipe() if stderr else (None, os.open(os.devnull, os.O_WRONLY))
        self.pid = os.fork()
        if self.pid == 0:
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = 1
            try:
                fn(*args)
                code = 0
            except SystemExit as stop:  # as Python ends on it: a message is printed, status 1
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if code and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)  # never back into pytest
        os.close(write)
        self.stderr = os.fdopen(read) if stderr else None

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)

    def wait(self):
        code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        if self.stderr is not None:
            self.stderr.close()
        return code
