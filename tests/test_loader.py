"""The loaders: batches in an order of (seed, epoch), the global random state left alone, the
balanced sampler."""

import numpy as np
import torch

from conftest import load_splits, make_dataset
from twophase.loader import BalancedSampler, make_loader, start_epoch


def test_loader_yields_uint8_batches_in_a_seeded_order(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=5)
    splits = load_splits(root, 8, tmp_path / "c")
    loader = make_loader(splits.train, 4, shuffle=True, seed=1)

    def order(epoch):
        start_epoch(loader, epoch)
        return torch.cat([labels for _, labels in loader]).tolist()

    images, labels = next(iter(loader))
    assert (
        images.dtype == torch.uint8 and images.shape == (4, 8, 8, 3) and labels.dtype == torch.int64
    )
    assert order(0) == order(0) and order(0) != order(1)


def test_making_a_loader_iterator_leaves_the_global_random_state_alone(tmp_path):
    """Else a resumed run, which makes a new iterator, would draw other augmentations."""
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    splits = load_splits(root, 8, tmp_path / "c")
    loader = make_loader(splits.train, 2, shuffle=True, seed=1)
    torch.manual_seed(5)
    next(iter(loader))
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_the_balanced_sampler_draws_classes_evenly_the_same_on_every_process(tmp_path):
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)  # 90:9:1
    sampler = BalancedSampler(labels, seed=3)
    draws = []
    for epoch in (0, 0, 1):
        sampler.set_epoch(epoch)
        draws.append(list(sampler))
    assert draws[0] == draws[1] != draws[2] and len(draws[0]) == 100  # by (seed, epoch) alone
    per_class = np.bincount(labels[draws[0] + draws[2]], minlength=3)
    assert per_class.min() > 40  # each about a third of 200, where shuffling gives 2 of class 2
    shards = [BalancedSampler(labels, 3, rank, seed=3) for rank in range(3)]
    merged = [i for triple in zip(*(list(s) for s in shards)) for i in triple]
    # Three processes take every third draw of one sequence, padded to 102: the one-process
    # epoch's 100 draws, then two more.
    assert len(merged) == 102 and merged[:100] == list(BalancedSampler(labels, seed=3))
