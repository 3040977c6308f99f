"""A trained checkpoint at work: the options and the load chain evaluate.py and predict.py share,
a checkpoint as a classifier for your own code (load_classifier), the one loop that turns
batches into logits (training's validation uses it too), predictions of a test folder
or of a few files, the counts every score is made of (top-k hits, the confusion matrix, its most
confused pairs), Grad-CAM, and an average of checkpoints with its batch norm measured again."""

import argparse
import math
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from data import CachedImages, in_memory_images, list_images
from model import average_weights, build_model, model_from_checkpoint
from twophase.augment import BatchPreprocess
from twophase.checkpoint import load_checkpoint
from twophase.checks import MIN_SIDE, at_least, checked
from twophase.image_cache import build_cache, default_cache_dir, load_image, square, to_rgb
from twophase.loader import make_loader
from twophase.prefetch import on_device
from utils import MissingFile, Problem, amp_dtype, log, pick_device, sum_over_processes


def add_inference_args(parser):
    """The options of every script that runs a checkpoint on images."""
    parser.add_argument(
        "--ckpt", default="best.pt", help="checkpoint; a bare name is looked up in checkpoints/"
    )
    parser.add_argument(
        "--data", default=None, help="dataset root (default: the one the checkpoint was trained on)"
    )
    parser.add_argument("--batch-size", type=checked(int, at_least(1)), default=128)
    parser.add_argument(
        "--cache-workers",
        "--workers",
        dest="cache_workers",
        type=checked(int, at_least(0)),
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
        type=checked(int, at_least(MIN_SIDE, "the side must be {low} px or more")),
        default=None,
        help="side the images are resized to (default: the size the run chose to test at with "
        "--test-size auto, else its training size)",
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

    @property
    def resize(self):
        return self.state["args"].get("resize", "crop")

    def logits(self, loader):
        return predict_logits(
            self.model, loader, self.preprocess, self.device, self.dtype, self.tta
        )

    def probabilities(self, images, files, batch_size):
        """(file, its class probabilities as a numpy row) for each of `images` (a dataset of
        whole batches, in the order of `files`), batch by batch."""
        loader = make_loader(
            images, batch_size, shuffle=False, pin_memory=self.device.type == "cuda"
        )
        names = iter(files)
        for logits, _ in self.logits(loader):
            for row in logits.softmax(dim=1).cpu().numpy():
                yield next(names), row


def load_trained(args, state=None):
    """The checkpoint --ckpt (or its `state`, already loaded) on --device, with the normalisation
    it was trained with, --amp (by default the training run's) and --tta (by default as the
    checkpoint is marked)."""
    state = state or load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    side = test_side(args.img_size, state)
    return Trained(
        state=state,
        model=model_from_checkpoint(state, device, args.use, side),
        preprocess=BatchPreprocess(state["mean"], state["std"]).to(device),
        device=device,
        dtype=amp_dtype(args.amp or state["args"].get("amp", "fp16"), device),
        img_size=side,
        tta=state.get("tta", False) if getattr(args, "tta", None) is None else args.tta,
    )


class Classifier:
    """A checkpoint as a classifier for your own code: the network in eval mode on its device,
    the preprocessing it was trained with (its size, resize mode and normalisation), its class
    names and its test-time flip mark. docs/in-your-code.md shows it at work."""

    def __init__(self, trained):
        self.trained = trained
        self.model, self.device, self.classes = trained.model, trained.device, trained.classes

    def pixels(self, image):
        """A file's path or a PIL image as the uint8 square the model reads."""
        if isinstance(image, (str, Path)):
            return load_image(image, self.trained.img_size, self.trained.resize)
        if isinstance(image, Image.Image):
            return square(
                to_rgb(ImageOps.exif_transpose(image)), self.trained.img_size, self.trained.resize
            )
        raise TypeError(f"an image is {ACCEPTED}, not {type(image).__name__}")

    def predict(self, images, batch_size=64):
        """The likeliest class and every class's probability (in `classes`' order, summing to 1)
        of `images`: one image (a path, as str or Path, or a PIL image) gives (its class's name,
        a numpy row of len(classes)); a list or tuple of them gives (a list of names, an
        N x len(classes) numpy array), one name and row per image, in order."""
        if isinstance(images, IMAGE_TYPES):
            names, probs = self.predict([images], batch_size)
            return names[0], probs[0]
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"predict takes {ACCEPTED}, or a list of them; not {type(images).__name__}"
            )
        for n, image in enumerate(images):
            if not isinstance(image, IMAGE_TYPES):
                raise TypeError(
                    f"predict's images[{n}] is a {type(image).__name__}: each must be {ACCEPTED}"
                )
        if not images:
            return [], np.zeros((0, len(self.classes)), np.float32)
        batch = in_memory_images(
            np.stack([self.pixels(i) for i in images]), np.zeros(len(images), np.int64)
        )
        rows = [p for _, p in self.trained.probabilities(batch, range(len(images)), batch_size)]
        probs = np.stack(rows)
        return [self.classes[i] for i in probs.argmax(1)], probs


IMAGE_TYPES = (str, Path, Image.Image)  # what Classifier reads as an image
ACCEPTED = "a path (str or pathlib.Path) or a PIL image"


def load_classifier(path, device="auto", use="auto", tta=None, amp=None):
    """The checkpoint at `path` (a bare name such as best.pt is looked up in checkpoints/) as a
    Classifier on `device`; `use`, `tta` and `amp` as predict.py's options."""
    args = argparse.Namespace(ckpt=path, device=device, use=use, tta=tta, amp=amp, img_size=None)
    return Classifier(load_trained(args))


def test_side(asked, state):
    """The side a checkpoint's images are tested at: --img-size if given (said, where it is not
    the run's), else the size --test-size auto chose, else the training size."""
    chosen = state.get("test_size", state["img_size"])
    if asked and asked != chosen:
        log(
            f"--img-size {asked}: testing at {asked} px, where the run trained at "
            f"{state['img_size']} px"
            + (f" and chose {chosen} to test at" if chosen != state["img_size"] else "")
        )
    return asked or chosen


@torch.no_grad()
def predict_logits(model, loader, preprocess, device, dtype, tta=False):
    """Yields (logits in float32, labels) per batch, on the device. With tta the logits are the
    log of the mean of the probabilities of each image and of its horizontal flip (their softmax
    is that mean)."""
    model.eval()
    with closing(on_device(loader, preprocess, device)) as batches:
        for x, labels in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x).float()
                if tta:
                    both = torch.stack([logits, model(x.flip(3)).float()]).log_softmax(dim=2)
                    logits = torch.logsumexp(both, dim=0) - math.log(2)
            yield logits, labels


def grad_cam(model, layer, images, classes):
    """Grad-CAM (Selvaraju et al., 2017) of each image for its class in `classes`: the
    activations of `layer` (a ResNet's last residual stage) weighted by the spatial mean of the
    class score's gradient with respect to them, summed over channels, kept where positive,
    resized to the image bilinearly and scaled to [0, 1]: where the model looks for that class.
    Hand-written with a forward hook (a few lines, no package to install); in float32 and eval
    mode, whatever the model's training."""
    seen = {}
    hook = layer.register_forward_hook(lambda module, inputs, output: seen.update(a=output))
    try:
        with torch.enable_grad():
            logits = model.eval()(images)
            scores = logits.gather(1, classes.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(scores, seen["a"])
    finally:
        hook.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = (weights * seen["a"]).sum(dim=1, keepdim=True).relu()
    cam = torch.nn.functional.interpolate(
        cam, size=images.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)).detach()


STAGES = (("layer4", 32), ("layer3", 16), ("layer2", 8), ("layer1", 4))  # a ResNet's, strides


def cam_layer(side):
    """The deepest residual stage whose maps are 4 x 4 or more at `side` px, for Grad-CAM: layer4
    at 224 (7 x 7), layer3 at 64, layer2 at 32. A map of 1 x 1 says nothing of where."""
    return next((name for name, stride in STAGES if side // stride >= 4), "layer1")


def averaged_model(states, device, loader=None, preprocess=None):
    """The average of checkpoints' weights (model.average_weights) as a model on `device`, in
    eval mode, its batch norm statistics measured again on `loader` (shuffled training images,
    not augmented) unless it is None."""
    last = states[-1]
    model = build_model(last["arch"], len(last["classes"]), weights="none")
    model.load_state_dict(average_weights(states))
    model = model.to(device, memory_format=torch.channels_last)
    if loader is not None:
        update_bn(model, loader, preprocess, device)
    return model.eval()


def bn_loader(images, batch_size, seed, device):
    """The training images in shuffled batches, for measuring an average's batch norm statistics
    again; the last partial batch is left out where there are more images than a batch, so that
    none is a single image (batch norm cannot measure one at a small size)."""
    return make_loader(
        images,
        batch_size,
        shuffle=True,
        seed=seed,
        pin_memory=device.type == "cuda",
        drop_last=len(images) > batch_size,
    )


@torch.no_grad()
def update_bn(model, loader, preprocess, device):
    """torch.optim.swa_utils.update_bn on this project's batches: batch norm's running statistics
    reset, then a cumulative average over one pass of the loader (shuffled, not augmented)."""
    with closing(on_device(loader, preprocess, device)) as batches:
        torch.optim.swa_utils.update_bn(batches, model, device)


def validation_metrics(model, loader, preprocess, criterion, device, dtype, num_classes=None):
    """Loss (`criterion` on the logits, as training computes it), top-1, top-5 and balanced
    accuracy (the mean over the classes present of each one's share of its images called right)
    over the whole split (every process's share: give `num_classes` under DDP, where a process
    may have no image to tell it), from exact counts."""
    loss_sum = torch.zeros((), device=device)
    weight_sum = torch.zeros((), device=device)  # what the mean loss divides by
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    per_class = None  # (images called right, images) of each class
    seen = 0
    for logits, labels in predict_logits(model, loader, preprocess, device, dtype):
        if hasattr(criterion, "sums"):  # class weights: their sum, over the whole split
            total, weights = criterion.sums(logits, labels)
            loss_sum, weight_sum = loss_sum + total, weight_sum + weights
        else:
            loss_sum, weight_sum = loss_sum + criterion(logits, labels) * len(labels), None
        hits1, hits5 = topk_hits(logits, labels)
        top1 += hits1
        top5 += hits5
        counts = class_hits(logits, labels)
        per_class = counts if per_class is None else per_class + counts
        seen += len(labels)
    divisor = seen if weight_sum is None else weight_sum
    loss_sum, divisor, top1, top5, seen = sum_over_processes(loss_sum, divisor, top1, top5, seen)
    if seen == 0:
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_top5": 0.0, "val_balanced": 0.0}
    right, images = all_processes(per_class, num_classes, device)
    balanced = float((right[images > 0] / images[images > 0]).mean())
    return {
        "val_loss": loss_sum / divisor,
        "val_acc": top1 / seen,
        "val_top5": top5 / seen,
        "val_balanced": balanced,
    }


def class_hits(logits, labels):
    """(images of each class called right, images of each class), on the device; no host sync
    (bincount and boolean indexing would ask the device for sizes)."""
    counts = torch.zeros(2, logits.shape[1], dtype=torch.long, device=logits.device)
    counts[0].scatter_add_(0, labels, (logits.argmax(1) == labels).long())
    counts[1].scatter_add_(0, labels, torch.ones_like(labels))
    return counts


def all_processes(counts, num_classes, device):
    """class_hits' counts summed over every process (one with no image holds None), on the CPU."""
    if counts is None:
        counts = torch.zeros(2, num_classes or 0, dtype=torch.long, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return counts.cpu().double()


def count_correct(model, loader, preprocess, device, dtype, tta=False):
    """(images whose top class is their label, images) over a loader, in this process alone."""
    correct, seen = 0, 0
    for logits, labels in predict_logits(model, loader, preprocess, device, dtype, tta):
        correct += topk_hits(logits, labels)[0]
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


# ----------------------------------------------------------------------------- test folders and
# the submission format (image_name,pred_label), shared by predict.py and evaluate.py


def no_test_images(test_dir, subfolders):
    """Why a test folder gives no rows, and what to give instead: it is read flat, so images in
    folders inside it are not read (images in class folders are labelled ones: train/'s, val/'s)."""
    if not subfolders:
        return f"{test_dir} holds no images"
    if len(subfolders) == 1:
        inside = test_dir / subfolders[0]
        return (
            f"{test_dir} holds no images, only the folder {subfolders[0]}: a test folder is read "
            f"flat (<test>/<image>); for the images in it, give --test-dir {inside}"
        )
    shown = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
    return (
        f"{test_dir} holds no images, only the folders {shown}: a test folder is read flat "
        "(<test>/<image>), and images in folders of their own read as class folders (labelled "
        "images: train/ or val/); give --test-dir the folder that holds the images themselves"
    )


def test_images(test_dir, keep_ext=False):
    """The images of a flat test folder, sorted as a submission's rows are. Without `keep_ext`
    (rows named without the extension), names that two files share once it is dropped are
    refused: their rows would clash."""
    if not test_dir.is_dir():
        raise MissingFile(f"no test folder {test_dir} (use --test-dir or --data)")
    files = list_images(test_dir)
    subfolders = sorted(
        p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not files:
        raise Problem(no_test_images(test_dir, subfolders))
    if subfolders:
        log(
            f"warning: {test_dir} is read flat; its sub-folders are ignored: "
            f"{', '.join(subfolders[:5])}"
        )
    files.sort(key=lambda f: (Path(f).stem, f))  # the order of the CSV's image_name column
    refuse_clashing_rows(files, f"{test_dir}: these files", keep_ext)
    return files


def unique_files(paths):
    """The paths, each file once (in the order first given); one given again is said."""
    seen, kept = set(), []
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            log(f"{path} is given more than once: predicted once")
            continue
        seen.add(key)
        kept.append(path)
    return kept


def refuse_clashing_rows(files, what, keep_ext=False):
    """A Problem where two files would name one row of a submission (their names, or without
    `keep_ext` their names less the extension), naming them and the way on."""
    row = (lambda f: Path(f).name) if keep_ext else (lambda f: Path(f).stem)
    rows = Counter(map(row, files))
    clashes = sorted(str(f) for f in files if rows[row(f)] > 1)
    if clashes:
        shared = "a file name" if keep_ext else "a name once the extension is dropped"
        way = "" if keep_ext else " (--keep-ext names the rows with it)"
        raise Problem(
            f"{what} share {shared}, so their rows would clash: {', '.join(clashes[:10])}{way}"
        )


def predict_folder(trained, test_dir, files, cache_dir, threads, batch_size, skip_bad=False):
    """(file, class probabilities) of each readable image of a test folder, as a generator that
    predicts batch by batch, and how many images were unreadable (an error unless skip_bad).
    The images go through the checkpoint's preprocessing (its size and resize mode), cached."""
    cache_dir = cache_dir or default_cache_dir(test_dir.parent)
    cache = build_cache(test_dir, files, trained.img_size, cache_dir, threads, trained.resize)
    if cache.skipped and not skip_bad:
        raise Problem(
            f"{len(cache.skipped)} unreadable test image(s), nothing written: "
            + "; ".join(f"{test_dir / f} ({why})" for f, why in list(cache.skipped.items())[:10])
            + "\n(--skip-bad leaves them out of the CSV)"
        )
    return trained.probabilities(
        CachedImages(cache, np.zeros(len(cache), np.int64)), cache.files, batch_size
    ), len(cache.skipped)


def predict_images(trained, paths, batch_size, keep_ext=False):
    """(path, class probabilities) of each of a few image files, preprocessed in memory (no
    cache is written beside them), each once however often it is given. An unreadable one is an
    error naming it; so are two files whose rows would clash."""
    paths = unique_files(paths)
    refuse_clashing_rows(paths, "these images", keep_ext)
    pixels, problems = [], []
    for path in paths:
        try:
            pixels.append(load_image(path, trained.img_size, trained.resize))
        except Exception as e:  # any decoder failure
            problems.append(f"{path} ({type(e).__name__}: {e})")
    if problems:
        raise Problem("unreadable image(s), nothing written: " + "; ".join(problems))
    images = in_memory_images(np.stack(pixels), np.zeros(len(paths), np.int64))
    return trained.probabilities(images, [str(p) for p in paths], batch_size)
