"""A trained checkpoint at work: the options and the load chain evaluate.py and predict.py share,
the one loop that turns batches into log-probabilities (training's validation uses it too), and
the counts every score is made of: top-k hits, the confusion matrix, its most confused pairs."""

import argparse
import math
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch

from augment import BatchPreprocess
from model import model_from_checkpoint
from prefetch import on_device
from utils import amp_dtype, load_checkpoint, pick_device


def add_inference_args(parser):
    """The options of every script that runs a checkpoint on images."""
    parser.add_argument(
        "--ckpt", default="best.pt", help="checkpoint; a bare name is looked up in checkpoints/"
    )
    parser.add_argument(
        "--data", default=None, help="dataset root (default: the one the checkpoint was trained on)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--cache-workers",
        "--workers",
        dest="cache_workers",
        type=int,
        default=4,
        help="threads that decode images into the preprocessing cache",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--amp",
        default=None,
        choices=["fp16", "bf16", "off"],
        help="mixed precision on CUDA (default: as in training)",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="side the images are resized to (default: the training run's); larger can be better "
        "(FixRes)",
    )
    parser.add_argument(
        "--use",
        default="auto",
        choices=["auto", "weights", "ema"],
        help="a checkpoint trained with --ema holds two sets of weights: auto takes the one that "
        "validated better",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the softmax over each image and its horizontal flip (beyond the report); "
        "default: as the checkpoint is marked (train.py --tta auto), else off",
    )
    return parser


@dataclass
class Trained:
    """A checkpoint ready to run: its saved dict, and the model, preprocessing and autocast dtype
    on the chosen device."""

    state: dict
    model: torch.nn.Module
    preprocess: BatchPreprocess
    device: torch.device
    dtype: torch.dtype | None
    img_size: int  # what the images are resized to: the training run's, or --img-size
    tta: bool  # whether each image's prediction averages in its horizontal flip

    @property
    def classes(self):
        return self.state["classes"]

    def log_probs(self, loader):
        return predict_log_probs(
            self.model, loader, self.preprocess, self.device, self.dtype, self.tta
        )


def load_trained(args, state=None):
    """The checkpoint --ckpt (or its `state`, already loaded) on --device, with the normalisation
    it was trained with, --amp (by default the training run's) and --tta (by default as the
    checkpoint is marked)."""
    state = state or load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    return Trained(
        state=state,
        model=model_from_checkpoint(state, device, args.use),
        preprocess=BatchPreprocess(state["mean"], state["std"]).to(device),
        device=device,
        dtype=amp_dtype(args.amp or state["args"].get("amp", "fp16"), device),
        img_size=args.img_size or state["img_size"],
        tta=state.get("tta", False) if getattr(args, "tta", None) is None else args.tta,
    )


@torch.no_grad()
def predict_log_probs(model, loader, preprocess, device, dtype, tta=False):
    """Yields (log-probabilities, labels) per batch, on the device. With tta the probabilities are
    the mean over each image and its horizontal flip."""
    model.eval()
    with closing(on_device(loader, preprocess, device)) as batches:
        for x, labels in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                log_p = model(x).float().log_softmax(dim=1)
                if tta:
                    flipped = model(x.flip(3)).float().log_softmax(dim=1)
                    log_p = torch.logsumexp(torch.stack([log_p, flipped]), dim=0) - math.log(2)
            yield log_p, labels


@torch.no_grad()
def update_bn(model, loader, preprocess, device):
    """torch.optim.swa_utils.update_bn on this project's batches: batch norm's running statistics
    reset, then a cumulative average over one pass of the loader (shuffled, not augmented)."""
    with closing(on_device(loader, preprocess, device)) as batches:
        torch.optim.swa_utils.update_bn(batches, model, device)


def count_correct(model, loader, preprocess, device, dtype, tta=False):
    """(images whose top class is their label, images) over a loader, in this process alone."""
    correct, seen = 0, 0
    for log_p, labels in predict_log_probs(model, loader, preprocess, device, dtype, tta):
        correct += topk_hits(log_p, labels)[0]
        seen += len(labels)
    return int(correct), seen


def topk_hits(scores, labels, k=5):
    """(images whose top class is the label, images with the label among the top k), as tensors
    on the scores' device: counts, not rates, so that sums over batches and processes are exact."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top[:, 0] == labels).sum(), (top == labels[:, None]).any(dim=1).sum()


def confusion_matrix(labels, preds, num_classes, normalize=True):
    """Counts[true, predicted]; normalised, each row with any images sums to one."""
    counts = np.bincount(
        np.asarray(labels) * num_classes + np.asarray(preds), minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    if not normalize:
        return counts
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def most_confused(counts, classes, top):
    """The largest off-diagonal cells: (true class, predicted class, count, share of the true
    class)."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    totals = counts.sum(axis=1)
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), len(classes))
        if off[t, p] == 0:
            break
        pairs.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "count": int(off[t, p]),
                "share": float(off[t, p] / totals[t]),
            }
        )
    return pairs


def print_confused(pairs):
    """The most confused pairs on standard output, one line each."""
    if pairs:
        print("most confused (true -> predicted: images, share of the true class):")
    for pair in pairs:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['share']:.1%})")
