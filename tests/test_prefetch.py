import threading
from contextlib import closing

import pytest
import torch

from twophase.augment import BatchPreprocess
from twophase.prefetch import on_device


def loader_of_batches(n_batches, fail_at=None):
    """A stand-in loader: uint8 NHWC batches numbered by their first pixel; raises at `fail_at`."""
    for i in range(n_batches):
        if i == fail_at:
            raise OSError(f"disk error at batch {i}")
        yield torch.full((2, 4, 4, 3), i, dtype=torch.uint8), torch.tensor([i, i])


def test_batches_reach_the_device_in_order_through_the_background_thread():
    """The thread that prepares CUDA batches, run on the CPU."""
    got = [
        labels[0].item()
        for _, labels in on_device(
            list(loader_of_batches(7)), BatchPreprocess(), torch.device("cpu"), background=True
        )
    ]
    assert got == list(range(7))


def test_an_error_while_loading_is_raised_in_the_training_thread():
    with pytest.raises(OSError, match="disk error at batch 3"):
        for _ in on_device(
            loader_of_batches(6, fail_at=3),
            BatchPreprocess(),
            torch.device("cpu"),
            background=True,
        ):
            pass


def test_stopping_early_stops_the_background_thread():
    before = threading.active_count()
    batches = on_device(
        list(loader_of_batches(50)),
        BatchPreprocess(),
        torch.device("cpu"),
        background=True,
        ahead=2,
    )
    next(batches)
    batches.close()  # what a break out of the loop, or an error in the step, does
    assert threading.active_count() == before


def test_an_error_in_the_step_stops_the_background_thread_with_the_loop():
    before = threading.active_count()
    with pytest.raises(ZeroDivisionError):
        with closing(
            on_device(
                list(loader_of_batches(50)),
                BatchPreprocess(),
                torch.device("cpu"),
                background=True,
            )
        ) as batches:
            for _ in batches:
                raise ZeroDivisionError  # the step fails; the traceback holds the generator
    assert threading.active_count() == before
