"""What the tests share: tiny datasets written on the fly (a few coloured images per class, no
downloads), narrow models, and the options of a run that takes a second or two on a CPU."""

from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from narrow import narrow_get_model

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


# Options for a run that takes a second or two on a CPU (with narrow_models: well under).
TINY = (
    "--arch resnet18 --weights none --img-size 16 --batch-size 4 --cache-workers 0 --device cpu "
    "--warmup-epochs 1 --cosine-epochs 3"
).split()


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
