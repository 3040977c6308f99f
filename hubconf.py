"""PyTorch Hub's entry point (torch.hub.load): a checkpoint this repository trained, as a classifier
in your own code, from any folder, with nothing installed and nothing put on sys.path by hand.

    import torch
    classifier = torch.hub.load("path/to/this/repo", "classifier", "checkpoints/best.pt",
                                source="local")
    names, probs = classifier.predict(["cat.jpg", "dog.png"])   # a list: a name and a row each
    name, prob = classifier.predict("cat.jpg")                 # one path or PIL image: its own

(`torch.hub.load("owner/repo", "classifier", ...)` once the repository is on GitHub.)
"""

import sys
from contextlib import contextmanager
from pathlib import Path

dependencies = ["torch", "torchvision", "numpy", "PIL", "tqdm", "filelock"]  # what loading imports

REPO = Path(__file__).resolve().parent
TOP = tuple(p.stem for p in REPO.glob("*.py") if p.stem != "hubconf")  # the top-level modules


@contextmanager
def own_modules():
    """This repository's top-level modules while the classifier loads, the caller's put back
    after: a notebook's own model.py or utils.py (common names) neither hides ours nor is
    hidden by them afterwards (the package keeps its references to ours)."""
    callers = {name: sys.modules.pop(name) for name in TOP if name in sys.modules}
    try:
        yield
    finally:
        for name in TOP:
            sys.modules.pop(name, None)
        sys.modules.update(callers)


def classifier(checkpoint="checkpoints/best.pt", device="auto", use="auto", tta=None, amp=None):
    """The checkpoint at `checkpoint` as a twophase.inference.Classifier: its network in eval mode
    on `device` (auto: CUDA where there is one), the preprocessing it was trained with, its class
    names; `classifier.predict(images)` gives each image's likeliest class and every class's
    probability. A relative path is looked up where your code runs, then in this repository, and
    a bare name (best.pt) then in this repository's checkpoints/ too (checkpoint_places).
    `use` ("ema" or "weights"), `tta` and `amp` as predict.py's --use, --tta and --amp."""
    with own_modules():
        sys.path.insert(0, str(REPO))  # torch.hub puts it there as it loads this file; not later
        try:
            from twophase.checkpoint import CHECKPOINT_DIR  # noqa: PLC0415
            from twophase.inference import load_classifier  # noqa: PLC0415
            from utils import MissingFile  # noqa: PLC0415

            places = checkpoint_places(checkpoint, REPO / CHECKPOINT_DIR)
            path = next((p for p in places if p.is_file()), None)
            if path is None:
                raise MissingFile(
                    f"no checkpoint {checkpoint}: looked in " + ", ".join(map(str, places))
                )
            return load_classifier(path, device=device, use=use, tta=tta, amp=amp)
        finally:
            sys.path.remove(str(REPO))


def checkpoint_places(checkpoint, checkpoints):
    """Where a checkpoint's path is looked for, in order: as given (relative to the working
    folder), in this repository, and for a bare name in `checkpoints` (this repository's
    checkpoints/, where train.py writes them). An absolute path is itself alone."""
    path = Path(checkpoint)
    if path.is_absolute():
        return [path]
    places = [Path.cwd() / path, REPO / path]
    if len(path.parts) == 1:
        places.append(checkpoints / path)
    return places
