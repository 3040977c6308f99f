"""The method's loss: cross-entropy with label smoothing, each class weighed by --class-weights:
its inverse frequency in the training images (auto) or a CSV's weights; and a weighted step's
gradients divided as one batch of all its images would divide them."""

import torch
from torch import nn

from twophase.tables import read_class_weights


def loss_of(args, classes=None, counts=None):
    """Both phases' loss, validation's too: cross-entropy with label smoothing, each class
    weighed by --class-weights (`counts`: each class's training images, for auto)."""
    weight = class_weights(args.class_weights, classes, counts)
    return Loss(weight=weight, label_smoothing=args.label_smoothing)


class Loss(nn.CrossEntropyLoss):
    """PyTorch's cross-entropy, whose mean over a batch with class weights divides by the sum of
    the weights of the images' classes, not by their number. A batch split over processes or
    accumulated steps would divide each part by its own sum; `sums` gives the two sums, which the
    training step and validation add up over the whole batch and split before dividing."""

    def sums(self, logits, targets):
        """(the loss summed over the images, what its mean divides that by)."""
        total = nn.functional.cross_entropy(
            logits,
            targets,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        if self.weight is None or targets.is_floating_point():  # mixed targets: by the images
            return total, total.new_full((), float(len(targets)))  # a fill: no host sync
        return total, self.weight[targets].sum()


def check_class_weights(spec, classes):
    """A --class-weights FILE read and checked against the classes (a Problem naming each bad
    row), as a run starts: before it writes anything."""
    if spec not in (None, "none", "auto"):
        read_class_weights(spec, classes)


def class_weights(spec, classes, counts):
    """--class-weights as a tensor of one weight a class, or None: "auto", each class's inverse
    frequency among the training images, scaled so that the weights' mean is 1 (a class with no
    training image gets 0); a CSV of class,weight rows (tables.read_class_weights)."""
    if spec in (None, "none"):
        return None
    if spec == "auto":
        counts = torch.as_tensor(counts, dtype=torch.float64)
        inverse = torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0)
        return (inverse / inverse[counts > 0].mean()).float()
    return torch.tensor(read_class_weights(spec, classes), dtype=torch.float32)


def divide_by_weights(params, images, weights):
    """A step with class weights, as one batch of all its images would take it: each batch's
    backward divided its weighted loss by its images, where PyTorch's weighted mean divides by
    the sum of their classes' weights; here the gradients take images / weights, summed over
    every batch of the step (--accum-steps) and every process (DDP). No host sync."""
    totals = torch.stack([torch.full_like(weights, float(images)), weights])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, totals[0] / totals[1])
