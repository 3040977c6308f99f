"""PyTorch Hub's entry point (torch.hub.load): a checkpoint this repository trained, as a classifier
in your own code, from any folder, with nothing installed and nothing put on sys.path by hand.

    import torch
    classifier = torch.hub.load("path/to/this/repo", "classifier", "checkpoints/best.pt",
                                source="local")
    names, probs = classifier.predict(["cat.jpg", "dog.png"])   # paths or PIL images

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
    probability. A relative path is looked up here, then in this repository (its checkpoints/).
    `use` ("ema" or "weights"), `tta` and `amp` as predict.py's --use, --tta and --amp."""
    path = Path(checkpoint)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path
    with own_modules():
        sys.path.insert(0, str(REPO))  # torch.hub puts it there as it loads this file; not later
        try:
            from twophase.inference import load_classifier  # noqa: PLC0415

            return load_classifier(path, device=device, use=use, tta=tta, amp=amp)
        finally:
            sys.path.remove(str(REPO))
