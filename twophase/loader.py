"""The batches a run reads from a cache (data.py's CachedImages): whole batches, one read of the
cache each, in an order that is a function of (seed, epoch) alone, so that a resumed run and
every process see what an uninterrupted one-process run would; the balanced sampler; the training
stream, which draws each epoch's order and augmentation.
"""

import itertools
import math

import numpy as np
import torch

from twophase.augment import Augmentation, BatchPreprocess, DeviceAugment
from twophase.prefetch import on_device


def make_loader(
    dataset,
    batch_size,
    shuffle,
    seed=0,
    pin_memory=False,
    drop_last=False,
    balanced=False,
    shard=(0, 1),
):
    """A loader of whole batches, each one read of the cache, in the thread that iterates it (no
    loader processes: handing a batch over from one costs more than the read).
    With shuffle, the order depends only on (seed, epoch): call start_epoch(loader, e) before
    each epoch and a resumed run sees the same batches (start_epoch(loader, e, n) skips the first
    n of them unread). Under DDP each process gets its own `shard`: (its rank, the processes).
    `balanced`: each epoch draws as many images with replacement, every class equally likely
    (BalancedSampler)."""
    rank, num_replicas = shard
    if balanced:
        sampler = BalancedSampler(dataset.labels[dataset.indices], num_replicas, rank, seed)
    elif shuffle:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
    else:
        # Every num_replicas-th image from `rank` on: each image counted once, none padded in.
        sampler = range(rank, len(dataset), num_replicas)
    batches = EpochBatches(sampler, batch_size, drop_last=drop_last)
    # Its own generator: making an iterator would otherwise draw from the global RNG, and a resumed
    # run (a new iterator) would then see other random draws than one that never stopped.
    return torch.utils.data.DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


class BalancedSampler(torch.utils.data.Sampler):
    """An epoch of class-balanced draws: as many images as there are, drawn with replacement,
    each image with weight 1 / (its class's images), so that each class is drawn equally often
    (torch's WeightedRandomSampler's draws). The draws are a function of (seed, epoch) alone and
    the same on every process, which takes every num_replicas-th of them from its rank on: the
    processes together see the one-process epoch, and a resumed run the same batches (the API of
    DistributedSampler: set_epoch, and padded to a multiple of num_replicas)."""

    def __init__(self, labels, num_replicas=1, rank=0, seed=0):
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        counts = torch.bincount(labels).double()
        self.weights = 1 / counts[labels]
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(labels) / num_replicas)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        draws = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(draws[self.rank : total : self.num_replicas].tolist())

    def __len__(self):
        return self.num_samples


class EpochBatches(torch.utils.data.BatchSampler):
    """The batches of an epoch, from the `start`-th on."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def start_epoch(loader, epoch, first_batch=0):
    """Shuffle for `epoch` (the order is a function of (seed, epoch) alone), and begin at its
    `first_batch`-th batch: a run stopped mid-epoch goes on where it stopped."""
    loader.sampler.sampler.set_epoch(epoch)
    loader.sampler.start = first_batch


class TrainingStream:
    """The training images as the steps take them: a loader of this process's share (shuffled,
    or class-balanced), its preprocessing and augmentation on the device, and each epoch's draws
    (its order, its augmentation, its image size, MixUp's) seeded by (seed, epoch, process), so
    that a resumed run, and every process, draws what an uninterrupted one would. A run stopped
    mid-epoch draws again what its trained batches drew, then goes on."""

    def __init__(self, images, batch_size, preprocess, seed, balanced, procs, cuda):
        self.preprocess, self.seed, self.rank = preprocess, seed, procs.rank
        self.loader = make_loader(
            images,
            batch_size,
            shuffle=True,
            seed=seed,
            pin_memory=cuda,
            # Dropping the last partial batch keeps batch norm from ever seeing a batch of one.
            drop_last=len(images) > batch_size * procs.world_size,
            balanced=balanced,
            shard=(procs.rank, procs.world_size),
        )

    def draw(self, epochs_trained, side, mix=None, first_batch=0):
        """An epoch's draws, the run's `epochs_trained`-th: from its batch `first_batch` on, at
        `side` px, with `mix` (MixUp/CutMix) if any."""
        seed = (self.seed, epochs_trained, self.rank)
        start_epoch(self.loader, epochs_trained, first_batch)
        self.preprocess.augment.reseed(*seed)
        self.preprocess.size = side
        if mix is not None:
            mix.reseed(*seed, 1)

    def replay(self, sizes, mix=None):
        """The augmentation's (and MixUp's) draws for the batches of `sizes` images an epoch
        stopped after, drawn again, so that the rest of the epoch draws what it would have."""
        side = self.preprocess.size
        for n in sizes:
            self.preprocess.augment.sample(n)
            if mix is not None:
                mix.sample(n, side, side)

    def batches(self, device):
        """The epoch's batches on `device`, augmented (a generator to close)."""
        return on_device(self.loader, self.preprocess, device)

    def __len__(self):
        return len(self.loader)


def data_loaders(args, splits, device, procs):
    """The training stream (this process's shard of each epoch, augmented on the device) and the
    validation loader (its shard of the validation images)."""
    cuda, balanced = device.type == "cuda", args.sampler == "balanced"
    augment = DeviceAugment(Augmentation.of(args))
    preprocess = BatchPreprocess(args.mean, args.std, augment).to(device)
    stream = TrainingStream(
        splits.train, args.batch_size, preprocess, args.seed, balanced, procs, cuda
    )
    val_loader = make_loader(
        splits.val,
        2 * args.batch_size,
        shuffle=False,
        pin_memory=cuda,
        shard=(procs.rank, procs.world_size),
    )
    return stream, val_loader
