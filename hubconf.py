"""PyTorch Hub's entry point (torch.hub.load): a checkpoint this repository trained, as a classifier
in your own code, from any folder, with nothing installed and nothing put on sys.path by hand.

    import torch
    classifier = torch.hub.load("path/to/this/repo", "classifier", "checkpoints/best.pt",
                                source="local")
    names, probs = classifier.predict(["cat.jpg", "dog.png"])   # paths or PIL images

(`torch.hub.load("owner/repo", "classifier", ...)` once the repository is on GitHub.)
"""

from pathlib import Path

dependencies = ["torch", "torchvision", "numpy", "PIL"]

REPO = Path(__file__).resolve().parent


def classifier(checkpoint="checkpoints/best.pt", device="auto", use="auto", tta=None, amp=None):
    """The checkpoint at `checkpoint` as a twophase.inference.Classifier: its network in eval mode
    on `device` (auto: CUDA where there is one), the preprocessing it was trained with, its class
    names; `classifier.predict(images)` gives each image's likeliest class and every class's
    probability. A relative path is looked up here, then in this repository (its checkpoints/).
    `use` ("ema" or "weights"), `tta` and `amp` as predict.py's --use, --tta and --amp."""
    from twophase.inference import load_classifier  # noqa: PLC0415 (torch.hub puts us on the path)

    path = Path(checkpoint)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path
    return load_classifier(path, device=device, use=use, tta=tta, amp=amp)
