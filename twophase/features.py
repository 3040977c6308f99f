"""Phase I from cached features (--phase1-features N), as LP-FT's linear probe trains: the frozen
backbone's pooled features of N passes over the training images, computed once on the device and
kept there, and the head alone trained on them. The backbone's weights do not change in Phase I,
so its forward on an epoch's augmented batches is the same function in every epoch: with N equal
to --epochs1 the head learns what Phase I would have taught it (tests/test_features.py).

Pass p is the draws of Phase I's epoch p (its order, its augmentation, batch norm as Phase I has
it), computed as that epoch begins; epoch e trains on pass e mod N. Nothing of it is saved: a
resumed run computes the passes it needs again, from the seed."""

from contextlib import closing

import numpy as np
import torch

from model import train_mode
from twophase.budget import synchronized
from twophase.run import distributed
from utils import Problem, gather_from_processes, log

FEATURE_BYTES = 4  # float32: what an fp16 or bf16 autocast computes, kept exactly
ORDER = 3  # a later epoch's order: a seed word of its own, beside the augmentation's and MixUp's


class FeatureStream:
    """Phase I's batches as the head takes them: (features, labels) of the backbone's passes,
    with the training stream's interface (draw, replay, batches, len), so that the one loop
    (train.optimizer_steps) trains the head on them as it trains a model on images.

    Phase I is the run's first phase: its epoch e is the run's e-th, the clock its draws are
    seeded by. Epoch e < N computes its own pass as it begins (batch norm in train mode updates
    its running statistics as that epoch would have) and trains on it in its order, as Phase I
    would; a later epoch trains on pass e mod N in an order of its own, drawn from (seed, epoch,
    process). A pass computed again, on a resumed run, leaves the statistics as they are: they
    have seen it. A pass is dropped after the last epoch that uses it."""

    def __init__(self, stream, model, passes, seed, procs):
        self.stream, self.model, self.passes = stream, model, passes
        self.seed, self.procs = seed, procs
        self.kept = {}  # pass number -> (features, labels), on the device
        self.phase, self.head = None, None
        self.epoch, self.side, self.first_batch, self.left = 0, None, 0, 0

    @classmethod
    def of(cls, args, stream, model, procs):
        """The run's cached Phase I with --phase1-features, else None: Phase I as the images
        come."""
        if not args.phase1_features:
            return None
        return cls(stream, model, args.phase1_features, args.seed, procs)

    def of_phase(self, phase, device):
        """Itself, for `phase` (Phase I: its epochs, autocast dtype and batch norm), with the head
        as the steps train it (under DDP with several processes); as Phase I begins, the memory
        its passes take is checked and said."""
        if self.phase is not phase:
            self.phase = phase
            self.head = distributed(self.model.fc, device, self.procs.world_size)
            kept = min(self.passes, phase.epochs)
            log(memory_line(self.images(), self.model.fc.in_features, kept, device, self.passes))
        return self

    # ------------------------------------------------------------------ the stream's interface

    def draw(self, epochs_trained, side, mix=None, first_batch=0):
        """Phase I's epoch `epochs_trained`, at `side` px, from its batch `first_batch` on."""
        if mix is not None:
            raise ValueError("MixUp and CutMix are Phase II's: Phase I's features are unmixed")
        self.epoch, self.side, self.first_batch = epochs_trained, side, first_batch
        self.stream.draw(epochs_trained, side, None, first_batch)
        self.left = len(self.stream)  # every epoch has as many batches: the sampler's

    def replay(self, sizes, mix=None):
        """Nothing to draw again: a pass is drawn whole, from its first batch."""

    @property
    def preprocess(self):
        return self.stream.preprocess

    def __len__(self):
        return self.left

    def batches(self, device):
        """The epoch's (features, labels) batches of --batch-size from its `first_batch`-th on;
        its pass computed first where it is not kept (a generator to close)."""
        epoch, size = self.epoch, self.stream.loader.sampler.batch_size
        number = epoch % self.passes
        if number not in self.kept:
            # A pass its own epoch computes as it begins; one computed again has been seen.
            adapt = number == epoch and self.first_batch == 0
            self.kept[number] = self.computed(number, device, adapt_statistics=adapt)
        features, labels = self.kept[number]
        order = None if number == epoch else self.order(epoch, len(labels), device)
        for start in range(self.first_batch * size, len(labels), size):
            picked = slice(start, start + size) if order is None else order[start : start + size]
            yield features[picked], labels[picked]
        if epoch + self.passes >= self.phase.epochs:
            del self.kept[number]  # no later epoch of the phase uses it

    # ------------------------------------------------------------------ the passes

    @torch.no_grad()
    def computed(self, number, device, adapt_statistics=True):
        """Pass `number`: the pooled features (the head's inputs) of Phase I's epoch `number`'s
        batches, as its steps would see them, and their labels."""
        statistics = None if adapt_statistics else [b.clone() for b in self.model.buffers()]
        self.stream.draw(number, self.side)
        train_mode(self.model, self.phase.freeze_bn)
        with closing(self.stream.batches(device)) as batches:
            features, labels = pooled_features(self.model, batches, self.phase.dtype)
        if statistics is not None:
            for buffer, saved in zip(self.model.buffers(), statistics, strict=True):
                buffer.copy_(saved)
        return features, labels

    def order(self, epoch, n, device):
        """A later epoch's order of a pass's `n` images, a function of (seed, epoch, process)."""
        words = [self.seed, epoch, self.procs.rank, ORDER]
        state = np.random.SeedSequence(words).generate_state(1, np.uint64)
        generator = torch.Generator().manual_seed(int(state[0]))
        return torch.randperm(n, generator=generator).to(device)

    def images(self):
        """The images of this process's pass: its share of an epoch's draws, in whole batches
        where the stream drops the last partial one."""
        batches = self.stream.loader.sampler
        images = len(batches.sampler)
        return images - images % batches.batch_size if batches.drop_last else images


def pooled_features(model, batches, dtype):
    """What `model`'s head takes (its input: the backbone's pooled features) for each batch, as
    float32, and the batches' labels, concatenated in their order."""
    features, labels = [], []

    def keep(head, inputs):
        features.append(inputs[0].float())

    hook = model.fc.register_forward_pre_hook(keep)
    try:
        for images, targets in batches:
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
                model(images)
            labels.append(targets)
    finally:
        hook.remove()
    if not labels:
        raise Problem("Phase I has no training batch to compute features of")
    return torch.cat(features), torch.cat(labels)


def memory_line(images, width, kept, device, passes):
    """The line that says the memory Phase I's passes take on `device` (images x feature width x
    passes x 4 bytes, and their labels), or a Problem where it would not fit in what is free
    there, a fifth kept spare, on any process: with the most passes that fit."""
    per_pass = images * (width * FEATURE_BYTES + 8)  # and an int64 label each
    free = free_memory(device)
    fit = kept if free is None else min(kept, int(0.8 * free // per_pass))
    fit = min(gather_from_processes(fit))  # every process agrees: one short refuses for all
    what = f"{kept} passes of {images:,} images x {width:,} features"
    what += " per process" if torch.distributed.is_initialized() else ""
    if fit < kept:
        way = f"--phase1-features {fit}, the most that fit, or 0" if fit else "--phase1-features 0"
        raise Problem(
            f"--phase1-features {passes}: {what} take {in_bytes(kept * per_pass)}, more than fits "
            f"in the memory free on {device} ({in_bytes(free)}, a fifth of it kept spare); give "
            f"{way} (Phase I on the images as they come)"
        )
    free_words = "" if free is None else f" of {in_bytes(free)} free"
    return (
        f"Phase I on the backbone's cached features (--phase1-features {passes}): {what}, "
        f"{in_bytes(kept * per_pass)} on {device}{free_words}; the head alone trains on them, "
        f"epoch e on pass e mod {passes}"
    )


def free_memory(device):
    """The bytes free for the passes on `device` (on CUDA the caching allocator's spare memory
    too), or None where it is not known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def in_bytes(n):
    """Bytes as a reader says them: 655.4 MB."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


def timed_pass(model, batches, phase):
    """The features of `batches` as a pass computes them with `model` (a copy: its batch norm
    statistics change), and the seconds a batch took after the first (which warms up): what
    --time-budget counts for each batch of each pass."""
    train_mode(model, phase.freeze_bn)
    device = batches[0][0].device
    times, features = [], []
    with torch.no_grad():
        for images, labels in batches:
            times.append(synchronized(device))
            features.append(pooled_features(model, [(images, labels)], phase.dtype))
        times.append(synchronized(device))
    timed = times[1:] if len(times) > 2 else times
    return features, (timed[-1] - timed[0]) / (len(timed) - 1)
